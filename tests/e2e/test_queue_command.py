"""scripts/mepg_queue.py against the real server: JSONL prompts through the full workflow, interrupt and
resume, a failing item among good ones, an unreachable server beside a live one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from host import free_port
from mepg_testing import ROOT, tiny_files_of, tiny_workflow

SCRIPT = ROOT / "scripts" / "mepg_queue.py"
FULL = ROOT / "workflows" / "mepg_full_sdxl_experts_api.json"
GOOD = [
    {"prompt": "a photo of a red apple on the left and an anime cat on the right", "seed": 11},
    {"prompt": "a watercolor boat under a photorealistic bridge", "tag": "two_object",
     "include": [{"class": "boat", "count": 1}]},  # GenEval's metadata fields ride along
    {"prompt": "two oil painting pears next to a blue cup", "seed": 12},
    {"prompt": "an anime girl holding a yellow umbrella", "seed": 13},
    {"prompt": "a photorealistic dog to the left of a watercolor tree", "seed": 14},
    {"prompt": "a pixel art castle above a green lake", "seed": 15},
    {"prompt": "a cartoon fox beside a photo of a red car", "seed": 16},
]
BAD = {"prompt": "   ", "seed": 99}  # the planner refuses an empty prompt: that item fails, the rest go on


@pytest.fixture(scope="module")
def tiny_full(tmp_path_factory, tiny_checkpoints, tiny_extras):
    path = tmp_path_factory.mktemp("queue") / "full_tiny_api.json"
    wf = tiny_workflow(json.loads(FULL.read_text()), tiny_files_of(tiny_checkpoints, tiny_extras), max_side=128,
                       steps=2)
    path.write_text(json.dumps(wf))
    return path


def write_prompts(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def command(workflow, prompts, out, *servers, extra=()):
    args = [sys.executable, str(SCRIPT), "--workflow", str(workflow), "--prompts", str(prompts), "--out", str(out),
            "--backoff", "0.2", "--no-progress", *extra]
    for url in servers:
        args += ["--server", url]
    return args


def manifest(out) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(stderr: str) -> dict:
    line = [x for x in stderr.splitlines() if x.startswith("[mepg-queue] {")][-1]
    return json.loads(line[len("[mepg-queue] "):])


def test_queue_interrupt_resume_and_a_failing_item(server, tiny_full, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [GOOD[0], GOOD[1], BAD, *GOOD[2:]])
    out = tmp_path / "run"
    # Two workers on the one live server (two spellings of loopback): items are shared out between them.
    servers = (server.url, server.url.replace("127.0.0.1", "localhost"))

    # Run 1: interrupted (Ctrl-C) once the first item is in the manifest.
    first = subprocess.Popen(command(tiny_full, prompts, out, *servers), stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
    deadline = time.monotonic() + 300
    while not [r for r in manifest(out) if r["status"] == "ok"]:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "no item finished in 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 130, err1
    done_first = {r["key"] for r in manifest(out) if r["status"] == "ok"}
    assert 1 <= len(done_first) < len(GOOD), err1

    # Run 2: the same command skips what is done and finishes the rest; the bad item fails alone.
    second = subprocess.run(command(tiny_full, prompts, out, *servers), capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert second.returncode == 1, second.stderr  # 1: one item failed
    stats = summary(second.stderr)
    assert stats["skipped_done"] == len(done_first)
    assert stats["ok"] == len(GOOD) - len(done_first) and stats["failed"] == 1 and stats["not_run"] == 0

    records = manifest(out)
    ok = [r for r in records if r["status"] == "ok"]
    assert sorted(r["index"] for r in ok) == [0, 1, 3, 4, 5, 6, 7]
    assert len({r["key"] for r in ok}) == len(ok), "an item ran twice"
    failed = [r for r in records if r["status"] == "error"]
    assert [r["index"] for r in failed] == [2] and "prompt is empty" in failed[0]["error"]
    assert failed[0]["attempts"] == 1  # a node error is not retried

    lines = [GOOD[0], GOOD[1], BAD, *GOOD[2:]]
    digests = set()
    for record in ok:
        line = lines[record["index"]]
        assert record["prompt"] == line["prompt"]
        assert record["seed"] == line.get("seed", record["index"])  # no seed: --seed (0) + the line index
        assert record["layout"]["global_prompt"] == line["prompt"] and record["layout"]["regions"]
        assert record["server"] in servers
        titles = {image["title"] for image in record["images"]}
        assert {"Save image", "Save layout preview", "Save layout overlay"} <= titles
        for image in record["images"]:
            data = (out / image["path"]).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            if image["title"] == "Save image":
                digests.add(hashlib.sha256(data).hexdigest())
    assert len(digests) == len(ok), "two items (different prompts and seeds) gave the same image"
    assert ok[[r["index"] for r in ok].index(1)]["meta"] == {"tag": "two_object",
                                                             "include": [{"class": "boat", "count": 1}]}

    # Run 3: nothing left but the failed item, which is tried again (and fails again).
    third = subprocess.run(command(tiny_full, prompts, out, *servers), capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert summary(third.stderr)["skipped_done"] == len(GOOD) and summary(third.stderr)["failed"] == 1


def test_unreachable_server_is_dropped_and_the_live_one_does_the_work(server, tiny_full, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", GOOD[:2])
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "run"
    run = subprocess.run(command(tiny_full, prompts, out, dead, server.url, extra=("--server-failures", "2")),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"giving up on {dead}" in run.stderr
    records = manifest(out)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert {r["server"] for r in records} == {server.url}


def test_usage_errors(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", GOOD[:1])
    no_planner = ROOT / "workflows" / "mepg_layout_from_json_api.json"
    run = subprocess.run(command(no_planner, prompts, tmp_path / "o", "http://127.0.0.1:9"), capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "MEPG_LLMLayoutPlanner" in run.stderr
    run = subprocess.run(command(FULL, prompts, tmp_path / "o", "ftp://example.org"), capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "expected http://HOST:PORT" in run.stderr


def test_progress_bar_without_tqdm(server, tiny_full, tmp_path):
    """The simple bar stands in when tqdm is missing (here: hidden from the child process)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "tqdm.py").write_text("raise ImportError('no tqdm here')\n")
    prompts = write_prompts(tmp_path / "p.jsonl", GOOD[:1])
    args = [a for a in command(tiny_full, prompts, tmp_path / "o", server.url) if a != "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert "mepg-queue [" in run.stderr and "1/1" in run.stderr
