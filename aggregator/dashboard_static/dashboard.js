// fedmq dashboard: polls api/state every second and redraws. The charts are hand-drawn
// SVG (a few lines each) so the page needs no chart library, CDN or download.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#d97706", "#16a34a", "#9333ea"];
let rounds = []; // every closed round, as api/state's history gives them

const $ = (id) => document.getElementById(id);

function text(id, value) {
  $(id).textContent = value;
}

function fmtAge(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// A tick spacing of 1, 2, 2.5 or 5 times a power of ten, giving about `count` ticks.
function niceStep(span, count) {
  const raw = span / count, magnitude = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((step) => step >= raw);
}

// Round numbers on x, each series a line with dots; y from 0 (or below, if the data goes
// there) to `top` if given, else to a round number above the data.
function drawChart(svg, legend, series, { format, top }) {
  const W = 480, H = 220, L = 56, R = 12, T = 10, B = 26;
  svg.replaceChildren();
  legend.replaceChildren();
  const points = series.map((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  const all = points.flat();
  svg.dataset.points = String(points[0].length);
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent =
      "waiting for the first round";
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(x0 + 1, ...xs);
  const low = Math.min(0, ...ys), high = Math.max(top ?? -Infinity, ...ys);
  const step = niceStep(high > low ? high - low : 1, 4);
  const y0 = Math.floor(low / step) * step, y1 = Math.max(y0 + step, Math.ceil(high / step) * step);
  for (let y = y0; y <= y1 + step / 2; y += step) {
    el("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" }, svg);
    el("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, svg).textContent = format(y);
  }
  function sy(y) { return H - B - ((y - y0) / (y1 - y0)) * (H - T - B); }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const xStep = Math.max(1, Math.ceil(niceStep(x1 - x0, 8)));
  for (let x = x0; x <= x1; x += xStep) {
    el("text", { x: sx(x), y: H - 8, "text-anchor": "middle" }, svg).textContent = String(x);
  }
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = points[i];
    if (!pts.length) return;
    el("polyline", {
      points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 2,
    }, svg);
    if (pts.length <= 60) {
      for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color }, svg);
    }
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = color;
    item.append(swatch, s.name);
    legend.appendChild(item);
  });
}

function series(name, key, scale = 1) {
  return { name, points: rounds.map((r) => [r.round, r[key] === null ? null : r[key] * scale]) };
}

function drawCharts() {
  const acc = [series("test accuracy", "accuracy")];
  if (rounds.some((r) => r.top3 !== null)) acc.push(series("top-3", "top3"));
  // federated evaluation: the devices scored the model each round trained from (the
  // previous round's), so their points sit one round earlier
  for (const [name, key] of [["devices' held-out", "fleet_accuracy"],
                             ["personalized", "personal_accuracy"]]) {
    if (rounds.some((r) => r[key] !== undefined && r[key] !== null)) {
      acc.push({ name, points: rounds.map((r) => [r.round - 1, r[key] ?? null]) });
    }
  }
  const decimals = (y) => String(Number(y.toFixed(3)));
  drawChart($("chart-accuracy"), $("legend-accuracy"), acc, { format: decimals, top: 1 });
  drawChart($("chart-loss"), $("legend-loss"),
    [series("test loss", "loss"), series("train loss", "train_loss")], { format: decimals });
  // one unit for the whole axis, so its ticks are round numbers of it
  const most = Math.max(0, ...rounds.map((r) => Math.max(r.bytes_up, r.model_bytes)));
  const [unit, size] = most >= 2 ** 30 ? ["GiB", 2 ** 30] : most >= 2 ** 20 ? ["MiB", 2 ** 20]
    : most >= 2 ** 10 ? ["KiB", 2 ** 10] : ["B", 1];
  drawChart($("chart-bytes"), $("legend-bytes"),
    [series("updates up", "bytes_up", 1 / size), series("model broadcast", "model_bytes", 1 / size)],
    { format: (y) => `${decimals(y)} ${unit}` });
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  row.appendChild(td);
}

function span(className, content) {
  const s = document.createElement("span");
  s.className = className;
  s.textContent = content;
  return s;
}

function drawFleet(state) {
  const body = $("devices").tBodies[0];
  body.replaceChildren();
  for (const d of state.devices) {
    const tr = document.createElement("tr");
    cell(tr, d.device_id);
    const status = document.createElement("span");
    status.append(span(d.online ? "dot on" : "dot", ""), d.online ? "online" : "offline");
    cell(tr, status);
    cell(tr, d.in_round ? span(`tag ${d.in_round}`, d.in_round) : "");
    cell(tr, fmtAge(d.last_update_age_s));
    cell(tr, fmtAge(d.status_age_s));
    cell(tr, d.cpus ?? "-");
    cell(tr, d.link_kbps ? `${d.link_kbps} kbit/s` : "-");
    cell(tr, d.battery === null ? "-" : d.battery ? "yes" : "no");
    cell(tr, d.agent_version || "-");
    body.appendChild(tr);
  }
  const shown = state.devices.length < state.devices_total
    ? `(${state.devices.length} of ${state.devices_total} shown)` : "";
  text("fleet-count", shown);
}

function drawSummary(state) {
  const p = state.progress, total = state.rounds_total;
  // finished: the last round closed; the open one is past the end and never runs
  const round = state.finished && total ? total : p.number;
  text("fleet", state.fleet);
  text("setup", `${state.task} · ${state.model} · ${state.mode}`);
  text("round", String(round));
  text("round-total", total ? ` / ${total}` : "");
  const last = rounds[rounds.length - 1];
  text("accuracy", last && last.accuracy !== null ? last.accuracy.toFixed(4) : "-");
  text("online", `${state.devices_online} / ${state.devices_total}`);
  text("version", `v${state.version}`);
  text("accepted", String(state.accepted));
  text("rejected", String(Object.values(state.rejected).reduce((a, b) => a + b, 0)));
  const status = $("status");
  status.textContent = state.finished ? (state.stopped ? "stopped" : "finished") : "live";
  status.title = state.stopped || "";
  status.className = `pill ${state.finished ? "finished" : "live"}`;
  if (state.finished) {
    text("progress-label", `all ${state.history_total} rounds done`);
    text("deadline", "");
    $("progress-bar").style.width = "100%";
  } else {
    const cohort = p.cohort ? `, ${p.cohort} devices asked` : "";
    text("progress-label", `round ${p.number}: ${p.updates} of ${p.target} updates${cohort}`);
    text("deadline", p.deadline_in_s >= 0 ? `deadline in ${Math.ceil(p.deadline_in_s)} s`
      : "deadline passed, waiting for more updates");
    $("progress-bar").style.width = `${Math.min(100, (100 * p.updates) / Math.max(1, p.target))}%`;
  }
  document.title = `fedmq · round ${round} · ${state.fleet}`;
}

async function poll() {
  try {
    const response = await fetch(`api/state?since=${rounds.length}`, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    // a service started afresh has fewer rounds than we hold: start over at the next poll
    rounds = state.history_from < rounds.length ? [] : rounds.concat(state.history);
    drawSummary(state);
    drawCharts();
    drawFleet(state);
  } catch (err) {
    const status = $("status");
    status.textContent = `connection lost (${err.message})`;
    status.className = "pill lost";
  }
  setTimeout(poll, POLL_MS);
}

poll();
