"use strict";
// The dashboard's script (served at /dashboard.js; no build step, nothing from another origin).
//
// Reads, every 2 s: GET /v1/devices {devices, host} (a device may carry memory_reserved_bytes,
// memory_external_bytes and holders; without them they are derived from the allocations, models
// and tasks below), GET /v1/allocations {allocations}, GET /v1/models {models, profile} with
// GET /v1/gateway {models: queued and in-flight requests per model},
// GET /v1/profile {name, profiles}, GET /api/tasks/history {tasks}, GET /v1/memory/tiers
// {tiers}, GET /v1/cluster/nodes {nodes} (shown when the server is in a pool), and the
// server-sent events of GET /v1/events.
// Acts (operator role, each after a confirmation): POST /api/tasks/{id}/cancel,
// PUT /v1/profile, POST /v1/models/{name}/load|unload; reads GET /api/tasks/{id}/logs.
// The role is learned from PUT /v1/profile {"dry_run": true}: it changes nothing, needs the
// operator role, and answers 403 to a viewer.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "vramancer-token";
const HISTORY_SAMPLES = 150; // 5 minutes at one sample per 2 s
const ENDED = new Set(["done", "failed", "cancelled"]);
const state = {
  role: null, // "operator" | "viewer" | "none" (no valid token) | null (not known yet)
  profile: null,
  allocations: [],
  models: [],
  tasks: [],
  history: new Map(), // GPU index -> [{used, reserved}]
};

// -- small helpers -------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}
function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}
function size(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; n = Number(n);
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}
function pct(ratio) {
  if (ratio == null || !isFinite(ratio)) return "–";
  if (ratio === 0) return "0%";
  if (ratio > 0 && ratio < 0.001) return "<0.1%";
  return (ratio < 0.1 ? (ratio * 100).toFixed(1) : Math.round(ratio * 100)) + "%";
}
// Timestamps arrive as Unix seconds (events, tasks, allocations) or ISO 8601 (models' last_used).
function toDate(ts) { return typeof ts === "number" ? new Date(ts * 1000) : new Date(ts); }
function clock(ts) {
  if (ts == null || ts === "") return "–";
  const t = toDate(ts);
  return isNaN(t) ? String(ts) : t.toLocaleTimeString();
}
function age(ts) {
  if (ts == null || ts === "") return "–";
  const t = toDate(ts);
  if (isNaN(t)) return "–";
  const s = Math.max(0, Math.round((Date.now() - t.getTime()) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}
function short(id) { return String(id ?? "").slice(0, 12); }
function gpuKey(index) { return "gpu:" + index; }

// Replace a container's children only when what it shows changed (keeps hovers and focus).
function show(container, nodes) {
  const fresh = document.createElement(container.tagName);
  fresh.append(...nodes);
  if (fresh.innerHTML !== container.innerHTML) container.replaceChildren(...fresh.childNodes);
}
function table(id, head, body, empty = "none") {
  const tr = h("tr", null, head.map(([label, cls]) => h("th", { class: cls }, label)));
  const rows = body.length ? body : [h("tr", null, h("td", { class: "muted", colspan: head.length }, empty))];
  show($(id), [h("thead", null, tr), h("tbody", null, rows)]);
}
function bar(used, total) {
  const r = total ? Math.min(1, Math.max(0, used / total)) : 0;
  const fill = h("span");
  // A non-zero use always shows at least a sliver: an empty-looking bar would read as "nothing".
  fill.style.width = (r > 0 ? Math.max(r * 100, 1.5) : 0).toFixed(2) + "%";
  return h("div", { class: r > 0.95 ? "bar full" : r > 0.8 ? "bar hot" : "bar", title: pct(r) }, fill);
}

// -- the token and the caller's role -------------------------------------------------------------

const tokenBox = $("token");
tokenBox.value = sessionStorage.getItem(TOKEN_KEY) || "";
tokenBox.addEventListener("change", () => {
  sessionStorage.setItem(TOKEN_KEY, tokenBox.value.trim());
  state.role = null;
  restartEvents();
  refresh();
});
function headers(extra) {
  const t = tokenBox.value.trim();
  return Object.assign(t ? { Authorization: "Bearer " + t } : {}, extra || {});
}
class ApiError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body; }
}
async function call(method, path, body) {
  const init = { method, headers: headers(body === undefined ? null : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, (data.error && data.error.message) || data.detail || r.statusText, data);
  return data;
}
function api(path) { return call("GET", path); }

async function learnRole() {
  if (state.profile == null) return;
  try {
    await call("PUT", "/v1/profile", { name: state.profile, dry_run: true });
    setRole("operator");
  } catch (e) {
    if (e.status === 403 || e.status === 401) setRole(e.status === 403 ? "viewer" : "none");
  }
}
function setRole(role) {
  state.role = role;
  const badge = $("role");
  badge.className = "role " + (role || "");
  badge.textContent = { operator: "operator", viewer: "viewer (read-only)", none: "no token" }[role] || "…";
  syncProfileButton();
}
function denied() {
  if (state.role === "operator") return null;
  if (state.role === "viewer") return "needs an operator token: this token is a viewer's (read-only)";
  return "needs an operator token: type one in the token box";
}
// A button that acts: disabled with the reason as its tooltip when the caller may not act.
function action(label, act, arg, opts = {}) {
  const why = opts.read ? null : denied();
  return h("button", {
    type: "button", class: "small" + (opts.danger ? " danger" : ""), "data-act": act, "data-arg": arg,
    disabled: why != null, title: why || opts.title || label,
  }, label);
}

// -- GPUs ----------------------------------------------------------------------------------------

const owners = { "model:": "model", "task:": "task" };
function taskLabel(task) {
  if (!task) return null;
  const spec = task.spec || {};
  const what = Array.isArray(spec.cmd) ? spec.cmd.join(" ") : spec.cmd || spec.shell || spec.python || spec.model || task.model;
  return task.type + (what ? ": " + what : "");
}
// What holds a GPU, when the server does not say (older servers): its allocations (a model's
// or a task's own carries its owner), loaded models and running tasks without one, and the
// driver's process list.
function deriveHolders(g) {
  const key = gpuKey(g.index), out = [], seen = new Set();
  const tasks = new Map(state.tasks.map((t) => [t.task_id, t]));
  for (const a of state.allocations.filter((x) => x.device === key)) {
    const prefix = Object.keys(owners).find((p) => (a.owner || "").startsWith(p));
    const kind = prefix ? owners[prefix] : "allocation";
    const id = prefix ? a.owner.slice(prefix.length) : a.id;
    const task = kind === "task" ? tasks.get(id) : null;
    seen.add(kind + ":" + id);
    out.push({
      kind, id, bytes: a.memory_bytes, since: a.created_at, pid: null,
      name: kind === "task" ? taskLabel(task) || id : kind === "model" ? id : a.workload_type + " · " + a.priority,
      owner: kind === "task" ? (task ? task.owner : null) : kind === "model" ? "model manager" : a.owner,
    });
  }
  for (const m of state.models.filter((x) => x.device === key && !seen.has("model:" + x.name))) {
    out.push({ kind: "model", id: m.name, name: m.name, owner: "model manager", bytes: m.vram_bytes, since: null, pid: null });
  }
  for (const t of state.tasks.filter((x) => x.state === "running" && x.gpu === g.index && !seen.has("task:" + x.task_id))) {
    out.push({ kind: "task", id: t.task_id, name: taskLabel(t), owner: t.owner, bytes: t.vram_bytes, since: t.started_at, pid: null });
  }
  for (const p of g.processes || []) {
    out.push({ kind: "external", id: "pid:" + p.pid, name: p.name || "pid " + p.pid, owner: null, bytes: p.used_memory_bytes || 0, since: null, pid: p.pid });
  }
  // External memory (used minus reserved, the server's own rule) no listed process explains.
  const reserved = out.filter((x) => x.kind !== "external").reduce((sum, x) => sum + (x.bytes || 0), 0);
  const listed = out.filter((x) => x.kind === "external").reduce((sum, x) => sum + x.bytes, 0);
  const unexplained = Math.max(0, (g.memory_used_bytes || 0) - reserved) - listed;
  if (unexplained > 0) {
    out.push({ kind: "external", id: "unattributed", name: "in use outside VRAMancer, not reported per process", owner: null, bytes: unexplained, since: null, pid: null });
  }
  return out.sort((x, y) => (y.bytes || 0) - (x.bytes || 0));
}
function memoryOf(g, holders) {
  const used = g.memory_used_bytes || 0, total = g.memory_total_bytes || 0;
  const derived = g.memory_reserved_bytes == null;
  const reserved = derived
    ? holders.filter((x) => x.kind !== "external").reduce((s, x) => s + (x.bytes || 0), 0)
    : g.memory_reserved_bytes;
  const external = g.memory_external_bytes != null ? g.memory_external_bytes : Math.max(0, used - reserved);
  return { used, total, reserved, external, derived };
}
function sample(g, mem) {
  const list = state.history.get(g.index) || [];
  list.push({ used: mem.used, reserved: mem.reserved });
  while (list.length > HISTORY_SAMPLES) list.shift();
  state.history.set(g.index, list);
  return list;
}
function sparkline(list, total) {
  const w = 150, hgt = 30, box = svg("svg", { class: "spark", viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", role: "img" });
  const title = svg("title"); title.textContent = "memory over the last " + list.length + " samples (white: used, blue: reserved)";
  box.append(title);
  if (list.length < 2 || !total) return box;
  // At least a minute wide, so the first samples do not fill the whole chart.
  const slots = Math.max(list.length, 30), step = w / (slots - 1), first = slots - list.length;
  const x = (i) => ((first + i) * step).toFixed(1);
  const y = (v) => (hgt - 1 - (Math.min(v, total) / total) * (hgt - 2)).toFixed(1);
  for (const [key, cls] of [["used", "used"], ["reserved", "res"]]) {
    box.append(svg("polyline", { class: cls, points: list.map((s, i) => x(i) + "," + y(s[key])).join(" ") }));
  }
  return box;
}
function stack(mem) {
  const part = (cls, bytes, title) => {
    const span = h("span", { class: cls, title });
    span.style.width = (mem.total ? Math.min(100, (bytes / mem.total) * 100) : 0).toFixed(2) + "%";
    return span;
  };
  // Reserved memory may not be in use yet (a reservation is a promise): the driver's "used"
  // then shows through as the grey part beyond it.
  const other = Math.max(0, mem.used - mem.reserved - mem.external);
  return h("div", { class: "stack" },
    part("res", mem.reserved, "reserved by VRAMancer: " + size(mem.reserved)),
    part("ext", mem.external, "external: " + size(mem.external)),
    part("other", other, "used, not attributed: " + size(other)));
}
function holderRow(x) {
  const acts = [];
  if (x.kind === "task") acts.push(action("Logs", "logs", x.id, { read: true }), action("Cancel", "cancel", x.id, { danger: true }));
  if (x.kind === "model") acts.push(action("Unload", "unload", x.id, { danger: true }));
  return h("tr", { "data-kind": x.kind, "data-id": x.id },
    h("td", { class: "k-" + x.kind }, x.kind),
    h("td", { title: x.name + (x.kind === "task" ? " (" + x.id + ")" : "") }, x.name || x.id),
    h("td", { title: x.owner || "" }, x.owner || (x.pid != null ? "pid " + x.pid : "–")),
    h("td", { class: "num" }, size(x.bytes)),
    h("td", { class: "num" }, x.since == null ? "–" : age(x.since)),
    h("td", { class: "acts" }, acts));
}
function gpuCard(g) {
  const holders = g.holders || deriveHolders(g);
  const mem = memoryOf(g, holders);
  const list = sample(g, mem);
  const tags = [h("span", { class: "tag" }, g.simulated ? "simulated" : g.backend)];
  if (g.error) tags.push(h("span", { class: "tag bad" }, "error: " + g.error));
  const right = [g.utilization_ratio == null ? null : "busy " + pct(g.utilization_ratio),
    g.temperature_celsius == null ? null : Math.round(g.temperature_celsius) + "°C",
    g.power_watts == null ? null : Math.round(g.power_watts) + " W"].filter(Boolean).join(" · ");
  const legend = h("div", { class: "legend" },
    h("span", { class: "used" }, h("i"), "used (driver) ", h("b", null, size(mem.used)), " of " + size(mem.total) + " (" + pct(mem.total ? mem.used / mem.total : null) + ")"),
    h("span", { class: "res" }, h("i"), "reserved by VRAMancer ", h("b", null, size(mem.reserved))),
    h("span", { class: "ext", title: mem.derived ? "used (driver) minus reserved by VRAMancer" : "used (driver) that no VRAMancer reservation explains" },
      h("i"), "external ", h("b", null, size(mem.external))),
    h("span", { class: "free" }, h("i"), "free " + size(Math.max(0, mem.total - mem.used))),
    mem.derived ? h("span", { class: "muted", title: "this server does not report reservations per GPU: summed from its allocations" }, "(reserved: from allocations)") : null);
  const holderTable = h("table", { class: "holders" },
    h("thead", null, h("tr", null, h("th", { class: "w-s" }, "holder"), h("th", null, "name"), h("th", { class: "w-m" }, "owner"),
      h("th", { class: "w-s num" }, "size"), h("th", { class: "w-m num" }, "age"), h("th", { class: "w-acts" }))),
    h("tbody", null, holders.length ? holders.map(holderRow) : h("tr", null, h("td", { class: "muted", colspan: 6 }, "nothing holds this GPU"))));
  return h("div", { class: "gpu", "data-gpu": g.index },
    h("div", { class: "gpu-head" }, h("b", null, gpuKey(g.index) + " · " + g.name), tags, h("span", { class: "right" }, right)),
    h("div", { class: "gpu-mem" }, h("div", null, stack(mem), legend), h("div", null, sparkline(list, mem.total), h("div", { class: "spark-note" }, "used / reserved, last " + (list.length < 30 ? list.length * 2 + " s" : Math.round(list.length / 3) / 10 + " min")))),
    holderTable);
}
async function loadDevices() {
  const d = await api("/v1/devices");
  const cards = (d.devices || []).map(gpuCard);
  show($("gpus"), cards.length ? cards : [h("p", { class: "muted" }, "no GPU: tasks and models run on the CPU")]);
  const host = d.host || {};
  const rowsOut = [];
  if (host.memory_total_bytes) {
    const used = host.memory_total_bytes - host.memory_available_bytes;
    rowsOut.push(h("tr", null, h("td", null, "host RAM ", h("span", { class: "tag" }, host.cpu_count + " CPU")),
      h("td", null, bar(used, host.memory_total_bytes)), h("td", { class: "num" }, size(used) + " / " + size(host.memory_total_bytes)),
      h("td", { class: "num" }, "CPU busy " + pct(host.cpu_utilization_ratio))));
  }
  show($("host"), [h("tbody", null, rowsOut)]);
  $("gpus-note").textContent = (d.node || "") + (d.cpu_only ? " · CPU-only mode" : "");
}

// -- tasks, models, allocations, tiers, pool -----------------------------------------------------

function waitingReason(t) {
  const reason = t.waiting_reason ?? t.wait_reason ?? t.reason ?? null;
  if (reason) return reason;
  // A task not running yet carries why in its error ("waiting for a device: gpu:0: needs ...").
  if (t.error && !ENDED.has(t.state) && t.state !== "running") return t.error;
  if (t.not_before && !ENDED.has(t.state) && t.state !== "running") return "not before " + clock(t.not_before);
  return null;
}
function taskRow(t) {
  const spec = t.spec || {};
  const what = Array.isArray(spec.cmd) ? spec.cmd.join(" ") : spec.cmd || spec.shell || spec.python || t.model || "";
  const reason = waitingReason(t);
  const exit = t.exit_code != null && t.exit_code !== 0 ? " (exit " + t.exit_code + ")" : "";
  const device = t.node ? (String(t.device || "").includes("/") ? t.device : t.node + "/" + t.device) : t.device;
  const when = ENDED.has(t.state) ? "ended " + clock(t.finished_at) : t.started_at ? "running " + age(t.started_at) : "queued " + age(t.submitted_at);
  const acts = [action("Logs", "logs", t.task_id, { read: true })];
  if (!ENDED.has(t.state)) acts.push(action("Cancel", "cancel", t.task_id, { danger: true }));
  return h("tr", { "data-task": t.task_id },
    h("td", { class: "mono", title: t.task_id }, short(t.task_id), " ", action("Copy", "copy", t.task_id, { read: true, title: "copy the task id" })),
    h("td", null, t.type),
    h("td", { class: "mono", title: what }, what || "–"),
    h("td", { class: "num" }, t.vram_bytes ? size(t.vram_bytes) : "–"),
    h("td", { class: "wrap s-" + t.state, title: t.error || "" }, t.state + exit, reason ? h("span", { class: "reason" }, reason) : null),
    h("td", null, device || "–"),
    h("td", { class: "muted" }, when),
    h("td", { class: "acts" }, acts));
}
async function loadTasks() {
  // The latest 15, and every running task (an old one would fall off the latest 15).
  const [d, running] = await Promise.all([api("/api/tasks/history?limit=15"), api("/api/tasks/history?state=running&limit=100")]);
  const latest = new Set((d.tasks || []).map((t) => t.task_id));
  const older = (running.tasks || []).filter((t) => !latest.has(t.task_id));
  state.tasks = older.concat(d.tasks || []);
  $("tasks-note").textContent = "latest 15" + (older.length ? " and " + older.length + " older running" : "");
  table("tasks", [["task", "w-l"], ["type", "w-xs"], ["command"], ["VRAM", "w-s num"], ["state", "w-l"], ["device", "w-s"], ["when", "w-m"], ["", "w-acts"]],
    state.tasks.map(taskRow), "no task yet");
}
async function loadModels() {
  const [d, gw] = await Promise.all([api("/v1/models"), api("/v1/gateway").catch(() => ({ models: [] }))]);
  const requests = new Map((gw.models || []).map((q) => [q.model, q]));
  state.models = d.models || [];
  state.profile = d.profile ?? state.profile;
  const body = state.models.map((m) => {
    const busy = m.state === "loading" || m.state === "unloading";
    const act = m.state === "loaded" ? action("Unload", "unload", m.name, { danger: true }) : busy ? null : action("Load", "load", m.name);
    return h("tr", { "data-model": m.name },
      h("td", { title: m.name + (m.error ? ": " + m.error : "") }, m.name),
      h("td", null, m.backend),
      h("td", { class: "s-" + m.state, title: m.error || "" }, m.state),
      h("td", null, m.device || "–", m.simulated ? " " : null, m.simulated ? h("span", { class: "tag" }, "sim") : null),
      h("td", { class: "num" }, size(m.vram_bytes)),
      gatewayCell(requests.get(m.name)),
      h("td", { class: "acts" }, act));
  });
  table("models", [["model"], ["backend", "w-s"], ["state", "w-s"], ["device", "w-s"], ["VRAM", "w-s num"], ["requests", "w-s"], ["", "w-s"]], body, "no model managed");
  $("models-note").textContent = d.degraded_mode ? "degraded: " + (d.degraded_reason || "") : "";
}
// The gateway's requests for a model (GET /v1/gateway): in flight (they hold it) and queued.
function gatewayCell(q) {
  if (!q || (!q.in_flight && !q.queued)) return h("td", { class: "muted", "data-requests": "0/0" }, "–");
  const wait = q.oldest_wait_s != null ? " (oldest " + q.oldest_wait_s.toFixed(1) + " s)" : "";
  return h("td", { "data-requests": q.in_flight + "/" + q.queued, title: "gateway requests being answered / waiting" + wait },
    q.in_flight + " in flight", q.queued ? " · " + q.queued + " queued" : null);
}
async function loadAllocations() {
  const d = await api("/v1/allocations");
  state.allocations = d.allocations || [];
  table("allocations", [["id", "w-xs"], ["owner"], ["kind", "w-m"], ["device", "w-xs"], ["size", "w-xs num"], ["age", "w-s num"]],
    state.allocations.map((a) => h("tr", null,
      h("td", { class: "mono", title: a.id }, a.id), h("td", { title: a.owner || "" }, a.owner || "–"),
      h("td", { title: a.workload_type + " · " + a.priority }, a.workload_type + " · " + a.priority),
      h("td", null, a.device || "any"), h("td", { class: "num" }, size(a.memory_bytes)), h("td", { class: "num" }, age(a.created_at)))),
    "no allocation");
  $("allocations-note").textContent = size(d.allocated_bytes) + " of " + size(d.budget_bytes) + " budget";
}
async function loadProfile() {
  const d = await api("/v1/profile");
  state.profile = d.name;
  const select = $("profile-select");
  const names = Object.keys(d.profiles || {});
  if (select.dataset.names !== names.join("\n") || select.dataset.current !== d.name) {
    select.replaceChildren(...names.map((n) => h("option", { value: n, selected: n === d.name }, n + (n === d.name ? " (in force)" : ""))));
    select.dataset.names = names.join("\n");
    select.dataset.current = d.name;
  }
}
async function loadTiers() {
  const d = await api("/v1/memory/tiers");
  table("tiers", [["tier", "w-xs"], ["occupancy"], ["used / capacity", "w-l num"], ["%", "w-xs num"], ["blocks", "w-xs num"]],
    (d.tiers || []).map((t) => h("tr", null, h("td", null, t.name), h("td", null, bar(t.used_bytes, t.capacity_bytes)),
      h("td", { class: "num" }, size(t.used_bytes) + " / " + size(t.capacity_bytes)),
      h("td", { class: "num" }, pct(t.capacity_bytes ? t.used_bytes / t.capacity_bytes : null)), h("td", { class: "num" }, t.blocks))));
}
async function loadPool() {
  const d = await api("/v1/cluster/nodes");
  const nodes = d.nodes || [];
  $("pool-section").hidden = nodes.length < 2;
  const now = Date.now() / 1000, body = [];
  for (const n of nodes) {
    body.push(h("tr", null, h("td", null, h("b", null, n.name)), h("td", { class: "s-" + n.state }, n.state),
      h("td", { class: "muted" }, Math.max(0, Math.round(now - n.last_heartbeat)) + " s ago"), h("td", null, n.running_tasks + " running"), h("td"), h("td")));
    for (const g of n.devices || []) {
      body.push(h("tr", null, h("td", null, "\u00a0\u00a0" + g.id, g.simulated ? h("span", { class: "tag" }, "sim") : null),
        h("td", { title: g.name }, g.name), h("td"), h("td"), h("td", null, bar(g.memory_used_bytes, g.memory_total_bytes)),
        h("td", { class: "num" }, size(g.memory_used_bytes) + " / " + size(g.memory_total_bytes))));
    }
  }
  table("pool", [["node / GPU", "w-l"], ["state"], ["heartbeat", "w-m"], ["tasks", "w-m"], ["memory"], ["used", "w-l num"]], body);
  $("pool-note").textContent = nodes.length + " nodes";
}

let refreshing = null;
async function refresh() {
  if (refreshing) return refreshing;
  refreshing = (async () => {
    // The profile first (learning the role needs its name, and the buttons the role), then
    // tasks, models and allocations: the GPU panel derives holders from them.
    const profile = await Promise.allSettled([loadProfile()]);
    if (state.role == null) await learnRole();
    const first = profile.concat(await Promise.allSettled([loadTasks(), loadModels(), loadAllocations()]));
    const rest = await Promise.allSettled([loadDevices(), loadTiers(), loadPool()]);
    const failed = [...first, ...rest].filter((r) => r.status === "rejected").map((r) => r.reason);
    const status = $("status");
    status.textContent = failed.length ? "error: " + failed[0].message : "live · " + new Date().toLocaleTimeString();
    status.classList.toggle("bad", failed.length > 0);
    tokenBox.classList.toggle("need", failed.some((e) => e.status === 401));
    if (failed.some((e) => e.status === 401)) setRole("none");
  })();
  try { await refreshing; } finally { refreshing = null; }
}

// -- actions -------------------------------------------------------------------------------------

function notice(text, ok) {
  const box = $("notice");
  box.hidden = false; box.textContent = text; box.className = ok ? "ok" : "bad";
}
function confirmAction(title, text, detail) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-detail").hidden = !detail;
  $("confirm-detail").textContent = detail || "";
  return new Promise((resolve) => {
    const done = (answer) => { dialog.close(); resolve(answer); };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    dialog.oncancel = () => resolve(false);
    dialog.showModal();
    $("confirm-no").focus();
  });
}
async function act(what, run, success) {
  try {
    const result = await run();
    notice(success(result), true);
  } catch (e) {
    notice(what + " failed: " + e.message + (e.status ? " (HTTP " + e.status + ")" : ""), false);
  }
  refresh();
}
async function cancelTask(id) {
  const t = state.tasks.find((x) => x.task_id === id);
  if (!(await confirmAction("Cancel task", "Cancel task " + id + "?" + (t && t.state === "running" ? " It is running: its process is killed." : ""), t ? taskLabel(t) : null))) return;
  await act("cancel " + short(id), () => call("POST", "/api/tasks/" + encodeURIComponent(id) + "/cancel"), (r) => "task " + id + ": " + r.state + (r.cancel_requested && r.state !== "cancelled" ? " (cancel requested)" : ""));
}
async function modelAction(verb, name) {
  const m = state.models.find((x) => x.name === name);
  const text = verb === "load" ? "Load model " + name + "? It takes " + size(m && m.vram_bytes) + " of VRAM." : "Unload model " + name + "? Its " + size(m && m.vram_bytes) + " are freed; requests to it wait for a reload.";
  if (!(await confirmAction(verb === "load" ? "Load model" : "Unload model", text))) return;
  notice((verb === "load" ? "loading " : "unloading ") + name + "…", true);
  await act(verb + " " + name, () => call("POST", "/v1/models/" + name.split("/").map(encodeURIComponent).join("/") + "/" + verb), (r) => "model " + name + ": " + r.state + (r.device ? " on " + r.device : ""));
}
async function switchProfile() {
  const name = $("profile-select").value;
  if (!name) return;
  let detail;
  try {
    const plan = await call("PUT", "/v1/profile", { name, dry_run: true });
    const steps = (plan.steps || []).map((s, i) => (i + 1) + ". " + (s.description || s.action + " " + s.model));
    detail = (steps.length ? steps : ["nothing to load or unload"]).concat(plan.notes || []).join("\n");
  } catch (e) {
    notice("switch to " + name + " failed: " + e.message, false);
    return;
  }
  if (!(await confirmAction("Switch profile", "Switch from " + state.profile + " to " + name + "? The plan:", detail))) return;
  await act("switch to " + name, () => call("PUT", "/v1/profile", { name }), (r) => "profile " + (r.name || r.profile || name) + " in force");
}
async function copyId(id, button) {
  try {
    await navigator.clipboard.writeText(id);
  } catch {
    // Not a secure context (plain http to another host): the old way.
    const area = h("textarea"); area.value = id; document.body.append(area); area.select();
    document.execCommand("copy"); area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}
// The logs dialog follows a task: it reads on from the offsets the last answer gave, every 2 s
// while the task has not ended, and keeps the last LOG_KEEP characters of each stream.
const LOG_KEEP = 256 * 1024;
let logs = null; // {id, stdout, stderr (offsets), attempt, timer}
function showLogs(id) {
  if (logs) clearTimeout(logs.timer);
  logs = { id, stdout: 0, stderr: 0, attempt: null, timer: null };
  $("logs-title").textContent = "Logs of task " + id;
  $("logs-meta").textContent = "loading…";
  $("logs-stdout").textContent = ""; $("logs-stderr").textContent = "";
  if (!$("logs").open) $("logs").showModal();
  return followLogs(logs);
}
function appendLog(el, text) {
  if (!text) return;
  const all = el.textContent + text;
  el.textContent = all.length > LOG_KEEP ? "…" + all.slice(-LOG_KEEP) : all;
}
async function followLogs(cur) {
  let d;
  try {
    for (let pages = 0; pages < 16; pages++) {
      const query = "?max_bytes=65536&stdout_offset=" + cur.stdout + "&stderr_offset=" + cur.stderr + (cur.attempt ? "&attempt=" + cur.attempt : "");
      d = await api("/api/tasks/" + encodeURIComponent(cur.id) + "/logs" + query);
      if (logs !== cur) return;
      cur.attempt = d.attempt; cur.stdout = d.stdout_next; cur.stderr = d.stderr_next;
      appendLog($("logs-stdout"), d.stdout); appendLog($("logs-stderr"), d.stderr);
      if (!d.truncated) break;
    }
  } catch (e) {
    if (logs === cur) $("logs-meta").textContent = "cannot read the logs: " + e.message;
    return;
  }
  const running = !ENDED.has(d.state);
  $("logs-meta").textContent = "attempt " + d.attempt + " of " + d.attempts + " · " + d.state + (running ? " · following" : "");
  if (running && $("logs").open) cur.timer = setTimeout(() => { if (logs === cur) followLogs(cur); }, 2000);
}
$("logs-close").addEventListener("click", () => $("logs").close());
$("logs").addEventListener("close", () => { if (logs) clearTimeout(logs.timer); logs = null; });
$("logs-refresh").addEventListener("click", () => { if (logs) showLogs(logs.id); });
$("profile-switch").addEventListener("click", switchProfile);
document.addEventListener("click", (e) => {
  const button = e.target.closest("button[data-act]");
  if (!button || button.disabled) return;
  const arg = button.dataset.arg;
  const run = { cancel: () => cancelTask(arg), logs: () => showLogs(arg), load: () => modelAction("load", arg),
    unload: () => modelAction("unload", arg), copy: () => copyId(arg, button) }[button.dataset.act];
  if (run) run();
});
function syncProfileButton() {
  const why = denied();
  $("profile-switch").disabled = why != null;
  $("profile-switch").title = why || "switch to the chosen profile (shows the plan first)";
}

// -- events --------------------------------------------------------------------------------------

const words = (data) => Object.entries(data || {}).filter(([, v]) => v != null && typeof v !== "object").map(([k, v]) => k + " " + v).join(", ");
const dev = (d) => d || "the CPU";
// One line per event: [subject, text, bad?].
const DESCRIBE = {
  task_state: (d) => [short(d.task_id), (d.previous ? d.previous + " → " : "") + d.state + (d.device ? " on " + d.device : "") + (d.exit_code != null ? " · exit " + d.exit_code : "") + (d.error ? " · " + d.error : ""), d.state === "failed"],
  model_loaded: (d) => [d.model, "loaded on " + dev(d.device) + " (" + size(d.vram_bytes) + ", " + d.duration_s.toFixed(1) + " s)" + (d.reason ? " · " + d.reason : "")],
  model_unloaded: (d) => [d.model, "unloaded from " + dev(d.device) + ", " + size(d.freed_bytes) + " freed" + (d.reason ? " · " + d.reason : "")],
  model_migrated: (d) => [d.model, "moved " + dev(d.from) + " → " + d.to + (d.reason ? " · " + d.reason : "")],
  model_error: (d) => [d.model, d.operation + " failed: " + d.error, true],
  model_preempted: (d) => [d.model, "preempted on " + dev(d.device) + " (allocation " + d.allocation_id + ")", true],
  idle_unload: (d) => [d.model, "unloaded after " + Math.round(d.idle_s) + " s idle"],
  allocation_granted: (d) => [d.owner || d.id, "granted " + size(d.memory_bytes) + " on " + (d.device || "any GPU") + " (" + d.workload_type + ", " + d.priority + ")"],
  allocation_released: (d) => [d.owner || d.id, "released " + size(d.memory_bytes) + " on " + (d.device || "any GPU")],
  preempted: (d) => [d.owner || d.allocation_id, "lost " + size(d.memory_bytes) + " on " + (d.device || "any GPU") + ": " + d.reason + (d.by_owner ? " (for " + d.by_owner + ")" : ""), true],
  arbiter_budget_changed: (d) => ["arbiter", "budget now " + size(d.budget_bytes)],
  device_changed: (d) => [d.name, d.change + (d.error ? ": " + d.error : ""), !!d.error],
  vram_changed: (d) => [d.name, "used " + size(d.used_bytes) + " of " + size(d.total_bytes) + " (free " + (d.delta_free_bytes >= 0 ? "+" : "−") + size(Math.abs(d.delta_free_bytes)) + ")"],
  runtime_started: (d) => [d.node, "daemon started"],
  degraded_mode: (d) => [d.backend, d.degraded ? "degraded: " + (d.reason || "backend down") : "back to normal", d.degraded],
  mode_changed: (d) => [d.mode, "profile " + (d.previous || "–") + " → " + d.mode + " in " + d.duration_s.toFixed(1) + " s (" + (d.steps || []).length + " steps)"],
  profile_switch_failed: (d) => [d.profile, "switch failed at step " + d.failed_step + ": " + d.step + (d.error ? " · " + d.error : ""), true],
  block_put: (d) => [d.id, "stored " + size(d.size) + " in " + d.tier],
  block_deleted: (d) => [d.id, "deleted " + size(d.size) + " from " + d.tier],
  block_promoted: (d) => [d.id, "promoted " + size(d.size) + " " + d.source + " → " + d.target + (d.reason ? " · " + d.reason : "")],
  block_demoted: (d) => [d.id, "demoted " + size(d.size) + " " + d.source + " → " + d.target + (d.reason ? " · " + d.reason : "")],
  block_evicted: (d) => [d.id, "evicted " + size(d.size) + " " + d.source + " → " + d.target + (d.reason ? " · " + d.reason : "")],
  block_lost: (d) => [d.id, "lost: " + d.reason, true],
  block_pinned: (d) => [d.id, "pinned"],
  block_unpinned: (d) => [d.id, "unpinned"],
  tier_capacity_changed: (d) => [d.tier, "capacity " + size(d.capacity_bytes) + " (target " + size(d.target_capacity_bytes) + ")"],
  memory_budget_changed: (d) => [d.tier, d.action + " " + size(d.old_bytes) + " → " + size(d.new_bytes) + (d.reason ? ": " + d.reason : "")],
  stream_dropped: (d) => ["", "the event stream was dropped (" + (d.message || d.reason) + "); reconnecting", true],
};
// resource_changed repeats model_loaded / model_unloaded / model_migrated for older clients.
const HIDDEN_KINDS = new Set(["resource_changed"]);
function describe(ev) {
  const data = ev.data || {};
  try {
    const f = DESCRIBE[ev.kind];
    if (f) return f(data);
  } catch { /* a field missing: fall back to the plain words */ }
  return ["", words(data)];
}
function showEvent(ev) {
  if (HIDDEN_KINDS.has(ev.kind)) return;
  const [subject, text, bad] = describe(ev);
  const box = $("events");
  box.prepend(h("div", { class: "ev" + (bad ? " bad" : ""), "data-kind": ev.kind },
    h("span", { class: "muted" }, clock(ev.timestamp)), h("span", { class: "kind" }, ev.kind.replace(/_/g, " ")),
    h("span", { title: subject || "" }, subject || ""), h("span", { class: "text" }, text)));
  while (box.childElementCount > 200) box.lastChild.remove();
}
// A burst of events (a batch of tasks) triggers one refresh, not one per event.
let pending = null;
function soon() { if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 500); }
let eventsAbort = null;
async function restartEvents() {
  if (eventsAbort) eventsAbort.abort();
  const mine = eventsAbort = new AbortController();
  let retry = true;
  try {
    const r = await fetch("/v1/events?replay=30", { headers: headers(), signal: mine.signal });
    // 429: too many streams are open (other tabs): try again later; else a token is missing.
    if (!r.ok || !r.body) { retry = r.status === 429; return; }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    const box = $("events"); box.textContent = ""; box.classList.remove("muted");
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("");
        if (!data) continue;
        let ev; try { ev = JSON.parse(data); } catch { continue; }
        showEvent(ev);
        if (/model_|task_|allocation_|block_|device_|preempted|mode_changed|profile/.test(ev.kind)) soon();
      }
    }
  } catch (e) { /* aborted, or the server went away */ }
  // The stream ended (server restarted, or this page read too slowly and was dropped):
  // reconnect, unless a newer stream replaced this one.
  if (retry && eventsAbort === mine && !mine.signal.aborted) setTimeout(() => { if (eventsAbort === mine) restartEvents(); }, 3000);
}

refresh(); restartEvents(); setInterval(refresh, 2000);
