// RewardTune's Training tab (a sidebar tab): the jobs list with live reward curves, Cancel, Resume
// and Remove.
//
// Three layers, so each can be tested where it runs:
// - pure functions (URLs, formatting, what each state offers, the curve's geometry): plain data in,
//   plain data out; tests/web/panel.test.mjs runs them in Node;
// - JobsStore: the jobs and their metric series, fed by the server's routes and websocket events
//   (jobs/routes.py); no DOM, also tested in Node with a fake `api`;
// - JobsPanel / JobCard / CurveView: the DOM. One card per job, keyed by the job's id, built once
//   and then patched field by field (a step changes a few texts, a path and a width), never the
//   whole panel's HTML. tests/test_browser.py drives it in Chromium against a real server.

export const ROUTE = "/rewardtune/jobs";
// The tab's one name: its sidebar button, its header, and what the docs, templates and node outputs call it
export const TAB_NAME = "Training";
export const ACTIVE = new Set(["queued", "running"]);
export const RESUMABLE = new Set(["stopped", "failed", "interrupted"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const STATUS_EVERY_MS = 3000; // while a job runs, its status (newest sample) is re-read at most this often

// ------------------------------------------------------------------------------------ pure parts
export function jobUrl(id, action = "") {
  return `${ROUTE}/${encodeURIComponent(id)}${action ? "/" + action : ""}`;
}

/** The name Load LoRA / LoraLoader lists for a finished job's LoRA (jobs/manager.py lora_name). */
export function loraName(job) {
  return `rewardtune/${job.id}.safetensors`;
}

/** The /view URL of the job's newest sample. The status carries the file's path on the server;
 * samples live in the output folder under rewardtune/jobs/<id>/samples/, which /view serves. */
export function previewUrl(job) {
  if (job.preview_url) return job.preview_url;
  if (!job.preview) return null;
  const path = String(job.preview).replace(/\\/g, "/");
  const at = path.lastIndexOf("/rewardtune/jobs/");
  if (at < 0) return null;
  const rel = path.slice(at + 1);
  const cut = rel.lastIndexOf("/");
  const params = new URLSearchParams({ filename: rel.slice(cut + 1), subfolder: rel.slice(0, cut), type: "output" });
  return `/view?${params}`;
}

/** The buttons a job offers, in order. Remove is never offered while a job is queued or running. */
export function actionsFor(job) {
  if (ACTIVE.has(job.state)) return ["cancel"];
  const out = [];
  if (RESUMABLE.has(job.state) && job.has_checkpoint) out.push("resume");
  if (job.state === "finished") out.push("copy");
  out.push("remove");
  return out;
}

export function rewardOf(row) {
  const r = row?.reward ?? row?.collect_reward;
  return Number.isFinite(r) ? r : null;
}

/** A value with 4 significant digits, without exponent noise for ordinary rewards. */
export function formatValue(v) {
  if (!Number.isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

/** Seconds left: the mean time of the last `window` steps × the steps left (null when unknown). */
export function etaSeconds(job, metrics, window = 10) {
  if (job.state !== "running" || !(job.steps > job.step)) return null;
  const times = metrics.slice(-window).map((m) => m.seconds).filter((s) => Number.isFinite(s) && s >= 0);
  if (!times.length) return null;
  return (times.reduce((a, b) => a + b, 0) / times.length) * (job.steps - job.step);
}

export function movingAverage(values, window = 10) {
  const out = [];
  let sum = 0;
  values.forEach((v, i) => {
    sum += v;
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  });
  return out;
}

// Merge new metric lines into a job's series: keyed by step, so a resumed run's repeated steps
// replace the old ones instead of doubling the curve.
export function mergeMetrics(series, rows) {
  const byStep = new Map(series.map((m) => [m.step, m]));
  for (const r of rows) if (r && Number.isInteger(r.step)) byStep.set(r.step, r);
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}

/** What a job's card shows, as plain values (the card writes each into its own element). */
export function jobView(job, metrics = []) {
  const steps = job.steps || 0;
  const pct = steps ? Math.max(0, Math.min(100, (100 * job.step) / steps)) : 0;
  const eta = etaSeconds(job, metrics);
  const last = rewardOf(job.last) ?? rewardOf(metrics.at(-1));
  const meta = [`step ${job.step ?? 0} / ${steps}`];
  if (job.state === "running") meta.push(eta === null ? "ETA …" : `ETA ${formatDuration(eta)}`);
  if (job.state === "queued") meta.push("waiting for the running job");
  if (last !== null) meta.push(`reward ${formatValue(last)}`);
  return {
    name: job.name || job.id, title: `${job.id}\n${job.objective ?? ""}`.trim(), state: job.state,
    meta: meta.join(" · "), objective: job.objective ?? "", pct: Math.round(pct * 10) / 10,
    error: job.error || "", actions: actionsFor(job), preview: previewUrl(job),
    lora: job.state === "finished" ? loraName(job) : null,
  };
}

/** Curve geometry in a width × height box with margins for the axis labels (y grows downwards):
 * the points, the raw and smoothed paths, and the axis range. One point is a dot, not a path. */
export function curveGeometry(metrics, { width = 260, height = 96, left = 40, right = 6, top = 6, bottom = 16,
  window = 10 } = {}) {
  const rows = metrics.filter((m) => rewardOf(m) !== null);
  const plot = { x0: left, x1: width - right, y0: top, y1: height - bottom };
  if (!rows.length) return { points: [], raw: "", smooth: "", plot, min: null, max: null, first: null, last: null };
  const steps = rows.map((m) => m.step), values = rows.map(rewardOf);
  const first = steps[0], last = steps[steps.length - 1];
  const min = Math.min(...values), max = Math.max(...values);
  let lo = min, hi = max;
  if (hi - lo < 1e-12) { const d = Math.abs(hi) * 0.05 || 1; lo -= d; hi += d; }
  const sx = (x) => last === first ? (plot.x0 + plot.x1) / 2 : plot.x0 + ((x - first) / (last - first)) * (plot.x1 - plot.x0);
  const sy = (y) => plot.y1 - ((y - lo) / (hi - lo)) * (plot.y1 - plot.y0);
  const points = rows.map((m, i) => ({ step: steps[i], value: values[i], x: sx(steps[i]), y: sy(values[i]) }));
  const path = (ys) => ys.length < 2 ? "" : steps.map((x, i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(ys[i]).toFixed(1)}`).join(" ");
  return { points, raw: path(values), smooth: path(movingAverage(values, window)), plot, min, max, first, last };
}

/** The point whose x is nearest to `x` (the hover readout). */
export function nearestPoint(points, x) {
  let best = null;
  for (const p of points) if (!best || Math.abs(p.x - x) < Math.abs(best.x - x)) best = p;
  return best;
}

// ------------------------------------------------------------------------------------ the store
/** The jobs and their metric series. `onChange(ids | null)` is told which jobs changed (null: the
 * list itself, i.e. a job came or went). Fetches go through ComfyUI's `api.fetchApi`. */
export class JobsStore {
  constructor(api, onChange = () => {}) {
    this.api = api;
    this.onChange = onChange;
    this.jobs = new Map();     // id → status (as GET /rewardtune/jobs returns it)
    this.metrics = new Map();  // id → metric rows sorted by step
    this.statusAt = new Map(); // id → when its status was last read (ms)
    this.complete = new Set(); // ids whose whole series has been read (else the next read starts at 0)
    this.now = () => Date.now();
  }

  async fetchJson(url, options) {
    const res = await this.api.fetchApi(url, options);
    if (!res.ok) throw new Error(`${url}: ${res.status} ${await res.text()}`);
    return res.json();
  }

  /** Newest first, as the server lists them. */
  ordered() {
    return [...this.jobs.values()].sort((a, b) => (b.created ?? 0) - (a.created ?? 0));
  }

  async refresh() {
    const listed = (await this.fetchJson(ROUTE)).jobs;
    const ids = new Set(listed.map((j) => j.id));
    let listChanged = false;
    for (const id of [...this.jobs.keys()]) {
      if (!ids.has(id)) { this.forget(id); listChanged = true; }
    }
    for (const j of listed) {
      if (!this.jobs.has(j.id)) listChanged = true;
      this.jobs.set(j.id, j);
    }
    await Promise.all(listed.slice(0, 20).map((j) => this.loadMetrics(j.id, false)));
    this.onChange(listChanged ? null : [...ids]);
  }

  /** Status and metric lines after the newest step held (all of them when `full`). */
  async loadMetrics(id, notify = true) {
    const held = this.metrics.get(id) || [];
    // events can arrive before the first read: read the whole series once
    const since = this.complete.has(id) ? held.at(-1)?.step ?? 0 : 0;
    const data = await this.fetchJson(`${jobUrl(id)}?since=${since}&limit=5000`);
    this.statusAt.set(id, this.now());
    if (data.job) this.jobs.set(id, { ...this.jobs.get(id), ...data.job });
    const step = this.jobs.get(id)?.step ?? Infinity;
    // steps past the job's own step were undone (a resume restarts from its checkpoint)
    const kept = held.filter((m) => m.step <= Math.max(step, since));
    this.metrics.set(id, mergeMetrics(kept, data.metrics || []));
    this.complete.add(id);
    if (notify) this.onChange([id]);
  }

  onJob(status) {
    const old = this.jobs.get(status.id);
    this.jobs.set(status.id, { ...old, ...status });
    if (old && !ACTIVE.has(old.state) && ACTIVE.has(status.state)) {
      // resumed: the steps after its checkpoint are trained again
      this.metrics.set(status.id, (this.metrics.get(status.id) || []).filter((m) => m.step <= status.step));
    }
    this.onChange(old ? [status.id] : null);
  }

  onProgress(event) {
    const known = this.jobs.get(event.id);
    this.metrics.set(event.id, mergeMetrics(this.metrics.get(event.id) || [], [event.metrics]));
    if (!known) { // a job this page has not listed yet: read the list (once for a burst of steps)
      this.listing ??= this.refresh().catch(() => {}).finally(() => { this.listing = null; });
      return;
    }
    Object.assign(known, { step: event.step, steps: event.steps ?? known.steps, state: "running", last: event.metrics });
    this.onChange([event.id]);
    if (this.now() - (this.statusAt.get(event.id) ?? 0) > STATUS_EVERY_MS) {
      this.statusAt.set(event.id, this.now());
      this.loadMetrics(event.id).catch(() => {}); // the newest sample image comes with the status
    }
  }

  /** A job removed (here, in another tab or by a script): rewardtune.removed. */
  onRemoved(event) {
    if (!this.jobs.has(event?.id)) return;
    this.forget(event.id);
    this.onChange(null);
  }

  /** POST a job action (cancel, resume, remove); returns the server's answer. */
  async act(id, action) {
    const res = await this.fetchJson(jobUrl(id, action), { method: "POST" });
    if (action === "remove") {
      this.forget(id);
      this.onChange(null);
    }
    return res;
  }

  forget(id) {
    for (const map of [this.jobs, this.metrics, this.statusAt]) map.delete(id);
    this.complete.delete(id);
  }
}

// ------------------------------------------------------------------------------------ the DOM
function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setAttr(node, name, value) {
  if (value === null || value === undefined) node.removeAttribute(name);
  else if (node.getAttribute(name) !== String(value)) node.setAttribute(name, value);
}

const BUTTONS = {
  cancel: { label: "Cancel", icon: "pi pi-stop", kind: "secondary", tip: "Stop after the current step (a checkpoint is kept)" },
  resume: { label: "Resume", icon: "pi pi-play", kind: "primary", tip: "Continue from the last checkpoint" },
  copy: { label: "Copy LoRA name", icon: "pi pi-copy", kind: "secondary", tip: "Copy the name to pick in Load LoRA" },
  remove: { label: "Remove", icon: "pi pi-trash", kind: "danger", tip: "Delete this job's folder (checkpoint, samples, metrics)" },
};

/** The reward curve of one job: axes, min/max, raw and smoothed lines, a dot for a lone point and
 * a readout of the value under the pointer. Elements are made once; update() moves them. */
export class CurveView {
  constructor(width = 260, height = 96) {
    this.size = { width, height };
    this.root = el("div", "rt-chart");
    this.svg = svg("svg", { class: "rt-curve", role: "img", "aria-label": "reward per step" });
    this.axes = svg("path", { class: "rt-axis", fill: "none" });
    this.raw = svg("path", { class: "rt-raw", fill: "none" });
    this.smooth = svg("path", { class: "rt-smooth", fill: "none" });
    this.dot = svg("circle", { class: "rt-dot-point", r: 3, visibility: "hidden" });
    this.guide = svg("line", { class: "rt-guide", visibility: "hidden" });
    this.marker = svg("circle", { class: "rt-marker", r: 3, visibility: "hidden" });
    this.yMax = svg("text", { class: "rt-label rt-ymax", "text-anchor": "end" });
    this.yMin = svg("text", { class: "rt-label rt-ymin", "text-anchor": "end" });
    this.xFirst = svg("text", { class: "rt-label rt-xfirst", "text-anchor": "start" });
    this.xLast = svg("text", { class: "rt-label rt-xlast", "text-anchor": "end" });
    this.hit = svg("rect", { class: "rt-hit", fill: "transparent" });
    this.svg.append(this.axes, this.raw, this.smooth, this.dot, this.guide, this.marker, this.yMax, this.yMin,
      this.xFirst, this.xLast, this.hit);
    this.readout = el("div", "rt-readout");
    this.empty = el("div", "rt-chart-empty", "no steps yet");
    this.root.append(this.svg, this.readout, this.empty);
    this.metrics = [];
    this.layout(width);
    this.hit.addEventListener("mousemove", (e) => this.hover(e));
    this.hit.addEventListener("mouseleave", () => this.hover(null));
  }

  /** Place the static parts for a width in pixels (the sidebar can be resized: no stretched text). */
  layout(width) {
    const { height } = this.size;
    this.size.width = width;
    const g = curveGeometry([], this.size).plot;
    for (const [k, v] of Object.entries({ width, height, viewBox: `0 0 ${width} ${height}` })) setAttr(this.svg, k, v);
    setAttr(this.axes, "d", `M${g.x0},${g.y0} V${g.y1} H${g.x1}`);
    for (const [node, x, y] of [[this.yMax, g.x0 - 4, g.y0 + 7], [this.yMin, g.x0 - 4, g.y1],
      [this.xFirst, g.x0, height - 3], [this.xLast, g.x1, height - 3]]) {
      setAttr(node, "x", x);
      setAttr(node, "y", y);
    }
    for (const [k, v] of Object.entries({ x: g.x0, y: g.y0, width: g.x1 - g.x0, height: g.y1 - g.y0 })) setAttr(this.hit, k, v);
    setAttr(this.guide, "y1", g.y0);
    setAttr(this.guide, "y2", g.y1);
  }

  /** Follow the chart's width (the card calls this from a ResizeObserver). */
  resize() {
    const w = Math.round(this.root.clientWidth);
    if (w >= 120 && w !== this.size.width) {
      this.layout(w);
      this.update(this.metrics);
    }
  }

  update(metrics) {
    this.metrics = metrics;
    const geo = this.geo = curveGeometry(metrics, this.size);
    const n = geo.points.length;
    this.root.dataset.points = String(n);
    this.empty.hidden = n > 0;
    this.svg.style.display = n ? "" : "none";
    setAttr(this.raw, "d", geo.raw || null);
    setAttr(this.smooth, "d", geo.smooth || null);
    const lone = n === 1 ? geo.points[0] : null;
    setAttr(this.dot, "visibility", lone ? "visible" : "hidden");
    if (lone) { setAttr(this.dot, "cx", lone.x.toFixed(1)); setAttr(this.dot, "cy", lone.y.toFixed(1)); }
    setText(this.yMax, n ? formatValue(geo.max) : "");
    setText(this.yMin, n ? formatValue(geo.min) : "");
    setText(this.xFirst, n ? `step ${geo.first}` : "");
    setText(this.xLast, n > 1 ? `${geo.last}` : "");
    if (this.hoverX !== undefined && this.hoverX !== null) this.showAt(this.hoverX);
  }

  hover(event) {
    if (!event) {
      this.hoverX = null;
      setAttr(this.guide, "visibility", "hidden");
      setAttr(this.marker, "visibility", "hidden");
      this.readout.textContent = "";
      this.readout.classList.remove("rt-visible");
      return;
    }
    const box = this.svg.getBoundingClientRect();
    this.showAt(((event.clientX - box.left) / box.width) * this.size.width);
  }

  /** Show the value of the point nearest to x (in the curve's own units). */
  showAt(x) {
    this.hoverX = x;
    const p = nearestPoint(this.geo.points, x);
    if (!p) return;
    for (const [k, v] of [["x1", p.x], ["x2", p.x]]) setAttr(this.guide, k, v.toFixed(1));
    setAttr(this.marker, "cx", p.x.toFixed(1));
    setAttr(this.marker, "cy", p.y.toFixed(1));
    setAttr(this.guide, "visibility", "visible");
    setAttr(this.marker, "visibility", "visible");
    setText(this.readout, `step ${p.step}: ${formatValue(p.value)}`);
    this.readout.classList.add("rt-visible");
  }
}

/** One job's card. update(view, metrics) patches only the fields that changed. */
export class JobCard {
  constructor(id, onAction) {
    this.id = id;
    this.root = el("div", "rt-job");
    this.root.dataset.job = id;
    const head = el("div", "rt-job-head");
    this.dot = el("span", "rt-state-dot");
    this.name = el("span", "rt-name");
    this.state = el("span", "rt-state");
    head.append(this.dot, this.name, this.state);
    this.meta = el("div", "rt-meta");
    const bar = el("div", "rt-progress");
    this.bar = el("div", "rt-progress-bar");
    bar.append(this.bar);
    this.error = el("div", "rt-error");
    this.error.hidden = true;
    const body = el("div", "rt-job-body");
    this.curve = new CurveView();
    this.thumb = el("img", "rt-thumb");
    this.thumb.alt = "newest sample";
    this.thumb.hidden = true;
    body.append(this.curve.root, this.thumb);
    this.actions = el("div", "rt-actions");
    this.root.append(head, this.meta, bar, this.error, body, this.actions);
    this.buttons = new Map();
    this.actions.addEventListener("click", (e) => {
      const b = e.target.closest?.("button[data-action]");
      if (b && !b.disabled) onAction(this.id, b.dataset.action, b);
    });
    this.shown = "";
  }

  update(view, metrics) {
    setText(this.name, view.name);
    setAttr(this.name, "title", view.title);
    setText(this.state, view.state);
    if (this.root.dataset.state !== view.state) this.root.dataset.state = view.state;
    setText(this.meta, view.meta);
    const width = `${view.pct}%`;
    if (this.bar.style.width !== width) this.bar.style.width = width;
    setText(this.error, view.error);
    this.error.hidden = !view.error;
    this.curve.update(metrics);
    if (view.preview && view.preview !== this.shown) {
      this.shown = view.preview;
      this.thumb.src = view.preview; // the URL names the step: a new sample is a new URL
      this.thumb.title = "newest sample (the x̂0 the reward scored)";
      this.thumb.hidden = false;
    }
    const want = view.actions.join(",");
    if (this.actions.dataset.actions !== want) {
      this.actions.dataset.actions = want;
      this.actions.replaceChildren(...view.actions.map((a) => this.button(a)));
    }
    this.lora = view.lora;
  }

  button(action) {
    if (!this.buttons.has(action)) {
      const spec = BUTTONS[action];
      const b = el("button", `rt-btn rt-btn-${spec.kind}`);
      b.type = "button";
      b.dataset.action = action;
      b.title = spec.tip;
      b.append(el("i", spec.icon), el("span", "", spec.label));
      this.buttons.set(action, b);
    }
    const b = this.buttons.get(action);
    b.disabled = false;
    return b;
  }
}

/** The sidebar tab's content: a header (title, refresh) and the job cards, keyed by job id. */
export class JobsPanel {
  /** ui: { confirm(title, message) → Promise<boolean>, toast(severity, summary, detail), copy(text) } */
  constructor(api, ui = {}) {
    this.store = new JobsStore(api, (ids) => this.changed(ids));
    this.ui = ui;
    this.cards = new Map();
    this.dirty = new Set();
    this.listDirty = true;
    this.root = null;
    this.frame = null;
  }

  mount(root) {
    this.root = root;
    this.cards.clear();
    root.classList.add("rt-panel");
    const header = el("div", "rt-header");
    const title = el("span", "rt-title", TAB_NAME);
    const refresh = el("button", "rt-icon-btn rt-refresh");
    refresh.type = "button";
    refresh.title = "Refresh the jobs list";
    refresh.setAttribute("aria-label", "Refresh");
    refresh.append(el("i", "pi pi-refresh"));
    refresh.addEventListener("click", () => this.refresh());
    header.append(title, refresh);
    this.list = el("div", "rt-list");
    this.emptyNote = el("div", "rt-empty");
    this.emptyNote.append("No training jobs yet. Add a ", el("b", "", "Train Reward LoRA"),
      " node in background mode and queue it: its reward curve appears here.");
    this.status = el("div", "rt-status");
    this.status.hidden = true;
    root.replaceChildren(header, this.status, this.list);
    this.resizer?.disconnect();
    this.resizer = globalThis.ResizeObserver ? new ResizeObserver((entries) => {
      for (const e of entries) this.charts.get(e.target)?.resize();
    }) : null;
    this.charts = new Map(); // chart element → its CurveView
    this.listDirty = true;
    this.refresh();
  }

  async refresh() {
    try {
      await this.store.refresh();
      this.setStatus("");
    } catch (err) {
      this.setStatus(`Cannot list training jobs: ${err.message}`);
    }
  }

  setStatus(text) {
    if (!this.status) return;
    setText(this.status, text);
    this.status.hidden = !text;
  }

  changed(ids) {
    if (ids === null) this.listDirty = true;
    else for (const id of ids) this.dirty.add(id);
    if (!this.root || this.frame !== null) return;
    const schedule = globalThis.requestAnimationFrame ?? ((f) => setTimeout(f, 16));
    this.frame = schedule(() => { this.frame = null; this.render(); });
  }

  render() {
    if (!this.root) return;
    const jobs = this.store.ordered();
    const ids = new Set(jobs.map((j) => j.id));
    for (const [id, card] of this.cards) {
      if (!ids.has(id)) {
        card.root.remove();
        this.cards.delete(id);
        this.resizer?.unobserve(card.curve.root);
        this.charts.delete(card.curve.root);
      }
    }
    for (const job of jobs) {
      let card = this.cards.get(job.id);
      const fresh = !card;
      if (fresh) {
        card = new JobCard(job.id, (id, action, button) => this.onAction(id, action, button));
        this.cards.set(job.id, card);
        this.charts.set(card.curve.root, card.curve);
        this.resizer?.observe(card.curve.root);
      }
      if (fresh || this.listDirty || this.dirty.has(job.id)) {
        const metrics = this.store.metrics.get(job.id) || [];
        const view = jobView(job, metrics);
        if (view.preview && this.store.api.apiURL) view.preview = this.store.api.apiURL(view.preview);
        card.update(view, metrics);
      }
    }
    if (this.listDirty) { // order: only moved nodes are touched
      let prev = null;
      for (const job of jobs) {
        const node = this.cards.get(job.id).root;
        const want = prev ? prev.nextSibling : this.list.firstChild;
        if (node !== want) this.list.insertBefore(node, want);
        prev = node;
      }
      if (!jobs.length && this.emptyNote.parentNode !== this.list) this.list.append(this.emptyNote);
      if (jobs.length && this.emptyNote.parentNode) this.emptyNote.remove();
    }
    this.dirty.clear();
    this.listDirty = false;
  }

  async onAction(id, action, button) {
    const job = this.store.jobs.get(id);
    if (!job) return;
    if (action === "copy") return this.copy(loraName(job));
    if (action === "remove") {
      const ok = await (this.ui.confirm ?? ((t, m) => Promise.resolve(window.confirm(`${t}\n\n${m}`))))(
        `Remove training job "${job.name}"?`,
        `Its folder (checkpoint, samples, metrics) is deleted. A LoRA it published to models/loras/rewardtune ` +
        `stays. This cannot be undone.`);
      if (!ok) return;
    }
    button.disabled = true;
    try {
      await this.store.act(id, action);
    } catch (err) {
      console.warn("RewardTune:", err);
      this.ui.toast?.("error", `RewardTune: ${action} failed`, err.message);
    }
    await this.refresh();
  }

  async copy(text) {
    try {
      await (this.ui.copy ?? ((t) => navigator.clipboard.writeText(t)))(text);
      this.ui.toast?.("success", "LoRA name copied", text);
    } catch (err) {
      this.ui.toast?.("warn", "Copy this LoRA name", text);
    }
  }
}

// The frontend's own colour variables (ComfyUI frontend 1.4x palettes), each with the older
// variable as a fallback so the panel follows the user's colour palette.
export const PANEL_CSS = `
.rt-panel { display: flex; flex-direction: column; height: 100%; font-size: 12px;
  color: var(--base-foreground, var(--fg-color, #ddd)); background: var(--interface-panel-surface, var(--comfy-menu-bg)); }
.rt-header { display: flex; align-items: center; gap: 8px; min-height: 4rem; padding: 0 12px;
  border-bottom: 1px solid var(--border-default, var(--border-color, #444)); flex: none; }
.rt-title { flex: 1; font-weight: 700; font-size: 14px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.rt-icon-btn { display: inline-flex; align-items: center; justify-content: center; width: 2rem; height: 2rem;
  border: none; border-radius: var(--radius-lg, 8px); background: transparent; cursor: pointer;
  color: var(--muted-foreground, var(--descrip-text, #999)); }
.rt-icon-btn:hover { background: var(--secondary-background-hover, var(--comfy-input-bg, #333));
  color: var(--base-foreground, var(--fg-color, #fff)); }
.rt-list { flex: 1; overflow-y: auto; padding: 8px 12px; display: flex; flex-direction: column; gap: 8px; }
.rt-status, .rt-error { color: var(--destructive-background, var(--error-text, #e57373)); padding: 4px 12px; }
.rt-error { padding: 4px 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.rt-empty { color: var(--muted-foreground, var(--descrip-text, #999)); padding: 8px 0; line-height: 1.5; }
.rt-job { border: 1px solid var(--border-default, var(--border-color, #444)); border-radius: var(--radius-lg, 8px);
  background: var(--secondary-background, var(--comfy-input-bg, #222)); padding: 8px 10px; }
.rt-job-head { display: flex; align-items: center; gap: 6px; min-width: 0; }
.rt-name { font-weight: 600; flex: 1; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.rt-state { font-size: 11px; color: var(--muted-foreground, var(--descrip-text, #999)); }
.rt-state-dot { width: 8px; height: 8px; border-radius: 50%; flex: none; background: var(--muted-foreground, #888); }
.rt-job[data-state="running"] .rt-state-dot { background: var(--primary-background, var(--p-primary-color, #0b8ce9)); }
.rt-job[data-state="finished"] .rt-state-dot { background: var(--success-background, #00cd72); }
.rt-job[data-state="failed"] .rt-state-dot, .rt-job[data-state="broken"] .rt-state-dot {
  background: var(--destructive-background, #b33a3a); }
.rt-job[data-state="stopped"] .rt-state-dot, .rt-job[data-state="interrupted"] .rt-state-dot {
  background: var(--warning-background, #fd9903); }
.rt-meta { color: var(--muted-foreground, var(--descrip-text, #999)); margin: 4px 0; font-variant-numeric: tabular-nums; }
.rt-progress { height: 3px; border-radius: 2px; background: var(--tertiary-background, var(--border-color, #444)); overflow: hidden; }
.rt-progress-bar { height: 100%; width: 0; background: var(--primary-background, var(--p-primary-color, #0b8ce9));
  transition: width 0.3s; }
.rt-job[data-state="finished"] .rt-progress-bar { background: var(--success-background, #00cd72); }
.rt-job-body { display: flex; gap: 8px; align-items: flex-start; margin-top: 6px; }
.rt-chart { position: relative; flex: 1; min-width: 0; }
.rt-curve { display: block; height: 96px; overflow: visible; }
.rt-axis { stroke: var(--border-default, var(--border-color, #555)); stroke-width: 1; vector-effect: non-scaling-stroke; }
.rt-raw { stroke: var(--primary-background, #0b8ce9); stroke-opacity: 0.35; stroke-width: 1; vector-effect: non-scaling-stroke; }
.rt-smooth { stroke: var(--primary-background, #0b8ce9); stroke-width: 2; vector-effect: non-scaling-stroke; }
.rt-dot-point, .rt-marker { fill: var(--primary-background, #0b8ce9); }
.rt-marker { stroke: var(--base-foreground, #fff); stroke-width: 1; }
.rt-guide { stroke: var(--muted-foreground, #888); stroke-dasharray: 2 2; vector-effect: non-scaling-stroke; }
.rt-label { fill: var(--muted-foreground, var(--descrip-text, #999)); font-size: 9px; font-variant-numeric: tabular-nums; }
.rt-readout { position: absolute; top: 0; right: 0; padding: 1px 5px; border-radius: 4px; font-size: 10px;
  background: var(--base-background, var(--comfy-menu-bg, #111)); opacity: 0; pointer-events: none; }
.rt-readout.rt-visible { opacity: 0.95; }
.rt-chart-empty { color: var(--muted-foreground, var(--descrip-text, #999)); padding: 12px 0; }
.rt-thumb { width: 72px; height: 72px; object-fit: cover; border-radius: var(--radius-md, 6px); flex: none;
  border: 1px solid var(--border-default, var(--border-color, #444)); }
.rt-actions { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 8px; }
.rt-actions:empty { display: none; }
.rt-btn { display: inline-flex; align-items: center; gap: 6px; height: 1.75rem; padding: 0 10px; border: none;
  border-radius: var(--radius-md, 6px); font: inherit; font-size: 12px; font-weight: 500; cursor: pointer;
  color: var(--base-foreground, var(--fg-color, #fff)); }
.rt-btn i { font-size: 11px; }
.rt-btn:disabled { opacity: 0.5; cursor: default; }
.rt-btn-secondary { background: var(--tertiary-background, var(--comfy-menu-secondary-bg, #333)); }
.rt-btn-secondary:hover { background: var(--tertiary-background-hover, var(--content-hover-bg, #444)); }
.rt-btn-primary { background: var(--primary-background, var(--p-primary-color, #0b8ce9)); color: #fff; }
.rt-btn-primary:hover { background: var(--primary-background-hover, var(--p-primary-color, #31b9f4)); }
.rt-btn-danger { background: transparent; color: var(--destructive-background, var(--error-text, #e57373)); }
.rt-btn-danger:hover { background: var(--secondary-background-hover, rgba(255, 255, 255, 0.06)); }
`;
