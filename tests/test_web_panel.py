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
