// braid's dashboard: one page, five views, redrawn every second from the
// head's /api/*. Curves over time come from the head's history (the last
// ten minutes, /api/history); the checkpoint history is kept here from
// the moment the page opens.
"use strict";

const POLL_MS = 1000;
const checkpoints = {}; // job -> [{id, duration, bytes, at}]

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  n = Math.max(0, n || 0);
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return (u === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[u];
}

function num(n, digits) {
  if (n === undefined || n === null || Number.isNaN(n)) return "–";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return n.toFixed(digits === undefined ? 0 : digits);
}

function short(id) { return id ? String(id).slice(0, 8) : "–"; }

function when(ms) { return ms ? new Date(ms).toLocaleTimeString() : "–"; }

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => c instanceof Node ? el("td", {}, c) : el("td", {}, c))))));
}

function stateCell(state) { return el("span", { class: "state-" + state }, state); }

function card(label, value, share) {
  return el("div", { class: "card" },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    share === undefined ? null : el("div", { class: "bar" }, el("div", { style: "width:" + Math.min(100, share * 100).toFixed(1) + "%" })));
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (r.status === 401) throw new Error("not signed in: open the URL braid start --head printed (it carries ?token=)");
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

/// The head's history of family `name`: the series `pick` accepts, summed
/// at each sampling time, as [[t, v], ...].
async function past(name, pick) {
  const all = await api("/api/history?name=" + encodeURIComponent(name));
  const sums = new Map();
  for (const s of all) {
    if (!pick(s.labels)) continue;
    for (const [t, v] of s.points) sums.set(t, (sums.get(t) || 0) + v);
  }
  return [...sums.entries()].sort((a, b) => a[0] - b[0]);
}
function chart(title, points, format) {
  const w = 360, h = 140, pad = 34;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  const box = el("div", { class: "chart" }, el("div", { class: "title" }, title), svg);
  if (!points || points.length < 2) {
    svg.innerHTML = `<text x="${pad}" y="${h / 2}">waiting for data…</text>`;
    return box;
  }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5 * Math.abs(y0 || 1) * 0.01 + 1e-6; y1 += 0.5 * Math.abs(y1 || 1) * 0.01 + 1e-6; }
  const sx = x => pad + (x - x0) / Math.max(1, x1 - x0) * (w - pad - 6);
  const sy = y => h - 16 - (y - y0) / (y1 - y0) * (h - 26);
  const path = points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
  const f = format || (v => num(v, 3));
  svg.innerHTML =
    `<line x1="${pad}" y1="${h - 16}" x2="${w - 6}" y2="${h - 16}" stroke="#ccd5de"/>` +
    `<text x="2" y="${sy(y1) + 4}">${f(y1)}</text><text x="2" y="${sy(y0)}">${f(y0)}</text>` +
    `<text x="${pad}" y="${h - 3}">${new Date(x0).toLocaleTimeString()}</text>` +
    `<text x="${w - 60}" y="${h - 3}">${new Date(x1).toLocaleTimeString()}</text>` +
    `<path d="${path}" fill="none" stroke="#3d8bd4" stroke-width="1.6"/>`;
  return box;
}

// ----------------------------------------------------------------- views --

async function overview() {
  const nodes = await api("/api/nodes");
  const alive = nodes.filter(n => n.alive);
  let cpu = 0, cpuUsed = 0, store = 0, storeUsed = 0, workers = 0;
  for (const n of alive) {
    const total = n.resources_total.CPU || 0, free = n.resources_available.CPU || 0;
    cpu += total; cpuUsed += total - free;
    store += n.store_capacity; storeUsed += n.store_used; workers += n.num_workers;
  }
  return [
    el("h2", {}, "Cluster"),
    el("div", { class: "cards" },
      card("Nodes", alive.length + (nodes.length > alive.length ? ` (+${nodes.length - alive.length} dead)` : "")),
      card("CPU in use", num(cpuUsed, 1) + " / " + num(cpu, 1), cpu ? cpuUsed / cpu : 0),
      card("Object store", bytes(storeUsed) + " / " + bytes(store), store ? storeUsed / store : 0),
      card("Workers", workers)),
    el("h2", {}, "Nodes"),
    table(["Node", "Host", "Head", "Alive", "CPU", "Store", "Workers", "Metrics"],
      nodes.map(n => [short(n.node_id), n.hostname, n.is_head_node ? "yes" : "no", stateCell(n.alive ? "yes" : "no"),
        num((n.resources_total.CPU || 0) - (n.resources_available.CPU || 0), 1) + " / " + num(n.resources_total.CPU || 0, 1),
        bytes(n.store_used) + " / " + bytes(n.store_capacity), n.num_workers, n.metrics || "–"])),
  ];
}

async function actors() {
  const list = await api("/api/actors");
  const counts = {};
  for (const a of list) counts[a.state] = (counts[a.state] || 0) + 1;
  return [
    el("h2", {}, "Actors"),
    el("div", { class: "cards" }, Object.entries(counts).map(([s, n]) => card(s, n))),
    el("h2", {}, `${list.length} actor${list.length === 1 ? "" : "s"}`),
    table(["Actor", "Class", "Name", "State", "Node", "PID", "Restarts", "Death cause"],
      list.map(a => [short(a.actor_id), a.class, a.name || "–", stateCell(a.state), short(a.node_id),
        a.worker_pid || "–", a.restarts, el("span", { class: "cause" }, a.death_cause || "")])),
  ];
}

async function jobs() {
  const list = await api("/api/jobs");
  let submitted = [];
  try { submitted = await api("/api/jobs/submitted"); } catch (e) { /* a head without a job manager */ }
  const exits = Object.fromEntries(submitted.map(s => [s.job_id, s]));
  return [
    el("h2", {}, "Submitted jobs"),
    submitted.length ? table(["Job", "State", "Exit code", "Entrypoint", "Started", "Ended", "Message"],
      submitted.slice().reverse().map(s => [short(s.job_id), stateCell(s.state), s.exit_code ?? "–",
        s.entrypoint.join(" "), when(s.start_time_ms), when(s.end_time_ms), s.message || ""]))
      : el("p", { class: "muted" }, "None: braid job submit -- COMMAND runs one."),
    el("h2", {}, "Drivers"),
    table(["Job", "State", "Driver PID", "Program", "Started", "Ended", "Duration"],
      list.map(j => {
        const exit = exits[j.job_id];
        const state = exit && exit.state !== "RUNNING" ? exit.state : j.finished ? "FINISHED" : "RUNNING";
        const end = j.end_time_ms || Date.now();
        return [short(j.job_id), stateCell(state), j.driver_pid, j.exe_path.split("/").pop(),
          when(j.start_time_ms), when(j.end_time_ms), ((end - j.start_time_ms) / 1000).toFixed(1) + " s"];
      })),
  ];
}

function byName(series) {
  const out = {};
  for (const s of series) (out[s.name] || (out[s.name] = [])).push(s);
  return out;
}

async function streams() {
  const now = Date.now();
  const series = byName(await api("/api/series"));
  // job -> task -> {ops: operator -> {in, out}, subtasks, bp, lag}
  const jobs = {};
  const taskOf = s => {
    const { job, task } = s.labels;
    if (!job || !task) return null;
    const j = jobs[job] || (jobs[job] = {});
    return j[task] || (j[task] = { ops: {}, subtasks: new Set(), bp: 0, lag: 0, index: 0 });
  };
  const fields = [["braid_stream_records_in", "in"], ["braid_stream_records_out", "out"],
    ["braid_stream_records_in_per_second", "inRate"], ["braid_stream_records_out_per_second", "outRate"]];
  for (const [name, field] of fields) {
    for (const s of series[name] || []) {
      const t = taskOf(s);
      if (!t) continue;
      const op = t.ops[s.labels.operator] || (t.ops[s.labels.operator] = { in: 0, out: 0, inRate: 0, outRate: 0 });
      op[field] += s.value;
    }
  }
  for (const s of series.braid_stream_backpressure_seconds || []) {
    const t = taskOf(s);
    if (t) t.subtasks.add(s.labels.subtask);
  }
  for (const s of series.braid_stream_backpressure_ratio || []) {
    const t = taskOf(s);
    if (t) t.bp = Math.max(t.bp, s.value);
  }
  for (const s of series.braid_stream_watermark_lag_seconds || []) {
    const t = taskOf(s);
    if (t) t.lag = Math.max(t.lag, s.value);
  }
  for (const s of series.braid_stream_task_index || []) {
    const t = taskOf(s);
    if (t) t.index = s.value;
  }
  const names = Object.keys(jobs).sort();
  if (!names.length) return [el("h2", {}, "Stream jobs"), el("p", { class: "muted" }, "No stream job reports to this cluster.")];
  const perJob = name => Object.fromEntries((series[name] || []).map(s => [s.labels.job, s.value]));
  const lastId = perJob("braid_stream_checkpoint_last_id"), lastDur = perJob("braid_stream_checkpoint_last_duration_seconds");
  const lastBytes = perJob("braid_stream_checkpoint_last_bytes"), lastAt = perJob("braid_stream_checkpoint_last_completed_seconds");
  const failures = perJob("braid_stream_failures"), recoveries = perJob("braid_stream_recoveries");
  const out = [el("h2", {}, "Stream jobs")];
  for (const job of names) {
    const graph = el("div", { class: "graph" });
    const tasks = Object.entries(jobs[job]).sort((a, b) => a[1].index - b[1].index);
    tasks.forEach(([task, t], i) => {
      const ops = Object.entries(t.ops);
      // Into the task: its first operator's input (a source has none: its
      // first operator's output); out of it: its last operator's output.
      const inRate = ops.length ? ops[0][1].inRate : 0;
      const outRate = ops.length ? ops[ops.length - 1][1].outRate : 0;
      if (i > 0) {
        // The sender's share of time waiting for credit: backpressure on this edge.
        const upstream = tasks[i - 1][1];
        graph.append(el("div", { class: "edge" }, el("div", { class: "arrow" }, "→"),
          `backpressure ${(100 * upstream.bp).toFixed(0)}%`));
      }
      graph.append(el("div", { class: "op" }, el("div", { class: "name" }, task),
        el("div", {}, `${t.subtasks.size} subtask${t.subtasks.size === 1 ? "" : "s"}`),
        el("div", {}, `in ${num(inRate)} /s · out ${num(outRate)} /s`),
        ops.map(([op, c]) => el("div", { class: "muted" }, `${op}: ${num(c.in)} in, ${num(c.out)} out`)),
        t.lag ? el("div", { class: "muted" }, `watermark lag ${num(t.lag, 2)} s`) : null));
    });
    const cps = checkpoints[job] || (checkpoints[job] = []);
    if (lastId[job] !== undefined && (!cps.length || cps[cps.length - 1].id !== lastId[job])) {
      cps.push({ id: lastId[job], duration: lastDur[job], bytes: lastBytes[job], at: lastAt[job] });
      if (cps.length > 50) cps.shift();
    }
    out.push(el("h2", {}, `Job ${job}`), graph,
      el("div", { class: "cards" },
        card("Last checkpoint", lastId[job] === undefined ? "none yet" : "#" + lastId[job]),
        card("Its duration", lastDur[job] === undefined ? "–" : num(lastDur[job] * 1000, 1) + " ms"),
        card("Its size", lastBytes[job] === undefined ? "–" : bytes(lastBytes[job])),
        card("Its age", lastAt[job] === undefined ? "–" : num(now / 1000 - lastAt[job], 1) + " s"),
        card("Failures / recoveries", `${failures[job] || 0} / ${recoveries[job] || 0}`)),
      el("div", { class: "charts" }, await Promise.all(tasks.map(async ([task, t]) => {
        const ops = Object.keys(t.ops);
        const last = ops[ops.length - 1];
        const points = await past("braid_stream_records_out_per_second",
          l => l.job === job && l.task === task && l.operator === last);
        return chart(`${task}: records out /s`, points, v => num(v));
      }))),
      el("h2", {}, "Checkpoint history"),
      table(["Checkpoint", "Duration", "Size", "Completed"],
        cps.slice().reverse().map(c => ["#" + c.id, num(c.duration * 1000, 1) + " ms", bytes(c.bytes), c.at ? new Date(c.at * 1000).toLocaleTimeString() : "–"])));
  }
  return out;
}

async function learning() {
  const now = Date.now();
  const series = byName(await api("/api/series"));
  const jobsNow = [...new Set((series.braid_learning_rows || []).map(s => s.labels.job))].sort();
  if (!jobsNow.length) return [el("h2", {}, "Online learning"), el("p", { class: "muted" }, "No online-learning job reports to this cluster.")];
  const value = (name, job, extra) => {
    const s = (series[name] || []).find(s => s.labels.job === job && (!extra || Object.entries(extra).every(([k, v]) => s.labels[k] === v)));
    return s ? s.value : undefined;
  };
  const out = [el("h2", {}, "Online learning")];
  for (const job of jobsNow) {
    const rows = value("braid_learning_rows", job);
    const rowsRate = value("braid_learning_rows_per_second", job);
    const figures = {
      auc: value("braid_learning_auc", job), logloss: value("braid_learning_logloss", job),
      lag: value("braid_learning_model_lag_seconds", job), p99: value("braid_serving_latency_seconds", job, { quantile: "0.99" }),
      version: value("braid_learning_model_version", job), requests: value("braid_serving_requests", job),
    };
    const mine = extra => l => l.job === job && (!extra || Object.entries(extra).every(([k, v]) => l[k] === v));
    const ms = points => points.map(([t, v]) => [t, v * 1000]);
    const [auc, logloss, lag, p99, rowsPast] = await Promise.all([
      past("braid_learning_auc", mine()), past("braid_learning_logloss", mine()),
      past("braid_learning_model_lag_seconds", mine()), past("braid_serving_latency_seconds", mine({ quantile: "0.99" })),
      past("braid_learning_rows_per_second", mine())]);
    out.push(el("h2", {}, `Job ${job}`),
      el("div", { class: "cards" },
        card("Rows trained", num(rows)), card("Rows / s", num(rowsRate)),
        card("Window AUC", num(figures.auc, 4)), card("Window logloss", num(figures.logloss, 4)),
        card("Model version", num(figures.version)), card("Model lag", figures.lag === undefined ? "–" : num(figures.lag * 1000, 1) + " ms"),
        card("Serving requests", num(figures.requests)), card("Serving p99", figures.p99 === undefined ? "–" : num(figures.p99 * 1000, 2) + " ms")),
      el("div", { class: "charts" },
        chart("AUC (window)", auc, v => num(v, 4)),
        chart("Logloss (window)", logloss, v => num(v, 4)),
        chart("Model lag (ms)", ms(lag), v => num(v, 1)),
        chart("Serving latency p99 (ms)", ms(p99), v => num(v, 2)),
        chart("Rows / s", rowsPast, v => num(v))));
  }
  return out;
}

const views = { overview, actors, jobs, streams, learning };

function current() {
  const name = (location.hash || "#overview").slice(1);
  return views[name] ? name : "overview";
}

let drawing = false;
async function draw() {
  if (drawing) return;
  drawing = true;
  const name = current();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  const page = document.getElementById("page");
  try {
    const content = await views[name]();
    page.replaceChildren(...content);
    page.dataset.view = name;
    const shown = document.getElementById("load-ms");
    if (shown.dataset.done !== "1") {
      // Navigation Timing's origin is the navigation's start: this is the
      // time until the first view stood drawn with its data.
      shown.textContent = Math.round(performance.now());
      shown.dataset.done = "1";
    }
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    page.replaceChildren(el("p", { class: "state-DEAD" }, String(e.message || e)));
  } finally {
    drawing = false;
  }
}

window.addEventListener("hashchange", draw);
draw();
setInterval(draw, POLL_MS);
