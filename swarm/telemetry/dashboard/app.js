// The swarm monitor's dashboard: polls the JSON API and draws with uPlot (vendored, served locally).
// Everything a peer wrote (names, organizations) is inserted as text, never as HTML.
"use strict";

const state = { period: 2, charts: {} };

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

function chart(id, series, rows) {
  const element = document.getElementById(id);
  const xs = rows.map((row) => row.time);
  const data = [xs, ...series.map((item) => rows.map((row) => row[item.field]))];
  const points = data.slice(1).reduce((count, ys) => count + ys.filter((y) => y !== null && y !== undefined).length, 0);
  element.dataset.points = String(points);
  const existing = state.charts[id];
  if (existing) { existing.setData(data); return; }
  const options = {
    width: Math.max(element.clientWidth, 300),
    height: 220,
    scales: { x: { time: true } },
    series: [{}, ...series.map((item) => ({ label: item.label, stroke: item.color, width: 2, spanGaps: true }))],
    axes: [{}, { size: 60 }],
  };
  state.charts[id] = new uPlot(options, data, element);
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
    `${peer.peer_id}: ${peer.offences} proven equivocation${peer.offences > 1 ? "s" : ""}, excluded until ` +
    `${new Date(peer.until * 1000).toLocaleString()}`), "no peer excluded");
  drawList("left", info.left.map((peer) =>
    `${peer.display_name || peer.peer_id} (${peer.role}), last seen ${new Date(peer.last_seen * 1000).toLocaleString()}, ` +
    `contributed ${fmt(peer.contributed)} samples`));
}

function drawHistory(history) {
  const rows = history.swarm;
  chart("loss-chart", [
    { field: "loss", label: "training", color: "#d9480f" },
    { field: "heldout_loss", label: "held-out", color: "#1c7ed6" },
  ], rows);
  chart("throughput-chart", [{ field: "samples_per_second", label: "samples/s", color: "#2b8a3e" }], rows);
  chart("peers-chart", [{ field: "peers_online", label: "peers", color: "#5f3dc4" }], rows);
}

async function refresh() {
  try {
    const [info, history, peersInfo] = await Promise.all([getJson("/api/swarm"), getJson("/api/history"),
      getJson("/api/peers")]);
    state.period = info.period;
    drawView(info, peersInfo);
    drawHistory(history);
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
refresh();
