// The live dashboard: GET /views for the catalogue, GET /views/{view} for the data, redrawn
// on a timer. Plain JavaScript over the vendored uPlot; no build step, nothing from a CDN.
"use strict";

const BUCKET_MS = { minute: 60000, hour: 3600000, day: 86400000 };
const KEY_STORAGE = "lambdalake.apiKey";
const MAX_SERIES = 8;
const COLORS = ["#3465a4", "#cc5500", "#4e9a06", "#a40068", "#75507b", "#c4a000", "#06989a",
                "#555753"];
const $ = (id) => document.getElementById(id);

const state = { views: [], charts: new Map(), cutSeconds: null, timer: null, busy: false };

class KeyNeeded extends Error {}

async function api(path, params = {}) {
  const url = new URL(path, document.baseURI);
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  const key = sessionStorage.getItem(KEY_STORAGE);
  const reply = await fetch(url, { headers: key ? { "X-API-Key": key } : {} });
  if (reply.status === 401 || reply.status === 403) {
    askForKey(reply.status === 403 ? "That key lacks the query scope." : "");
    throw new KeyNeeded();
  }
  const body = await reply.json();
  if (!reply.ok) {
    const problems = (body.errors || []).map((p) => `${p.field}: ${p.error}`).join("; ");
    throw new Error(problems || `HTTP ${reply.status}`);
  }
  return body;
}

function askForKey(reason) {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  dialog.querySelector("p").textContent =
    `${reason} This API needs a key with the query scope.`.trim();
  dialog.showModal();
}

$("key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value);
  start();
});

function currentView() {
  return state.views.find((v) => v.name === $("view").value);
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

function showView() {
  const view = currentView();
  $("split").replaceChildren(option("", "nothing"),
    ...view.dimensions.map((d) => option(d, d)));
  $("filters").replaceChildren(...view.dimensions.map((d) => {
    const input = document.createElement("input");
    input.name = d;
    input.placeholder = `${d} =`;
    input.setAttribute("aria-label", `filter ${d}`);
    return input;
  }));
  for (const chart of state.charts.values()) chart.plot.destroy();
  state.charts.clear();
  $("charts").replaceChildren();
}

function timeRange(view) {
  const bucketMs = BUCKET_MS[$("bucket").value || view.bucket];
  const end = (Math.floor(Date.now() / bucketMs) + 1) * bucketMs;
  const buckets = Math.max(1, Math.ceil(Number($("range").value) / bucketMs));
  return { from: end - buckets * bucketMs, to: end };
}

function filters() {
  const chosen = {};
  for (const input of $("filters").querySelectorAll("input")) {
    if (input.value.trim()) chosen[input.name] = input.value.trim();
  }
  return chosen;
}

// A metric a top-N can be ordered by: its answer is one number.
function rankable(kind) {
  return kind !== "quantiles";
}

async function refresh() {
  const view = currentView();
  const range = timeRange(view);
  const common = { from: range.from, to: range.to, ...filters() };
  const split = $("split").value;
  const metrics = Object.entries(view.metrics);
  const orderBy = (metrics.find(([, kind]) => rankable(kind)) || [])[0];
  const series = api(`views/${encodeURIComponent(view.name)}`, {
    ...common, group_by: split, ...($("bucket").value ? { bucket: $("bucket").value } : {}),
  });
  const topParams = { ...common, bucket: "total", limit: $("top").value || 10 };
  if (orderBy) topParams.order_by = orderBy;
  const top = api(`views/${encodeURIComponent(view.name)}`, topParams);
  const [seriesAnswer, topAnswer] = await Promise.all([series, top]);
  showFreshness(seriesAnswer.freshness);
  drawCharts(view, seriesAnswer.rows, split, range);
  drawTop(view, topAnswer.rows, orderBy);
  $("updated").textContent = new Date().toLocaleTimeString();
  $("status").textContent = "";
}

function showFreshness(fresh) {
  $("batch-version").textContent = fresh.batch_version || "none yet";
  $("cut").textContent = fresh.cut ? new Date(fresh.cut).toISOString() : "none yet";
  $("lag").textContent = fresh.realtime_lag_ms === null ? "unknown"
    : `${(fresh.realtime_lag_ms / 1000).toFixed(1)} s${fresh.stale ? " (stale)" : ""}`;
  $("lag").classList.toggle("stale", fresh.stale);
  state.cutSeconds = fresh.cut ? Date.parse(fresh.cut) / 1000 : null;
}

// One chart per metric: a line per group (the largest MAX_SERIES), or, for quantiles without
// a split, a line per rank with the bands between them filled.
function drawCharts(view, rows, split, range) {
  const times = [...new Set(rows.map((r) => Date.parse(r.bucket) / 1000))].sort((a, b) => a - b);
  const position = new Map(times.map((t, i) => [t, i]));
  for (const [metric, kind] of Object.entries(view.metrics)) {
    const layout = kind === "quantiles" && !split
      ? quantileSeries(rows, metric) : groupSeries(rows, metric, split);
    const data = [times, ...layout.series.map(() => times.map(() => null))];
    for (const row of rows) {
      const at = position.get(Date.parse(row.bucket) / 1000);
      layout.series.forEach((s, i) => {
        if (s.takes(row)) data[i + 1][at] = s.value(row);
      });
    }
    plot(metric, kind, layout, data, range);
  }
}

function groupName(row, split) {
  return split ? String(row[split]) : "all";
}

function numeric(value) {
  return typeof value === "number" ? value : null;
}

function groupSeries(rows, metric, split) {
  const weight = new Map();
  for (const row of rows) {
    const name = groupName(row, split);
    weight.set(name, (weight.get(name) || 0) + (numeric(row[metric]) ?? 1));
  }
  const groups = [...weight.entries()].sort((a, b) => b[1] - a[1]).slice(0, MAX_SERIES);
  const median = (row) => (row[metric] ? Object.values(row[metric])[0] : null);
  return {
    bands: [],
    series: groups.map(([name]) => ({
      label: name,
      takes: (row) => groupName(row, split) === name,
      value: (row) => numeric(row[metric]) ?? median(row),
    })),
  };
}

function quantileSeries(rows, metric) {
  const ranks = [...new Set(rows.flatMap((r) => Object.keys(r[metric] || {})))]
    .sort((a, b) => Number(a) - Number(b));
  const series = ranks.map((rank) => ({
    label: `p${Math.round(Number(rank) * 1000) / 10}`,
    takes: (row) => row[metric] !== null,
    value: (row) => row[metric][rank],
  }));
  // uPlot fills between series i+1 (higher) and i (lower); series 0 is x.
  const bands = ranks.slice(1).map((_, i) => ({ series: [i + 2, i + 1], fill: "rgba(52,101,164,0.15)" }));
  return { bands, series };
}

function cutMarker() {
  return {
    hooks: {
      draw: (u) => {
        if (state.cutSeconds === null) return;
        const x = u.valToPos(state.cutSeconds, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
        const ctx = u.ctx;
        ctx.save();
        ctx.strokeStyle = "#b3261e";
        ctx.setLineDash([6, 4]);
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
        ctx.fillStyle = "#b3261e";
        ctx.font = `${12 * devicePixelRatio}px system-ui`;
        ctx.fillText("cut: batch ◀ ▶ real time", x + 4, u.bbox.top + 14 * devicePixelRatio);
        ctx.restore();
      },
    },
  };
}

function plot(metric, kind, layout, data, range) {
  const labels = layout.series.map((s) => s.label).join("\u0000");
  let chart = state.charts.get(metric);
  if (chart && chart.labels !== labels) {
    chart.plot.destroy();
    chart.element.remove();
    chart = undefined;
  }
  if (!chart) {
    const element = document.createElement("figure");
    element.className = "chart";
    element.dataset.metric = metric;
    const title = document.createElement("h2");
    title.innerHTML = `${metric} <span class="kind">${kind}</span>`;
    element.append(title);
    $("charts").append(element);
    const options = {
      width: Math.max(480, element.clientWidth),
      height: 260,
      plugins: [cutMarker()],
      scales: { x: { time: true, range: () => [range.from / 1000, range.to / 1000] } },
      series: [{}, ...layout.series.map((s, i) => ({
        label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false,
        points: { size: 4 },
      }))],
      bands: layout.bands,
    };
    chart = { element, labels, plot: new uPlot(options, data, element) };
    state.charts.set(metric, chart);
  } else {
    chart.plot.setScale("x", { min: range.from / 1000, max: range.to / 1000 });
    chart.plot.setData(data);
  }
  const values = data.slice(1).flat().filter((v) => v !== null);
  chart.element.dataset.points = String(values.length);
  chart.element.dataset.total = String(values.reduce((a, b) => a + b, 0));
}

function formatted(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return value.toLocaleString();
  if (typeof value === "object") {
    return Object.entries(value).map(([rank, v]) => `p${Number(rank) * 100} ${formatted(v)}`)
      .join(" · ");
  }
  return String(value);
}

function drawTop(view, rows, orderBy) {
  $("top-n").textContent = rows.length;
  $("top-metric").textContent = orderBy || "—";
  const columns = [...view.dimensions, ...Object.keys(view.metrics)];
  const head = document.createElement("tr");
  head.append(...columns.map((c) => Object.assign(document.createElement("th"), { textContent: c })));
  $("top-table").tHead.replaceChildren(head);
  $("top-table").tBodies[0].replaceChildren(...rows.map((row) => {
    const line = document.createElement("tr");
    line.append(...columns.map((c) => Object.assign(document.createElement("td"), {
      textContent: formatted(row[c]),
      className: c in view.metrics ? "number" : "",
    })));
    return line;
  }));
}

function schedule() {
  clearTimeout(state.timer);
  const every = Number($("refresh").value);
  if (every) state.timer = setTimeout(tick, every);
}

async function tick() {
  if (state.busy) return;
  state.busy = true;
  try {
    await refresh();
  } catch (error) {
    if (!(error instanceof KeyNeeded)) $("status").textContent = error.message;
  } finally {
    state.busy = false;
    schedule();
  }
}

async function start() {
  try {
    state.views = (await api("views")).views;
  } catch (error) {
    if (!(error instanceof KeyNeeded)) {
      $("status").textContent = `${error.message}; retrying`;
      setTimeout(start, 2000);
    }
    return;
  }
  const chosen = new URLSearchParams(location.search).get("view");
  $("view").replaceChildren(...state.views.map((v) => option(v.name, v.name)));
  if (chosen && state.views.some((v) => v.name === chosen)) $("view").value = chosen;
  showView();
  tick();
}

$("view").addEventListener("change", () => { showView(); tick(); });
$("controls").addEventListener("change", (event) => {
  if (event.target.id !== "view") tick();
});
$("controls").addEventListener("submit", (event) => event.preventDefault());
start();
