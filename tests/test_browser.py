"""The pack in a real browser: Debian's Chromium driven by Playwright against a real ComfyUI server
with the pack and tiny models. Every request not to 127.0.0.1 is blocked.

- the nodes carry the pack's colours (and core nodes do not);
- what the help pages say about advanced inputs and blend mode is what the canvas shows, and each
  page is found at the first address the frontend asks for (<Node>/en.md, no 404);
- the Training tab (one name: its one-word button label is its header) lists a background training
  job live: its card, step and ETA, a reward curve that gains points with axes, min/max and a hover
  value, the newest sample thumbnail; the card is patched in place, not rebuilt; Cancel stops the
  job; a reload restores it;
- Resume continues the stopped job to its last step (the page reloaded while it trains); Copy gives
  the LoRA's name;
- Remove (after the frontend's confirm dialog) deletes a finished job;
- the Templates dialog names the pack RewardTune, shows its cards in the order 1…7 beside ComfyUI's
  own templates, and every template opens from it and runs when queued from the UI (with the tiny
  models picked in its combos and small sizes);
- no console error that mentions the pack or its extension files, and no "Unhandled message" for
  the pack's websocket messages (after a Remove, after a reload mid-job), on any page.

Screenshots go to $RT_ARTIFACTS (or browser-artifacts/ in pytest's temp folder);
RT_DOC_IMAGES=1 also writes the README's two pictures to docs/images/.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse

import pytest

from rewardtune.testing.browser import (FIRST_RUN_SETTINGS, PageLog, chromium_path, node_clip, open_page, wait_app,
                                       wait_until)
from rewardtune.testing.comfy_host import ComfyServer

from test_trainer_node import train_prompt  # noqa: E402

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RT_COLOR, RT_BGCOLOR = "#2a3f5a", "#1c2a3c"  # web/rewardtune.js
VIEWPORT = {"width": 1400, "height": 900}
JOB_STEPS = 20
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def browser_server(models_tree, reward_tree, tmp_path_factory):
    srv = ComfyServer(str(tmp_path_factory.mktemp("browser_server")), models_tree["yaml"])
    srv.start()
    srv.post("/settings", FIRST_RUN_SETTINGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: scripts/test.sh installs it (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.fail("Chromium is missing: scripts/test.sh installs it (apt-get install chromium), or set $RT_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    folder = os.environ.get("RT_ARTIFACTS") or str(tmp_path_factory.getbasetemp() / "browser-artifacts")
    os.makedirs(folder, exist_ok=True)
    return folder


@pytest.fixture
def ui(browser, browser_server, artifacts, request):
    """A fresh browser context and page on the server; its console is checked for pack errors by
    each test (``check_console``) and a screenshot is saved when the test ends."""
    context = browser.new_context(viewport=VIEWPORT)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=browser_server.url)
    log = PageLog()
    page = open_page(context, browser_server.url, log)
    close_dialogs(page)
    yield page, log
    try:
        page.screenshot(path=os.path.join(artifacts, f"{request.node.name}.png"))
    finally:
        context.close()


def check_console(log: PageLog):
    errors = log.pack_errors()
    assert not errors, "console errors from the pack:\n" + "\n".join(errors)
    assert not any(u.startswith("http://127.0.0.1") for u in log.blocked)


def close_dialogs(page):
    for _ in range(3):
        if not page.locator("[role=dialog]:visible").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def doc_image(artifacts, name):
    """Screenshots for the README go to docs/images/ when RT_DOC_IMAGES=1, else with the artifacts."""
    if os.environ.get("RT_DOC_IMAGES") == "1":
        folder = os.path.join(PACK_ROOT, "docs", "images")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name)
    return os.path.join(artifacts, name)


def jobs(srv):
    return srv.get("/rewardtune/jobs")["jobs"]


def job_status(srv, job_id):
    return srv.get(f"/rewardtune/jobs/{job_id}")["job"]


def open_panel(page):
    button = page.locator(".rewardtune-jobs-tab-button")
    button.wait_for(timeout=30_000)
    if not page.locator(".rt-panel").count():
        button.click()
    page.locator(".rt-panel .rt-header").wait_for(timeout=30_000)


def card(page, job_id):
    return page.locator(f'.rt-job[data-job="{job_id}"]')


def points(page, job_id) -> int:
    value = card(page, job_id).locator(".rt-chart").get_attribute("data-points")
    return int(value or 0)


# ---------------------------------------------------------------------------------------- nodes
def test_nodes_carry_the_pack_colours(ui, artifacts):
    page, log = ui
    found = page.evaluate("""() => {
        const out = {};
        const types = Object.keys(LiteGraph.registered_node_types);
        for (const t of types.filter((t) => t.startsWith('RewardTune')).concat(['KSampler'])) {
            const n = LiteGraph.createNode(t);
            out[t] = [n.color ?? null, n.bgcolor ?? null];
        }
        return out;
    }""")
    ours = {t: c for t, c in found.items() if t.startswith("RewardTune")}
    assert "RewardTuneCombinedKSampler" in ours and len(ours) >= 8, found.keys()
    assert all(c == [RT_COLOR, RT_BGCOLOR] for c in ours.values()), ours
    assert found["KSampler"] != [RT_COLOR, RT_BGCOLOR]
    # a Combined KSampler on an empty canvas, for the README
    node_id = page.evaluate("""() => {
        app.graph.clear();
        const n = LiteGraph.createNode('RewardTuneCombinedKSampler');
        n.pos = [420, 260];
        app.graph.add(n);
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        return n.id;
    }""")
    page.wait_for_timeout(500)
    page.screenshot(path=doc_image(artifacts, "combined_ksampler_node.png"), clip=node_clip(page, node_id))
    check_help_pages_against_the_canvas(page, sorted(ours))
    check_console(log)


FOLDED = re.compile(r"folded|hidden|under \*advanced|advanced inputs\*", re.IGNORECASE)


def check_help_pages_against_the_canvas(page, node_types):
    """Each node's help page, fetched at the first address the frontend's help panel asks for
    (/extensions/<pack>/docs/<Node>/<locale>.md; a 404 there was the first request of every help
    page), against a fresh node on the canvas: an input the page says is folded away or hidden is not
    drawn, and every input the schema marks advanced is drawn (the classic canvas shows them inline;
    Nodes 2.0 folds them, which the pages say). In blend mode the Combined KSampler shows
    blend_power and keeps switch_unit (ignored, as its page says); in switch mode blend_power is gone."""
    found = page.evaluate("""async (types) => {
        const ext = (await (await fetch('/extensions')).json()).find((e) => e.endsWith('/rewardtune.js'));
        const pack = ext.split('/')[2];
        const locale = app.extensionManager.setting.get('Comfy.Locale') || 'en';
        const out = {};
        for (const t of types) {
            const res = await fetch(`/extensions/${pack}/docs/${t}/${locale}.md`);
            const n = LiteGraph.createNode(t);
            app.graph.add(n);
            out[t] = { status: res.status, type: res.headers.get('content-type'), page: await res.text(),
                       widgets: Object.fromEntries((n.widgets || []).map((w) => [w.name,
                           { visible: n.isWidgetVisible(w), advanced: !!(w.advanced || w.options?.advanced) }])) };
            app.graph.remove(n);
        }
        const n = LiteGraph.createNode('RewardTuneCombinedKSampler');
        app.graph.add(n);
        const shown = () => n.widgets.filter((w) => n.isWidgetVisible(w)).map((w) => w.name);
        const mode = n.widgets.find((w) => w.name === 'mode');
        mode.value = 'blend';
        out.blend = shown();
        mode.value = 'switch';
        out.switch = shown();
        app.graph.remove(n);
        return out;
    }""", node_types)
    problems = []
    for t in node_types:
        f = found[t]
        if f["status"] != 200 or "text/html" in (f["type"] or ""):  # what the frontend's help panel accepts
            problems.append(f"{t}: help page answered {f['status']} ({f['type']}) at <Node>/<locale>.md")
            continue
        for name, w in f["widgets"].items():
            lines = [line for line in f["page"].splitlines() if f"`{name.split('.')[-1]}`" in line]
            if w["visible"] and any(FOLDED.search(line) and "Nodes 2.0" not in line for line in lines):
                problems.append(f"{t}: the help page says {name} is folded away or hidden; the canvas shows it")
            if w["advanced"] and not w["visible"]:
                problems.append(f"{t}: advanced input {name} is not drawn on the canvas, as its page says it is")
    assert not problems, "\n".join(problems)
    assert "mode.blend_power" in found["blend"] and "switch_unit" in found["blend"], found["blend"]
    assert "mode.blend_power" not in found["switch"] and "switch_unit.switch_step" in found["switch"], found["switch"]


# ---------------------------------------------------------------------------------------- panel
@pytest.fixture(scope="module")
def panel_job(browser_server, models_tree, reward_tree):
    """A background training job, started over HTTP as a user's queued graph would."""
    srv = browser_server
    before = {j["id"] for j in jobs(srv)}
    prompt = train_prompt(models_tree, reward_tree, name="browser-panel", steps=JOB_STEPS, save_every=1, seed=11)
    entry = srv.wait(srv.queue(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success", entry
    new = [j for j in jobs(srv) if j["id"] not in before]
    assert len(new) == 1, new
    return new[0]["id"]


@pytest.mark.slow
def test_panel_lists_a_background_job_live_and_cancel_stops_it(ui, browser_server, panel_job, artifacts):
    page, log = ui
    srv, job_id = browser_server, panel_job
    # the sidebar label is one short word on one line (a long title wrapped mid-word)
    label = page.locator(".rewardtune-jobs-tab-button .side-bar-button-label")
    assert label.inner_text().strip() == "Training"
    lines = label.evaluate("e => e.getClientRects().length && Math.round(e.getBoundingClientRect().height / "
                           "parseFloat(getComputedStyle(e).lineHeight))")
    assert lines == 1, f"the sidebar label takes {lines} lines"
    open_panel(page)
    assert page.locator(".rt-header .rt-refresh").is_visible()
    # one name: the header says what the button says
    assert page.locator(".rt-panel .rt-title").inner_text().strip() == "Training"
    c = card(page, job_id)
    c.wait_for(timeout=60_000)
    assert c.locator(".rt-name").inner_text() == "browser-panel"  # the name, the raw id only as a tooltip
    assert job_id in c.locator(".rt-name").get_attribute("title")
    # keyed DOM: watch the list and this card while steps arrive
    page.evaluate("""(id) => {
        const list = document.querySelector('.rt-list'), el = document.querySelector(`.rt-job[data-job="${id}"]`);
        window.__rt = { el, listMutations: 0, svg: el.querySelector('svg') };
        new MutationObserver((m) => { window.__rt.listMutations += m.length; }).observe(list, { childList: true });
    }""", job_id)
    start = points(page, job_id)
    wait_until(lambda: points(page, job_id) >= max(3, start + 2) or job_status(srv, job_id)["state"] != "running",
               180, "the curve to gain points")
    assert job_status(srv, job_id)["state"] == "running", "the job ended before the panel showed it running"
    assert c.get_attribute("data-state") == "running"
    meta = c.locator(".rt-meta").inner_text()
    assert f"/ {JOB_STEPS}" in meta and "ETA" in meta and "reward" in meta, meta
    assert c.locator(".rt-smooth").get_attribute("d").count("L") >= 2
    ymin, ymax = (float(c.locator(s).text_content()) for s in (".rt-ymin", ".rt-ymax"))
    assert ymin <= ymax
    assert c.locator(".rt-xfirst").text_content() == "step 1"
    same = page.evaluate("""(id) => ({
        el: document.querySelector(`.rt-job[data-job="${id}"]`) === window.__rt.el,
        svg: window.__rt.el.querySelector('svg') === window.__rt.svg, mutations: window.__rt.listMutations })""", job_id)
    assert same == {"el": True, "svg": True, "mutations": 0}, f"the panel rebuilt its DOM on a step: {same}"
    # Cancel stops it; Remove is not offered while it runs
    assert c.locator("button[data-action=remove]").count() == 0
    c.locator("button[data-action=cancel]").click()
    wait_until(lambda: job_status(srv, job_id)["state"] == "stopped", 120, "the job to stop")
    c.locator(".rt-state", has_text="stopped").wait_for(timeout=30_000)
    stopped = job_status(srv, job_id)
    assert stopped["step"] < JOB_STEPS
    assert c.locator("button[data-action=resume]").is_visible() and c.locator("button[data-action=remove]").is_visible()
    # checked after Cancel: a short job on a fast machine finished while the test looked at it (CI failed so)
    # the newest sample (save_every=1: one per step) as a thumbnail, served by /view
    wait_until(lambda: c.locator(".rt-thumb").evaluate("i => !i.hidden && i.complete && i.naturalWidth > 0"), 60,
               "the sample thumbnail")
    # hovering the curve reads a value out
    box = c.locator(".rt-hit").bounding_box()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    readout = c.locator(".rt-readout").inner_text()
    assert readout.startswith("step ") and ":" in readout, readout
    panel_box, card_box = page.locator(".rt-panel").bounding_box(), c.bounding_box()
    page.screenshot(path=doc_image(artifacts, "training_panel.png"), clip={
        "x": 0, "y": 0, "width": panel_box["x"] + panel_box["width"], "height": card_box["y"] + card_box["height"] + 24})
    # a reload restores the panel: the job, its state and its whole curve
    n_points = points(page, job_id)
    page.reload(wait_until="domcontentloaded")
    wait_app(page)
    close_dialogs(page)
    open_panel(page)
    c = card(page, job_id)
    c.wait_for(timeout=30_000)
    wait_until(lambda: points(page, job_id) >= stopped["step"], 30, "the reloaded curve")
    assert c.get_attribute("data-state") == "stopped" and points(page, job_id) == stopped["step"] >= n_points - 1
    check_console(log)


@pytest.mark.slow
def test_resume_from_the_panel_trains_to_the_end_and_copies_the_lora_name(ui, browser_server, panel_job, models_tree):
    page, log = ui
    srv, job_id = browser_server, panel_job
    if job_status(srv, job_id)["state"] in ("queued", "running"):  # the test before did not get to Cancel
        srv.post(f"/rewardtune/jobs/{job_id}/cancel", {})
        wait_until(lambda: job_status(srv, job_id)["state"] not in ("queued", "running"), 120, "the job to end")
    assert job_status(srv, job_id)["state"] == "stopped", "the job ended before it could be cancelled"
    open_panel(page)
    c = card(page, job_id)
    with page.expect_response(lambda r: r.url.endswith("/resume") and r.request.method == "POST") as resp:
        c.locator("button[data-action=resume]").click()
    assert resp.value.ok, resp.value.text()
    # the page reloaded at once, while the job restarts and trains: its progress messages reach the
    # new page from its first moments on (before the extension's setup() runs) and must find a
    # listener, not "Unknown message type"
    page.reload(wait_until="domcontentloaded")
    wait_app(page)
    # Resume queues the job's graph again; its trainer node must start the job, not answer from the
    # output cache (a re-queued identical prompt "executes" in milliseconds and trains nothing)
    wait_until(lambda: job_status(srv, job_id)["state"] != "stopped", 60, "Resume to restart the stopped job")
    reloaded_at = job_status(srv, job_id)
    assert reloaded_at["state"] == "running", f"the job ended before the page came back: {reloaded_at}"
    close_dialogs(page)
    open_panel(page)
    c = card(page, job_id)
    wait_until(lambda: job_status(srv, job_id)["state"] in ("finished", "failed", "stopped"), 300,
               "the resumed job to end")
    st = job_status(srv, job_id)
    assert st["state"] == "finished" and st["step"] == JOB_STEPS, st
    c.locator(".rt-state", has_text="finished").wait_for(timeout=30_000)
    wait_until(lambda: points(page, job_id) == JOB_STEPS, 30, "the whole curve")
    assert c.locator(".rt-meta").inner_text().startswith(f"step {JOB_STEPS} / {JOB_STEPS}")
    c.locator("button[data-action=copy]").click()
    copied = wait_until(lambda: page.evaluate("navigator.clipboard.readText()"), 10, "the clipboard")
    assert copied == f"rewardtune/{job_id}.safetensors"
    assert os.path.isfile(os.path.join(models_tree["root"], "loras", copied))  # the name Load LoRA lists
    check_console(log)


@pytest.mark.slow
def test_remove_from_the_panel_after_a_confirm(ui, browser_server, panel_job):
    page, log = ui
    srv, job_id = browser_server, panel_job
    if job_status(srv, job_id)["state"] in ("queued", "running"):
        srv.post(f"/rewardtune/jobs/{job_id}/cancel", {})
        wait_until(lambda: job_status(srv, job_id)["state"] not in ("queued", "running"), 120, "the job to end")
    open_panel(page)
    c = card(page, job_id)
    c.wait_for(timeout=30_000)
    # declined: nothing happens
    c.locator("button[data-action=remove]").click()
    dialog = page.locator("[role=dialog]").last
    dialog.wait_for(timeout=10_000)
    assert "Remove training job" in dialog.inner_text()
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached", timeout=10_000)
    assert c.count() == 1 and job_id in {j["id"] for j in jobs(srv)}
    # confirmed: the job is gone from the server and the panel
    c.locator("button[data-action=remove]").click()
    dialog = page.locator("[role=dialog]").last
    dialog.wait_for(timeout=10_000)
    dialog.get_by_role("button", name="Delete").click()
    wait_until(lambda: job_id not in {j["id"] for j in jobs(srv)}, 30, "the job to be removed on the server")
    c.wait_for(state="detached", timeout=30_000)
    page.wait_for_timeout(1000)  # the server's rewardtune.removed message: handled, not "Unknown message type"
    with pytest.raises(urllib.error.HTTPError) as e:
        srv.get(f"/rewardtune/jobs/{job_id}")
    assert e.value.code == 404
    check_console(log)


@pytest.mark.slow
def test_a_lone_point_is_drawn_as_a_dot(ui):
    """Step 1 of a job: one point, no line to draw (the curve used to stay blank)."""
    page, log = ui
    dot = page.evaluate("""async () => {
        const ext = (await (await fetch('/extensions')).json()).find((e) => e.endsWith('/rewardtune_panel.js'));
        const { CurveView } = await import(ext);
        const view = new CurveView();
        document.body.append(view.root);
        view.update([{ step: 1, reward: 0.25 }]);
        const c = view.root.querySelector('.rt-dot-point');
        const out = { visible: c.getAttribute('visibility'), cx: +c.getAttribute('cx'), cy: +c.getAttribute('cy'),
                      r: c.getBoundingClientRect().width, max: view.root.querySelector('.rt-ymax').textContent };
        view.root.remove();
        return out;
    }""")
    assert dot["visible"] == "visible" and dot["r"] > 0 and dot["cx"] > 0 and dot["cy"] > 0, dot
    assert dot["max"] == "0.25"
    check_console(log)


# -------------------------------------------------------------------------------- UI → API rule
@pytest.mark.slow
def test_the_frontend_queues_what_the_headless_conversion_builds(ui, browser_server):
    """Each example workflow loaded into the real frontend: ``app.graphToPrompt()`` sends exactly the
    node inputs ``testing/workflow.ui_to_api`` builds (the conversion the demo and the tests use), and
    no node grows past the size the JSON saves (LiteGraph's ``computeSize``), so a file that shifts
    widgets or overlaps in the browser fails here."""
    from rewardtune.testing.workflow import EXAMPLES, load_example, ui_to_api
    page, log = ui
    info = browser_server.get("/object_info")
    problems = []
    for name in EXAMPLES.values():
        wf = load_example(name)
        mine = ui_to_api(wf, info, check_options=False)
        res = page.evaluate("""async (wf) => {
            await app.loadGraphData(wf, true, true, null);
            const p = await app.graphToPrompt();
            const sizes = {};
            for (const n of app.graph.nodes) sizes[n.id] = {size: [n.size[0], n.size[1]], min: n.computeSize()};
            return {output: p.output, sizes};
        }""", wf)
        theirs = res["output"]
        for nid, node in mine.items():
            if nid not in theirs:
                problems.append(f"{name}: node {nid} missing in the frontend's prompt")
            elif theirs[nid]["inputs"] != node["inputs"]:
                diff = {k: (node["inputs"].get(k), theirs[nid]["inputs"].get(k))
                        for k in set(node["inputs"]) | set(theirs[nid]["inputs"])
                        if node["inputs"].get(k) != theirs[nid]["inputs"].get(k)}
                problems.append(f"{name}: node {nid} ({node['class_type']}) differs (ours, frontend's): {diff}")
        if set(theirs) - set(mine):
            problems.append(f"{name}: the frontend sends extra nodes {sorted(set(theirs) - set(mine))}")
        for n in wf["nodes"]:
            real = res["sizes"][str(n["id"])]
            if real["size"][0] > n["size"][0] + 0.5 or real["size"][1] > n["size"][1] + 0.5 \
                    or real["min"][1] > n["size"][1]:
                problems.append(f"{name}: node {n['id']} {n['type']} saved {n['size']}, drawn {real['size']}, "
                                f"needs {real['min']}")
    assert not problems, "\n".join(problems)
    check_console(log)


# ---------------------------------------------------------------------------------------- templates
# What a user of the tiny test models would pick: per widget name, a value (or for combos whose
# value is not installed, the option to pick); per node type, overrides. Small sizes and step counts.
SHRINK = {
    "*": {"width": 64, "height": 64, "steps": 4, "batch_size": 2, "switch_step": 2, "precision": "fp32"},
    "RewardTuneTrainLoRA": {"steps": 2, "batch_size": 1, "grad_accum": 1, "rank": 2, "save_every": 1,
                            "gradient_checkpointing": False, "learning_rate": 1e-3,
                            "dataset_folder": "rewardtune_browser_dataset",
                            "config_json": json.dumps({"num_steps": 10, "imagerefl_start": 6, "imagerefl_tf_min": 6,
                                                       "imagerefl_tf_max": 9, "cfg": 2.0,
                                                       # SQDF: the paper presets collect 64/256 per step
                                                       "sqdf_collect": 2, "sqdf_buffer": 4, "sqdf_window": 4})},
    "RewardTuneQualityDiversitySweep": {"switch_steps": "0, 2, 4", "images_per_prompt": 2},
    "RewardTuneLoadRewardModel": {"precision": "fp32"},
}
PREFER = {"ckpt_name": "sd15", "lora_name": "lora", "reward_model": "hpsv2"}


def template_names(srv) -> list[str]:
    listed = srv.get("/api/workflow_templates")
    assert "rewardtune" in listed, listed
    return sorted(listed["rewardtune"])


def open_templates_dialog(page):
    """The Templates dialog with the pack's category picked (named RewardTune, not the folder's name)."""
    page.locator(".templates-tab-button").click()
    dialog = page.locator("[role=dialog]").last
    dialog.wait_for(timeout=30_000)
    dialog.get_by_text("RewardTune", exact=True).first.click()
    return dialog


@pytest.mark.slow
def test_every_template_opens_from_the_dialog_and_runs_when_queued(ui, browser_server, models_tree, reward_tree,
                                                                    artifacts):
    page, log = ui
    srv = browser_server
    from rewardtune.testing.workflow import write_tiny_dataset
    write_tiny_dataset(os.path.join(srv.workdir, "input", SHRINK["RewardTuneTrainLoRA"]["dataset_folder"]))
    prefer = {k: (models_tree.get(v) or reward_tree["files"][v]) for k, v in PREFER.items()}
    # the SD3.5 template gets the tiny SD3.5 checkpoint and its LoRA
    prefer_sd35 = {**prefer, "ckpt_name": models_tree["sd35"], "lora_name": models_tree["sd35_lora"]}
    names = template_names(srv)
    assert len(names) >= 3, names
    # the dialog: ComfyUI's own templates are there (its templates package is installed), the pack's
    # category is RewardTune, its cards come in their numbers' order (the server lists them in
    # directory order)
    dialog = open_templates_dialog(page)
    cards = dialog.locator('[data-testid^="template-workflow-"]')
    wait_until(lambda: cards.count() == len(names), 30, "the pack's template cards")
    shown = [t.removeprefix("template-workflow-") for t in cards.evaluate_all("cs => cs.map((c) => c.dataset.testid)")]
    assert shown == sorted(names, key=lambda n: int(n.split()[0])), shown
    dialog.get_by_text("All Templates", exact=True).first.click()
    wait_until(lambda: cards.count() > len(names), 30, "ComfyUI's own templates in the dialog")
    close_dialogs(page)
    assert not [c for c in log.console if "Error loading core workflow templates" in c[1]]
    ran, failed = {}, {}
    for name in names:
        try:
            ran[name] = open_and_queue_template(page, srv, name, prefer_sd35 if "SD3.5" in name else prefer, artifacts)
        except Exception as e:  # go on: one report for every template (Playwright has its own TimeoutError)
            failed[name] = str(e)[:3000]
            close_dialogs(page)
    print("templates run from the UI (seconds each):", ran)
    assert not failed, "templates that failed:\n" + "\n\n".join(f"{k}: {v}" for k, v in failed.items())
    check_console(log)


def open_and_queue_template(page, srv, name, prefer, artifacts) -> float:
    """Open template ``name`` from the Templates dialog, pick the tiny models and small sizes in
    its widgets, press Run, and wait for the prompt to succeed. Returns the seconds it ran."""
    expected = srv.get(f"/api/workflow_templates/rewardtune/{urllib.parse.quote(name)}.json")
    dialog = open_templates_dialog(page)
    dialog.get_by_text(name, exact=True).first.click()
    wait_until(lambda: page.evaluate("() => !document.querySelector('[role=dialog]')") or close_dialogs(page), 30,
               f"the Templates dialog to close after picking {name}")
    wait_until(lambda: page.evaluate("() => app.graph.nodes.map((n) => n.type).sort()") ==
               sorted(n["type"] for n in expected["nodes"]), 30, f"{name} to load")
    changed = page.evaluate("""([shrink, prefer]) => {
        const out = [];
        for (const node of app.graph.nodes) {
            const rules = { ...shrink['*'], ...(shrink[node.type] || {}) };
            for (const w of node.widgets || []) {
                let v = w.value;
                const options = Array.isArray(w.options?.values) ? w.options.values : null;
                if (options && !options.includes(v)) v = options.includes(prefer[w.name]) ? prefer[w.name] : options[0];
                // DynamicCombo sub-inputs are named after their combo ("switch_unit.switch_step")
                const key = (w.name in rules) ? w.name : w.name.split('.').pop();
                if (key in rules && (!options || options.includes(rules[key]))) v = rules[key];
                if (v !== w.value) { w.value = v; w.callback?.(v); out.push(`${node.type}.${w.name}=${v}`); }
            }
        }
        app.graph.setDirtyCanvas(true, true);
        return out;
    }""", [SHRINK, prefer])
    page.screenshot(path=os.path.join(artifacts, f"template_{name}.png"))
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                              timeout=30_000) as resp:
        page.locator("[data-testid=queue-button], button:has-text('Run')").first.click()
    body = resp.value.json()
    assert "prompt_id" in body, f"the server refused the queued graph: {body}; widgets changed: {changed}"
    t0 = time.time()
    entry = srv.wait(body["prompt_id"], timeout=600)
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", (
        [(e.get("node_type"), e.get("exception_message")) for e in errors], changed)
    close_dialogs(page)
    return round(time.time() - t0, 1)
