"""Installing the pack the way users do, and the metadata the Comfy registry publishes.

* ComfyUI-Manager (``comfyui_manager`` at the version ComfyUI's ``manager_requirements.txt`` pins,
  installed into the test venv by scripts/setup.sh) installs the pack from a git URL served on
  127.0.0.1, through its own HTTP API on a real ``main.py --enable-manager`` server; after a
  restart every node, the web files and the templates are there; then the Manager disables and
  uninstalls it. Everything lands in a temp ComfyUI base directory, never in the shared ComfyUI.
  The Manager runs offline (``network_mode = offline``) and its ``requirements.txt`` install must
  be a no-op (pip and uv are told not to reach an index; no installed distribution may change).
* ``comfy node validate`` (comfy-cli, in a venv of its own built by scripts/setup.sh) passes,
  ``comfy node pack`` builds an archive with what a user's ComfyUI needs and no test code, and the
  ``[project]`` / ``[tool.comfy]`` metadata is complete and consistent.
"""
from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile

import pytest

from rewardtune.testing.comfy_host import ComfyServer, comfyui_dir, write_extra_model_paths

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_ROOT = os.path.dirname(HERE)
# The name a user's clone gets: the last part of the repository URL in pyproject.toml.
REPO_NAME = "ComfyUI-RewardTune"
IN_PROCESS_MODULE = "custom_nodes.rewardtune"  # how the `host` fixture loads this checkout


def _pyproject() -> dict:
    with open(os.path.join(PACK_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


# ------------------------------------------------------------------------------ registry metadata
def test_dependencies_equal_requirements_txt():
    """ComfyUI-Manager installs requirements.txt; the registry lists [project].dependencies."""
    deps = _pyproject()["project"]["dependencies"]
    reqs = _requirement_lines(os.path.join(PACK_ROOT, "requirements.txt"))
    assert deps == reqs, f"pyproject.toml dependencies {deps} != requirements.txt {reqs}"


def test_registry_metadata_is_complete_and_consistent():
    meta = _pyproject()
    project, comfy = meta["project"], meta["tool"]["comfy"]
    # an SPDX licence id (PEP 639) with the licence text as a file
    assert project["license"] == "GPL-3.0-only"
    for name in project["license-files"]:
        assert os.path.isfile(os.path.join(PACK_ROOT, name)), name
    with open(os.path.join(PACK_ROOT, "LICENSE"), encoding="utf-8") as f:
        head = f.read(300)
    assert "GNU GENERAL PUBLIC LICENSE" in head and "Version 3" in head, "LICENSE is not the GPL-3.0 text"
    # one repository URL everywhere; comfy-cli reads the Issues / Documentation keys by these names
    urls = project["urls"]
    repo = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/" + re.escape(REPO_NAME), repo), repo
    assert urls["Issues"] == repo + "/issues"
    assert urls["Documentation"].startswith(repo)
    assert "Bug Tracker" not in urls  # comfy-cli ignores that key
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # the icon: a file in this repository, at the URL's path on the default branch
    owner_repo = repo.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = os.path.join(PACK_ROOT, comfy["Icon"].removeprefix(prefix))
    assert os.path.isfile(icon), f"{icon} (named by Icon) is missing"
    with open(icon, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "the icon is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    assert width == height and 64 <= width <= 400, (width, height)  # the registry asks for ≤ 400×400
    assert comfy["web"] == "web" and os.path.isdir(os.path.join(PACK_ROOT, "web"))
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


# ------------------------------------------------------------------------------ comfy-cli
def _comfy_cli() -> str:
    """comfy-cli's ``comfy``, from the venv scripts/setup.sh builds ($RT_COMFY_CLI overrides)."""
    exe = os.environ.get("RT_COMFY_CLI") or os.path.join(PACK_ROOT, ".rt", "comfy-cli", "bin", "comfy")
    if not os.access(exe, os.X_OK):
        pytest.fail(f"comfy-cli not found at {exe}: run `bash scripts/setup.sh` (scripts/test.sh does)")
    return exe


def _run_comfy_cli(args: list[str], cwd: str, home: str) -> subprocess.CompletedProcess:
    # its own HOME (it writes a config there), no telemetry, no prompts, no input
    env = dict(os.environ, HOME=home, DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1")
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([_comfy_cli(), "--skip-prompt", "--no-json", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def _snapshot(dst: str) -> str:
    """This checkout as a user would get it from the repository: a git repo holding the git-tracked
    files (as they are on disk now) and new files git does not ignore, in one commit."""
    try:
        out = subprocess.run(["git", "-C", PACK_ROOT, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"this test needs the pack as a git checkout with git installed: {e}")
    for rel in sorted({p for p in out.decode().split("\0") if p}):
        src = os.path.join(PACK_ROOT, rel)
        if os.path.islink(src) or not os.path.isfile(src):  # deleted files, links (.rt)
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
    git = ["git", "-C", dst, "-c", "user.name=RewardTune tests", "-c", "user.email=tests@127.0.0.1",
           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    return dst


def test_comfy_node_validate_passes(tmp_path):
    res = _run_comfy_cli(["node", "validate"], cwd=_snapshot(str(tmp_path / REPO_NAME)), home=str(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "All validation checks passed successfully" in out, out
    # comfy-cli only warns (exit 0) about a malformed licence or classifiers and unsafe code
    assert "Warning" not in out and "Security warnings" not in out, out


def test_registry_archive_holds_what_a_user_needs(tmp_path):
    """``comfy node pack`` builds the archive ``comfy node publish`` uploads (git-tracked files
    minus .comfyignore, plus ``includes``)."""
    src = _snapshot(str(tmp_path / REPO_NAME))
    res = _run_comfy_cli(["node", "pack"], cwd=src, home=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    with zipfile.ZipFile(os.path.join(src, "node.zip")) as z:
        names = set(z.namelist())
    tracked = set(subprocess.run(["git", "-C", src, "ls-files", "-z"], check=True, capture_output=True,
                                 text=True).stdout.split("\0")) - {""}  # template names hold spaces
    runtime_dirs = ("nodes/", "jobs/", "trainers/", "rewards/", "sampling/", "metrics/", "web/",
                    "example_workflows/")
    must = {f for f in tracked if f.startswith(runtime_dirs)}
    must |= {"__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE", "scripts/train.py"}
    assert len([f for f in must if f.startswith("example_workflows/")]) >= 1
    assert not must - names, f"missing from the registry archive: {sorted(must - names)}"
    dev = {f for f in names if f.startswith(("tests/", "testing/", "benchmarks/", ".ci/"))
           or f in ("scripts/setup.sh", "scripts/test.sh", "requirements-dev.txt")}
    assert not dev, f"development files in the registry archive: {sorted(dev)}"
    # nothing the pack imports at run time lives in a folder the archive leaves out
    for f in must:
        if f.endswith(".py") and not f.startswith("scripts/"):
            with open(os.path.join(src, f), encoding="utf-8") as fh:
                code = fh.read()
            assert not re.search(r"^\s*(from|import)\s+\.*(testing|tests|benchmarks)\b", code, re.M), f


# ------------------------------------------------------------------------------ ComfyUI-Manager
def _manager_pin() -> str:
    for line in _requirement_lines(os.path.join(comfyui_dir(), "manager_requirements.txt")):
        m = re.fullmatch(r"comfyui[-_]manager==(\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("ComfyUI's manager_requirements.txt does not pin comfyui_manager")


def _installed_distributions() -> dict[str, str]:
    """Every distribution in the server's Python and its version, read in a fresh process."""
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps(sorted((d.metadata['Name'].lower(), d.version) for d in m.distributions())))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


class _LoopbackGit:
    """A directory of bare repositories served over "dumb" HTTP on 127.0.0.1 (git clones it after
    ``git update-server-info``). The Manager refuses file:// URLs."""

    def __init__(self, root: str):
        handler = functools.partial(_QuietHandler, directory=root)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests_seen: list[str] = []

    def log_message(self, fmt, *args):
        _QuietHandler.requests_seen.append(self.path)


def _write_manager_config(user_dir: str):
    """<user dir>/__manager/config.ini: no network; git-URL installs allowed (they need a loopback
    listener as well); uv installs requirements.txt, as on a fresh Linux install."""
    d = os.path.join(user_dir, "__manager")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.ini"), "w", encoding="utf-8") as f:
        f.write("[default]\nnetwork_mode = offline\nallow_git_url_install = True\nsecurity_level = normal\n"
                "use_uv = True\nfile_logging = False\n")


def _post(srv: ComfyServer, path: str, body: bytes, ctype: str, timeout: float = 60) -> int:
    req = urllib.request.Request(srv.url + path, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _manager_task(srv: ComfyServer, kind: str, params: dict, timeout: float = 120) -> dict:
    """Queue one task through the Manager's queue API (as its frontend does), run the queue and
    return the task's history entry."""
    ui_id, client_id = str(uuid.uuid4()), "rewardtune-tests"
    task = {"ui_id": ui_id, "client_id": client_id, "kind": kind, "params": params}
    assert _post(srv, "/v2/manager/queue/task", json.dumps(task).encode(), "application/json") == 200, srv.log_tail()
    assert _post(srv, "/v2/manager/queue/start", b"", "application/json") in (200, 201), srv.log_tail()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:  # {"history": the task's TaskHistoryItem} once it is done, 400 before
            entry = srv.get(f"/v2/manager/queue/history?ui_id={ui_id}")["history"]
        except urllib.error.HTTPError:
            entry = None
        if isinstance(entry, dict) and (entry.get("status") or {}).get("completed"):
            return entry
        time.sleep(0.3)
    raise TimeoutError(f"Manager task {kind} not done after {timeout}s\n{srv.log_tail()}")


def _written_since(root: str, since: float) -> list[str]:
    """Files and folders under root changed after `since` (Python's own __pycache__ aside)."""
    hits = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        hits += [os.path.join(d, x) for x in dirs + files if os.lstat(os.path.join(d, x)).st_mtime > since]
    return hits


def _pack_nodes(object_info: dict, module: str) -> set[str]:
    return {k for k, v in object_info.items() if v.get("python_module") == module}


@pytest.mark.slow
@pytest.mark.server
def test_install_disable_uninstall_through_comfyui_manager(host, tmp_path, monkeypatch):
    t0 = time.time()
    try:
        version = importlib.metadata.version("comfyui_manager")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("comfyui_manager is not installed in the test venv: run `bash scripts/setup.sh` "
                    "(it installs ComfyUI's manager_requirements.txt)")
    assert version == _manager_pin(), f"comfyui_manager {version}, ComfyUI pins {_manager_pin()}"
    expected_nodes = {k for k, c in host.node_classes.items()
                      if getattr(c, "RELATIVE_PYTHON_MODULE", "") == IN_PROCESS_MODULE}
    assert len(expected_nodes) >= 10, expected_nodes
    templates = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(PACK_ROOT, "example_workflows"))
                       if f.endswith(".json"))

    # the pack as a bare repository on a loopback HTTP URL
    served = tmp_path / "git"
    bare = served / f"{REPO_NAME}.git"
    _snapshot(str(tmp_path / "src" / REPO_NAME))
    subprocess.run(["git", "clone", "-q", "--bare", str(tmp_path / "src" / REPO_NAME), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)

    # a ComfyUI base directory of its own: the Manager clones into <base>/custom_nodes
    base = tmp_path / "base"
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    _write_manager_config(str(work / "user"))
    emp = write_extra_model_paths(str(tmp_path / "extra_model_paths.yaml"), str(tmp_path / "models"))
    # the requirements install must be satisfied by what is installed: no index, no downloads
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("UV_NO_CACHE", "1")
    monkeypatch.setenv("COLUMNS", "1000")  # keep the Manager's (rich) log lines whole
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # git and urllib talk to loopback directly
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    before = _installed_distributions()
    started = time.time()

    def server(*flags):
        return ComfyServer(str(work), emp, extra_args=("--base-directory", str(base), *flags))

    timings = {}
    # 1. install through the legacy UI's "Install via Git URL" (the new UI installs only packs
    #    from the Manager's database)
    with _LoopbackGit(str(served)) as gitsrv, server("--enable-manager-legacy-ui") as srv:
        timings["start"] = time.time() - t0
        url = f"{gitsrv.url}/{REPO_NAME}.git"
        t = time.time()
        status = _post(srv, "/v2/customnode/install/git_url", url.encode(), "text/plain", timeout=600)
        timings["install"] = time.time() - t
        log = srv.log_tail(200_000)
    assert status == 200, log
    assert any("info/refs" in p for p in _QuietHandler.requests_seen), "git never fetched from the loopback URL"
    installed = custom_nodes / REPO_NAME
    assert (installed / "__init__.py").is_file() and (installed / ".git").is_dir(), os.listdir(custom_nodes)
    flat = re.sub(r"\s+", " ", log)  # the Manager prints through rich, which may wrap lines
    assert re.search(r"EXECUTE => \[[^]]*'-m', 'uv', 'pip', 'install', 'open-clip-torch>=3\.0,<4'\]", flat), (
        f"the Manager did not install requirements.txt with uv:\n{log[-6000:]}")
    assert "install script failed" not in log, log[-6000:]
    assert _installed_distributions() == before, "the Manager's requirements install changed the venv"

    # 2. restart (the Manager's new UI, as users get it): the nodes, web files and templates
    with server("--enable-manager") as srv:
        t = time.time()
        info = srv.get("/object_info")
        module = f"custom_nodes.{REPO_NAME}"
        assert _pack_nodes(info, module) == expected_nodes, (
            f"nodes after the Manager install: {sorted(_pack_nodes(info, module))}\n{srv.log_tail()}")
        exts = srv.get("/extensions")
        assert f"/extensions/{REPO_NAME}/rewardtune.js" in exts, exts
        assert b"registerExtension" in srv.get(f"/extensions/{REPO_NAME}/rewardtune.js")
        listed = srv.get("/api/workflow_templates")
        assert sorted(listed.get(REPO_NAME, [])) == templates, listed
        got = srv.get(f"/api/workflow_templates/{REPO_NAME}/{urllib.parse.quote(templates[0])}.json")
        with open(os.path.join(PACK_ROOT, "example_workflows", templates[0] + ".json"), "rb") as f:
            assert (json.loads(got) if isinstance(got, bytes) else got) == json.load(f)
        packs = srv.get("/v2/customnode/installed")
        assert REPO_NAME in packs and packs[REPO_NAME]["enabled"], packs
        # 3. disable through the Manager
        done = _manager_task(srv, "disable", {"node_name": REPO_NAME, "is_unknown": True})
        assert done["status"]["status_str"] == "success", (done, srv.log_tail())
        timings["checks+disable"] = time.time() - t
    assert not installed.exists() and (custom_nodes / ".disabled" / REPO_NAME / "__init__.py").is_file()

    # 4. restart: the nodes are gone; uninstall through the Manager
    with server("--enable-manager") as srv:
        t = time.time()
        info = srv.get("/object_info")
        assert not {k for k in info if k in expected_nodes}, "nodes still loaded from a disabled pack"
        assert REPO_NAME not in srv.get("/api/workflow_templates")
        done = _manager_task(srv, "uninstall", {"node_name": REPO_NAME, "is_unknown": True})
        assert done["status"]["status_str"] == "success", (done, srv.log_tail())
        timings["uninstall"] = time.time() - t
    assert not (custom_nodes / ".disabled" / REPO_NAME).exists() and not installed.exists()
    assert not _written_since(comfyui_dir(), started), "the Manager wrote into the shared ComfyUI folder"
    # offline: the Manager read its lists from its own package, never from the network
    logs = "".join(open(os.path.join(work, f), encoding="utf-8", errors="replace").read()
                   for f in os.listdir(work) if f.startswith("server-") and f.endswith(".log"))
    fetched = re.findall(r"FETCH DATA from: (\S+)", logs)
    assert fetched and all(u.startswith("/") for u in fetched), fetched
    for sign in ("network error", "Cannot connect to comfyregistry", "network connection is unstable",
                 "FETCH ComfyRegistry"):
        assert sign not in logs, f"the Manager tried the network: {sign!r}"
    print(f"\n[manager] comfyui_manager {version}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + f", total {time.time() - t0:.1f}s")
