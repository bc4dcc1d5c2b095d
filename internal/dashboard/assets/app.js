// The Trellis dashboard: one stream of snapshots (the control plane's
// status and the last minute's traffic) from /api/v1/events, drawn as a
// topology, tables and small charts. Plain JavaScript, no dependencies.

const SVG = "http://www.w3.org/2000/svg";
const NO_SIDECAR = "(no sidecar)";
const OUTSIDE = "(outside the mesh)";
const HISTORY = 60; // points kept per workload for the charts

const history = new Map(); // workload → [requests/s, …]
const denials = new Map(); // "source|destination|policy" → {seen, source, destination, policy, rate}

function el(tag, attrs = {}, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

const fmt = {
  rate: (v) => (v ? v.toFixed(v < 10 ? 2 : 1) : "0"),
  pct: (v) => (v === undefined || v === null ? "–" : (v * 100).toFixed(2) + "%"),
  ms: (l, k) => (l ? l[k].toFixed(1) + " ms" : "–"),
  until: (iso) => {
    if (!iso) return "–";
    const s = (new Date(iso) - Date.now()) / 1000;
    if (s < 0) return "expired";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " days";
  },
};

function fill(table, rows) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...rows);
}

function td(text, cls) {
  return el("td", cls ? { class: cls } : {}, text);
}

function sparkline(points) {
  const w = 120, h = 24, max = Math.max(...points, 0.001);
  const step = points.length > 1 ? w / (points.length - 1) : w;
  const coords = points.map((p, i) => `${(i * step).toFixed(1)},${(h - 2 - (p / max) * (h - 4)).toFixed(1)}`).join(" ");
  return el("svg:svg", { class: "spark", viewBox: `0 0 ${w} ${h}` }, el("svg:polyline", { points: coords }));
}

// drawTopology lays workloads out in columns by namespace, callers without
// sidecar on the left and destinations outside the mesh on the right, and
// draws each edge as a curve marked mTLS, plaintext or refused.
function drawTopology(workloads, edges) {
  const svg = document.getElementById("topology");
  const names = new Set(workloads.map((w) => w.workload));
  const meshed = new Map(workloads.map((w) => [w.workload, w.meshed]));
  for (const e of edges) {
    names.add(e.source);
    names.add(e.destination);
  }
  const columns = new Map(); // column name → [node names]
  const columnOf = (n) => (n === NO_SIDECAR ? " callers" : n === OUTSIDE ? "~outside" : n.includes("/") ? n.split("/")[0] : " callers");
  for (const n of [...names].sort()) {
    const c = columnOf(n);
    if (!columns.has(c)) columns.set(c, []);
    columns.get(c).push(n);
  }
  const order = [...columns.keys()].sort();
  const colW = 230, rowH = 70, top = 90, left = 30;
  const pos = new Map();
  let height = 0;
  const groups = [];
  order.forEach((c, i) => {
    const x = left + i * colW;
    const nodes = columns.get(c);
    const label = c === " callers" ? "outside the mesh (callers)" : c === "~outside" ? "outside the mesh" : "namespace " + c;
    groups.push(el("svg:g", { class: "namespace", "data-namespace": c.trim() },
      el("svg:rect", { x: x - 15, y: top - 30, width: colW - 30, height: nodes.length * rowH + 20, rx: 6 }),
      el("svg:text", { x: x - 5, y: top + nodes.length * rowH + 6 }, label)));
    nodes.forEach((n, j) => pos.set(n, { x: x + 20, y: top + 25 + j * rowH }));
    height = Math.max(height, top + nodes.length * rowH + 30);
  });
  const edgeEls = [];
  const column = new Map(); // node → its column's index
  order.forEach((c, i) => columns.get(c).forEach((n) => column.set(n, i)));
  const seen = new Map(); // edges so far into each destination, to fan them out
  const labels = []; // where rate labels are, to keep them apart
  for (const e of edges) {
    const a = pos.get(e.source), b = pos.get(e.destination);
    if (!a || !b) continue;
    // Refused plaintext is plaintext all the same, drawn apart.
    const kind = e.mtls ? "mtls" : e.refusedPerSecond > 0 ? "plaintext refused" : "plaintext";
    const nth = seen.get(e.destination) || 0;
    seen.set(e.destination, nth + 1);
    // Arcs over the columns between the ends, higher the farther they go,
    // and fanned out per destination so their labels do not collide.
    const span = Math.abs(column.get(e.source) - column.get(e.destination));
    const cx = (a.x + b.x) / 2, cy = Math.min(a.y, b.y) - 30 - 30 * Math.max(span - 1, 0) - 30 * nth;
    const d = a === b ? `M${a.x},${a.y} c40,-60 80,0 0,0` : `M${a.x},${a.y} Q${cx},${cy} ${b.x},${b.y}`;
    const lx = (a.x + 2 * cx + b.x) / 4; // the curve's midpoint…
    let ly = (a.y + 2 * cy + b.y) / 4;
    while (labels.some((p) => Math.abs(p.x - lx) < 70 && Math.abs(p.y - ly) < 13)) ly -= 13; // …clear of the others'
    labels.push({ x: lx, y: ly });
    const rate = e.requestsPerSecond > 0 ? fmt.rate(e.requestsPerSecond) + " req/s"
      : e.tcpConnectionsPerSecond > 0 ? fmt.rate(e.tcpConnectionsPerSecond) + " conn/s"
      : e.refusedPerSecond > 0 ? fmt.rate(e.refusedPerSecond) + " refused/s" : "";
    edgeEls.push(el("svg:g", { class: "edge-group" },
      el("svg:path", { d, class: `edge ${kind}`, "data-source": e.source, "data-destination": e.destination },
        el("svg:title", {}, `${e.source} → ${e.destination}: ${kind}${e.plaintext ? " (" + e.plaintext + ")" : ""}`)),
      el("svg:text", { class: "edge-label", x: lx, y: ly - 4, "text-anchor": "middle" }, rate)));
  }
  const nodeEls = [];
  for (const [n, p] of pos) {
    const external = n === NO_SIDECAR || n === OUTSIDE;
    const cls = external ? "external" : meshed.get(n) === false ? "unmeshed" : "meshed";
    const label = external ? n : n.split("/")[1] + (meshed.get(n) === false ? " (no sidecar)" : "");
    nodeEls.push(el("svg:g", { class: `node ${cls}`, "data-workload": n },
      el("svg:circle", { cx: p.x, cy: p.y, r: 12 }),
      el("svg:text", { x: p.x + 18, y: p.y + 4 }, label)));
  }
  svg.setAttribute("viewBox", `0 0 ${left + order.length * colW} ${Math.max(height, 200)}`);
  svg.setAttribute("height", Math.max(height, 200));
  svg.replaceChildren(...groups, ...edgeEls, ...nodeEls);
  document.getElementById("topology-empty").hidden = names.size > 0;
}

function render(snap) {
  const { status, traffic } = snap;
  document.getElementById("trust-domain").textContent = "trust domain " + status.trustDomain;
  document.getElementById("updated").textContent = "updated " + new Date(traffic.at).toLocaleTimeString();
  const workloads = traffic.workloads || [];
  const edges = traffic.edges || [];
  drawTopology(workloads, edges);
  tapOptions(workloads);

  for (const w of workloads) {
    const h = history.get(w.workload) || [];
    h.push(w.requestsPerSecond || 0);
    if (h.length > HISTORY) h.shift();
    history.set(w.workload, h);
  }
  fill("workloads", workloads.map((w) => el("tr", { "data-workload": w.workload },
    td(w.workload), td(w.meshed ? "yes" : "no", w.meshed ? "yes" : "no"), td(w.meshed ? String(w.proxies) : "–", "num"),
    td(fmt.pct(w.successRate), "num"), td(fmt.rate(w.requestsPerSecond), "num"), td(fmt.rate(w.deniedPerSecond), "num"),
    td(fmt.ms(w.latencyMs, "p50"), "num"), td(fmt.ms(w.latencyMs, "p95"), "num"), td(fmt.ms(w.latencyMs, "p99"), "num"),
    td(String(w.tcpOpenConnections || 0), "num"), el("td", {}, sparkline(history.get(w.workload))))));

  fill("edges", edges.map((e) => el("tr", { class: e.mtls ? "mtls" : "plaintext" },
    td(e.source), td(e.destination), td(e.mtls ? "yes" : "no", e.mtls ? "yes" : "no"), td(fmt.pct(e.successRate), "num"),
    td(fmt.rate(e.requestsPerSecond), "num"), td(fmt.rate(e.tcpConnectionsPerSecond), "num"), td(e.plaintext || ""))));

  const policies = [];
  for (const w of workloads) {
    for (const d of w.decisions || []) {
      policies.push(el("tr", {}, td(w.workload), td(d.policy || "(none)"), td(fmt.rate(d.allowedPerSecond), "num"),
        td(fmt.rate(d.deniedPerSecond), "num" + (d.deniedPerSecond > 0 ? " warn" : ""))));
    }
  }
  fill("policies", policies);

  const now = new Date();
  for (const e of edges) {
    for (const d of e.decisions || []) {
      if (d.deniedPerSecond > 0) {
        const key = `${e.source}|${e.destination}|${d.policy}`;
        denials.set(key, { seen: now, source: e.source, destination: e.destination, policy: d.policy, rate: d.deniedPerSecond });
      }
    }
  }
  const recent = [...denials.values()].sort((a, b) => b.seen - a.seen).slice(0, 20);
  fill("denials", recent.map((d) => el("tr", {}, td(d.seen.toLocaleTimeString()), td(d.source), td(d.destination),
    td(d.policy || "no ALLOW policy matched"), td(fmt.rate(d.rate), "num"))));

  fill("identities", (status.proxies || []).map((p) => el("tr", {},
    td(p.instance), td(p.identity), td(fmt.until(p.certificateExpiry)),
    td(!p.connected ? "disconnected" : p.inSync ? "current" : p.rejected ? "rejected: " + p.rejected : "updating",
      !p.connected || p.rejected ? "no" : p.inSync ? "yes" : "warn"))));
  const ca = status.ca || {};
  fill("ca", [...(ca.roots || []).map((r) => ["root", r]), ["intermediate", ca.intermediate || {}]].map(([kind, c]) =>
    el("tr", {}, td(kind), td(c.subject || ""), td("expires in " + fmt.until(c.notAfter)))));
}

// The live tap: one stream of events of the chosen workload, newest
// first, at most TAP_ROWS kept.
const TAP_ROWS = 200;
let tapSource = null;

function tapOptions(workloads) {
  const select = document.getElementById("tap-workload");
  const chosen = select.value;
  const names = workloads.filter((w) => w.meshed).map((w) => w.workload);
  if ([...select.options].map((o) => o.value).join() === names.join()) return;
  select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(chosen)) select.value = chosen;
}

function stopTap(state) {
  if (tapSource) tapSource.close();
  tapSource = null;
  document.getElementById("tap-start").disabled = false;
  document.getElementById("tap-stop").disabled = true;
  document.getElementById("tap-state").textContent = state;
}

function startTap(ev) {
  ev.preventDefault();
  stopTap("");
  const q = new URLSearchParams({ workload: document.getElementById("tap-workload").value, max: "1000" });
  const method = document.getElementById("tap-method").value.trim();
  const path = document.getElementById("tap-path").value.trim();
  if (method) q.set("method", method);
  if (path) q.set("path", path);
  const body = document.querySelector("#tap tbody");
  body.replaceChildren();
  tapSource = new EventSource("../api/v1/tap?" + q);
  document.getElementById("tap-start").disabled = true;
  document.getElementById("tap-stop").disabled = false;
  tapSource.addEventListener("started", (e) => {
    document.getElementById("tap-state").textContent = `tapping ${JSON.parse(e.data).proxies} proxies…`;
  });
  tapSource.addEventListener("tap", (e) => {
    const t = JSON.parse(e.data);
    body.prepend(el("tr", { class: t.mtls ? "mtls" : "plaintext" },
      td(new Date(t.time).toLocaleTimeString()), td(t.instance), td(t.direction), td(t.source), td(t.destination),
      td(t.method), td(t.path), td(String(t.status), t.status >= 500 ? "no" : t.status === 403 ? "warn" : ""),
      td(t.latencyMs.toFixed(1) + " ms", "num"), td(t.mtls ? "yes" : "no", t.mtls ? "yes" : "no"),
      td(t.decision ? t.decision + (t.policy ? " (" + t.policy + ")" : "") : "")));
    while (body.children.length > TAP_ROWS) body.lastChild.remove();
  });
  // The tap ends on its own after max events; the browser would reconnect.
  tapSource.onerror = () => stopTap("stopped");
}

document.getElementById("tap-form").addEventListener("submit", startTap);
document.getElementById("tap-stop").addEventListener("click", () => stopTap("stopped"));

function connect() {
  const pill = document.getElementById("connection");
  const source = new EventSource("../api/v1/events");
  source.addEventListener("snapshot", (ev) => {
    pill.textContent = "live";
    pill.className = "pill live";
    render(JSON.parse(ev.data));
  });
  source.onerror = () => {
    pill.textContent = "reconnecting…";
    pill.className = "pill down";
  };
}

connect();
