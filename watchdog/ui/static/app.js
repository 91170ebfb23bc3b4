// rtm watchdog dashboard: plain JS, no build step, no network beyond the
// watchdog itself. Reads /v1/nodes, /v1/alerts and /v1/series once, then
// follows /v1/events (fetch + stream reader, not EventSource, so the
// Authorization header can be sent).
"use strict";

const KEY_STORAGE = "rtm.watchdog.key";
const WINDOW_SECONDS = 3600; // the watchdog keeps one hour per node
const MAX_ALERTS_SHOWN = 200;
const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#bf8700", "#8250df", "#0a7ea4", "#bc4c00", "#6e7781"];

const state = {
  nodes: new Map(),  // name -> node object as /v1/nodes
  alerts: new Map(), // id -> alert object
  series: new Map(), // name -> {t:[], msgs:[], drops:[]}
  colors: new Map(), // name -> color, stable for the page's life
};

const $ = (id) => document.getElementById(id);

// --- API access and the key prompt -------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, init = {}) {
  for (;;) {
    const res = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) }, cache: "no-store" });
    if (res.status !== 401) {
      if (!res.ok) throw new Error(path + ": HTTP " + res.status);
      return res;
    }
    await askKey(sessionStorage.getItem(KEY_STORAGE) !== null);
  }
}

let keyPromise = null;

// askKey shows the dialog once however many requests were refused at the
// same time, and resolves when the operator has entered a key.
function askKey(wasRefused) {
  if (keyPromise) return keyPromise;
  keyPromise = new Promise((resolve) => {
    const dlg = $("key-dialog"), form = $("key-form"), input = $("key-input");
    $("key-error").classList.toggle("hidden", !wasRefused);
    input.value = "";
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      dlg.close();
      keyPromise = null;
      resolve();
    };
    // Escape would close the dialog and leave every request waiting.
    dlg.oncancel = (ev) => ev.preventDefault();
    if (!dlg.open) dlg.showModal();
  });
  return keyPromise;
}

// --- formatting -----------------------------------------------------------

function fmtRate(v) {
  if (v == null || isNaN(v)) return "–";
  if (v >= 1000) return (v / 1000).toFixed(1) + "k";
  return v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

function fmtInt(v) {
  return v == null ? "–" : Number(v).toLocaleString("en");
}

function fmtBytes(v) {
  if (v == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : v) + " " + units[i];
}

// fmtValue shows an alert's value or threshold in the unit its rule names.
function fmtValue(rule, v) {
  if (v == null || v === "") return "";
  if (/_bytes$/.test(rule)) return fmtBytes(v);
  if (/_pct$/.test(rule)) return v + "%";
  return String(v);
}

function fmtDuration(s) {
  if (s == null) return "–";
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0");
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

function fmtSince(iso) {
  if (!iso) return "";
  const t = Date.parse(iso);
  if (isNaN(t)) return "";
  return fmtDuration(Math.max(0, (Date.now() - t) / 1000)) + " ago";
}

function colorOf(name) {
  if (!state.colors.has(name)) state.colors.set(name, COLORS[state.colors.size % COLORS.length]);
  return state.colors.get(name);
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-") || k === "title") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

const td = (text, cls) => el("td", { text: text == null ? "" : String(text), class: cls || "" });

// --- state updates --------------------------------------------------------

function setNodes(list, at) {
  const seen = new Set();
  for (const n of list || []) {
    seen.add(n.name);
    state.nodes.set(n.name, n);
    if (at !== undefined) appendPoint(n, at);
  }
  for (const name of [...state.nodes.keys()]) if (!seen.has(name)) state.nodes.delete(name);
  renderNodes();
  renderCharts();
}

function appendPoint(n, at) {
  const s = n.stats;
  if (!s) return;
  const t = n.last_poll ? Date.parse(n.last_poll) / 1000 : at;
  let ser = state.series.get(n.name);
  if (!ser) { ser = { t: [], msgs: [], drops: [] }; state.series.set(n.name, ser); }
  if (ser.t.length && ser.t[ser.t.length - 1] >= t) return; // same poll seen twice
  ser.t.push(t);
  ser.msgs.push((s.msgs_in_rate || 0) + (s.msgs_out_rate || 0));
  ser.drops.push(s.dropped_rate || 0);
  const cut = t - WINDOW_SECONDS;
  while (ser.t.length && ser.t[0] < cut) { ser.t.shift(); ser.msgs.shift(); ser.drops.shift(); }
}

function setSeries(body) {
  for (const [name, s] of Object.entries((body && body.nodes) || {})) {
    const msgs = (s.t || []).map((_, i) => ((s.msgs_in_rate || [])[i] || 0) + ((s.msgs_out_rate || [])[i] || 0));
    state.series.set(name, { t: (s.t || []).slice(), msgs, drops: (s.dropped_rate || []).slice() });
  }
  renderCharts();
}

const stateRank = { pending: 0, firing: 1, resolved: 2 };

// setAlert keeps the later of two versions of an alert: a fetch of
// /v1/alerts may answer after the stream has told a newer state.
function setAlert(a) {
  if (!a || !a.id) return;
  const cur = state.alerts.get(a.id);
  if (cur && (stateRank[cur.state] ?? 0) > (stateRank[a.state] ?? 0)) return;
  state.alerts.set(a.id, a);
}

// --- rendering ------------------------------------------------------------

function loadBar(s) {
  if (!s) return td("–", "load");
  const load = s.capacity > 0 ? s.connections / s.capacity : s.load || 0;
  const pct = Math.max(0, Math.min(1, load)) * 100;
  const bar = el("span", { class: "bar" + (load >= 1 ? " full" : load >= 0.8 ? " high" : ""), title: (load * 100).toFixed(1) + "% of capacity" });
  const fill = el("span");
  fill.style.width = pct.toFixed(1) + "%"; // CSSOM, allowed by the page's CSP
  bar.append(fill);
  return el("td", { class: "load" }, bar, el("span", { class: "loadtxt", text: (load * 100).toFixed(load < 0.1 ? 1 : 0) + "%" }));
}

function renderNodes() {
  const tbody = document.querySelector("#nodes tbody");
  const rows = [];
  const names = [...state.nodes.keys()].sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  let alive = 0, drained = 0;
  for (const name of names) {
    const n = state.nodes.get(name);
    const s = n.stats || null;
    if (n.state === "alive") alive++;
    if (n.draining) drained++;
    const nameCell = el("td", {}, el("strong", { text: name }));
    if (n.poll_error) nameCell.append(el("div", { class: "error", text: n.poll_error }));
    const stateCell = el("td", {}, el("span", { class: "badge " + n.state, text: n.state }));
    if (n.draining) {
      stateCell.append(el("span", { class: "badge draining", text: n.drained_by_watchdog ? "drained by watchdog" : "draining" }));
    }
    const links = s && s.links ? s.links : [];
    const down = links.filter((l) => l.state !== "up");
    const linkCell = td(links.length ? (links.length - down.length) + "/" + links.length + " up" : "–", down.length ? "error" : "");
    if (links.length) linkCell.title = links.map((l) => l.peer + ": " + l.state + (l.queued_bytes ? " (" + fmtBytes(l.queued_bytes) + " queued)" : "")).join("\n");
    rows.push(el("tr", { "data-node": name, "data-state": n.state },
      nameCell, stateCell, loadBar(s),
      td(s ? fmtInt(s.connections) : "–", "num"),
      td(s ? fmtRate(s.msgs_in_rate) : "–", "num"),
      td(s ? fmtRate(s.msgs_out_rate) : "–", "num"),
      td(s ? fmtRate(s.dropped_rate) : "–", "num" + (s && s.dropped_rate > 0 ? " error" : "")),
      td(s ? fmtBytes(s.memory_bytes) : "–", "num"),
      td(s ? fmtInt(s.goroutines) : "–", "num"),
      td(s ? (s.store_up ? "up" : "down") : "–", s && !s.store_up ? "error" : ""),
      linkCell,
      td(s ? fmtDuration(s.uptime_seconds) : "–", "num")));
  }
  tbody.replaceChildren(...rows);
  $("nodes-empty").classList.toggle("hidden", names.length > 0);
  $("sum-nodes").textContent = alive + "/" + names.length + " nodes alive";
  const d = $("sum-drained");
  d.textContent = drained + " drained";
  d.classList.toggle("hidden", drained === 0);
  d.classList.toggle("alarm", drained > 0);
}

const listOrder = { firing: 0, pending: 1, resolved: 2 };

function renderAlerts() {
  const list = [...state.alerts.values()].sort((a, b) =>
    (listOrder[a.state] ?? 3) - (listOrder[b.state] ?? 3) ||
    Date.parse(b.fired_at || b.started_at || 0) - Date.parse(a.fired_at || a.started_at || 0));
  // keep memory bounded on a page left open for days
  for (const a of list.slice(MAX_ALERTS_SHOWN)) state.alerts.delete(a.id);
  const rows = list.slice(0, MAX_ALERTS_SHOWN).map((a) => {
    const since = a.state === "resolved" ? a.resolved_at : a.state === "firing" ? a.fired_at : a.started_at;
    const action = a.action_taken || (a.action ? a.action + " (not taken)" : "");
    return el("tr", { "data-alert-id": a.id, "data-rule": a.rule, "data-node": a.node || "", "data-state": a.state, class: a.state },
      el("td", {}, el("span", { class: "badge " + a.state, text: a.state })),
      el("td", {}, el("span", { class: "badge " + a.severity, text: a.severity })),
      td(a.rule), td(a.node || "cluster"), td(fmtValue(a.rule, a.value), "num"), td(fmtValue(a.rule, a.threshold), "num"),
      td(action, a.action_taken ? "error" : ""), td(a.message, "msg"),
      el("td", { text: fmtSince(since), title: since || "" }));
  });
  $("alerts").querySelector("tbody").replaceChildren(...rows);
  $("alerts-empty").classList.toggle("hidden", rows.length > 0);
  const firing = list.filter((a) => a.state === "firing").length;
  const f = $("sum-firing");
  f.textContent = firing + " firing";
  f.classList.toggle("alarm", firing > 0);
}

const SVGNS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function drawChart(svg, field) {
  const w = Math.max(200, Math.round(svg.clientWidth || 600)), h = 160, pad = 4, top = 14;
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const now = Date.now() / 1000;
  let tmin = now, max = 0;
  for (const ser of state.series.values()) {
    if (ser.t.length) tmin = Math.min(tmin, ser.t[0]);
    for (const v of ser[field]) max = Math.max(max, v);
  }
  tmin = Math.max(tmin, now - WINDOW_SECONDS);
  const span = Math.max(60, now - tmin);
  const ymax = max > 0 ? max * 1.1 : 1;
  const x = (t) => pad + ((t - (now - span)) / span) * (w - 2 * pad);
  const y = (v) => h - pad - (v / ymax) * (h - pad - top);
  const parts = [svgEl("line", { x1: 0, x2: w, y1: y(0), y2: y(0) })];
  const label = svgEl("text", { x: pad, y: 11 });
  label.textContent = "max " + fmtRate(max) + "/s · last " + fmtDuration(span);
  parts.push(label);
  for (const [name, ser] of state.series) {
    if (ser.t.length < 1) continue;
    const pts = ser.t.map((t, i) => x(t).toFixed(1) + "," + y(ser[field][i]).toFixed(1));
    if (pts.length === 1) pts.push((w - pad) + "," + y(ser[field][0]).toFixed(1));
    const pl = svgEl("polyline", { points: pts.join(" "), stroke: colorOf(name), "data-node": name });
    parts.push(pl);
  }
  svg.replaceChildren(...parts);
}

let chartTimer = 0;

// Charts are redrawn at most once per animation frame however many events
// arrive together.
function renderCharts() {
  if (chartTimer) return;
  chartTimer = requestAnimationFrame(() => {
    chartTimer = 0;
    drawChart($("chart-msgs"), "msgs");
    drawChart($("chart-drops"), "drops");
    const names = [...new Set([...state.nodes.keys(), ...state.series.keys()])].sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
    $("legend").replaceChildren(...names.map((n) => {
      const sw = el("i");
      sw.style.background = colorOf(n);
      return el("li", {}, sw, n);
    }));
  });
}

function setStatus(s, text) {
  const st = $("conn-status");
  st.dataset.state = s;
  st.textContent = text;
}

// --- the event stream -----------------------------------------------------

function handleEvent(type, data) {
  let body;
  try { body = JSON.parse(data); } catch (e) { console.warn("rtm: bad event data", type, e); return; }
  const now = Date.now() / 1000;
  switch (type) {
    case "snapshot": {
      // Alerts that closed while the stream was down are not in a
      // snapshot (it has the open ones): drop them and fetch their end.
      const open = new Set((body.alerts || []).map((a) => a.id));
      let missed = false;
      for (const [id, a] of state.alerts) {
        if (a.state !== "resolved" && !open.has(id)) { state.alerts.delete(id); missed = true; }
      }
      if (missed) loadAlerts().catch((e) => console.warn("rtm:", e.message || e));
      for (const a of body.alerts || []) setAlert(a);
      setNodes(body.nodes, now);
      renderAlerts();
      break;
    }
    case "nodes":
      setNodes(body.nodes, now);
      break;
    case "alert":
      setAlert(body);
      renderAlerts();
      break;
    default: // unknown events are for newer dashboards
  }
}

// readEvents parses text/event-stream from a fetch() body and calls
// handleEvent per event; it returns when the stream ends.
async function readEvents(res) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "", type = "message", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(buf[i] === "\r" && buf[i + 1] === "\n" ? i + 2 : i + 1);
      if (line === "") {
        if (data.length) handleEvent(type, data.join("\n"));
        type = "message"; data = [];
      } else if (line[0] === ":") {
        // comment: keep-alive ping
      } else {
        const c = line.indexOf(":");
        const field = c < 0 ? line : line.slice(0, c);
        let val = c < 0 ? "" : line.slice(c + 1);
        if (val[0] === " ") val = val.slice(1);
        if (field === "event") type = val;
        else if (field === "data") data.push(val);
      }
    }
  }
}

async function follow() {
  let delay = 1000;
  for (;;) {
    try {
      const res = await api("/v1/events", { headers: { Accept: "text/event-stream" } });
      setStatus("live", "live");
      delay = 1000;
      await readEvents(res);
      setStatus("connecting", "reconnecting");
    } catch (e) {
      setStatus("error", "disconnected, retrying");
      console.warn("rtm: event stream:", e.message || e);
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 30000);
  }
}

async function loadAlerts() {
  const body = await (await api("/v1/alerts")).json();
  for (const a of body.alerts || []) setAlert(a);
  renderAlerts();
}

async function loadInitial() {
  // Each part is optional: the stream's snapshot fills nodes and open alerts
  // even if one of these fails.
  const parts = await Promise.allSettled([
    api("/v1/nodes").then((r) => r.json()).then((b) => setNodes(b.nodes)),
    api("/v1/series").then((r) => r.json()).then(setSeries),
    loadAlerts(),
  ]);
  for (const p of parts) if (p.status === "rejected") console.warn("rtm:", p.reason && p.reason.message);
}

function start() {
  renderNodes();
  renderAlerts();
  renderCharts();
  window.addEventListener("resize", renderCharts);
  // "since" columns age without events
  setInterval(renderAlerts, 30000);
  loadInitial().finally(follow);
}

start();
