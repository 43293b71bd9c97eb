"""The web page in a real headless browser (Debian's chromium through chromedriver and
Selenium; nothing downloaded at run time), against a real server: load the page,
search a user and see their 10 recommendations with titles, click one for "more like
this", submit a new user from features and a rating, and check that the plots draw.
On failure a screenshot is saved (its path is in the failure message).

Without chromium the tests skip visibly; under CI (``CI`` set, as `.ci/run` runs, which
installs chromium) they fail instead, so that a broken install cannot pass unseen."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.service.server import ServerConfig, TandemServer
from engine.serving.engine import EngineConfig
from index_builder import build_bundle

SCREENSHOTS = Path(os.environ.get("TANDEM_SCREENSHOTS", "artifacts/screenshots"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ENGINE_CONFIG = EngineConfig(segment_key="occupation")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(titled_models, tmp_path_factory):
    ds, cf, towers = titled_models
    root = tmp_path_factory.mktemp("web-bundles")
    build_bundle(ds, cf, towers, root, log=lambda line: None)
    report = root / "pipeline.json"
    report.write_text(
        json.dumps(
            {
                "data": "synthetic",
                "splits": ["random"],
                "k": 10,
                "n_candidates": 500,
                "summary": {
                    "pipeline": {"recall@10": 0.3, "ndcg@10": 0.2, "candidate_recall": {"cf": 0.7, "merged": 0.9}},
                    "ease": {"recall@10": 0.25, "ndcg@10": 0.18},
                },
            }
        )
    )
    config = ServerConfig(port=0, http_port=0, watch_interval=0, eval_report=str(report))
    server = TandemServer(root, config, ENGINE_CONFIG).start()
    yield server, ds
    server.stop(0)


@pytest.fixture
def page(browser, site, request):
    """The page loaded and ready; a screenshot is saved if the test fails."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site[0].http.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    yield browser
    failed = getattr(request.node, "failed_call", False)
    if failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{request.node.name}.png"
        browser.save_screenshot(str(path))
        print(f"screenshot of the failure: {path}")


def wait_for(driver, condition, seconds: float = 30):
    """Until ``condition(driver)`` holds; an element replaced while it was read (the page
    redraws a table or a plot whole) is read again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, ignored_exceptions=[StaleElementReferenceException]).until(condition)


def rows(driver, selector: str) -> list:
    return driver.find_elements("css selector", selector)


def error_text(driver) -> str:
    return driver.find_element("id", "error").text


def test_search_a_user_then_more_like_this(page):
    page.find_element("id", "user-id").send_keys("u1")
    page.find_element("id", "user-search").click()
    wait_for(page, lambda d: len(rows(d, "#user-recs tr.rec")) == 10)
    titles = [row.find_element("css selector", "a.item").text for row in rows(page, "#user-recs tr.rec")]
    assert all(t.startswith("Film number ") for t in titles) and len(set(titles)) == 10, titles
    assert rows(page, "#user-recs tr.rec .badge"), "each recommendation names its sources"
    assert len(rows(page, "#user-history tbody tr")) > 0 and "user u1:" in page.find_element("id", "user-summary").text
    first = rows(page, "#user-recs tr.rec a.item")[0]
    chosen = first.text
    first.click()
    wait_for(page, lambda d: len(rows(d, "#similar-results tr.similar")) == 10)
    assert chosen in page.find_element("id", "similar-of").text
    similar = [row.find_element("css selector", "a.item").text for row in rows(page, "#similar-results tr.similar")]
    assert chosen not in similar and all(t.startswith("Film number ") for t in similar)
    assert not error_text(page)


def test_a_new_user_from_features_and_a_rating(page, site):
    from selenium.webdriver.support.ui import Select

    ds = site[1]
    page.find_element("id", "feature-age").send_keys("31")
    Select(page.find_element("id", "feature-occupation")).select_by_index(1)
    page.find_element("id", "rating-query").send_keys("Film number 7 [i7]")
    page.find_element("id", "rating-add").click()
    wait_for(page, lambda d: len(rows(d, "#rating-list li")) == 1)
    page.find_element("id", "new-user-submit").click()
    wait_for(page, lambda d: len(rows(d, "#new-user-results tr.rec")) == 10)
    titles = [row.find_element("css selector", "a.item").text for row in rows(page, "#new-user-results tr.rec")]
    assert "Film number 7" not in titles  # the rated item is not recommended back
    assert "fold-in" in page.find_element("id", "new-user-summary").text
    assert not error_text(page)
    assert ds.n_items > 10


def test_the_plots_and_the_bundle_render(page, site):
    ds = site[1]
    curves = rows(page, "#curves svg.plot")
    assert len(curves) >= 2 and all(c.find_elements("css selector", "polyline.series") for c in curves)
    assert len(rows(page, "#projection svg circle.point")) == ds.n_items
    assert len(rows(page, "#projection .legend div")) >= 2  # one colour per genre
    assert len(rows(page, "#evaluation svg rect.bar")) == 2 + 2 + 2  # recall per source, Recall, NDCG
    indexes = rows(page, "#bundle-indexes tbody tr")
    assert {r.find_elements("css selector", "td")[0].text for r in indexes} == {"cf_l2", "cf_ip", "towers_ip"}
    assert "cf" in page.find_element("id", "bundle-models").text
    page.find_element("id", "projection-model").send_keys("CF")
    wait_for(page, lambda d: d.find_element("css selector", "#projection svg .title").text == "cf item vectors")
    assert not error_text(page)
