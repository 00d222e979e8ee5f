// The training panel's pure parts, run in Node (node --test): URLs, escaping, smoothing, the SVG
// curve, the HTML for each job state, and the metric merge a resumed job needs.
import test from "node:test";
import assert from "node:assert/strict";
import { curvePath, curveSvg, escapeHtml, jobHtml, jobUrl, mergeMetrics, movingAverage, panelHtml, JobsPanel }
  from "../../web/rewardtune_panel.js";

const job = (over = {}) => ({ id: "run-abc123", name: "run", state: "running", step: 3, steps: 10,
  objective: "refl", error: null, has_checkpoint: true, last: { step: 3, reward: 0.25 }, ...over });

test("job urls encode ids", () => {
  assert.equal(jobUrl("a-b"), "/rewardtune/jobs/a-b");
  assert.equal(jobUrl("../x", "cancel"), "/rewardtune/jobs/..%2Fx/cancel");
});

test("names and errors are escaped", () => {
  const html = jobHtml(job({ name: "<img src=x onerror=alert(1)>", error: "a & b", state: "failed" }));
  assert.ok(!html.includes("<img"));
  assert.ok(html.includes("&lt;img src=x onerror=alert(1)&gt;") && html.includes("a &amp; b"));
  assert.equal(escapeHtml(`"'`), "&quot;&#39;");
});

test("moving average", () => {
  assert.deepEqual(movingAverage([2, 4, 6, 8], 2), [2, 3, 5, 7]);
  assert.deepEqual(movingAverage([], 3), []);
});

test("curve path stays inside the box and goes left to right", () => {
  const d = curvePath([1, 2, 3, 4], [0.1, -0.5, 2.0, 0.3], 100, 50, 4);
  const pts = d.split(" ").map((s) => s.slice(1).split(",").map(Number));
  assert.equal(pts.length, 4);
  assert.equal(pts[0][0], 4);
  assert.equal(pts[3][0], 96);
  for (const [x, y] of pts) assert.ok(x >= 4 && x <= 96 && y >= 4 && y <= 46, `${x},${y}`);
  assert.equal(Math.min(...pts.map((p) => p[1])), 4); // the highest reward at the top
  assert.ok(!curvePath([1], [0.3], 100, 50).includes("NaN")); // one point, flat range
});

test("buttons follow the job state", () => {
  assert.ok(jobHtml(job()).includes('data-action="cancel"'));
  assert.ok(!jobHtml(job()).includes('data-action="resume"'));
  for (const state of ["stopped", "failed", "interrupted"]) {
    assert.ok(jobHtml(job({ state })).includes('data-action="resume"'), state);
  }
  assert.ok(!jobHtml(job({ state: "interrupted", has_checkpoint: false })).includes("resume"));
  assert.ok(!jobHtml(job({ state: "finished" })).includes("<button"));
  assert.ok(jobHtml(job(), [{ step: 1, reward: 0.1 }, { step: 2, reward: 0.2 }]).includes("<svg"));
  assert.ok(curveSvg([]).includes("no steps yet"));
  assert.ok(panelHtml([], {}).includes("No training jobs yet"));
});

test("a resumed job's repeated steps replace the old ones", () => {
  const merged = mergeMetrics([{ step: 1, reward: 1 }, { step: 2, reward: 2 }, { step: 3, reward: 3 }],
    [{ step: 3, reward: 30 }, { step: 4, reward: 4 }]);
  assert.deepEqual(merged.map((m) => m.reward), [1, 2, 30, 4]);
});

test("the panel follows websocket events and fetches through the api", async () => {
  const calls = [];
  const api = { fetchApi: async (url) => {
    calls.push(url);
    const body = url === "/rewardtune/jobs" ? { jobs: [job({ step: 1 })] } : { metrics: [{ step: 1, reward: 0.1 }] };
    return { ok: true, json: async () => body, text: async () => "" };
  } };
  const panel = new JobsPanel(api);
  await panel.refresh();
  assert.deepEqual(calls, ["/rewardtune/jobs", "/rewardtune/jobs/run-abc123?since=0&limit=5000"]);
  panel.onProgress({ id: "run-abc123", step: 2, steps: 10, metrics: { step: 2, reward: 0.3 } });
  assert.equal(panel.jobs[0].step, 2);
  assert.deepEqual(panel.metrics["run-abc123"].map((m) => m.step), [1, 2]);
  panel.onJob({ ...job(), id: "other-1", name: "other", state: "queued" });
  assert.equal(panel.jobs[0].id, "other-1");
});
