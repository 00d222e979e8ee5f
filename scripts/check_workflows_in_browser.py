"""Load every example workflow in the real ComfyUI frontend (headless Chromium) and check that what
it would queue (``app.graphToPrompt()``) equals ``testing/workflow.ui_to_api``'s prompt, and that no
node grows past its saved size (LiteGraph's ``computeSize``). Exit status 1 on any difference.

Needs Chromium (``apt-get install chromium``) and Playwright for Python (``pip install playwright``;
neither is a test requirement yet). Every request that is not to the local server is blocked.
Run:  .venv/bin/python scripts/check_workflows_in_browser.py   (about 2 minutes)
"""
import os
import runpy
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"]()  # the pack as ``rewardtune``
from rewardtune.testing.comfy_host import ComfyServer, make_custom_nodes_dir, write_extra_model_paths  # noqa: E402
from rewardtune.testing.workflow import EXAMPLES, load_example, min_node_size, ui_to_api  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

work = tempfile.mkdtemp(prefix="ux-browser-")
emp = write_extra_model_paths(os.path.join(work, "emp.yaml"), os.path.join(work, "models"),
                              custom_nodes=make_custom_nodes_dir(os.path.join(work, "nodes")))
failures = 0
print("[browser] starting ComfyUI and Chromium …", flush=True)
with ComfyServer(os.path.join(work, "srv"), emp) as srv, sync_playwright() as p:
    info = srv.get("/object_info")
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(srv.url) else r.abort())
    logs = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    t0 = time.time()
    page.goto(srv.url, timeout=180000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.graph.nodes !== undefined", timeout=180000)
    print(f"frontend up in {time.time()-t0:.1f}s")
    for key, name in EXAMPLES.items():
        wf = load_example(name)
        mine = ui_to_api(wf, info, check_options=False)
        res = page.evaluate("""async (wf) => {
            await window.app.loadGraphData(wf, true, true, null);
            const p = await window.app.graphToPrompt();
            const sizes = {};
            for (const n of window.app.graph.nodes) sizes[n.id] = {size: [n.size[0], n.size[1]], min: n.computeSize(), widgets: (n.widgets||[]).map(w => [w.name, w.value])};
            return {output: p.output, sizes};
        }""", wf)
        theirs = res["output"]
        ok = True
        for nid, node in mine.items():
            t = theirs.get(nid)
            if t is None:
                print(f"  {name}: node {nid} missing in frontend prompt"); ok = False; continue
            if t["inputs"] != node["inputs"]:
                ok = False
                diff = {k: (node["inputs"].get(k), t["inputs"].get(k)) for k in set(node["inputs"]) | set(t["inputs"])
                        if node["inputs"].get(k) != t["inputs"].get(k)}
                print(f"  {name}: node {nid} ({node['class_type']}) differs (mine, frontend): {diff}")
        extra = set(theirs) - set(mine)
        if extra:
            print(f"  {name}: frontend sends extra nodes {extra}"); ok = False
        for n in wf["nodes"]:
            s = res["sizes"][str(n["id"])]
            est = min_node_size(n, info[n["type"]]) if n["type"] in info else None
            grew = s["size"][1] > n["size"][1] + 0.5 or s["size"][0] > n["size"][0] + 0.5
            if grew or (est and s["min"][1] > n["size"][1]):
                ok = False
                print(f"  {name}: node {n['id']} {n['type']} json {n['size']} real {s['size']} computeSize {s['min']} estimate {est}")
        print(("OK   " if ok else "DIFF ") + name)
        failures += not ok
    browser.close()
    errors = [line for line in logs if line.startswith("error") and "404" not in line and "ERR_FAILED" not in line
              and "AxiosError" not in line]
    if errors:  # 404s/blocked requests are the core templates, release notes … this set-up does not serve
        print("console errors:\n" + "\n".join(errors[:15]))
sys.exit(1 if failures else 0)
