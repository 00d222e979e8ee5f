// RewardTune training panel: the jobs list with live reward curves, cancel and resume.
// The pure parts (URLs, smoothing, the SVG curve, the HTML) take plain data and return strings, so
// tests/web/panel.test.mjs runs them in Node; JobsPanel wires them to the server's routes and
// websocket events (see jobs/routes.py).

export const ROUTE = "/rewardtune/jobs";
const ACTIVE = new Set(["queued", "running"]);
const RESUMABLE = new Set(["stopped", "failed", "interrupted"]);

export function jobUrl(id, action = "") {
  return `${ROUTE}/${encodeURIComponent(id)}${action ? "/" + action : ""}`;
}

export function escapeHtml(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
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

// An SVG path through (step, value) points scaled into width × height (y grows downwards).
export function curvePath(steps, values, width, height, pad = 4) {
  if (!values.length) return "";
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  let y0 = Math.min(...values), y1 = Math.max(...values);
  if (y1 - y0 < 1e-12) { y0 -= 1; y1 += 1; }
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad);
  const sy = (y) => height - pad - ((y - y0) / (y1 - y0)) * (height - 2 * pad);
  return steps.map((x, i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(values[i]).toFixed(1)}`).join(" ");
}

export function curveSvg(metrics, width = 260, height = 70) {
  const rows = metrics.filter((m) => Number.isFinite(m.reward));
  if (!rows.length) return `<div class="rt-empty">no steps yet</div>`;
  const steps = rows.map((m) => m.step), rewards = rows.map((m) => m.reward);
  const raw = curvePath(steps, rewards, width, height);
  const smooth = curvePath(steps, movingAverage(rewards), width, height);
  return `<svg class="rt-curve" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">` +
    `<path d="${raw}" fill="none" stroke="#6b8ccc" stroke-opacity="0.45" stroke-width="1"/>` +
    `<path d="${smooth}" fill="none" stroke="#4f8cff" stroke-width="2"/></svg>`;
}

export function jobHtml(job, metrics = []) {
  const pct = job.steps ? Math.round((100 * job.step) / job.steps) : 0;
  const last = job.last && Number.isFinite(job.last.reward) ? ` · reward ${job.last.reward.toFixed(4)}` : "";
  const buttons = [
    ACTIVE.has(job.state) ? `<button data-action="cancel" data-id="${escapeHtml(job.id)}">Cancel</button>` : "",
    RESUMABLE.has(job.state) && job.has_checkpoint
      ? `<button data-action="resume" data-id="${escapeHtml(job.id)}">Resume</button>` : "",
  ].join("");
  return `<div class="rt-job rt-${escapeHtml(job.state)}" data-job="${escapeHtml(job.id)}">` +
    `<div class="rt-title"><b>${escapeHtml(job.name)}</b> <span class="rt-state">${escapeHtml(job.state)}</span></div>` +
    `<div class="rt-meta">${escapeHtml(job.objective)} · step ${job.step}/${job.steps} (${pct}%)${escapeHtml(last)}</div>` +
    (job.error ? `<div class="rt-error">${escapeHtml(job.error)}</div>` : "") +
    curveSvg(metrics) + `<div class="rt-buttons">${buttons}</div>` +
    `<div class="rt-id">${escapeHtml(job.id)}</div></div>`;
}

export function panelHtml(jobs, metricsById) {
  if (!jobs.length) {
    return `<div class="rt-empty">No training jobs yet. Add a <b>Train Reward LoRA</b> node and queue it.</div>`;
  }
  return jobs.map((j) => jobHtml(j, metricsById[j.id] || [])).join("");
}

// Merge new metric lines into a job's series: keyed by step, so a resumed run's repeated steps
// replace the old ones instead of doubling the curve.
export function mergeMetrics(series, rows) {
  const byStep = new Map(series.map((m) => [m.step, m]));
  for (const r of rows) byStep.set(r.step, r);
  return [...byStep.values()].sort((a, b) => a.step - b.step);
}

export class JobsPanel {
  constructor(api) {
    this.api = api;
    this.jobs = [];
    this.metrics = {};
    this.root = null;
  }

  async fetchJson(url, options) {
    const res = await this.api.fetchApi(url, options);
    if (!res.ok) throw new Error(`${url}: ${res.status} ${await res.text()}`);
    return res.json();
  }

  async refresh() {
    this.jobs = (await this.fetchJson(ROUTE)).jobs;
    await Promise.all(this.jobs.slice(0, 20).map(async (j) => {
      const since = (this.metrics[j.id] || []).at(-1)?.step ?? 0;
      const data = await this.fetchJson(`${jobUrl(j.id)}?since=${since}&limit=5000`);
      this.metrics[j.id] = mergeMetrics(since ? this.metrics[j.id] : [], data.metrics);
    }));
    this.render();
  }

  onJob(status) {
    const i = this.jobs.findIndex((j) => j.id === status.id);
    if (i >= 0) this.jobs[i] = { ...this.jobs[i], ...status };
    else this.jobs.unshift(status);
    this.render();
  }

  onProgress(event) {
    this.metrics[event.id] = mergeMetrics(this.metrics[event.id] || [], [event.metrics]);
    const job = this.jobs.find((j) => j.id === event.id);
    if (job) Object.assign(job, { step: event.step, state: "running", last: event.metrics });
    this.render();
  }

  mount(root) {
    this.root = root;
    root.classList.add("rt-panel");
    root.addEventListener("click", async (e) => {
      const button = e.target.closest?.("button[data-action]");
      if (!button) return;
      button.disabled = true;
      try {
        await this.fetchJson(jobUrl(button.dataset.id, button.dataset.action), { method: "POST" });
      } catch (err) {
        console.error("RewardTune:", err);
      }
      await this.refresh();
    });
    this.refresh().catch((err) => { root.textContent = `RewardTune: cannot list jobs (${err.message})`; });
  }

  render() {
    if (this.root) this.root.innerHTML = panelHtml(this.jobs, this.metrics);
  }
}

export const PANEL_CSS = `
.rt-panel { padding: 8px; font-size: 12px; overflow-y: auto; }
.rt-job { border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 6px 8px; margin-bottom: 8px; }
.rt-state { opacity: 0.8; margin-left: 4px; }
.rt-running .rt-state { color: #4f8cff; } .rt-finished .rt-state { color: #4caf50; }
.rt-failed .rt-state, .rt-error { color: #e57373; }
.rt-meta, .rt-id { opacity: 0.75; } .rt-id { font-size: 10px; }
.rt-buttons button { margin: 4px 4px 0 0; }
.rt-empty { opacity: 0.7; padding: 6px 0; }
`;
