// The page: reads the HTTP/JSON API under /v1 (engine/service/http.py) and draws what it
// returns. Titles and ids are data: they are always set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { schema: null, ratings: new Map() };

// ------------------------------------------------------------ the API
function headers() {
  const token = $("token").value.trim();
  return { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) };
}

async function api(path, body) {
  const response = await fetch(path, body === undefined
    ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").hidden = !error;
}

async function guarded(work) {
  try {
    showError(null);
    await work();
  } catch (error) {
    showError(error);
  }
}

// ------------------------------------------------------------ tables
function cell(row, content, className) {
  const td = row.insertCell();
  if (className) td.className = className;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  return td;
}

function itemLink(itemId, title) {
  const link = document.createElement("a");
  link.className = "item";
  link.textContent = title;
  link.title = `item ${itemId}: more like this`;
  link.dataset.itemId = itemId;
  link.addEventListener("click", () => guarded(() => showSimilar(itemId, title)));
  return link;
}

function badges(names) {
  const span = document.createElement("span");
  for (const name of names) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = name;
    span.appendChild(badge);
  }
  return span;
}

// The reply's items as rows of class ``className`` (rank, title, score), in place of the
// table's rows; returns [row, item] pairs for more cells.
function rankedRows(table, reply, className) {
  const body = table.tBodies[0];
  body.replaceChildren();
  return reply.items.map((item, n) => {
    const row = body.insertRow();
    row.className = className;
    cell(row, String(n + 1), "num");
    cell(row, itemLink(item.item_id, item.title));
    cell(row, item.score.toFixed(4), "num");
    return [row, item];
  });
}

function fillRecommendations(table, reply) {
  for (const [row, item] of rankedRows(table, reply, "rec")) {
    cell(row, badges(item.sources));
    const parts = (item.explanation || []).slice(0, 3)
      .map((part) => `${part.feature} ${part.contribution >= 0 ? "+" : ""}${part.contribution.toFixed(2)}`);
    cell(row, parts.join(", "), "muted");
  }
}

function servedLine(reply) {
  const counts = Object.entries(reply.candidates).map(([name, n]) => `${name} ${n}`).join(", ");
  return `served by ${reply.served_by || "?"}; candidates: ${counts || "none"}; version ${reply.version}`;
}

// ------------------------------------------------------------ a user
async function showUser(userId) {
  const explain = $("user-explain").checked;
  const [history, reply] = await Promise.all([
    api(`/v1/history?user_id=${encodeURIComponent(userId)}&limit=50`).catch(() => null),
    api("/v1/recommend", { user_id: userId, k: 10, explain }),
  ]);
  const body = $("user-history").tBodies[0];
  body.replaceChildren();
  if (history) {
    for (const item of history.items) {
      const row = body.insertRow();
      cell(row, itemLink(item.item_id, item.title));
      cell(row, String(item.value), "num");
    }
  }
  const features = history ? Object.entries(history.features).map(([k, v]) => `${k}: ${v}`).join(", ") : "";
  $("user-summary").textContent = history
    ? `user ${userId}: ${history.n_items} items${features ? "; " + features : ""}. ${servedLine(reply)}`
    : `user ${userId} is not known: ${servedLine(reply)}`;
  fillRecommendations($("user-recs"), reply);
}

// ------------------------------------------------------------ more like this
async function showSimilar(itemId, title) {
  const reply = await api(`/v1/similar?item_id=${encodeURIComponent(itemId)}&k=10`);
  $("similar-of").textContent = `items nearest ${title || itemId} (${reply.items[0] ? reply.items[0].sources[0] : ""})`;
  rankedRows($("similar-results"), reply, "similar");
  $("similar-panel").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

// Suggestions of items for an <input list=...>: the value picked is "title [id]".
function itemPicker(input, datalist) {
  let timer = null;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    const query = input.value.trim();
    if (query.length < 2 || /\[[^\]]+\]$/.test(query)) return;
    timer = setTimeout(async () => {
      const found = await api(`/v1/items/search?query=${encodeURIComponent(query)}&limit=15`).catch(() => []);
      datalist.replaceChildren(...found.map((item) => {
        const option = document.createElement("option");
        option.value = `${item.title} [${item.item_id}]`;
        return option;
      }));
    }, 150);
  });
}

// The item an input names: "title [id]", else the first search hit.
async function pickedItem(input) {
  const value = input.value.trim();
  const match = value.match(/^(.*) \[([^\]]+)\]$/);
  if (match) return { item_id: match[2], title: match[1] };
  const found = await api(`/v1/items/search?query=${encodeURIComponent(value)}&limit=1`);
  if (!found.length) throw new Error(`no item matches "${value}"`);
  return found[0];
}

// ------------------------------------------------------------ a new user
function buildNewUserForm(schema) {
  const fieldset = $("new-user-features");
  for (const feature of schema.user_features) {
    if (feature.kind === "labels") continue;
    const label = document.createElement("label");
    label.textContent = `${feature.name} `;
    let input;
    if (feature.kind === "choice") {
      input = document.createElement("select");
      input.appendChild(new Option("—", ""));
      for (const choice of feature.choices) input.appendChild(new Option(choice, choice));
    } else {
      input = document.createElement("input");
      input.type = feature.kind === "number" ? "number" : "text";
      input.step = "any";
    }
    input.id = `feature-${feature.name}`;
    input.dataset.kind = feature.kind;
    input.dataset.name = feature.name;
    label.appendChild(input);
    fieldset.appendChild(label);
  }
  if (!schema.user_features.length) fieldset.appendChild(document.createTextNode("this bundle has no user features"));
}

function renderRatings() {
  const list = $("rating-list");
  list.replaceChildren();
  for (const [itemId, { title, value }] of state.ratings) {
    const entry = document.createElement("li");
    entry.textContent = `${title}: ${value} `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.addEventListener("click", () => { state.ratings.delete(itemId); renderRatings(); });
    entry.appendChild(remove);
    list.appendChild(entry);
  }
}

async function recommendNewUser() {
  const features = {};
  for (const input of $("new-user-features").querySelectorAll("input, select")) {
    if (input.value === "") continue;
    features[input.dataset.name] = input.dataset.kind === "number" ? Number(input.value) : input.value;
  }
  const ratings = Object.fromEntries([...state.ratings].map(([itemId, r]) => [itemId, r.value]));
  const reply = await api("/v1/recommend", { user_features: features, ratings, k: 10, explain: true });
  $("new-user-summary").textContent = servedLine(reply);
  fillRecommendations($("new-user-results"), reply);
}

// ------------------------------------------------------------ the bundle
async function showBundle() {
  const target = $("bundle-info");
  let info;
  try {
    info = await api("/v1/info");
  } catch (error) {
    target.textContent = `${error.message} (the server's info needs its token: enter it above)`;
    return;
  }
  const models = await api("/v1/models");
  target.className = "";
  target.replaceChildren();
  const summary = document.createElement("p");
  summary.textContent = `version ${info.version}, built ${info.created_at} from ${info.dataset}: ` +
    `${info.n_items} items, ${info.n_users} users; ranking: ${info.ranking}` +
    (info.ranking === "ranker" ? ` (${info.ranker_trees} trees over the best ${info.ranker_depth} candidates)` : "") +
    `; sources: ${info.sources.join(", ")}; live events: ${info.feedback_events} of ${info.feedback_users} users.`;
  target.appendChild(summary);
  const table = document.createElement("table");
  table.id = "bundle-indexes";
  table.createTHead().innerHTML =
    "<tr><th>index</th><th>factory</th><th>metric</th><th>vectors</th><th>dim</th><th>measured recall</th><th>search parameters</th></tr>";
  const body = table.createTBody();
  for (const index of info.indexes) {
    const row = body.insertRow();
    cell(row, index.name);
    cell(row, index.factory);
    cell(row, index.metric);
    cell(row, String(index.n_vectors), "num");
    cell(row, String(index.dim), "num");
    cell(row, `${index.recall_at_k.toFixed(4)} @${index.k}`, "num");
    cell(row, Object.entries(index.search_params).map(([k, v]) => `${k}=${v}`).join(", ") || "exact");
  }
  target.appendChild(table);
  const parameters = document.createElement("table");
  parameters.id = "bundle-models";
  parameters.createTHead().innerHTML = "<tr><th>model</th><th>parameters</th><th>measured</th></tr>";
  const rows = parameters.createTBody();
  for (const [name, model] of Object.entries(models)) {
    const row = rows.insertRow();
    cell(row, name);
    cell(row, Object.entries(model.config || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", "), "muted");
    cell(row, Object.entries(model.metrics || {})
      .filter(([, v]) => typeof v !== "object")
      .map(([k, v]) => `${k}=${typeof v === "number" ? format(v) : v}`).join(", "), "muted");
  }
  target.appendChild(parameters);
}

// ------------------------------------------------------------ plots
async function showCurves() {
  const curves = await api("/v1/plots/curves");
  const target = $("curves");
  target.replaceChildren();
  for (const [model, records] of Object.entries(curves)) {
    const keys = Object.keys(records[0]).filter((key) => key !== "epoch");
    for (const key of keys) {  // one chart per measure: their scales differ
      target.appendChild(lineChart(`${model}: ${key}`, [{ name: key, points: records.map((r) => [r.epoch, r[key]]) }],
        model === "ranker" ? "tree" : "epoch"));
    }
  }
  if (!target.children.length) target.textContent = "no learning curves in this bundle (trained before they were recorded)";
}

async function showEvaluation() {
  const report = await api("/v1/plots/evaluation");
  const target = $("evaluation");
  target.replaceChildren();
  if (!report.present) {
    target.textContent = "no evaluation report: run make eval-pipeline (the page reads server.eval_report)";
    return;
  }
  const recall = Object.entries(report.candidate_recall).map(([label, value]) => ({ label, value }));
  target.appendChild(barChart(`candidate recall@${report.n_candidates} per source`, recall));
  const systems = Object.entries(report.systems).filter(([, s]) => s.recall !== null);
  target.appendChild(barChart(`Recall@${report.k}`, systems.map(([label, s]) => ({ label, value: s.recall }))));
  target.appendChild(barChart(`NDCG@${report.k}`, systems.map(([label, s]) => ({ label, value: s.ndcg }))));
  const note = document.createElement("p");
  note.className = "muted";
  note.textContent = `${report.data}, splits ${report.splits.join(", ")} (${report.path})`;
  target.appendChild(note);
}

async function showProjection() {
  const model = $("projection-model").value;
  const found = await api(`/v1/plots/projection?model=${model}`);
  const variance = found.explained_variance.map((v) => `${(100 * v).toFixed(1)}%`).join(" + ");
  const colour = found.colour_by ? `, coloured by ${found.colour_by} (first label)` : "";
  const caption = document.createElement("p");
  caption.className = "muted";
  caption.textContent = `${found.points.length} of ${found.n_items} items; the two axes explain ${variance} ` +
    `of the variance${colour}; hover a point for its title.`;
  $("projection").replaceChildren(scatterPlot(`${model} item vectors`, found.points), caption);
}

// ------------------------------------------------------------ start
async function start() {
  $("token").value = sessionStorage.getItem("tandem-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("tandem-token", $("token").value.trim());
    guarded(showBundle);
  });
  $("user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(() => showUser($("user-id").value.trim()));
  });
  $("similar-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => {
      const item = await pickedItem($("similar-query"));
      await showSimilar(item.item_id, item.title);
    });
  });
  $("rating-add").addEventListener("click", () => guarded(async () => {
    const item = await pickedItem($("rating-query"));
    state.ratings.set(item.item_id, { title: item.title, value: Number($("rating-value").value) });
    $("rating-query").value = "";
    renderRatings();
  }));
  $("new-user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(recommendNewUser);
  });
  $("projection-model").addEventListener("change", () => guarded(showProjection));
  itemPicker($("similar-query"), $("similar-choices"));
  itemPicker($("rating-query"), $("rating-choices"));

  await guarded(async () => {
    state.schema = await api("/v1/schema");
    $("bundle-line").textContent =
      `bundle ${state.schema.version}: ${state.schema.n_items} items, ${state.schema.n_users} users, ${state.schema.ranking}`;
    buildNewUserForm(state.schema);
  });
  await Promise.all([guarded(showBundle), guarded(showCurves), guarded(showEvaluation), guarded(showProjection)]);
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
