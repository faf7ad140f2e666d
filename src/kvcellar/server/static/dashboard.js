// kvcellar dashboard: polls /v1/cache/stats and /v1/requests/recent, draws them,
// and sends budget changes and tier clears. Plain DOM, no build step, no network beyond this server.
"use strict";

const params = new URLSearchParams(location.search);
const POLL_MS = Math.max(200, Number(params.get("interval")) || 1000);
const MAX_POINTS = 300;
const series = { hitRate: [], saved: [] };
let previous = null; // the last stats, to turn cumulative counters into per-interval rates
const $ = (id) => document.getElementById(id);

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("kvcellar.apiKey") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("kvcellar.apiKey", keyInput.value); poll(); });

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (keyInput.value) headers.Authorization = `Bearer ${keyInput.value}`;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

const int = (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"));
const ms = (s) => (s === null || s === undefined ? "–" : `${(1000 * s).toFixed(1)} ms`);
const pct = (x) => (x > 0 && x < 0.001 ? "<0.1%" : `${(100 * x).toFixed(1)}%`);
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}
function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}
function bar(parts) { // parts: [[fraction, className], ...]
  const outer = document.createElement("div");
  outer.className = "bar";
  for (const [fraction, className] of parts) {
    const inner = document.createElement("div");
    inner.className = className;
    inner.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    outer.appendChild(inner);
  }
  return outer;
}

function push(list, point) { list.push(point); if (list.length > MAX_POINTS) list.shift(); }

function addPoint(stats, now) {
  if (previous) {
    const hits = stats.hit_tokens - previous.hit_tokens, misses = stats.miss_tokens - previous.miss_tokens;
    push(series.hitRate, { t: now, v: hits + misses > 0 ? (100 * hits) / (hits + misses) : null });
  }
  push(series.saved, { t: now, v: stats.saved_tokens });
  previous = stats;
}

function renderCards(stats) {
  $("model").textContent = `model ${stats.model}` + (stats.scope === "tenant" ? " (your tenant's figures)" : "");
  $("queue-depth").textContent = stats.queue_depth;
  $("running").textContent = stats.running;
  $("hit-rate").textContent = pct(stats.hit_rate);
  $("saved-tokens").textContent = int(stats.saved_tokens);
  $("requests").textContent = int(stats.requests);
  $("lookups").textContent = int(stats.lookups);
  $("evictions").textContent = int(stats.evictions);
  $("entries").textContent = `${int(stats.entries)} / ${bytes(stats.bytes)}`;
  const body = $("windows-body");
  body.replaceChildren();
  for (const [name, w] of Object.entries(stats.windows)) {
    const row = body.insertRow();
    for (const text of [name, pct(w.hit_rate), int(w.saved_tokens), w.saved_tokens_per_s.toFixed(1), int(w.requests), int(w.evictions)]) cell(row, text);
  }
}

function tierRow(name) { // rows persist so a budget being typed survives the next poll
  let row = document.querySelector(`#tiers-body tr[data-tier="${name}"]`);
  if (row) return row;
  row = $("tiers-body").insertRow();
  row.dataset.tier = name;
  cell(row, name);
  cell(row, "", "occupancy");
  cell(row, "", "bytes");
  cell(row, "", "entries");
  const input = document.createElement("input");
  input.type = "text";
  input.placeholder = "e.g. 512M";
  input.className = "budget-input";
  const set = document.createElement("button");
  set.textContent = "set budget";
  set.className = "set-budget";
  set.addEventListener("click", () => admin("/v1/cache/budget", { tier: name, budget: input.value.trim() }, `budget of ${name} set`));
  const budgetCell = row.insertCell();
  budgetCell.append(input, " ", set);
  const clear = document.createElement("button");
  clear.textContent = `clear ${name}`;
  clear.className = "clear-tier";
  clear.dataset.tier = name;
  clear.addEventListener("click", () => admin("/v1/cache/clear", { tier: name }, `${name} cleared`));
  row.insertCell().appendChild(clear);
  return row;
}

function renderTiers(stats) {
  for (const [name, tier] of Object.entries(stats.tiers)) {
    const row = tierRow(name);
    const used = tier.budget_bytes > 0 ? tier.bytes / tier.budget_bytes : 0;
    row.querySelector(".occupancy").replaceChildren(bar([[used, "used"]]), ` ${pct(used)}`);
    row.querySelector(".bytes").textContent = `${bytes(tier.bytes)} / ${bytes(tier.budget_bytes)}`;
    row.querySelector(".entries").textContent = int(tier.entries);
  }
}

function renderRecent(recent) { // newest first, by completion order (r.seq)
  const body = $("recent-body");
  body.replaceChildren();
  for (const r of recent.data) {
    const row = body.insertRow();
    row.dataset.seq = r.seq;
    const prompt = r.num_prompt_tokens || 1;
    const cached = (r.num_cached_tokens || 0) / prompt, prefilled = (r.num_prefilled_tokens || 0) / prompt;
    cell(row, new Date(r.created_s * 1000).toLocaleTimeString());
    cell(row, r.endpoint + (r.stream ? " (stream)" : ""));
    cell(row, int(r.num_prompt_tokens));
    cell(row, int(r.num_cached_tokens), "cached");
    cell(row, int(r.num_prefilled_tokens), "prefilled");
    row.insertCell().appendChild(bar([[cached, "hit"], [prefilled, "miss"]]));
    cell(row, int(r.num_completion_tokens));
    cell(row, ms(r.queue_s), "queue");
    cell(row, ms(r.ttft_s), "ttft");
    cell(row, ms(r.engine_ttft_s), "engine-ttft");
    cell(row, r.finish_reason, "finish");
    const rebuilt = cell(row, r.reuse_break ? `at token ${int(r.reuse_break.position)}` : "", "reuse-break");
    if (r.reuse_break) { // where this chat turn parted from its previous turn: the rest was computed again
      rebuilt.title = `previous turn: ${JSON.stringify(r.reuse_break.previous)}\nthis turn: ${JSON.stringify(r.reuse_break.now)}`;
    }
  }
}

function renderCharts() {
  drawLineChart($("chart-hit-rate"), series.hitRate, { yMin: 0, yMax: 100, color: "#2a9d5b", format: (v) => `${Math.round(v)}%` });
  drawLineChart($("chart-saved"), series.saved, { yMin: 0, color: "#4a7fd1", format: (v) => int(v) });
}

async function admin(path, body, done) {
  try {
    await api(path, body);
    $("admin-message").textContent = done;
  } catch (error) {
    $("admin-message").textContent = `error: ${error.message}`;
  }
  poll();
}

let first = true;
async function poll() {
  try {
    const [stats, recent] = await Promise.all([api(`/v1/cache/stats${first ? "?history=true" : ""}`), api("/v1/requests/recent?limit=20")]);
    if (first && stats.history) for (const h of stats.history) addPoint(h, h.time_s);
    first = false;
    addPoint(stats, Date.now() / 1000);
    renderCards(stats);
    renderTiers(stats);
    renderRecent(recent);
    renderCharts();
    $("status").textContent = "live";
    $("status").className = "status ok";
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "status error";
  }
}

$("clear-all").addEventListener("click", () => admin("/v1/cache/clear", {}, "all tiers cleared"));
poll();
setInterval(poll, POLL_MS);
