// The ferry dashboard: hash routes (#/queues, #/queue/<name>, #/jobs, #/job/<id>, #/events, #/enqueue,
// #/cluster), data from the /v1 API and live events from /v1/ws. See docs/dashboard.md.

import { ApiError, Live, api, auth, q } from "./api.js";
import { append, clear, duration, h, sortableTable, sparkline, text, time } from "./dom.js";

const view = document.getElementById("view");
const POLL_MS = 2000;
const BUCKET_MS = 5000; // sparkline resolution
const BUCKETS = 36; // 3 minutes of history
const TAIL = 500; // events kept for the live tail

// ---- shared live state: events from every subscribed channel, per-queue counters and samples ----

const events = []; // newest last
const perQueue = new Map(); // name -> {buckets: Map(bucket -> {done, failed}), samples: [{t, ...figures}]}
let eventListeners = new Set();

function queueStats(name) {
  let s = perQueue.get(name);
  if (!s) perQueue.set(name, (s = { buckets: new Map(), samples: [] }));
  return s;
}

// A job event reaches the page once per channel it is on (its queue's, the owner's `user:`, `job:<id>`):
// the tail keeps it once.
const seen = new Set();

function onEvent(frame) {
  frame.received = Date.now();
  const d = frame.data || {};
  const key = d.id ? `${d.id}|${frame.event}|${d.attempt}|${d.at}` : null;
  if (!key || !seen.has(key)) {
    if (key) seen.add(key);
    events.push(frame);
    if (events.length > TAIL) for (const old of events.splice(0, events.length - TAIL)) {
      const dd = old.data || {};
      seen.delete(`${dd.id}|${old.event}|${dd.attempt}|${dd.at}`);
    }
  }
  if (typeof d.queue === "string" && frame.channel.startsWith("queue:")) {
    const b = Math.floor((d.at || frame.received) / BUCKET_MS);
    const st = queueStats(d.queue);
    const c = st.buckets.get(b) || { done: 0, failed: 0 };
    if (frame.event === "job.completed") c.done++;
    if (frame.event === "job.retrying" || frame.event === "job.dead") c.failed++;
    st.buckets.set(b, c);
    for (const k of st.buckets.keys()) if (k < b - BUCKETS) st.buckets.delete(k);
  }
  for (const fn of eventListeners) fn(frame);
}

/** Per-bucket series for a queue: completions per second and the failed share of finished attempts. */
function series(name) {
  const st = queueStats(name);
  const now = Math.floor(Date.now() / BUCKET_MS);
  const thr = [], fail = [];
  for (let b = now - BUCKETS + 1; b <= now; b++) {
    const c = st.buckets.get(b) || { done: 0, failed: 0 };
    thr.push(c.done / (BUCKET_MS / 1000));
    fail.push(c.done + c.failed ? c.failed / (c.done + c.failed) : 0);
  }
  return { thr, fail };
}

const live = new Live(onEvent, (up) => {
  const el = document.getElementById("live");
  el.textContent = up ? "live" : "offline";
  el.className = up ? "live on" : "live off";
});

// ---- chrome: flash messages, navigation, login ----

function flash(msg, kind = "info") {
  const el = document.getElementById("flash");
  el.textContent = msg;
  el.className = `flash ${kind}`;
  clearTimeout(flash.t);
  flash.t = setTimeout(() => (el.className = "flash hidden"), 6000);
}

function errorBox(e) {
  if (e instanceof ApiError && e.status === 503 && e.type === "no-store") {
    return h("div.notice", {},
      h("strong", {}, "Job history needs a database. "),
      "This gateway runs without PostgreSQL (no --database-url), so it cannot list jobs or show audit trails. ",
      "Searching by job id still works: it reads the live state.");
  }
  return h("div.error", {}, e instanceof ApiError && e.status ? `${e.status}: ${e.message}` : String(e.message || e));
}

function chrome() {
  const logged = !!auth.claims;
  document.getElementById("logout").className = logged ? "" : "hidden";
  document.getElementById("nav").className = logged ? "" : "hidden";
  const who = document.getElementById("who");
  who.textContent = logged ? `${auth.claims.sub ?? "?"}${auth.claims.tenant ? ` @ ${auth.claims.tenant}` : ""} · ${auth.scopes().join(" ")}` : "";
  for (const a of document.querySelectorAll("#nav a")) {
    const need = a.dataset.scope;
    a.classList.toggle("hidden", !!need && !auth.can(need));
    a.classList.toggle("active", location.hash.startsWith(`#/${a.dataset.page}`));
  }
}

function loginPage(message) {
  const input = h("textarea", { id: "token", rows: 4, placeholder: "eyJhbGciOi…", spellcheck: false });
  const submit = (ev) => {
    ev.preventDefault();
    if (!auth.set(input.value)) {
      flash("That is not a JWT (three base64url parts separated by dots).", "error");
      return;
    }
    start();
  };
  return h("section.login", {},
    h("h1", {}, "Sign in"),
    message ? h("div.error", {}, message) : null,
    h("p", {}, "Paste a ferry token (", h("code", {}, "ferry token --sub you --scope \"queues:read jobs:read\""),
      "). It stays in this tab's session storage only."),
    h("form", { on: { submit } }, input, h("button", { type: "submit", id: "login" }, "Sign in")));
}

// ---- pages ----

let stopPage = () => {};

function every(ms, fn) {
  let alive = true, timer;
  const tick = async () => {
    if (!alive) return;
    await fn();
    if (alive) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    alive = false;
    clearTimeout(timer);
  };
}

const pages = {
  queues: queuesPage,
  queue: deadPage,
  jobs: jobsPage,
  job: jobPage,
  events: eventsPage,
  enqueue: enqueuePage,
  cluster: clusterPage,
  autoscaler: autoscalerPage,
};

let sort = { key: "queue", dir: "asc" };

function queuesPage(root) {
  if (!auth.can("queues:read")) {
    append(root, h("div.notice", {}, "This token has no queues:read scope: queue figures are not available."));
    return () => {};
  }
  const table = h("div");
  const updated = h("span.muted");
  append(root, h("h1", {}, "Queues ", updated), table,
    h("p.muted", {}, `Completed (jobs in the last minute) and failure rate (retried or dead among the attempts finished in the last minute) are computed in this browser from the live events since it signed in, in ${BUCKET_MS / 1000} s buckets over the last ${(BUCKET_MS * BUCKETS) / 60000} minutes.`));
  let rows = [];
  const render = () => {
    const admin = auth.can("queues:admin");
    const cols = [
      { key: "queue", label: "Queue", value: (r) => r.queue, render: (r) => admin ? h("a", { href: `#/queue/${q(r.queue)}` }, r.queue) : r.queue },
      { key: "state", label: "State", value: (r) => (r.paused ? "paused" : "running"), render: (r) => h(r.paused ? "span.badge.warn" : "span.badge.ok", {}, r.paused ? "paused" : "running") },
      { key: "depth", label: "Depth", num: true, value: (r) => r.depth },
      { key: "active", label: "Active", num: true, value: (r) => r.active },
      { key: "scheduled", label: "Scheduled", num: true, value: (r) => r.scheduled },
      { key: "dead", label: "Dead", num: true, value: (r) => r.dead },
      { key: "lag_ms", label: "Oldest wait", num: true, value: (r) => r.lag_ms ?? 0, render: (r) => duration(r.lag_ms) },
      { key: "thr", label: "Completed", num: true, value: (r) => series(r.queue).thr.at(-1),
        render: (r) => { const s = series(r.queue).thr; return h("span.sparkcell", {}, sparkline(s, { label: "completions/s" }), ` ${perMinute(s)}/min`); } },
      { key: "fail", label: "Failure rate", num: true, value: (r) => series(r.queue).fail.at(-1),
        render: (r) => { const s = series(r.queue).fail; return h("span.sparkcell", {}, sparkline(s, { label: "failure rate" }), ` ${failedShare(r.queue)}`); } },
      { key: "actions", label: "", sortable: false, value: () => "", render: (r) => actions(r, admin) },
    ];
    clear(table).append(rows.length ? sortableTable(cols, rows, sort, (s) => { sort = s; render(); })
      : h("p.muted", {}, "No queues yet: enqueue a job to create one."));
  };
  const actions = (r, admin) => {
    const act = async (btn, verb) => {
      btn.disabled = true;
      try {
        await api("POST", `/v1/queues/${q(r.queue)}/${verb}`);
        flash(`${r.queue}: ${verb}d`);
        await load();
      } catch (e) {
        flash(e.message, "error");
        btn.disabled = false;
      }
    };
    const title = admin ? "" : "needs the queues:admin scope";
    const btn = h("button", { type: "button", disabled: !admin, title, class: r.paused ? "resume" : "pause", dataset: { queue: r.queue } }, r.paused ? "Resume" : "Pause");
    btn.addEventListener("click", () => act(btn, r.paused ? "resume" : "pause"));
    return h("span.actions", {}, btn, admin ? h("a.button", { href: `#/queue/${q(r.queue)}` }, "Dead letters") : null);
  };
  const load = async () => {
    try {
      const data = await api("GET", "/v1/queues");
      rows = data.queues || [];
      for (const r of rows) {
        live.subscribe(`queue:${r.queue}`);
        const st = queueStats(r.queue);
        st.samples.push({ t: Date.now(), ...r });
        if (st.samples.length > BUCKETS) st.samples.shift();
      }
      updated.textContent = `updated ${time(Date.now()).slice(11, 19)}`;
      render();
    } catch (e) {
      clear(table).append(errorBox(e));
    }
  };
  const stop = every(POLL_MS, load);
  const redraw = setInterval(render, BUCKET_MS);
  return () => { stop(); clearInterval(redraw); };
}

// Completions in the last minute (the series is per second, per bucket).
const perMinute = (s) => Math.round(s.slice(-(60000 / BUCKET_MS)).reduce((x, y) => x + y, 0) * (BUCKET_MS / 1000));
// Failed share of the attempts that finished in the last minute.
function failedShare(name) {
  const st = queueStats(name);
  const now = Math.floor(Date.now() / BUCKET_MS);
  let done = 0, failed = 0;
  for (let b = now - 60000 / BUCKET_MS + 1; b <= now; b++) {
    const c = st.buckets.get(b);
    if (c) (done += c.done), (failed += c.failed);
  }
  return done + failed ? `${Math.round((100 * failed) / (done + failed))}%` : "—";
}

function deadPage(root, name) {
  const queue = decodeURIComponent(name || "");
  const box = h("div");
  append(root, h("h1", {}, "Dead letters of ", h("code", {}, queue)), box);
  let jobs = [];
  const selected = new Set();
  const retry = async (ids) => {
    let ok = 0;
    const failed = [];
    for (const id of ids) {
      try {
        await api("POST", `/v1/jobs/${q(id)}/retry`);
        ok++;
      } catch (e) {
        failed.push(`${id}: ${e.message}`);
      }
    }
    flash(`retried ${ok} job${ok === 1 ? "" : "s"}${failed.length ? `; failed: ${failed.join("; ")}` : ""}`, failed.length ? "error" : "info");
    selected.clear();
    await load();
  };
  const render = () => {
    const admin = auth.can("queues:admin");
    const all = h("input", { type: "checkbox", title: "select all", checked: jobs.length > 0 && selected.size === jobs.length,
      on: { change: (e) => { for (const j of jobs) e.target.checked ? selected.add(j.id) : selected.delete(j.id); render(); } } });
    const rows = jobs.map((j) => h("tr", {},
      h("td", {}, h("input", { type: "checkbox", checked: selected.has(j.id), dataset: { id: j.id },
        on: { change: (e) => { e.target.checked ? selected.add(j.id) : selected.delete(j.id); render(); } } })),
      h("td", {}, h("a", { href: `#/job/${q(j.id)}` }, j.id)),
      h("td", {}, j.kind), h("td.num", {}, `${j.attempts}/${j.max_attempts}`),
      h("td.err", {}, text(j.error)), h("td", {}, time(j.updated_at)),
      h("td", {}, h("button.retry-one", { type: "button", disabled: !admin, on: { click: () => retry([j.id]) } }, "Retry"))));
    clear(box).append(
      h("div.toolbar", {},
        h("button#retry-selected", { type: "button", disabled: !admin || selected.size === 0, on: { click: () => retry([...selected]) } }, `Retry selected (${selected.size})`),
        h("button#retry-all", { type: "button", disabled: !admin || jobs.length === 0, on: { click: () => confirmAll() } }, `Retry all (${jobs.length})`),
        h("button", { type: "button", on: { click: () => load() } }, "Refresh")),
      jobs.length
        ? h("table.dead", {}, h("thead", {}, h("tr", {}, h("th", {}, all), ["Job", "Kind", "Attempts", "Error", "Died"].map((l) => h("th", {}, l)), h("th"))), h("tbody", {}, rows))
        : h("p.muted", {}, "No dead jobs in this queue."));
  };
  const confirmAll = () => retry(jobs.map((j) => j.id));
  const load = async () => {
    try {
      jobs = (await api("GET", `/v1/queues/${q(queue)}/dead?limit=1000`)).jobs || [];
      for (const id of [...selected]) if (!jobs.some((j) => j.id === id)) selected.delete(id);
      render();
    } catch (e) {
      clear(box).append(errorBox(e));
    }
  };
  load();
  return () => {};
}

const STATES = ["", "scheduled", "queued", "active", "retrying", "completed", "dead", "cancelled"];
let lastSearch = {};

function jobsPage(root) {
  const f = (name, props = {}) => h("input", { name, id: `f-${name}`, value: lastSearch[name] || "", ...props });
  const state = h("select", { name: "state", id: "f-state" }, STATES.map((s) => h("option", { value: s, selected: lastSearch.state === s }, s || "any state")));
  const results = h("div");
  const form = h("form.search", { on: { submit: (e) => { e.preventDefault(); search(); } } },
    h("label", {}, "Job id", f("id", { placeholder: "0193…", size: 38 })),
    h("label", {}, "Queue", f("queue")), h("label", {}, "Kind", f("kind")), h("label", {}, "State", state),
    h("label", {}, "Created after", f("created_after", { type: "datetime-local", step: 1 })),
    h("label", {}, "Created before", f("created_before", { type: "datetime-local", step: 1 })),
    h("button", { type: "submit", id: "search" }, "Search"));
  append(root, h("h1", {}, "Jobs"), form, results);
  const value = (n) => form.elements[n].value.trim();
  const search = async (cursor, more) => {
    lastSearch = Object.fromEntries(["id", "queue", "kind", "state", "created_after", "created_before"].map((n) => [n, value(n)]));
    if (lastSearch.id) {
      location.hash = `#/job/${q(lastSearch.id)}`;
      return;
    }
    const params = new URLSearchParams();
    for (const n of ["queue", "kind", "state"]) if (lastSearch[n]) params.set(n, lastSearch[n]);
    for (const n of ["created_after", "created_before"]) if (lastSearch[n]) params.set(n, String(new Date(lastSearch[n]).getTime()));
    params.set("limit", "50");
    if (cursor) params.set("cursor", cursor);
    try {
      const data = await api("GET", `/v1/jobs?${params}`);
      if (!more) clear(results);
      let tbody = results.querySelector("tbody");
      if (!tbody) {
        tbody = h("tbody");
        results.append(h("table.jobs", {}, h("thead", {}, h("tr", {}, ["Job", "Queue", "Kind", "State", "Attempts", "Created", "Updated"].map((l) => h("th", {}, l)))), tbody));
      }
      for (const j of data.jobs || []) tbody.append(jobRow(j));
      results.querySelector(".more")?.remove();
      if (data.next_cursor) results.append(h("button.more", { type: "button", on: { click: () => search(data.next_cursor, true) } }, "More"));
      if (!tbody.children.length) results.append(h("p.muted", {}, "No job matches (the record lags the live state by the recorder's delay)."));
    } catch (e) {
      clear(results).append(errorBox(e));
    }
  };
  if (Object.values(lastSearch).some(Boolean) && !lastSearch.id) search();
  return () => {};
}

const jobRow = (j) => h("tr", {},
  h("td", {}, h("a", { href: `#/job/${q(j.id)}` }, j.id)), h("td", {}, j.queue), h("td", {}, j.kind),
  h("td", {}, h(`span.badge.s-${String(j.state).replace(/[^a-z]/g, "")}`, {}, j.state)), h("td.num", {}, `${j.attempts}/${j.max_attempts}`),
  h("td", {}, time(j.created_at)), h("td", {}, time(j.updated_at)));

function jobPage(root, id) {
  const jobId = decodeURIComponent(id || "");
  const detail = h("div");
  const trail = h("div");
  append(root, h("h1", {}, "Job ", h("code#job-id", {}, jobId)), detail, h("h2", {}, "Audit trail"), trail);
  // The audit trail comes from PostgreSQL, which the recorder fills a moment after the live events: until the
  // trail has caught up with the job's state, it is read again every second (for at most a minute).
  let state = null, retrail = null, tries = 0;
  const load = async () => {
    clearTimeout(retrail);
    try {
      const j = await api("GET", `/v1/jobs/${q(jobId)}`);
      state = j.state;
      const finished = ["completed", "dead", "cancelled"].includes(j.state);
      const buttons = h("div.toolbar", {},
        auth.can("jobs:cancel") && !finished ? h("button#cancel", { type: "button", on: { click: () => act("DELETE", `/v1/jobs/${q(jobId)}`, "cancelled") } }, "Cancel") : null,
        auth.can("queues:admin") && j.state === "dead" ? h("button#retry", { type: "button", on: { click: () => act("POST", `/v1/jobs/${q(jobId)}/retry`, "queued again") } }, "Retry") : null);
      clear(detail).append(buttons,
        h("dl.fields", {}, [["State", h(`span.badge.s-${String(j.state).replace(/[^a-z]/g, "")}#job-state`, {}, j.state)], ["Queue", j.queue], ["Kind", j.kind], ["Priority", j.priority],
          ["Attempts", `${j.attempts} of ${j.max_attempts}`], ["Created", time(j.created_at)], ["Updated", time(j.updated_at)], ["Runs at", time(j.run_at)]]
          .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
        h("h2", {}, "Payload"), h("pre#payload", {}, text(j.payload)),
        h("h2", {}, "Result"), h("pre#result", {}, text(j.result)),
        h("h2", {}, "Error"), h("pre#error", { class: j.error ? "err" : "" }, text(j.error)));
    } catch (e) {
      clear(detail).append(errorBox(e));
    }
    try {
      const t = await api("GET", `/v1/jobs/${q(jobId)}/events`);
      const last = (t.events || []).at(-1);
      if ((!last || last.state !== state) && tries++ < 60) retrail = setTimeout(load, 1000);
      clear(trail).append((t.events || []).length
        ? h("table.trail", {}, h("thead", {}, h("tr", {}, ["At", "Event", "State", "Attempt", "Actor", "Correlation", "Data"].map((l) => h("th", {}, l)))),
          h("tbody", {}, t.events.map((e) => h("tr", {}, h("td", {}, time(e.at)), h("td", {}, e.type), h("td", {}, e.state), h("td.num", {}, e.attempt),
            h("td", {}, e.actor), h("td", {}, e.correlation_id), h("td", {}, h("pre.inline", {}, e.data == null ? "" : text(e.data)))))))
        : h("p.muted", {}, "No events recorded yet (the recorder copies them within a moment)."));
    } catch (e) {
      clear(trail).append(errorBox(e));
    }
  };
  const act = async (method, path, what) => {
    try {
      await api(method, path);
      flash(`job ${what}`);
      load();
    } catch (e) {
      flash(e.message, "error");
    }
  };
  const channel = `job:${jobId}`;
  live.subscribe(channel);
  const onFrame = (f) => { if (f.data?.id === jobId) load(); };
  eventListeners.add(onFrame);
  load();
  return () => { clearTimeout(retrail); eventListeners.delete(onFrame); live.unsubscribe(channel); };
}

function eventsPage(root) {
  const filter = h("input#tail-filter", { placeholder: "filter: queue, kind, event, id…", size: 40 });
  const pause = h("input#tail-pause", { type: "checkbox" });
  const body = h("tbody");
  append(root, h("h1", {}, "Live events"),
    h("div.toolbar", {}, filter, h("label", {}, pause, " pause")),
    h("p.muted", {}, "Events of every queue and of your own jobs, newest first, since this tab signed in (the last 500)."),
    h("table.tail", {}, h("thead", {}, h("tr", {}, ["Received", "Channel", "Event", "Job", "Queue", "Kind", "Attempt", "Detail"].map((l) => h("th", {}, l)))), body));
  let queued = false;
  const render = () => {
    queued = false;
    if (pause.checked) return;
    const needle = filter.value.trim().toLowerCase();
    const rows = [];
    for (let i = events.length - 1; i >= 0 && rows.length < 200; i--) {
      const f = events[i], d = f.data || {};
      const detail = d.error ?? d.result ?? d.progress ?? (f.event === "message" ? d : null);
      const cells = [time(f.received).slice(11), f.channel, f.event, d.id, d.queue, d.kind, d.attempt, detail == null ? "" : text(detail)];
      if (needle && !cells.some((c) => String(c ?? "").toLowerCase().includes(needle))) continue;
      rows.push(h("tr", {}, cells.map((c, k) => h(k === 7 ? "td.detail" : "td.nowrap", {}, k === 3 && c ? h("a", { href: `#/job/${q(c)}` }, c) : c ?? ""))));
    }
    clear(body).append(...rows);
  };
  const onFrame = () => { if (!queued) { queued = true; requestAnimationFrame(render); } };
  filter.addEventListener("input", render);
  pause.addEventListener("change", render);
  eventListeners.add(onFrame);
  render();
  return () => eventListeners.delete(onFrame);
}

function enqueuePage(root) {
  if (!auth.can("jobs:submit")) {
    append(root, h("div.notice", {}, "This token has no jobs:submit scope."));
    return () => {};
  }
  const out = h("div#enqueue-result");
  const form = h("form.enqueue", { on: { submit: (e) => { e.preventDefault(); send(); } } },
    h("label", {}, "Queue", h("input", { name: "queue", id: "e-queue", value: "default", required: true })),
    h("label", {}, "Kind", h("input", { name: "kind", id: "e-kind", value: "ferry.echo", required: true })),
    h("label", {}, "Priority", h("select", { name: "priority", id: "e-priority" }, ["normal", "high", "low"].map((p) => h("option", { value: p }, p)))),
    h("label", {}, "Delay (ms)", h("input", { name: "delay_ms", id: "e-delay", type: "number", min: 0 })),
    h("label", {}, "Max attempts", h("input", { name: "max_attempts", id: "e-attempts", type: "number", min: 1, max: 1000 })),
    h("label.wide", {}, "Payload (JSON)", h("textarea", { name: "payload", id: "e-payload", rows: 8, spellcheck: false, value: '{"hello": "world"}' })),
    h("button", { type: "submit", id: "enqueue" }, "Enqueue"));
  append(root, h("h1", {}, "Enqueue a job"), form, out);
  const send = async () => {
    const v = (n) => form.elements[n].value.trim();
    const job = { kind: v("kind"), priority: v("priority") };
    if (v("payload")) {
      try {
        job.payload = JSON.parse(v("payload"));
      } catch (e) {
        clear(out).append(h("div.error", {}, `payload is not valid JSON: ${e.message}`));
        return;
      }
    }
    if (v("delay_ms")) job.delay_ms = Number(v("delay_ms"));
    if (v("max_attempts")) job.max_attempts = Number(v("max_attempts"));
    try {
      const r = await api("POST", `/v1/queues/${q(v("queue"))}/jobs`, job);
      if (auth.can("queues:read")) live.subscribe(`queue:${r.queue}`);
      clear(out).append(h("div.ok", {}, `${r.duplicate ? "duplicate of" : "enqueued"} `, h("a#enqueued-link", { href: `#/job/${q(r.id)}` }, r.id), ` in ${r.queue} (${r.state})`));
    } catch (e) {
      const fields = (e.problem?.errors || []).map((x) => h("li", {}, `${x.field}: ${x.message}`));
      clear(out).append(errorBox(e), fields.length ? h("ul", {}, fields) : null);
    }
  };
  return () => {};
}

function clusterPage(root) {
  const box = h("div");
  append(root, h("h1", {}, "Gateways and connections"), box);
  const load = async () => {
    try {
      const c = await api("GET", "/v1/cluster");
      const summary = h("dl.fields", {}, [["Answered by", c.self], ["Eligible gateways", c.eligible], ["Connections", c.connections],
        ["Load bound", c.bound ?? "—"], ["ε", c.epsilon], ["Partitions", c.partitions]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, text(v))]));
      const rows = (c.nodes || []).map((n) => h("tr", {}, h("td", {}, n.id, n.self ? " (this)" : ""), h("td", {}, n.url), h("td", {}, n.region),
        h("td.num", {}, n.connections), h("td.num", {}, n.owned_partitions), h("td", {}, h(n.ready ? "span.badge.ok" : "span.badge.warn", {}, n.draining ? "draining" : n.ready ? "ready" : "unready")),
        h("td.num", {}, duration(n.heartbeat_age_ms)), h("td", {}, time(n.started_at_ms))));
      clear(box).append(summary, h("table.nodes", {}, h("thead", {}, h("tr", {}, ["Gateway", "URL", "Region", "Connections", "Owned partitions", "State", "Heartbeat age", "Started"].map((l) => h("th", {}, l)))), h("tbody", {}, rows)));
    } catch (e) {
      clear(box).append(errorBox(e));
    }
  };
  return every(POLL_MS * 2, load);
}

// The last round of each autoscaler the gateway is pointed at (`ferry gateway --autoscaler-url`).
function autoscalerPage(root) {
  if (!auth.can("queues:read")) {
    append(root, h("div.notice", {}, "This token has no queues:read scope: the autoscaler's decisions are not available."));
    return () => {};
  }
  const box = h("div");
  append(root, h("h1", {}, "Autoscaler decisions"), box);
  const seconds = (v) => (v === null || v === undefined ? "—" : duration(Math.round(v * 1000)));
  const load = async () => {
    try {
      const { autoscalers = [] } = await api("GET", "/v1/autoscaler");
      if (!autoscalers.length) {
        clear(box).append(h("div.notice", {}, "This gateway is pointed at no autoscaler: start it with --autoscaler-url http://AUTOSCALER:9465 (the autoscaler's admin listener)."));
        return;
      }
      clear(box).append(...autoscalers.map((a) => {
        const head = h("h2", {}, a.url, " ", h(a.ok ? "span.badge.ok" : "span.badge.warn", {}, a.ok ? (a.dry_run ? "dry run" : "acting") : "unreachable"));
        if (!a.ok) return h("div.autoscaler", {}, head, h("p.error", {}, a.error));
        if (a.at === null || a.at === undefined) return h("div.autoscaler", {}, head, h("p.muted", {}, "No round yet."));
        const regions = (a.regions || []).map((r) => {
          if (r.error) return h("div.region", {}, h("h3", {}, r.region), h("p.error", {}, r.error));
          const summary = h("dl.fields", {}, [["Workers now", r.current], ["Desired", r.desired], ["Need before bounds", r.need],
            ["Borrowed", (r.borrowed || []).map((b) => `${b.workers} from ${b.from}`).join(", ") || "—"]]
            .map(([k, v]) => [h("dt", {}, k), h("dd", {}, text(v))]));
          const rows = (r.queues || []).map((q) => h("tr", {}, h("td", {}, q.queue), h("td.num", {}, q.waiting), h("td.num", {}, q.due_soon),
            h("td.num", {}, q.active), h("td.num", {}, seconds(q.oldest_wait_seconds)),
            h("td.num", {}, q.rate_per_worker === null || q.rate_per_worker === undefined ? "—" : `${q.rate_per_worker.toFixed(1)}/s`),
            h("td.num", {}, q.need), h("td.num", {}, q.desired), h("td.num", {}, seconds(q.drain_seconds)), h("td", {}, q.reason)));
          return h("div.region", {}, h("h3", {}, "Region ", r.region), summary,
            h("table.decisions", {}, h("thead", {}, h("tr", {}, ["Queue", "Waiting", "Due soon", "Active", "Oldest wait", "Rate per worker", "Need", "Desired", "Drain time", "Reason"].map((l) => h("th", {}, l)))), h("tbody", {}, rows)));
        });
        return h("div.autoscaler", {}, head, h("p.muted", {}, "Round of ", time(a.at)), ...regions);
      }));
    } catch (e) {
      clear(box).append(errorBox(e));
    }
  };
  return every(POLL_MS * 2, load);
}

// ---- routing ----

function route() {
  stopPage();
  stopPage = () => {};
  chrome();
  clear(view);
  if (!auth.claims) {
    view.append(loginPage(route.message));
    route.message = "";
    return;
  }
  const [, page = "queues", arg] = location.hash.match(/^#\/([a-z]+)\/?(.*)$/) || [];
  const fn = pages[page] || queuesPage;
  const root = h("section", { id: `page-${pages[page] ? page : "queues"}` });
  view.append(root);
  stopPage = fn(root, arg) || (() => {});
}

// Every queue's channel stays subscribed whatever the page, so the sparklines and the tail see all events.
let stopQueues = () => {};
function watchQueues() {
  stopQueues();
  stopQueues = auth.can("queues:read") ? every(POLL_MS * 2, async () => {
    try {
      for (const r of (await api("GET", "/v1/queues")).queues || []) live.subscribe(`queue:${r.queue}`);
    } catch {
      /* the page shows errors */
    }
  }) : () => {};
}

function start() {
  chrome();
  live.stop();
  live.channels.clear();
  live.start();
  watchQueues();
  if (!location.hash.startsWith("#/")) history.replaceState(null, "", `${location.pathname}#/queues`);
  route();
}

window.addEventListener("hashchange", route);
window.addEventListener("ferry:unauthorized", (e) => {
  auth.clear();
  live.stop();
  stopQueues();
  route.message = `The gateway refused the token: ${e.detail}`;
  route();
});
document.getElementById("logout").addEventListener("click", () => {
  auth.clear();
  live.stop();
  stopQueues();
  history.replaceState(null, "", `${location.pathname}#/`);
  route();
});

// `/ui/#token=…`: take the token and remove it from the address bar (and from history).
const m = location.hash.match(/^#token=([^&]+)/);
if (m) {
  auth.set(decodeURIComponent(m[1]));
  history.replaceState(null, "", `${location.pathname}#/queues`);
}
if (auth.claims) start();
else route();
