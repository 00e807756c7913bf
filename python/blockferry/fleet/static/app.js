"use strict";
// The fleet's status page: follows /api/events (server-sent events; /api/status polled if the
// stream breaks) and redraws the totals, the throughput chart and a row per disk.

const fmtBytes = (n) => {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return (u === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[u];
};
const fmtRate = (n) => (n ? fmtBytes(n) + "/s" : "–");
const fmtSecs = (s) => {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
};
const text = (id, v) => { document.getElementById(id).textContent = v; };

function cell(tr, cls) {
  let td = tr.querySelector("td." + cls);
  if (!td) { td = document.createElement("td"); td.className = cls; tr.appendChild(td); }
  return td;
}

function row(tbody, d) {
  let tr = tbody.querySelector(`tr[data-disk="${CSS.escape(d.name)}"]`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.disk = d.name;
    for (const c of ["name", "datastore", "state", "progress", "rate", "eta", "lag", "sent", "attempts", "worker", "error"]) cell(tr, c);
    cell(tr, "progress").innerHTML = '<div class="bar"><span></span><em></em></div>';
    tbody.appendChild(tr);
  }
  const frac = d.bytes_total ? Math.min(1, d.bytes_done / d.bytes_total) : (d.state === "done" ? 1 : 0);
  tr.dataset.state = d.state;
  tr.dataset.done = String(d.bytes_done);
  tr.dataset.total = String(d.bytes_total);
  cell(tr, "name").textContent = d.name;
  cell(tr, "name").title = d.path;
  const ds = cell(tr, "datastore");
  ds.textContent = d.datastore.split("/").filter(Boolean).slice(-2).join("/") || d.datastore;
  ds.title = d.datastore;
  const st = cell(tr, "state");
  st.textContent = d.state + (d.phase && d.state === "running" ? " · " + d.phase : "");
  st.className = "state state-" + d.state;
  tr.querySelector(".bar > span").style.width = (frac * 100).toFixed(1) + "%";
  tr.querySelector(".bar > em").textContent = (frac * 100).toFixed(0) + "% of " + fmtBytes(d.bytes_total);
  cell(tr, "rate").textContent = d.state === "running" ? fmtRate(d.rate) : "–";
  cell(tr, "eta").textContent = d.state === "running" ? fmtSecs(d.eta) : "–";
  cell(tr, "lag").textContent = fmtSecs(d.lag_seconds);
  cell(tr, "sent").textContent = fmtBytes(d.bytes_sent);
  cell(tr, "attempts").textContent = d.attempts + (d.resumed ? " (resumed)" : "");
  cell(tr, "worker").textContent = d.worker || "–";
  const err = cell(tr, "error");
  err.textContent = d.last_error || "";
  err.className = "error";
}

function chart(samples) {
  const c = document.getElementById("chart");
  const g = c.getContext("2d");
  const w = c.width, h = c.height, pad = 28;
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#6b7280";
  g.font = "11px system-ui, sans-serif";
  if (!samples.length) { g.fillText("throughput: no data yet", pad, h / 2); return; }
  const t0 = samples[0][0], t1 = Math.max(samples[samples.length - 1][0], t0 + 1);
  const top = Math.max(1, ...samples.map((s) => s[1]));
  g.fillText(fmtRate(top), 4, 12);
  g.fillText("sent per second over " + fmtSecs(t1 - t0), pad, h - 6);
  g.strokeStyle = "#e3e6eb";
  g.beginPath(); g.moveTo(pad, h - pad); g.lineTo(w - 4, h - pad); g.stroke();
  g.strokeStyle = "#2f80ed"; g.lineWidth = 2;
  g.beginPath();
  samples.forEach((s, i) => {
    const x = pad + ((s[0] - t0) / (t1 - t0)) * (w - pad - 4);
    const y = h - pad - (s[1] / top) * (h - pad - 16);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
}

function render(st) {
  const t = st.totals;
  text("fleet-id", st.fleet + " · " + st.mode + " · " + st.workers.length + " workers");
  text("t-disks", t.disks);
  text("t-running", (t.states.running || 0) + (t.states.syncing || 0));
  text("t-done", t.states.done || 0);
  text("t-failed", t.states.failed || 0);
  text("t-progress", t.bytes_total ? ((100 * t.bytes_done) / t.bytes_total).toFixed(1) + "%" : "–");
  text("t-sent", fmtBytes(t.bytes_sent));
  text("t-rate", fmtRate(st.throughput.length ? st.throughput[st.throughput.length - 1][1] : 0));
  text("t-lag", fmtSecs(t.max_lag_seconds));
  text("t-elapsed", fmtSecs(st.elapsed));
  const tbody = document.querySelector("#disks tbody");
  for (const d of st.disks) row(tbody, d);
  chart(st.throughput);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  document.body.dataset.running = String(st.running);
}

function poll() {
  fetch("/api/status").then((r) => r.json()).then((st) => {
    render(st);
    text("connection", st.running ? "live (polling)" : "finished");
    if (st.running) setTimeout(poll, 1000);
  }).catch(() => { text("connection", "disconnected; retrying"); setTimeout(poll, 2000); });
}

function follow() {
  if (!window.EventSource) { poll(); return; }
  const es = new EventSource("/api/events");
  es.onmessage = (m) => { render(JSON.parse(m.data)); text("connection", "live"); };
  es.addEventListener("end", () => { es.close(); text("connection", "finished"); });
  es.onerror = () => { es.close(); poll(); };
}

follow();
