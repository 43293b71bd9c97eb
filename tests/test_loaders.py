"""Loaders on small hand-written files in each format, and their errors."""

from pathlib import Path

import numpy as np
import pytest
from conftest import write

from engine import data
from engine.errors import DataFormatError

GENRES_19 = "|".join(["0"] * 19)


def ml100k_dir(root: Path, u_data: str | None = None) -> Path:
    d = root / "ml-100k"
    write(d / "u.data", u_data or "1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250951\n")
    action = "|".join(["0", "1"] + ["0"] * 17)
    write(
        d / "u.item",
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{action}\n"
        f"20|Café (1996)|||http://y|{GENRES_19}\n"
        f"30|Never Rated (1990)|01-Jan-1990||http://z|{GENRES_19}\n",
        encoding="latin-1",
    )
    write(d / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n3|33|F|writer|E2A4\n")
    return d


def test_ml100k_format(tmp_path):
    ds = data.load(ml100k_dir(tmp_path))
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (3, 3, 3)  # unrated item and user kept
    assert list(ds.item_titles) == ["Toy Story (1995)", "Café (1996)", "Never Rated (1990)"]
    genres = ds.item_features.columns["genres"]
    assert genres.shape == (3, 19) and genres[0, 1] == 1 and genres.sum() == 1
    assert ds.item_features.labels["genres"][1] == "Action"
    np.testing.assert_array_equal(ds.item_features.columns["year"], [1995, 1996, 1990])  # 1996 from title
    assert list(ds.user_features.columns["occupation"]) == ["technician", "other", "writer"]
    assert ds.user_features.columns["age"][1] == 53
    assert ds.user_items()[ds.users.index("1"), ds.items.index("20")] == 4.0


@pytest.mark.parametrize(
    "u_data, line, problem",
    [
        ("1\t10\t5\t881250949\n2\t10\tfive\t881250950\n", 2, "should be a number"),
        ("1\t10\t5\t881250949\n\n1\t20\t4\n", 3, "expected 4 fields"),
        ("1\t10\t5\t881250949\n1\t\t4\t1\n", 2, "'item' is empty"),
        ("1\t10\t5\t88125x\n", 1, "should be an integer"),
        ("1\t10\tnan\t1\n", 1, "not finite"),
    ],
)
def test_malformed_ratings_name_file_and_line(tmp_path, u_data, line, problem):
    d = ml100k_dir(tmp_path, u_data)
    with pytest.raises(DataFormatError, match=problem) as info:
        data.load(d)
    assert info.value.line == line and info.value.path.endswith("u.data")
    assert f"u.data, line {line}" in str(info.value)


def test_malformed_item_and_user_files_name_file_and_line(tmp_path):
    d = ml100k_dir(tmp_path)
    write(d / "u.item", f"10|Toy Story (1995)|01-Jan-1995||http://x|{GENRES_19}\n20|Broken|x\n")
    with pytest.raises(DataFormatError, match=r"u.item, line 2: expected 24 fields"):
        data.load(d)
    d = ml100k_dir(tmp_path)
    write(d / "u.user", "1|24|M|technician|85711\n2|old|F|other|94043\n")
    with pytest.raises(DataFormatError, match=r"u.user, line 2: field 'age' should be a number"):
        data.load(d)


def test_ml1m_format(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(
        d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n",
        encoding="latin-1",
    )
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    ds = data.load(d)
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (2, 2, 3)
    assert list(ds.items.ids) == ["661", "1193"]
    assert ds.item_features.labels["genres"] == ["Animation", "Children's", "Drama", "Musical"]
    np.testing.assert_array_equal(ds.item_features.columns["genres"][0], [1, 1, 0, 1])
    assert list(ds.user_features.columns["occupation"]) == ["K-12 student", "self-employed"]
    np.testing.assert_array_equal(ds.item_features.columns["year"], [1996, 1975])
    write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(DataFormatError, match=r"ratings.dat, line 2: expected 4 fields"):
        data.load(d)


def test_ratings_csv_family_with_tags(tmp_path):
    d = tmp_path / "ml-latest-small"
    write(
        d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n6,1,0.5,964982224\n"
    )
    write(
        d / "movies.csv",
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
        '3,"Grumpier Old Men, The (1995)",Comedy|Romance\n'
        "5,Untitled,(no genres listed)\n",
    )
    write(
        d / "tags.csv", "userId,movieId,tag,timestamp\n2,1,Pixar,1445714994\n2,1,pixar,1445714996\n7,3,old,1169687325\n"
    )
    ds = data.load(d)
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (2, 3, 3)
    assert ds.title(ds.items.index("3")) == "Grumpier Old Men, The (1995)"
    assert ds.describe()["rating_values"] == [0.5, 4.0, 4.5]
    # Tags are multi-valued labels, as genres are.
    assert ds.item_features.labels["tags"] == ["old", "pixar"]
    assert ds.item_features.columns["tags"].tolist() == [[0, 1], [1, 0], [0, 0]]
    assert ds.item_features.columns["genres"][2].sum() == 0
    assert np.isnan(ds.item_features.columns["year"][2])
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,high,964981247\n")
    with pytest.raises(DataFormatError, match=r"ratings.csv, line 3: field 'rating' should be a number"):
        data.load(d)
    write(d / "ratings.csv", "user,movie,rating,timestamp\n1,1,4.0,964982703\n")
    with pytest.raises(DataFormatError, match=r"ratings.csv, line 1: expected header"):
        data.load(d)


def test_generic_csv_with_column_mapping(tmp_path):
    p = write(
        tmp_path / "events.csv",
        "customer,sku,stars,when,extra\nc1,s1,5,2024-01-01T00:00:00,x\nc2,s1,2,2024-01-02T00:00:00,y\n",
    )
    ds = data.load_table(p, columns={"user": "customer", "item": "sku", "rating": "stars", "timestamp": "when"})
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (2, 1, 2)
    assert ds.timestamps[0] == 1704067200  # 2024-01-01 UTC in seconds
    implicit = data.load_table(p, columns={"user": "customer", "item": "sku"})
    np.testing.assert_array_equal(implicit.ratings, [1, 1])
    with pytest.raises(DataFormatError, match="'nope' .* is not in the header"):
        data.load_table(p, columns={"user": "nope", "item": "sku"})
    bad = write(tmp_path / "bad.csv", "user,item,rating\nu1,i1,5\nu2,i2,\nu3,i3,1\n")
    with pytest.raises(DataFormatError, match=r"bad.csv, line 3: column 'rating' \(rating\) should be a finite"):
        data.load(bad)
    missing = write(tmp_path / "noitem.csv", "user,thing\nu1,i1\n")
    with pytest.raises(DataFormatError, match="no 'item' column"):
        data.load(missing)


def test_generic_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b", "a"], "item_id": [1, 2, 2], "rating": [1.0, 2.0, 3.0]}), p)
    ds = data.load(p)
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (2, 2, 3)
    pq.write_table(pa.table({"user_id": ["a", None], "item_id": [1, 2]}), p)
    with pytest.raises(DataFormatError, match="data row 2: column 'user' has a missing value"):
        data.load(p)


def test_auto_detect_and_missing_paths(tmp_path):
    assert data.detect_flavour(ml100k_dir(tmp_path)) == "ml-100k"
    with pytest.raises(DataFormatError, match="not a MovieLens directory"):
        data.load(tmp_path / "ml-100k" / ".." / "..")
    with pytest.raises(DataFormatError, match="no such file"):
        data.load(tmp_path / "missing")


def test_real_ml100k(ml100k_path):
    ds = data.load(ml100k_path)
    assert (ds.n_users, ds.n_items, ds.n_ratings) == (943, 1682, 100_000)
    assert ds.title(ds.items.index("50")) == "Star Wars (1977)"
    assert ds.item_features.columns["genres"].shape == (1682, 19)
    assert set(np.unique(ds.ratings)) == {1, 2, 3, 4, 5}


@pytest.mark.parametrize(
    "content, line", [(b"user,item,rating\n1,caf\xe9,4\n2,b,3\n", 2), (b"us\xe9r,item,rating\n1,a,4\n", 1)]
)
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, content, line):
    p = tmp_path / "latin.csv"
    p.write_bytes(content)
    with pytest.raises(DataFormatError, match=rf"latin.csv, line {line}: not valid utf-8 text \(byte 0xe9"):
        data.load(p)
