"""No orphaned servers: the test hosts, ``make demo`` (both through ``tools/host.py``'s ComfyServer) and
``make serve`` (``scripts/serve.py``) stop their server when stopped from outside (SIGTERM, SIGINT, SIGHUP,
even SIGKILL) or by an error. A stand-in server (a tiny HTTP server answering ``/system_stats``) replaces
ComfyUI so each case takes about a second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STAND_IN = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"system": {}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

WITH_COMFY_SERVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tools!r})
import host
host.server_command = lambda port, base: [sys.executable, "-c", {stand_in!r}, str(port)]
with host.ComfyServer(port=host.free_port(), base=Path({tmp!r}), log_path=Path({tmp!r}) / "server.log") as server:
    print(server.process.pid, flush=True)
    if {fail!r}:
        raise RuntimeError("an error while the server runs")
    time.sleep(600)
"""

SERVE = """
import sys
sys.path.insert(0, {scripts!r})
sys.argv = ["serve.py", "--port", "0", "--base", {tmp!r}]
import serve
serve.host.prepare_base = lambda base, with_tiny_models: None
def command(port, base):
    port = serve.host.free_port()
    print("PORT", port, flush=True)
    return [sys.executable, "-c", {stand_in!r}, str(port)]
serve.host.server_command = command
sys.exit(serve.main())
"""


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "\nState:\tZ" in state:
            return True
        time.sleep(0.05)
    return False


def start(script: str) -> tuple[subprocess.Popen, str]:
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    line = driver.stdout.readline().strip()
    assert line, driver.stderr.read()
    return driver, line


def child_pid(driver: subprocess.Popen) -> int:
    """The one child process of ``driver`` (the server it started)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{driver.pid}/task/{driver.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no server process was started")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "SIGKILL", "error"])
def test_comfy_server_stops_with_its_process(tmp_path, how):
    script = WITH_COMFY_SERVER.format(tools=str(ROOT / "tools"), stand_in=STAND_IN, tmp=str(tmp_path),
                                      fail=how == "error")
    driver, line = start(script)
    server_pid = int(line)
    try:
        if how != "error":
            driver.send_signal(getattr(signal, how))
        driver.wait(timeout=30)
        assert gone(server_pid), f"the server outlived its process ({how})"
    finally:
        driver.kill()
        if not gone(server_pid, 0.1):
            os.kill(server_pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_make_serve_stops_its_server(tmp_path, how):
    script = SERVE.format(scripts=str(ROOT / "scripts"), stand_in=STAND_IN, tmp=str(tmp_path))
    driver, line = start(script)
    while not line.startswith("PORT"):
        line = driver.stdout.readline().strip()
    server_pid = child_pid(driver)
    try:
        driver.send_signal(getattr(signal, how))
        driver.wait(timeout=30)
        assert gone(server_pid), f"make serve left its server running ({how})"
    finally:
        driver.kill()
        if not gone(server_pid, 0.1):
            os.kill(server_pid, signal.SIGKILL)


def test_sigterm_unwinds_like_ctrl_c():
    """The handlers that let ``with``/``finally`` stop a server cleanly (the kernel's SIGTERM on parent death
    covers a process killed outright)."""
    script = (f"import os, signal, sys, time; sys.path.insert(0, {str(ROOT / 'tools')!r}); import host\n"
              "host.stop_on_signals()\n"
              "try:\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
              "except KeyboardInterrupt as exc:\n    print('unwound:', exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "unwound: stopped by SIGTERM", out.stderr
