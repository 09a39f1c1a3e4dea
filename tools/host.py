"""Start and talk to a real ComfyUI server from this checkout (tests, demo, ``make serve``).

The server runs ComfyUI's own ``main.py`` on the CPU, bound to 127.0.0.1, with a base directory of
its own whose ``custom_nodes`` holds a link to this pack (and, for tests and the demo, the tiny-model
fixture node). Only loopback addresses are ever used.

No server outlives the process that started it: :func:`stop_on_signals` turns SIGTERM (and SIGHUP) into
``KeyboardInterrupt`` so ``with`` blocks and ``finally`` clauses stop servers on the way out, an
``atexit`` hook stops any still running, and on Linux the server gets SIGTERM from the kernel when its
parent dies in any other way (even ``kill -9``).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import comfy_env

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = comfy_env.COMFY_DIR  # $MEPG_COMFYUI_DIR or .host/ComfyUI
PACK_LINK_NAME = "comfyui-mepg"
TINY_NODE_DIR = ROOT / "tools" / "mepg_tiny_models"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, *, with_tiny_models: bool = True) -> Path:
    """Create a ComfyUI base directory with this pack (and optionally the tiny-model node) mounted."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/LLM", "models/mepg_gates",
                "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _link(base / "custom_nodes" / PACK_LINK_NAME, ROOT)
    # A new user directory makes the frontend open its template browser on an empty graph at first start;
    # mark the tour as done so every start behaves like the later ones (the default graph is loaded).
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}, indent=4))
    tiny = base / "custom_nodes" / "mepg_tiny_models"
    if with_tiny_models:
        _link(tiny, TINY_NODE_DIR)
    elif tiny.is_symlink():
        tiny.unlink()
    return base


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


_RUNNING: set[subprocess.Popen] = set()
_PR_SET_PDEATHSIG = 1


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread (as Ctrl-C does), so the code
    that started a server unwinds and stops it. Only where the signal still has its default action."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@atexit.register
def _stop_all() -> None:
    for process in list(_RUNNING):
        terminate(process)


# Run first in the child: ask the kernel for SIGTERM when the parent goes (kept across exec), leave at
# once if it is already gone, then become the server. A launcher instead of preexec_fn, which is unsafe
# in a process with threads.
_LAUNCHER = (f"import ctypes, os, signal, sys; ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM); "
             "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execvp(sys.argv[2], sys.argv[2:])")


def spawn_server(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start a server process that is stopped with this process (see the module docstring)."""
    stop_on_signals()
    # PR_SET_PDEATHSIG follows the starting *thread*: tie the server only to the main thread's life.
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        command = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]
    process = subprocess.Popen(command, **popen_kwargs)
    _RUNNING.add(process)
    return process


def terminate(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server (its process group when it leads one), SIGKILL after ``grace`` seconds."""
    _RUNNING.discard(process)
    if process.poll() is not None:
        return
    try:
        group = os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return

    def send(sig: int) -> None:
        try:
            os.killpg(process.pid, sig) if group else process.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=10)


def server_command(port: int, base: Path) -> list[str]:
    return [sys.executable, str(COMFY_DIR / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", str(base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]


@dataclass
class ComfyServer:
    """A running ComfyUI server process on 127.0.0.1 and a small HTTP client for it."""

    port: int
    base: Path
    log_path: Path
    process: subprocess.Popen | None = None
    client_id: str = field(default_factory=lambda: f"mepg-{os.getpid()}-{time.time_ns()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> ComfyServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = spawn_server(server_command(self.port, self.base), cwd=COMFY_DIR, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()  # the child holds its own copy
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}; see {self.log_path}")
                try:
                    self.get_json("/system_stats", timeout=2)
                    return self
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    time.sleep(0.5)
            raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s; see {self.log_path}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def resident_memory_bytes(self) -> int:
        """The server process's resident set size (Linux /proc)."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    # -- HTTP ----------------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post_json(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST an API-format prompt; returns (HTTP status, response body)."""
        return self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished (successfully or not); return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        status, body = self.queue(prompt)
        if status != 200:
            raise RuntimeError(f"ComfyUI rejected the prompt (HTTP {status}): {json.dumps(body)[:2000]}")
        return self.wait(body["prompt_id"], timeout)

    def images(self, entry: dict, kinds: tuple[str, ...] = ("output",)) -> list[tuple[str, bytes]]:
        """The images a finished prompt saved, as (node id, PNG bytes), read through /view.

        ``kinds``: which image folders count ("output" for saved images, "temp" for node previews).
        """
        out = []
        for node_id, node_out in entry.get("outputs", {}).items():
            for img in node_out.get("images", []):
                if img.get("type", "output") not in kinds:
                    continue
                q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                            "type": img.get("type", "output")})
                out.append((node_id, self.get_bytes(f"/view?{q}")))
        return out


def error_message(entry: dict) -> str | None:
    """The execution error of a finished history entry, or None."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return None
