// The training panel's pure parts and its store, run in Node (node --test): URLs, what each state
// offers, formatting and ETA, the curve's geometry (axes range, a lone point, hover), the metric
// merge a resumed job needs, and the store following routes and websocket events. The DOM is
// driven in a real browser by tests/test_browser.py.
import test from "node:test";
import assert from "node:assert/strict";
import { actionsFor, curveGeometry, etaSeconds, formatDuration, formatValue, jobUrl, jobView, JobsStore,
  loraName, mergeMetrics, movingAverage, nearestPoint, previewUrl } from "../../web/rewardtune_panel.js";

const job = (over = {}) => ({ id: "run-abc123", name: "run", state: "running", step: 3, steps: 10, created: 1,
  objective: "refl", error: null, has_checkpoint: true, last: { step: 3, reward: 0.25 }, preview: null, ...over });

test("job urls encode ids", () => {
  assert.equal(jobUrl("a-b"), "/rewardtune/jobs/a-b");
  assert.equal(jobUrl("../x", "cancel"), "/rewardtune/jobs/..%2Fx/cancel");
  assert.equal(jobUrl("a-b", "remove"), "/rewardtune/jobs/a-b/remove");
});

test("buttons follow the job state; Remove is never offered for a queued or running job", () => {
  assert.deepEqual(actionsFor(job()), ["cancel"]);
  assert.deepEqual(actionsFor(job({ state: "queued" })), ["cancel"]);
  for (const state of ["stopped", "failed", "interrupted"]) {
    assert.deepEqual(actionsFor(job({ state })), ["resume", "remove"], state);
    assert.deepEqual(actionsFor(job({ state, has_checkpoint: false })), ["remove"], state);
  }
  assert.deepEqual(actionsFor(job({ state: "finished" })), ["copy", "remove"]);
  // a job folder the server cannot read (jobs/manager.py BROKEN): its error says what to do; Remove only
  const broken = job({ state: "broken", steps: 0, objective: null, config: null, error: "job.json cannot be read" });
  assert.deepEqual(actionsFor(broken), ["remove"]);
  assert.equal(jobView(broken).error, "job.json cannot be read");
  assert.equal(loraName(job()), "rewardtune/run-abc123.safetensors");
  assert.equal(jobView(job({ state: "finished" })).lora, "rewardtune/run-abc123.safetensors");
  assert.equal(jobView(job()).lora, null);
});

test("the newest sample is served by /view from the output folder", () => {
  const url = previewUrl(job({ preview: "/srv/out/rewardtune/jobs/run-abc123/samples/step_000004.png" }));
  const q = new URL(url, "http://h").searchParams;
  assert.ok(url.startsWith("/view?"));
  assert.equal(q.get("filename"), "step_000004.png");
  assert.equal(q.get("subfolder"), "rewardtune/jobs/run-abc123/samples");
  assert.equal(q.get("type"), "output");
  assert.equal(new URL(previewUrl(job({ preview: "C:\\out\\rewardtune\\jobs\\j-1\\samples\\s.png" })), "http://h")
    .searchParams.get("subfolder"), "rewardtune/jobs/j-1/samples");
  assert.equal(previewUrl(job()), null);
  assert.equal(previewUrl(job({ preview: "/elsewhere/x.png" })), null);
});

test("values, durations and the ETA", () => {
  assert.equal(formatValue(0.123456), "0.1235");
  assert.equal(formatValue(-2.5), "-2.5");
  assert.equal(formatValue(21.98765), "21.99");
  assert.equal(formatValue(0), "0");
  assert.equal(formatValue(NaN), "–");
  assert.equal(formatDuration(42.4), "42 s");
  assert.equal(formatDuration(125), "2 min 05 s");
  assert.equal(formatDuration(3 * 3600 + 7 * 60), "3 h 07 min");
  const rows = [1, 2, 3].map((step) => ({ step, reward: 0, seconds: 2 }));
  assert.equal(etaSeconds(job(), rows), 14); // 7 steps left × 2 s
  assert.equal(etaSeconds(job({ state: "stopped" }), rows), null);
  assert.equal(etaSeconds(job(), []), null);
  const view = jobView(job(), rows);
  assert.equal(view.meta, "step 3 / 10 · ETA 14 s · reward 0.25");
  assert.equal(view.pct, 30);
  assert.equal(view.name, "run");
  assert.ok(view.title.includes("run-abc123")); // the raw id only as a tooltip
});

test("moving average", () => {
  assert.deepEqual(movingAverage([2, 4, 6, 8], 2), [2, 3, 5, 7]);
  assert.deepEqual(movingAverage([], 3), []);
});

test("curve geometry: inside the plot, left to right, min/max on the axis, a lone point is a dot", () => {
  const rows = [[1, 0.1], [2, -0.5], [3, 2.0], [4, 0.3]].map(([step, reward]) => ({ step, reward }));
  const g = curveGeometry(rows, { width: 200, height: 100, left: 40, right: 10, top: 10, bottom: 20 });
  assert.equal(g.points.length, 4);
  assert.equal(g.min, -0.5);
  assert.equal(g.max, 2.0);
  assert.equal(g.first, 1);
  assert.equal(g.last, 4);
  assert.equal(g.points[0].x, 40);
  assert.equal(g.points[3].x, 190);
  for (const p of g.points) assert.ok(p.x >= 40 && p.x <= 190 && p.y >= 10 && p.y <= 80, `${p.x},${p.y}`);
  assert.equal(g.points[2].y, 10); // the highest reward at the top
  assert.equal(g.points[1].y, 80); // the lowest at the bottom
  assert.equal(g.raw.split(" ").length, 4);
  assert.ok(g.smooth.startsWith("M"));
  const one = curveGeometry([{ step: 1, reward: 0.3 }], { width: 200, height: 100, left: 40, right: 10, top: 10, bottom: 20 });
  assert.equal(one.points.length, 1);
  assert.equal(one.raw, ""); // no path through one point: the view draws a dot
  assert.ok(Number.isFinite(one.points[0].x) && Number.isFinite(one.points[0].y));
  assert.equal(one.min, 0.3);
  assert.equal(curveGeometry([{ step: 1, reward: null }, { step: 2, loss: 1 }]).points.length, 0);
  assert.equal(curveGeometry([{ step: 1, collect_reward: 0.5 }]).points.length, 1); // SQDF rows
});

test("hover picks the nearest point", () => {
  const pts = [{ x: 10, step: 1 }, { x: 50, step: 2 }, { x: 90, step: 3 }];
  assert.equal(nearestPoint(pts, 0).step, 1);
  assert.equal(nearestPoint(pts, 69).step, 2);
  assert.equal(nearestPoint(pts, 71).step, 3);
  assert.equal(nearestPoint([], 5), null);
});

test("a resumed job's repeated steps replace the old ones", () => {
  const merged = mergeMetrics([{ step: 1, reward: 1 }, { step: 2, reward: 2 }, { step: 3, reward: 3 }],
    [{ step: 3, reward: 30 }, { step: 4, reward: 4 }]);
  assert.deepEqual(merged.map((m) => m.reward), [1, 2, 30, 4]);
});

function fakeApi(routes) {
  const calls = [];
  return {
    calls,
    fetchApi: async (url, options = {}) => {
      calls.push(`${options.method ?? "GET"} ${url}`);
      const body = routes(url, options);
      return { ok: body !== undefined, status: body === undefined ? 404 : 200, json: async () => body,
        text: async () => "not found" };
    },
  };
}

test("the store follows routes and websocket events, and tells which jobs changed", async () => {
  let listed = [job({ step: 1 })];
  const api = fakeApi((url) => url === "/rewardtune/jobs" ? { jobs: listed }
    : url.startsWith("/rewardtune/jobs/run-abc123?") ? { job: listed[0], metrics: [{ step: 1, reward: 0.1 }] }
    : url === "/rewardtune/jobs/run-abc123/remove" ? { id: "run-abc123", removed: true } : undefined);
  const changes = [];
  const store = new JobsStore(api, (ids) => changes.push(ids));
  await store.refresh();
  assert.deepEqual(api.calls, ["GET /rewardtune/jobs", "GET /rewardtune/jobs/run-abc123?since=0&limit=5000"]);
  assert.deepEqual(changes.pop(), null); // a new job: the list changed
  store.onProgress({ id: "run-abc123", step: 2, steps: 10, metrics: { step: 2, reward: 0.3 } });
  assert.deepEqual(changes.pop(), ["run-abc123"]); // one job's card, not the list
  assert.equal(store.jobs.get("run-abc123").step, 2);
  assert.deepEqual(store.metrics.get("run-abc123").map((m) => m.step), [1, 2]);
  store.onJob({ ...job(), id: "other-1", name: "other", state: "queued", created: 2 });
  assert.deepEqual(changes.pop(), null);
  assert.deepEqual(store.ordered().map((j) => j.id), ["other-1", "run-abc123"]); // newest first
  // cancelled at step 2, resumed from a checkpoint at step 1: the later steps are dropped, then retrained
  store.onJob({ ...store.jobs.get("run-abc123"), state: "stopped", step: 2 });
  store.onJob({ ...store.jobs.get("run-abc123"), state: "running", step: 1 });
  assert.deepEqual(store.metrics.get("run-abc123").map((m) => m.step), [1]);
  // Remove: posted to the job's remove route, gone from the store
  await store.act("run-abc123", "remove");
  assert.equal(api.calls.at(-1), "POST /rewardtune/jobs/run-abc123/remove");
  assert.ok(!store.jobs.has("run-abc123"));
  // removed elsewhere (another browser tab, a script): the websocket's rewardtune.removed drops it
  store.onRemoved({ id: "other-1" });
  assert.deepEqual(changes.pop(), null);
  assert.ok(!store.jobs.has("other-1") && !store.metrics.has("other-1"));
  const told = changes.length;
  store.onRemoved({ id: "never-listed" }); // nothing to do, nothing redrawn
  assert.equal(changes.length, told);
  // a job the server no longer lists disappears on refresh
  listed = [];
  await store.refresh();
  assert.equal(store.jobs.size, 0);
  await assert.rejects(store.act("nope", "cancel"), /404/);
});

test("steps that arrive before the first read do not hide the earlier ones", async () => {
  const api = fakeApi((url) => url === "/rewardtune/jobs" ? { jobs: [job({ step: 6 })] }
    : url.startsWith("/rewardtune/jobs/run-abc123?") ? { job: job({ step: 6 }),
      metrics: [1, 2, 3, 4, 5, 6].map((step) => ({ step, reward: step })) } : undefined);
  const store = new JobsStore(api);
  store.onProgress({ id: "run-abc123", step: 6, steps: 10, metrics: { step: 6, reward: 6 } }); // before any list
  await store.refresh();
  assert.ok(api.calls.includes("GET /rewardtune/jobs/run-abc123?since=0&limit=5000"), api.calls);
  assert.deepEqual(store.metrics.get("run-abc123").map((m) => m.step), [1, 2, 3, 4, 5, 6]);
  await store.loadMetrics("run-abc123"); // afterwards only the new lines are read
  assert.equal(api.calls.at(-1), "GET /rewardtune/jobs/run-abc123?since=6&limit=5000");
});
