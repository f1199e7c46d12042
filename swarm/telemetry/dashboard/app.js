// The swarm monitor's dashboard: polls the JSON API and draws with uPlot (vendored, served locally).
// Everything a peer wrote (names, organizations) is inserted as text, never as HTML.
"use strict";

const PALETTE = ["#d9480f", "#1c7ed6", "#2b8a3e", "#5f3dc4", "#e67700", "#0b7285", "#c2255c", "#495057"];
const X_MODES = { time: "wall-clock time", epoch: "swarm epoch", samples: "samples trained (swarm)" };
const state = {
  period: 2,
  charts: {},
  xMode: X_MODES[localStorage.getItem("swarm.x")] ? localStorage.getItem("swarm.x") : "time",
  zoom: null, // the x range the user dragged, {min, max} in the x-axis units; kept across refreshes
  sort: { key: "contributed", descending: true },
  history: null,
  peersInfo: null,
};

function text(id, value) { document.getElementById(id).textContent = value; }
function fmt(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}
function bytes(value) {
  if (value === null || value === undefined) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let index = 0;
  while (value >= 1000 && index < units.length - 1) { value /= 1000; index += 1; }
  return `${value.toFixed(index ? 1 : 0)} ${units[index]}`;
}
function duration(seconds) {
  seconds = Math.floor(seconds);
  if (seconds >= 3600) return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// The x value of each time: the time itself, or the swarm's epoch or samples at that time (a running
// maximum over the swarm's rows: a trainer leaving lowers the sum of samples; uPlot wants x sorted).
function xMapper(swarmRows) {
  if (state.xMode === "time") return (time) => time;
  const field = state.xMode === "epoch" ? "epoch" : "samples_total";
  const times = [], values = [];
  let highest = 0;
  for (const row of swarmRows) {
    highest = Math.max(highest, row[field] || 0);
    times.push(row.time);
    values.push(highest);
  }
  return (time) => {
    let low = 0, high = times.length - 1, found = 0;
    while (low <= high) {
      const middle = (low + high) >> 1;
      if (times[middle] <= time) { found = middle; low = middle + 1; } else high = middle - 1;
    }
    return values.length ? values[found] : 0;
  };
}

function applyZoom(plot) {
  if (state.zoom) plot.setScale("x", state.zoom);
}

// A drag on any chart zooms every chart to the same x range; a double click (or the button) zooms out.
// uPlot runs this hook a moment after a scale changes (it batches), also after the dashboard's own
// setData: a range that spans all the data is such a refresh, not a zoom, and the zoom stays.
function onScale(plot, key) {
  if (key !== "x") return;
  const { min, max } = plot.scales.x, xs = plot.data[0];
  if (!xs.length || (min <= xs[0] && max >= xs[xs.length - 1])) return;
  if (state.zoom && state.zoom.min === min && state.zoom.max === max) return; // already everywhere
  state.zoom = { min, max };
  for (const other of Object.values(state.charts)) if (other !== plot) applyZoom(other);
  document.body.dataset.zoom = `${min},${max}`;
}

function resetZoom() {
  state.zoom = null;
  delete document.body.dataset.zoom;
  if (state.history) drawHistory(state.history);
}

// series: [{label, color, dash?, bytes?}]; columns: one array of y values per series, aligned with xs
function chart(id, series, xs, columns) {
  const element = document.getElementById(id);
  const data = [xs, ...columns];
  element.dataset.points = String(columns.reduce((count, ys) => count + ys.filter((y) => y !== null && y !== undefined).length, 0));
  element.dataset.series = String(series.length);
  const shape = state.xMode + "|" + series.map((item) => item.label).join("|");
  const existing = state.charts[id];
  if (existing && existing.shape === shape) {
    existing.setData(data);
    applyZoom(existing);
    return;
  }
  if (existing) existing.destroy();
  const byteAxis = series.some((item) => item.bytes);
  const options = {
    width: Math.max(element.clientWidth, 300),
    height: 220,
    scales: { x: { time: state.xMode === "time" } },
    series: [{ label: X_MODES[state.xMode] },
      ...series.map((item) => ({ label: item.label, stroke: item.color, width: 2, spanGaps: true, dash: item.dash }))],
    axes: [{}, byteAxis ? { size: 70, values: (plot, ticks) => ticks.map((tick) => bytes(tick)) } : { size: 60 }],
    hooks: { setScale: [onScale] },
  };
  state.charts[id] = new uPlot(options, data, element);
  state.charts[id].shape = shape;
  applyZoom(state.charts[id]);
}

function cell(row, value, numeric = false) {
  const td = document.createElement("td");
  td.textContent = value;
  if (numeric) td.className = "num";
  row.appendChild(td);
}

function drawPeers(peers, contributions) {
  const body = document.querySelector("#peers tbody");
  const rows = [];
  for (const peer of peers) {
    const tr = document.createElement("tr");
    tr.dataset.peerId = peer.peer_id;
    const contributed = contributions.get(peer.peer_id);
    cell(tr, "…" + peer.peer_id.slice(-8));
    cell(tr, peer.display_name || "–");
    cell(tr, peer.organization || "–");
    cell(tr, peer.role);
    cell(tr, peer.state);
    cell(tr, fmt(peer.epoch), true);
    cell(tr, fmt(peer.samples_per_second, 1), true);
    cell(tr, fmt(peer.loss, 3), true);
    cell(tr, fmt(contributed === undefined ? peer.samples_total : contributed), true);
    cell(tr, `${peer.rounds_ok} / ${peer.rounds_failed}`, true);
    cell(tr, bytes(peer.bytes_sent), true);
    cell(tr, bytes(peer.bytes_received), true);
    cell(tr, peer.reachability);
    cell(tr, peer.device || "–");
    cell(tr, duration(peer.uptime), true);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// Reason -> count objects from the API as Maps: a reason is a peer-chosen key, and one named like an
// Object property ("constructor") must read as a count, not as the property.
function counts(object) { return new Map(Object.entries(object)); }
function total(map) { let sum = 0; for (const count of map.values()) sum += count; return sum; }

function emptyRow(columns, message) {
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.colSpan = columns;
  td.className = "empty";
  td.textContent = message;
  tr.appendChild(td);
  return tr;
}

function drawRefusals(view) {
  const byPeers = { record: counts(view.totals.refused), request: counts(view.totals.refused_requests) };
  const byMonitor = { record: counts(view.refused), request: new Map() };
  const reasons = [];
  for (const kind of ["record", "request"]) {
    const names = [...new Set([...byPeers[kind].keys(), ...byMonitor[kind].keys()])].sort();
    for (const reason of names) {
      const tr = document.createElement("tr");
      tr.dataset.kind = kind;
      tr.dataset.reason = reason;
      cell(tr, kind);
      cell(tr, reason);
      cell(tr, fmt(byPeers[kind].get(reason) || 0), true);
      cell(tr, fmt(byMonitor[kind].get(reason) || 0), true);
      reasons.push(tr);
    }
  }
  document.querySelector("#refused-reasons tbody").replaceChildren(...(reasons.length ? reasons :
    [emptyRow(4, "nothing refused")]));

  const peers = [];
  for (const peer of view.peers) {
    const records = counts(peer.refused), requests = counts(peer.refused_requests);
    if (total(records) + total(requests) === 0) continue;
    const tr = document.createElement("tr");
    tr.dataset.peerId = peer.peer_id;
    cell(tr, "…" + peer.peer_id.slice(-8));
    cell(tr, peer.display_name || "–");
    cell(tr, fmt(total(records)), true);
    cell(tr, fmt(total(requests)), true);
    cell(tr, [...records, ...requests].sort((a, b) => b[1] - a[1]).map(([reason, count]) => `${reason} ${count}`)
      .join(", "));
    peers.push(tr);
  }
  document.querySelector("#refused-peers tbody").replaceChildren(...(peers.length ? peers :
    [emptyRow(5, "no peer refused anything")]));

  const peersTotal = total(byPeers.record) + total(byPeers.request), monitorTotal = total(byMonitor.record);
  text("refused", peersTotal + monitorTotal === 0 ? "nothing refused" :
    `refused by the peers: ${fmt(peersTotal)} (records ${fmt(total(byPeers.record))}, requests ` +
    `${fmt(total(byPeers.request))}) · by this monitor: ${fmt(monitorTotal)}`);
  return peersTotal + monitorTotal;
}

function drawList(id, items, empty = "none") {
  const list = document.getElementById(id);
  const entries = items.length ? items : [empty];
  list.replaceChildren(...entries.map((item) => { const li = document.createElement("li"); li.textContent = item; return li; }));
}

function drawView(info, peersInfo) {
  text("run-id", info.run_id);
  const view = info.view;
  if (!view) return;
  const totals = view.totals;
  const ago = Math.max(0, Date.now() / 1000 - view.time);
  text("freshness", `last collection ${ago.toFixed(0)} s ago · every ${info.period} s · history since ` +
    new Date(info.history_since * 1000).toLocaleString());
  text("peer-count", String(totals.peers_online));
  text("peer-roles", Object.entries(totals.by_role).map(([role, count]) => `${count} ${role}`).join(", "));
  text("epoch", fmt(totals.epoch));
  text("throughput", fmt(totals.samples_per_second));
  text("loss", fmt(totals.loss, 3));
  text("heldout", totals.heldout_loss === null ? "" : `held-out ${fmt(totals.heldout_loss, 3)}`);
  text("rounds", `${fmt(totals.rounds_ok)} / ${fmt(totals.rounds_failed)}`);
  const refused = drawRefusals(view);
  text("suspicious", `${view.flagged.length} / ${fmt(refused)}`);
  const contributions = new Map(peersInfo.peers.map((row) => [row.peer_id, row.contributed]));
  drawPeers(view.peers, contributions);
  drawList("flagged", view.flagged.map((peer) =>
    `${peer.peer_id} (${peer.display_name || "no name"}): ${peer.reasons.join("; ")}`), "no record flagged");
  drawList("excluded", (view.excluded || []).map((peer) =>
    `${peer.peer_id}: ${peer.offences} proven offence${peer.offences > 1 ? "s" : ""} ` +
    `(${peer.reason || "equivocation"}), excluded until ` +
    `${new Date(peer.until * 1000).toLocaleString()}`), "no peer excluded");
  drawList("left", info.left.map((peer) =>
    `${peer.display_name || peer.peer_id} (${peer.role}), last seen ${new Date(peer.last_seen * 1000).toLocaleString()}, ` +
    `contributed ${fmt(peer.contributed)} samples`));
}

function peerLabel(peerId) {
  const known = (state.peersInfo ? state.peersInfo.peers : []).find((row) => row.peer_id === peerId);
  return (known && known.display_name ? known.display_name + " " : "") + "…" + peerId.slice(-6);
}

// One x array for all peers (the union of their times) and, per field, one column per peer.
function peerColumns(peerSeries, toX, fields) {
  const times = [...new Set(Object.values(peerSeries).flatMap((rows) => rows.map((row) => row.time)))].sort((a, b) => a - b);
  const index = new Map(times.map((time, position) => [time, position]));
  const columns = {};
  for (const field of fields) {
    columns[field] = Object.values(peerSeries).map((rows) => {
      const ys = new Array(times.length).fill(null);
      for (const row of rows) ys[index.get(row.time)] = row[field];
      return ys;
    });
  }
  return { xs: times.map(toX), columns };
}

function drawHistory(history) {
  const rows = history.swarm;
  const toX = xMapper(rows);
  const xs = rows.map((row) => toX(row.time));
  const column = (field) => rows.map((row) => row[field]);
  chart("loss-chart", [{ label: "training", color: PALETTE[0] }, { label: "held-out", color: PALETTE[1] }], xs,
    [column("loss"), column("heldout_loss")]);
  chart("throughput-chart", [{ label: "samples/s", color: PALETTE[2] }], xs, [column("samples_per_second")]);
  chart("peers-chart", [{ label: "peers", color: PALETTE[3] }], xs, [column("peers_online")]);
  chart("traffic-chart", [{ label: "sent", color: PALETTE[4], bytes: true }, { label: "received", color: PALETTE[5] }],
    xs, [column("bytes_sent"), column("bytes_received")]);

  // a peer keeps its colour in every chart; bootstrap peers do not train, so they show in traffic only
  const roles = new Map((state.peersInfo ? state.peersInfo.peers : []).map((row) => [row.peer_id, row.role]));
  const colors = new Map(Object.keys(history.peers).map((peerId, position) => [peerId, PALETTE[position % PALETTE.length]]));
  const described = (peerIds) => peerIds.map((peerId) => ({ label: peerLabel(peerId), color: colors.get(peerId) }));
  const trainers = Object.fromEntries(Object.entries(history.peers).filter(([peerId]) => roles.get(peerId) !== "bootstrap"));
  const training = peerColumns(trainers, toX, ["loss", "samples_per_second"]);
  chart("peer-loss-chart", described(Object.keys(trainers)), training.xs, training.columns.loss);
  chart("peer-throughput-chart", described(Object.keys(trainers)), training.xs, training.columns.samples_per_second);
  const traffic = peerColumns(history.peers, toX, ["bytes_sent", "bytes_received"]);
  const everyone = described(Object.keys(history.peers));
  chart("peer-traffic-chart", [
    ...everyone.map((item) => ({ ...item, label: `${item.label} sent`, bytes: true })),
    ...everyone.map((item) => ({ ...item, label: `${item.label} received`, dash: [6, 4] })),
  ], traffic.xs, [...traffic.columns.bytes_sent, ...traffic.columns.bytes_received]);
}

// The contribution table: one row per peer ever seen, sorted by the header last clicked.
const CONTRIBUTION_COLUMNS = [
  { key: "peer_id", show: (row) => "…" + row.peer_id.slice(-8) },
  { key: "display_name", show: (row) => row.display_name || "–" },
  { key: "organization", show: (row) => row.organization || "–" },
  { key: "role", show: (row) => row.role },
  { key: "device", show: (row) => row.device || "–" },
  { key: "version", show: (row) => row.version || "–" },
  { key: "state", show: (row) => row.state },
  { key: "contributed", show: (row) => fmt(row.contributed), numeric: true },
  { key: "compute_seconds", show: (row) => duration(row.compute_seconds || 0), numeric: true },
  { key: "rounds_joined", show: (row) => fmt(row.rounds_joined), numeric: true },
  { key: "refused", show: (row) => fmt(row.refused), numeric: true },
  { key: "last_seen", show: (row) => new Date(row.last_seen * 1000).toLocaleTimeString(), numeric: true },
];

function drawContributions(peersInfo) {
  const { key, descending } = state.sort;
  const column = CONTRIBUTION_COLUMNS.find((item) => item.key === key);
  const value = (row) => row[key] === null || row[key] === undefined ? (column.numeric ? -Infinity : "") : row[key];
  const sorted = [...peersInfo.peers].sort((a, b) => {
    const order = column.numeric ? value(a) - value(b) : String(value(a)).localeCompare(String(value(b)));
    return (descending ? -order : order) || a.peer_id.localeCompare(b.peer_id);
  });
  const rows = sorted.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.peerId = row.peer_id;
    for (const item of CONTRIBUTION_COLUMNS) cell(tr, item.show(row), item.numeric);
    return tr;
  });
  document.querySelector("#contributions tbody").replaceChildren(...(rows.length ? rows :
    [emptyRow(CONTRIBUTION_COLUMNS.length, "no peer seen yet")]));
  for (const th of document.querySelectorAll("#contributions th")) {
    th.dataset.sorted = th.dataset.key === key ? (descending ? "descending" : "ascending") : "";
  }
}

function setupControls() {
  const select = document.getElementById("x-axis");
  select.value = state.xMode;
  select.addEventListener("change", () => {
    state.xMode = select.value;
    localStorage.setItem("swarm.x", state.xMode);
    resetZoom();
  });
  document.getElementById("reset-zoom").addEventListener("click", resetZoom);
  // uPlot zooms out on a double click itself; this forgets the zoom so the next refresh keeps it out
  document.querySelector(".charts").addEventListener("dblclick", () => setTimeout(resetZoom, 0));
  for (const th of document.querySelectorAll("#contributions th")) {
    th.addEventListener("click", () => {
      const numeric = CONTRIBUTION_COLUMNS.find((item) => item.key === th.dataset.key).numeric;
      // a first click sorts numbers largest first and text A to Z; a second click reverses
      const descending = state.sort.key === th.dataset.key ? !state.sort.descending : Boolean(numeric);
      state.sort = { key: th.dataset.key, descending };
      if (state.peersInfo) drawContributions(state.peersInfo);
    });
  }
}

async function refresh() {
  try {
    const [info, swarmHistory, peerHistory, peersInfo] = await Promise.all([getJson("/api/swarm"),
      getJson("/api/history"), getJson("/api/history/peers"), getJson("/api/peers")]);
    state.period = info.period;
    state.peersInfo = peersInfo;
    state.history = { swarm: swarmHistory.swarm, peers: peerHistory.peers };
    drawView(info, peersInfo);
    drawContributions(peersInfo);
    drawHistory(state.history);
    document.body.dataset.updated = String(Date.now());
  } catch (error) {
    text("freshness", `the monitor did not answer (${error.message}); retrying`);
  }
  setTimeout(refresh, Math.max(1, state.period) * 1000);
}

window.addEventListener("resize", () => {
  for (const [id, plot] of Object.entries(state.charts)) {
    plot.setSize({ width: Math.max(document.getElementById(id).clientWidth, 300), height: 220 });
  }
});
setupControls();
refresh();
