"""Drive the ComfyUI frontend in a real browser: Debian's Chromium through Playwright for Python.

Used by tests/test_browser.py. Playwright cannot download its own browser here, so the system one
is launched (``$RT_CHROMIUM``, else ``chromium`` on the PATH); ``scripts/test.sh`` installs both.
Every request that does not go to 127.0.0.1 is aborted (the frontend calls out for release notes,
the node registry and the default graph's model files), and recorded.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

PACK_MARK = re.compile(r"rewardtune|/extensions/", re.IGNORECASE)
UNHANDLED = re.compile(r"Unhandled message|Unknown message type")
# the frontend's first-run state, set through /settings before the page loads: no template gallery
# popping up over the graph, labels under the sidebar icons
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Sidebar.Size": "normal",
                      "Comfy.Minimap.Visible": False}


def chromium_path() -> str | None:
    for cand in (os.environ.get("RT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 "/usr/bin/chromium"):
        if cand and os.path.exists(cand):
            return cand
    return None


@dataclass
class PageLog:
    """What one page printed and tried to fetch."""
    console: list[tuple[str, str, str]] = field(default_factory=list)  # (type, text, url)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def pack_errors(self) -> list[str]:
        """Console errors and uncaught exceptions that mention the pack or its extension files, and
        the frontend's warning for a websocket message nobody listens to ("Unhandled message: …
        Unknown message type rewardtune.…")."""
        out = [f"{text} ({url})" for kind, text, url in self.console
               if (kind == "error" or kind == "warning" and UNHANDLED.search(text))
               and PACK_MARK.search(text + " " + url)]
        out += [e for e in self.page_errors if PACK_MARK.search(e)]
        return out


def open_page(context, base_url: str, log: PageLog, timeout_ms: int = 120_000):
    """A page on ``base_url`` with every other host blocked, loaded until the app and its extension
    manager are ready."""
    host = urlparse(base_url).hostname

    def route(r):
        if urlparse(r.request.url).hostname == host:
            r.continue_()
        else:
            log.blocked.append(r.request.url)
            r.abort()
    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda m: log.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
    page.on("pageerror", lambda e: log.page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"))
    page.goto(base_url, wait_until="domcontentloaded", timeout=timeout_ms)
    wait_app(page, timeout_ms)
    return page


def wait_app(page, timeout_ms: int = 120_000) -> None:
    page.wait_for_function("() => window.app?.graph && window.app.extensionManager?.registerSidebarTab "
                           "&& document.querySelector('.side-tool-bar-container')", timeout=timeout_ms)


def node_clip(page, node_id, pad: int = 24) -> dict:
    """The screen rectangle of a graph node (title bar included), for a screenshot clip."""
    box = page.evaluate("""([id, pad]) => {
        const node = app.graph.getNodeById(id), ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
        const th = LiteGraph.NODE_TITLE_HEIGHT;
        const [x, y] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - th]);
        return { x: rect.left + x - pad, y: rect.top + y - pad,
                 width: node.size[0] * ds.scale + 2 * pad, height: (node.size[1] + th) * ds.scale + 2 * pad };
    }""", [node_id, pad])
    return {k: max(0.0, v) for k, v in box.items()}


def wait_until(pred, timeout: float, what: str, interval: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")
