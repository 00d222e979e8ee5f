"""Drive a real ComfyUI from Python: in-process (its executor) or as a server subprocess.

Used by the tests, the demo and the benchmarks. Nothing here is imported by the nodes.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "rewardtune"
COMFY_VERSION = "0.30.0"


def comfyui_dir() -> str:
    """Where scripts/setup.sh put ComfyUI (``$COMFYUI_DIR`` overrides)."""
    candidates = [os.environ.get("COMFYUI_DIR")]
    env_sh = os.path.join(PACK_ROOT, ".rt", "env.sh")
    if os.path.exists(env_sh):
        for line in open(env_sh, encoding="utf-8"):
            if line.startswith("export COMFYUI_DIR="):
                candidates.append(line.split("=", 1)[1].strip().strip('"'))
    cache = os.environ.get("RT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "rewardtune"))
    candidates.append(os.path.join(cache, f"ComfyUI-{COMFY_VERSION}"))
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "main.py")):
            return os.path.abspath(c)
    raise RuntimeError("ComfyUI not found: run `bash scripts/setup.sh` first (or set COMFYUI_DIR).")


def make_custom_nodes_dir(root: str) -> str:
    """A custom_nodes folder holding this pack under its install name (a symlink, as a user's clone)."""
    cn = os.path.join(root, "custom_nodes")
    os.makedirs(cn, exist_ok=True)
    link = os.path.join(cn, PACK_NAME)
    if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(PACK_ROOT):
        os.unlink(link)  # left by a checkout that moved or was deleted: point it at this one
    if not os.path.lexists(link):
        os.symlink(PACK_ROOT, link)
    return cn


def write_extra_model_paths(path: str, models_root: str, custom_nodes: str | None = None) -> str:
    """An extra_model_paths.yaml registering a models tree (and optionally a custom_nodes folder)."""
    # is_default: this tree comes first, so files the pack writes (trained LoRAs) land in it, not
    # in the shared ComfyUI install
    lines = ["rewardtune_test:", f"  base_path: {models_root}", "  is_default: true",
             "  checkpoints: checkpoints", "  loras: loras", "  vae: vae", "  vae_approx: vae_approx",
             "  diffusion_models: diffusion_models", "  clip_vision: clip_vision", "  reward_models: reward_models"]
    if custom_nodes:
        lines.append(f"  custom_nodes: {custom_nodes}")
    for sub in ("checkpoints", "loras", "vae", "vae_approx", "diffusion_models", "clip_vision", "reward_models"):
        os.makedirs(os.path.join(models_root, sub), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def prepare_comfy_import(cpu: bool = True) -> str:
    """Put ComfyUI on sys.path and set its arguments before anything imports comfy.model_management."""
    cdir = comfyui_dir()
    # ComfyUI's top-level modules (``nodes``, ``execution``, ``server``) must win over anything with
    # the same name further up sys.path, e.g. this pack's own ``nodes/`` when the pack's folder is on
    # it: move ComfyUI to the front even when an earlier call put it somewhere else.
    while cdir in sys.path:
        sys.path.remove(cdir)
    sys.path.insert(0, cdir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = cpu
    return cdir


class InProcessComfy:
    """ComfyUI imported into this process on CPU, nodes loaded by its own loader, prompts run by its executor."""

    def __init__(self, workdir: str, extra_model_paths: str | None = None, load_pack: bool = True):
        self.workdir = workdir
        prepare_comfy_import(cpu=True)
        import folder_paths
        for name, setter in (("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory),
                             ("input", folder_paths.set_input_directory), ("user", folder_paths.set_user_directory)):
            d = os.path.join(workdir, name)
            os.makedirs(d, exist_ok=True)
            setter(d)
        custom_nodes = make_custom_nodes_dir(workdir)
        # only our custom_nodes folder: don't pick up whatever else is installed
        folder_paths.folder_names_and_paths["custom_nodes"] = ([custom_nodes], set())
        if extra_model_paths:
            import utils.extra_config
            utils.extra_config.load_extra_path_config(extra_model_paths)
        import execution
        import nodes
        import server
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=load_pack, init_api_nodes=False))
        self.nodes = nodes
        self.execution = execution
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                   cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @property
    def node_classes(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def validate(self, prompt: dict):
        return self.loop.run_until_complete(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns the UI outputs per node; raises on failure."""
        valid = self.validate(prompt)
        if not valid[0]:
            raise RuntimeError(f"prompt invalid: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
        prompt_id = str(uuid.uuid4())
        self.executor.execute(prompt, prompt_id, {"client_id": None}, valid[2])
        if not self.executor.success:
            msgs = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(f"prompt failed: {json.dumps(msgs, default=str)[:4000]}")
        return self.executor.history_result.get("outputs", {})

    def run_expect_error(self, prompt: dict) -> dict:
        """Execute a prompt that should fail; returns the execution_error message data."""
        valid = self.validate(prompt)
        if not valid[0]:
            return {"validation": valid}
        self.executor.execute(prompt, str(uuid.uuid4()), {"client_id": None}, valid[2])
        if self.executor.success:
            raise AssertionError("the prompt was expected to fail but succeeded")
        msgs = [m for m in self.executor.status_messages if m[0] == "execution_error"]
        return msgs[-1][1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real ``python main.py --cpu`` subprocess on 127.0.0.1 with the pack in its custom nodes."""

    def __init__(self, workdir: str, extra_model_paths: str, python: str | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"server-{self.port}.log")
        d = {n: os.path.join(workdir, n) for n in ("output", "temp", "input", "user")}
        for v in d.values():
            os.makedirs(v, exist_ok=True)
        cmd = [python or sys.executable, os.path.join(comfyui_dir(), "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--extra-model-paths-config", extra_model_paths,
               "--output-directory", d["output"], "--temp-directory", d["temp"], "--input-directory", d["input"],
               "--user-directory", d["user"], "--database-url", f"sqlite:///{os.path.join(workdir, 'comfy.db')}",
               "--disable-auto-launch", *extra_args]
        self.cmd = cmd
        self.proc = None

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.cmd, cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 8000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            ctype = r.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def post(self, path: str, data: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        res = self.post("/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history until the prompt is done; returns its history entry (raises on error status)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died; log:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout}s; log:\n{self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def copy_tree_clean(src: str, dst: str):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
