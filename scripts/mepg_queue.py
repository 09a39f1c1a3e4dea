"""Queue a file of prompts through an API workflow on one or more ComfyUI servers, headless.

    python scripts/mepg_queue.py --workflow workflows/mepg_full_sdxl_experts_api.json \\
        --prompts prompts.jsonl --out runs/geneval [--server http://127.0.0.1:8188 --server ...]

``--prompts``: JSON lines, each with ``"prompt"`` and optionally ``"seed"`` (GenEval's metadata lines work as
they are; their other fields are kept in the manifest). The prompt goes into the planner node's ``prompt``
(through the node that feeds it, e.g. the workflow's Prompt node), the seed into the sampler's ``seed``; a
line without a seed gets ``--seed`` + its line index.

For each line the workflow is sent to ``POST /prompt``, followed through ``/history``, and its images are
read back through ``/view`` into ``OUT/images/``. ``OUT/manifest.jsonl`` gets one line per finished item:
prompt, seed, the layout (from the workflow's 'Layout JSON' text output), image paths, server and timings;
failures are recorded too, with the reason. Running the command again skips the items the manifest already
has as done, so an interrupted run resumes where it stopped; failed items are tried again.

Servers are taken in turn (one worker per ``--server``, sharing one queue). Retries: an item whose run failed
for a reason that may pass (timeouts, HTTP 5xx, an interrupted or out-of-memory run) is tried again after
``--backoff`` seconds, doubled each time, up to ``--retries`` times, on whichever server is free; a server
that cannot be reached is rested with the same backoff and dropped after ``--server-failures`` failures in a
row. Deterministic failures (the server rejects the workflow, a node raises) are not retried, and never stop
the other items. Only the servers you name are contacted (default: ComfyUI on 127.0.0.1:8188).

Exit status: 0 when every item is done, 1 when some failed, 2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8188"
PLANNER = "MEPG_LLMLayoutPlanner"
SAMPLER_SEED_INPUTS = (("MEPG_CrossDenoiseKSampler", "seed"), ("KSampler", "seed"), ("KSamplerAdvanced", "noise_seed"),
                       ("RandomNoise", "noise_seed"))
PROMPT_SOURCE_INPUTS = ("value", "text", "string", "prompt")
RETRYABLE_EXCEPTIONS = ("OutOfMemory", "InterruptProcessingException", "TimeoutError", "ConnectionError")


class UsageError(Exception):
    """A problem with the command line, the workflow or the prompt file (exit status 2)."""


class ItemFailure(Exception):
    """An item failed; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class ServerDown(Exception):
    """The server could not be reached at all (the item is not to blame)."""


# --------------------------------------------------------------------------------------------------
# The workflow: where prompt and seed go


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def prompt_target(workflow: dict) -> tuple[str, str]:
    """``(node id, input name)`` that receives the prompt: the planner's ``prompt``, or the input of the node
    that feeds it (a Prompt / primitive node shared with the global conditioning)."""
    planners = [nid for nid, n in workflow.items() if n.get("class_type") == PLANNER]
    if len(planners) != 1:
        raise UsageError(f"the workflow must have exactly one {PLANNER} node (it has {len(planners)}); "
                         "the prompts go into its 'prompt'")
    node_id, name = planners[0], "prompt"
    for _ in range(8):  # follow links back to the node holding the text
        value = workflow[node_id]["inputs"].get(name)
        if not _is_link(value):
            return node_id, name
        node_id = value[0]
        if node_id not in workflow:
            raise UsageError(f"the planner's prompt links to missing node {node_id}")
        inputs = workflow[node_id]["inputs"]
        candidates = [k for k in PROMPT_SOURCE_INPUTS if k in inputs]
        if not candidates:
            raise UsageError(f"cannot find the text input of node {node_id} ({workflow[node_id]['class_type']}) "
                             "that feeds the planner's prompt")
        name = candidates[0]
    raise UsageError("the planner's prompt is linked through too many nodes")


def seed_targets(workflow: dict) -> list[tuple[str, str]]:
    targets = [(nid, name) for nid, n in workflow.items() for cls, name in SAMPLER_SEED_INPUTS
               if n.get("class_type") == cls and not _is_link(n["inputs"].get(name))]
    if not targets:
        raise UsageError("the workflow has no sampler with a seed input (" +
                         ", ".join(f"{c}.{n}" for c, n in SAMPLER_SEED_INPUTS) + ")")
    return targets


def apply_overrides(workflow: dict, overrides: list[str]) -> dict:
    """``NODE.INPUT=VALUE`` (VALUE read as JSON when it parses, else as a string)."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or node_id not in workflow:
            raise UsageError(f"--set {item!r}: expected NODE.INPUT=VALUE with a node id of the workflow")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        workflow[node_id]["inputs"][name] = value
    return workflow


def item_workflow(workflow: dict, prompt: str, seed: int) -> dict:
    wf = copy.deepcopy(workflow)
    node_id, name = prompt_target(wf)
    wf[node_id]["inputs"][name] = prompt
    for node_id, name in seed_targets(wf):
        wf[node_id]["inputs"][name] = seed
    return wf


# --------------------------------------------------------------------------------------------------
# Items and the manifest


@dataclass
class Item:
    index: int
    prompt: str
    seed: int
    key: str
    meta: dict
    attempts: int = 0
    not_before: float = 0.0
    errors: list[str] = field(default_factory=list)


def item_key(index: int, prompt: str, seed: int) -> str:
    digest = hashlib.sha1(json.dumps([prompt, seed]).encode()).hexdigest()[:10]
    return f"{index:06d}-{digest}"


def read_items(path: Path, base_seed: int) -> tuple[list[Item], list[dict]]:
    """Items of the prompt file, and a failure record for each line that cannot be used."""
    items, bad = [], []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
                    raise ValueError('each line must be a JSON object with a string "prompt"')
                seed = data.get("seed", base_seed + index)
                if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                    raise ValueError(f'"seed" must be a non-negative integer, got {seed!r}')
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                bad.append({"key": f"{index:06d}-badline", "index": index, "status": "error",
                            "error": f"line {index + 1}: {exc}"})
                continue
            meta = {k: v for k, v in data.items() if k not in ("prompt", "seed")}
            items.append(Item(index, data["prompt"], seed, item_key(index, data["prompt"], seed), meta))
    return items, bad


def done_keys(manifest: Path) -> set[str]:
    done: dict[str, bool] = {}
    if manifest.exists():
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
                if isinstance(record, dict) and "key" in record:
                    done[record["key"]] = record.get("status") == "ok"
    return {k for k, ok in done.items() if ok}


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# One ComfyUI server


class Client:
    def __init__(self, url: str, timeout: float):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"--server {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = f"mepg-queue-{uuid.uuid4().hex[:12]}"

    def _request(self, request) -> bytes:
        """The response body; ServerDown when nothing answers, ItemFailure for HTTP errors and timeouts."""
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise ItemFailure(f"HTTP {exc.code}: {rejection(detail)}", retry=exc.code >= 500) from None
        except TimeoutError as exc:
            raise ItemFailure(f"{self.url}: timed out ({exc})", retry=True) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise ItemFailure(f"{self.url}: timed out", retry=True) from None
            raise ServerDown(f"{self.url}: {exc.reason}") from None
        except (ConnectionError, OSError) as exc:  # refused, reset, the server went away mid-answer
            raise ServerDown(f"{self.url}: {exc}") from None

    def get_json(self, path: str):
        return json.loads(self._request(self.url + path))

    def get_bytes(self, path: str) -> bytes:
        return self._request(self.url + path)

    def queue(self, workflow: dict) -> str:
        prompt_id = str(uuid.uuid4())
        body = json.dumps({"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            answer = json.loads(self._request(request))
        except ItemFailure as exc:
            if exc.retry:
                raise
            raise ItemFailure(f"the server rejected the workflow ({exc})", retry=False) from None
        prompt_id = answer.get("prompt_id", prompt_id)
        if answer.get("node_errors"):
            # ComfyUI queued only the outputs that passed validation: not the run that was asked for.
            self.delete(prompt_id)
            raise ItemFailure("the server rejected part of the workflow: " + rejection(json.dumps(answer)),
                              retry=False)
        return prompt_id

    def delete(self, prompt_id: str) -> None:
        """Take a prompt off the server's queue (no effect once it runs)."""
        body = json.dumps({"delete": [prompt_id]}).encode()
        request = urllib.request.Request(self.url + "/queue", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            self._request(request)
        except (ItemFailure, ServerDown):
            pass

    def wait(self, prompt_id: str, timeout: float, stop: threading.Event) -> dict:
        deadline = time.monotonic() + timeout
        delay = 0.1
        while time.monotonic() < deadline:
            if stop.is_set():
                raise ItemFailure("interrupted", retry=True)
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if entry and status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                return entry
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise ItemFailure(f"no result within {timeout:.0f} s", retry=True)


def rejection(detail: str) -> str:
    """A short reason from ComfyUI's validation answer."""
    try:
        body = json.loads(detail)
    except json.JSONDecodeError:
        return detail[:500]
    parts = [body.get("error", {}).get("message", "")] if isinstance(body.get("error"), dict) else []
    for node_id, node_error in (body.get("node_errors") or {}).items():
        for err in node_error.get("errors", []):
            parts.append(f"node {node_id} ({node_error.get('class_type')}): {err.get('message')}: "
                         f"{err.get('details', '')}".rstrip(": "))
    return "; ".join(p for p in parts if p) or detail[:500]


def execution_error(entry: dict) -> tuple[str, bool] | None:
    status = entry.get("status", {})
    for event, data in status.get("messages", []):
        if event == "execution_error":
            kind = str(data.get("exception_type", ""))
            message = f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '')}"
            return message.strip(), any(k in kind for k in RETRYABLE_EXCEPTIONS)
        if event == "execution_interrupted":
            return "the run was interrupted on the server", True
    if status.get("status_str") == "error":
        return "the run failed (no message)", True
    return None


def layout_from_outputs(entry: dict) -> dict | None:
    """The layout JSON a workflow shows in a text output (the 'Layout JSON' node), if any."""
    for _, output in sorted(entry.get("outputs", {}).items(), key=lambda kv: _id_key(kv[0])):
        for text in output.get("text", []) or []:
            try:
                value = json.loads(text)
            except (TypeError, json.JSONDecodeError):
                continue
            if isinstance(value, dict) and "regions" in value and "version" in value:
                return value
    return None


def _id_key(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


# --------------------------------------------------------------------------------------------------
# Running items


class Runner:
    def __init__(self, args, workflow: dict, manifest: Manifest, images_dir: Path, bar):
        self.args = args
        self.workflow = workflow
        self.manifest = manifest
        self.images_dir = images_dir
        self.bar = bar
        self.todo: queue.Queue[Item] = queue.Queue()
        self.remaining = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set on Ctrl-C / SIGTERM, or when no server is left
        self.interrupted = False
        self.ok = 0
        self.failed = 0
        self.live_workers = 0

    def run(self, items: list[Item], clients: list[Client]) -> None:
        self.remaining = len(items)
        for item in items:
            self.todo.put(item)
        threads = [threading.Thread(target=self.worker, args=(c,), daemon=True, name=c.url) for c in clients]
        self.live_workers = len(threads)
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
        if self.interrupted:
            return  # pending and in-flight items stay undone; the next run picks them up
        # Items left when every server was dropped.
        while True:
            try:
                item = self.todo.get_nowait()
            except queue.Empty:
                break
            self.finish_failure(item, "no server could be reached: " + "; ".join(item.errors[-1:]))

    def _take(self) -> Item | None:
        while not self.stop.is_set():
            with self.lock:
                if self.remaining <= 0:
                    return None
            try:
                item = self.todo.get(timeout=0.2)
            except queue.Empty:
                continue
            wait = item.not_before - time.monotonic()
            if wait > 0:
                self.todo.put(item)
                time.sleep(min(wait, 0.2))
                continue
            return item
        return None

    def worker(self, client: Client) -> None:
        failures_in_a_row = 0
        while True:
            item = self._take()
            if item is None:
                return
            try:
                record = self.run_item(client, item)
            except ServerDown as exc:
                failures_in_a_row += 1
                item.errors.append(str(exc))
                self.todo.put(item)  # not the item's fault: another server (or this one, later) takes it
                if failures_in_a_row >= self.args.server_failures:
                    self.bar.write(f"[mepg-queue] giving up on {client.url} after {failures_in_a_row} failed "
                                   f"connections: {exc}")
                    with self.lock:
                        self.live_workers -= 1
                        last = self.live_workers == 0
                    if last:
                        self.stop.set()
                    return
                time.sleep(self.args.backoff * 2 ** (failures_in_a_row - 1))
                continue
            except ItemFailure as exc:
                if self.interrupted:
                    return
                failures_in_a_row = 0
                item.attempts += 1
                item.errors.append(str(exc))
                if exc.retry and item.attempts <= self.args.retries and not self.stop.is_set():
                    item.not_before = time.monotonic() + self.args.backoff * 2 ** (item.attempts - 1)
                    self.bar.write(f"[mepg-queue] item {item.index}: {exc}; retrying "
                                   f"({item.attempts}/{self.args.retries})")
                    self.todo.put(item)
                    continue
                self.finish_failure(item, str(exc), client.url)
                continue
            failures_in_a_row = 0
            self.finish_success(record)

    def run_item(self, client: Client, item: Item) -> dict:
        started = time.time()
        workflow = item_workflow(self.workflow, item.prompt, item.seed)
        prompt_id = client.queue(workflow)
        entry = client.wait(prompt_id, self.args.timeout, self.stop)
        failure = execution_error(entry)
        if failure:
            raise ItemFailure(failure[0], retry=failure[1])
        images = []
        for node_id, output in sorted(entry.get("outputs", {}).items(), key=lambda kv: _id_key(kv[0])):
            for n, image in enumerate(output.get("images", []) or []):
                if image.get("type", "output") != "output":
                    continue  # previews (temp) are not results
                query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                                "type": image.get("type", "output")})
                data = client.get_bytes(f"/view?{query}")
                suffix = Path(image["filename"]).suffix or ".png"
                path = self.images_dir / f"{item.key}_node{node_id}_{n}{suffix}"
                path.write_bytes(data)
                title = (workflow.get(node_id, {}).get("_meta") or {}).get("title", "")
                images.append({"node": node_id, "title": title, "path": str(path.relative_to(self.args.out)),
                               "server_file": f"{image.get('subfolder', '')}/{image['filename']}".lstrip("/")})
        return {
            "key": item.key, "index": item.index, "status": "ok", "prompt": item.prompt, "seed": item.seed,
            "layout": layout_from_outputs(entry), "images": images, "server": client.url, "prompt_id": prompt_id,
            "attempts": item.attempts + 1, "seconds": round(time.time() - started, 3), "meta": item.meta,
        }

    def finish_success(self, record: dict) -> None:
        self.manifest.append(record)
        with self.lock:
            self.ok += 1
            self.remaining -= 1
        self.bar.update(1)
        self.bar.set_postfix(ok=self.ok, failed=self.failed)

    def finish_failure(self, item: Item, reason: str, server: str | None = None) -> None:
        self.manifest.append({"key": item.key, "index": item.index, "status": "error", "prompt": item.prompt,
                              "seed": item.seed, "error": reason, "server": server, "attempts": item.attempts,
                              "meta": item.meta})
        self.bar.write(f"[mepg-queue] item {item.index} failed: {reason}")
        with self.lock:
            self.failed += 1
            self.remaining -= 1
        self.bar.update(1)
        self.bar.set_postfix(ok=self.ok, failed=self.failed)


class SimpleBar:
    """A stand-in for tqdm: one line on stderr, redrawn in place."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self._draw()

    def _draw(self, end: str = "\r") -> None:
        width = 30
        filled = int(width * self.n / self.total) if self.total else width
        rate = self.n / max(time.monotonic() - self.started, 1e-9)
        sys.stderr.write(f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                         f"{rate:.2f} it/s {self.postfix}{end}")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.n += n
            self._draw()

    def set_postfix(self, **values) -> None:
        with self.lock:
            self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
            self._draw()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stderr.write("\r\033[K" + text + "\n")
            self._draw()

    def close(self) -> None:
        with self.lock:
            self._draw(end="\n")


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _SilentBar()
    try:
        from tqdm import tqdm  # ComfyUI's requirements include tqdm
    except ImportError:
        return SimpleBar(total, desc)
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True)


class _SilentBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values) -> None: ...
    def close(self) -> None: ...

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", type=Path, required=True, help="an API-format workflow (workflows/*_api.json)")
    ap.add_argument("--prompts", type=Path, required=True, help="JSON lines with 'prompt' (and optional 'seed')")
    ap.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl, images/)")
    ap.add_argument("--server", action="append", default=[], help=f"ComfyUI URL, repeatable (default {DEFAULT_SERVER})")
    ap.add_argument("--seed", type=int, default=0, help="seed of a line without one: this + the line index")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="change a workflow input for every item, e.g. --set 17.steps=20 (VALUE as JSON if it parses)")
    ap.add_argument("--retries", type=int, default=3, help="tries again after a failure that may pass (default 3)")
    ap.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry, doubled each time")
    ap.add_argument("--server-failures", type=int, default=4,
                    help="drop a server after this many failed connections in a row (default 4)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one item may take on the server")
    ap.add_argument("--http-timeout", type=float, default=60.0, help="seconds for one HTTP request")
    ap.add_argument("--limit", type=int, default=0, help="run at most this many pending items (0 = all)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workflow = json.loads(args.workflow.read_text())
        if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n
                                                     for n in workflow.values()):
            raise UsageError(f"{args.workflow} is not an API-format workflow (use the *_api.json file)")
        apply_overrides(workflow, args.set)
        prompt_target(workflow)
        seed_targets(workflow)
        clients = [Client(url, args.http_timeout) for url in (args.server or [DEFAULT_SERVER])]
        items, bad_lines = read_items(args.prompts, args.seed)
    except (UsageError, OSError, json.JSONDecodeError) as exc:
        print(f"mepg_queue: {exc}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    images_dir = args.out / "images"
    images_dir.mkdir(exist_ok=True)
    manifest = Manifest(args.out / "manifest.jsonl")
    done = done_keys(manifest.path)
    pending = [item for item in items if item.key not in done]
    skipped = len(items) - len(pending)
    if args.limit > 0:
        pending = pending[: args.limit]
    for record in bad_lines:
        if record["key"] not in done:
            manifest.append(record)
            print(f"[mepg-queue] {record['error']}", file=sys.stderr)
    print(f"[mepg-queue] {len(items)} prompts: {skipped} already done, {len(pending)} to run on "
          f"{len(clients)} server(s): {', '.join(c.url for c in clients)}", file=sys.stderr, flush=True)

    bar = progress_bar(len(pending), "mepg-queue", not args.no_progress)
    runner = Runner(args, workflow, manifest, images_dir, bar)
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        nonlocal interrupted
        interrupted = True
        runner.interrupted = True
        runner.stop.set()

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    try:
        runner.run(pending, clients)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    failed = runner.failed + sum(1 for r in bad_lines if r["key"] not in done)
    summary = {"total": len(items) + len(bad_lines), "skipped_done": skipped, "ok": runner.ok, "failed": failed,
               "not_run": len(pending) - runner.ok - runner.failed, "manifest": str(manifest.path)}
    print("[mepg-queue] " + json.dumps(summary), file=sys.stderr, flush=True)
    if interrupted:
        print("[mepg-queue] interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0 if failed == 0 and summary["not_run"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
