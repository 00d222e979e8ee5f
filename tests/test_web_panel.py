"""The training panel's JavaScript: its own tests run in Node (tests/web/panel.test.mjs)."""
from __future__ import annotations

import os
import shutil
import subprocess

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_panel_tests_pass_in_node():
    node = shutil.which("node")
    assert node, "Node.js is missing: scripts/setup.sh installs it (apt-get install nodejs)"
    proc = subprocess.run([node, "--test", os.path.join(PACK_ROOT, "tests", "web")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# pass 10" in proc.stdout and "# fail 0" in proc.stdout


def test_the_training_tab_has_one_name_everywhere():
    """The tab's button, its header and everything a user reads (README, docs, help pages, the
    templates' notes, the nodes' and jobs' messages) call it the Training tab: no "RewardTune
    panel", "RewardTune sidebar tab" or "RewardTune training" (the header said the last while the
    button said Training and template 5's note the second). The browser test checks the rendered
    button and header."""
    import glob
    import json
    import re
    other = re.compile(r"RewardTune (panel|sidebar|tab|training\b(?! (jobs|checkpoint)))|sidebar panel|"
                       r"Training sidebar tab", re.IGNORECASE)
    texts = [os.path.join(PACK_ROOT, "README.md"), *glob.glob(os.path.join(PACK_ROOT, "docs", "*.md")),
             *glob.glob(os.path.join(PACK_ROOT, "web", "docs", "**", "*.md"), recursive=True),
             *glob.glob(os.path.join(PACK_ROOT, "nodes", "*.py")), *glob.glob(os.path.join(PACK_ROOT, "jobs", "*.py")),
             os.path.join(PACK_ROOT, "__init__.py")]
    found = []
    for path in texts:
        for i, line in enumerate(open(path, encoding="utf-8"), 1):
            if other.search(line):
                found.append(f"{os.path.relpath(path, PACK_ROOT)}:{i}: {line.strip()}")
    for path in glob.glob(os.path.join(PACK_ROOT, "example_workflows", "*.json")):
        for node in json.load(open(path, encoding="utf-8"))["nodes"]:
            if node["type"] in ("MarkdownNote", "Note") and other.search(node["widgets_values"][0]):
                found.append(f"{os.path.basename(path)}: {other.search(node['widgets_values'][0]).group(0)}")
    assert not found, "other names for the Training tab:\n" + "\n".join(found)
    panel = open(os.path.join(PACK_ROOT, "web", "rewardtune_panel.js"), encoding="utf-8").read()
    assert 'export const TAB_NAME = "Training";' in panel
    assert 'el("span", "rt-title", TAB_NAME)' in panel  # the header
    ext = open(os.path.join(PACK_ROOT, "web", "rewardtune.js"), encoding="utf-8").read()
    assert "title: TAB_NAME," in ext and "label: TAB_NAME," in ext  # the button
