"""Planner backends: callable, OpenAI-compatible endpoint (against `transformers serve` on loopback), local
transformers models (the tiny random Qwen2 and the real SmolLM2-135M GGUF), errors and caching."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mepg_planner_testing import GOOD, build_tiny_qwen2, find_smollm2_gguf, free_port, one_torch_thread, step_of

from mepg_core.planner import chain
from mepg_core.planner.backends import (
    BackendError,
    CallableBackend,
    EndpointBadResponseError,
    EndpointHTTPError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    JSONEndScanner,
    ModelNotFoundError,
    OpenAIBackend,
    TransformersBackend,
    clear_backend_cache,
    load_transformers_backend,
    make_backend,
)
from mepg_core.planner.chain import aplan_with_backend, plan_with_backend

MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Plan a cat."}]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.getbasetemp() / "tiny_qwen2")


@pytest.fixture(scope="session")
def tiny_backend(tiny_qwen2):
    backend = TransformersBackend(tiny_qwen2, device="cpu")
    yield backend
    backend.close()


# --------------------------------------------------------------------------------------------------
# CallableBackend


def test_callable_backend_passes_options_or_just_messages():
    seen = {}

    def with_options(messages, **options):
        seen.update(options)
        return "ok"

    assert CallableBackend(with_options).generate(MESSAGES, seed=5, use_adapter=True, tag="step0") == "ok"
    assert seen == {"temperature": 0.0, "seed": 5, "max_new_tokens": 256, "use_adapter": True, "tag": "step0"}
    assert CallableBackend(lambda messages: messages[-1]["content"]).generate(MESSAGES) == "Plan a cat."


def test_callable_backend_wraps_failures_and_checks_messages():
    def boom(messages):
        raise KeyError("x")

    with pytest.raises(BackendError, match="KeyError"):
        CallableBackend(boom).generate(MESSAGES)
    with pytest.raises(BackendError, match="messages"):
        CallableBackend(lambda m: "x").generate([{"role": "robot", "content": "hi"}])
    with pytest.raises(BackendError, match="expected text"):
        CallableBackend(lambda m: 42).generate(MESSAGES)


def test_callable_backend_async():
    async def answer(messages, **options):
        return "async " + str(options["seed"])

    backend = CallableBackend(answer)
    assert asyncio.run(backend.agenerate(MESSAGES, seed=3)) == "async 3"
    with pytest.raises(BackendError, match="async"):
        backend.generate(MESSAGES)


def test_make_backend():
    assert make_backend("offline") is None
    assert isinstance(make_backend("openai", base_url="http://127.0.0.1:1", model="m"), OpenAIBackend)
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("llamafile")
    with pytest.raises(BackendError, match="model_path"):
        make_backend("transformers")


# --------------------------------------------------------------------------------------------------
# OpenAIBackend: settings


@pytest.mark.parametrize("base, url", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"),
    ("https://host/api/v1/chat/completions", "https://host/api/v1/chat/completions"),
])
def test_endpoint_url_forms(base, url):
    assert OpenAIBackend(base, "m").url == url


@pytest.mark.parametrize("kwargs, match", [
    ({"base_url": "ftp://x"}, "http"), ({"base_url": "localhost:8000"}, "http"), ({"model": " "}, "model"),
    ({"api_key_env": "sk-abc123-very-secret"}, "NAME"), ({"timeout": 0}, "timeout"), ({"max_retries": -1}, "retries"),
])
def test_endpoint_settings_are_checked(kwargs, match):
    args = {"base_url": "http://127.0.0.1:1", "model": "m", **kwargs}
    with pytest.raises(BackendError, match=match) as info:
        OpenAIBackend(**args)
    assert "sk-abc123" not in str(info.value)


def test_missing_api_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MEPG_TEST_NO_SUCH_KEY", raising=False)
    backend = OpenAIBackend("http://127.0.0.1:1", "m", api_key_env="MEPG_TEST_NO_SUCH_KEY")
    with pytest.raises(BackendError, match="MEPG_TEST_NO_SUCH_KEY is not set"):
        backend.generate(MESSAGES)


# --------------------------------------------------------------------------------------------------
# OpenAIBackend: error paths against small loopback servers


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "500"
    hits: list[dict] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        type(self).hits.append({"auth": self.headers.get("Authorization"), "body": body})
        mode = type(self).mode
        if mode == "sleep":
            time.sleep(1.5)
            return self._send(200, b'{"choices": [{"message": {"content": "late"}}]}')
        if mode == "500":
            return self._send(500, b'{"error": {"message": "model exploded"}}')
        if mode == "404":
            return self._send(404, b'{"detail": "no such model"}')
        if mode == "html":
            return self._send(200, b"<html><body>Welcome to nginx</body></html>", "text/html")
        if mode == "schema":
            return self._send(200, b'{"result": "fine"}')
        if mode == "ok":
            return self._send(200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                        "content": "hello"}}]}).encode())
        raise AssertionError(mode)

    def _send(self, status, payload, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def stub_server():
    """A loopback HTTP server whose answer is chosen per test (``server.mode = ...``): error paths only."""
    handler = type("Handler", (_Handler,), {"hits": [], "mode": "500"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.handler = handler
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def test_http_500_is_retried_then_a_clear_error(stub_server):
    backend = OpenAIBackend(stub_server.base, "m", max_retries=2, backoff=0.01)
    with pytest.raises(EndpointHTTPError, match=r"HTTP 500: 'model exploded' \(after 3 attempts\)") as info:
        backend.generate(MESSAGES)
    assert info.value.status == 500
    assert len(stub_server.handler.hits) == 3


def test_http_500_async(stub_server):
    backend = OpenAIBackend(stub_server.base, "m", max_retries=1, backoff=0.01)
    with pytest.raises(EndpointHTTPError, match="HTTP 500"):
        asyncio.run(backend.agenerate(MESSAGES))
    assert len(stub_server.handler.hits) == 2


def test_http_404_is_not_retried(stub_server):
    stub_server.handler.mode = "404"
    backend = OpenAIBackend(stub_server.base, "m", max_retries=3, backoff=0.01)
    with pytest.raises(EndpointHTTPError, match="HTTP 404: 'no such model'"):
        backend.generate(MESSAGES)
    assert len(stub_server.handler.hits) == 1


@pytest.mark.parametrize("mode, match", [("html", "did not answer JSON"), ("schema", "without choices")])
def test_non_json_and_wrong_schema_answers(stub_server, mode, match):
    stub_server.handler.mode = mode
    backend = OpenAIBackend(stub_server.base, "m", max_retries=0)
    with pytest.raises(EndpointBadResponseError, match=match):
        backend.generate(MESSAGES)
    with pytest.raises(EndpointBadResponseError, match=match):
        asyncio.run(backend.agenerate(MESSAGES))


def test_timeouts(stub_server):
    stub_server.handler.mode = "sleep"
    backend = OpenAIBackend(stub_server.base, "m", timeout=0.3, max_retries=0)
    started = time.perf_counter()
    with pytest.raises(EndpointTimeoutError, match="within 0.3 s"):
        backend.generate(MESSAGES)
    with pytest.raises(EndpointTimeoutError, match="within 0.3 s"):
        asyncio.run(backend.agenerate(MESSAGES))
    assert time.perf_counter() - started < 3


def test_unreachable_endpoint():
    port = free_port()  # nothing listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}", "m", max_retries=2, backoff=0.01, timeout=5)
    with pytest.raises(EndpointUnreachableError, match=f"cannot reach http://127.0.0.1:{port}.*after 3 attempts"):
        backend.generate(MESSAGES)
    with pytest.raises(EndpointUnreachableError, match="cannot reach"):
        asyncio.run(backend.agenerate(MESSAGES))
    # The chain reports it (default) or falls back with a log line (on request).
    with pytest.raises(EndpointUnreachableError):
        plan_with_backend("a cat", backend)


def test_api_key_comes_from_the_named_environment_variable(stub_server, monkeypatch):
    stub_server.handler.mode = "ok"
    monkeypatch.setenv("MEPG_TEST_API_KEY", "s3cret-value")
    backend = OpenAIBackend(stub_server.base, "planner-model", api_key_env="MEPG_TEST_API_KEY")
    assert backend.generate(MESSAGES, seed=7, max_new_tokens=9, temperature=0.5) == "hello"
    assert asyncio.run(backend.agenerate(MESSAGES)) == "hello"
    hits = stub_server.handler.hits
    assert [h["auth"] for h in hits] == ["Bearer s3cret-value"] * 2
    assert hits[0]["body"]["model"] == "planner-model"
    assert (hits[0]["body"]["seed"], hits[0]["body"]["max_tokens"], hits[0]["body"]["temperature"]) == (7, 9, 0.5)
    for text in (repr(backend), backend.cache_key(), chain.plan_cache_key("a cat", backend)):
        assert "s3cret" not in text
    no_key = OpenAIBackend(stub_server.base, "planner-model")
    no_key.generate(MESSAGES)
    assert hits[-1]["auth"] is None


# --------------------------------------------------------------------------------------------------
# OpenAIBackend against a real OpenAI-compatible server: `transformers serve` on loopback


@pytest.fixture(scope="module")
def transformers_server(tiny_qwen2, tmp_path_factory):
    port = free_port()
    home = tmp_path_factory.mktemp("hf_home")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home),
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_qwen2),
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}: "
                            f"{(home / 'serve.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve did not come up in 120 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_endpoint_backend_against_transformers_serve(transformers_server, tiny_qwen2):
    backend = OpenAIBackend(transformers_server, str(tiny_qwen2), timeout=60, max_retries=1)
    first = backend.generate(MESSAGES, max_new_tokens=8, temperature=0)
    assert isinstance(first, str)
    assert backend.generate(MESSAGES, max_new_tokens=8, temperature=0) == first  # greedy is repeatable
    assert asyncio.run(backend.agenerate(MESSAGES, max_new_tokens=8, temperature=0)) == first
    # The whole chain over HTTP: the random model's answers are garbage, the layout is still valid.
    result = plan_with_backend("a red apple left of a green pear", backend, max_new_tokens=16, repair_rounds=0,
                               offline_planner=_stub_offline)
    assert result.path == chain.PATH_OFFLINE_FALLBACK
    assert len(result.trace[0].attempts) == 1 and result.trace[0].attempts[0].error is None
    result = asyncio.run(aplan_with_backend("a red apple", backend, max_new_tokens=16, repair_rounds=0,
                                            offline_planner=_stub_offline))
    assert result.path == chain.PATH_OFFLINE_FALLBACK


def _stub_offline(prompt, **kwargs):
    from mepg_core.layout import Layout, Region

    return Layout(global_prompt=prompt, regions=(Region("apple", "a red apple", (100, 300, 450, 700)),))


# --------------------------------------------------------------------------------------------------
# TransformersBackend


def test_missing_model_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "models" / "LLM" / "nope"
    with pytest.raises(ModelNotFoundError, match=f"model path not found: {missing}"):
        TransformersBackend(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json and no .gguf"):
        TransformersBackend(empty)
    (empty / "a.gguf").write_bytes(b"")
    (empty / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        TransformersBackend(empty)
    text_file = tmp_path / "weights.txt"
    text_file.write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        TransformersBackend(text_file)


def test_missing_or_unsafe_adapter_is_a_clear_error(tiny_qwen2, tmp_path):
    with pytest.raises(ModelNotFoundError, match="LoRA adapter path not found"):
        TransformersBackend(tiny_qwen2, adapter_path=tmp_path / "no_adapter")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelNotFoundError, match="never pickled"):
        TransformersBackend(tiny_qwen2, adapter_path=pickled)


@pytest.mark.slow
def test_tiny_model_generates_with_its_chat_template(tiny_backend):
    ids = tiny_backend.encode(MESSAGES)
    assert tiny_backend.tokenizer.convert_tokens_to_ids("<|im_start|>") in ids[0].tolist()
    greedy = tiny_backend.generate(MESSAGES, max_new_tokens=6, temperature=0)
    assert isinstance(greedy, str)
    assert tiny_backend.generate(MESSAGES, max_new_tokens=6, temperature=0, seed=99) == greedy
    sampled = tiny_backend.generate(MESSAGES, max_new_tokens=6, temperature=1.0, seed=3)
    assert tiny_backend.generate(MESSAGES, max_new_tokens=6, temperature=1.0, seed=3) == sampled
    assert not tiny_backend.has_adapter  # use_adapter is then a no-op
    assert tiny_backend.generate(MESSAGES, max_new_tokens=6, use_adapter=True) == greedy


def test_tiny_model_refuses_requests_longer_than_its_context(tiny_backend):
    with pytest.raises(BackendError, match="reads at most 8192"):
        tiny_backend.generate(MESSAGES, max_new_tokens=9000)


@pytest.mark.slow
def test_backend_cache_reuses_a_loaded_model(tiny_qwen2):
    try:
        first = load_transformers_backend(tiny_qwen2, device="cpu")
        assert load_transformers_backend(tiny_qwen2, device="cpu") is first
        assert first.cache_key() == load_transformers_backend(tiny_qwen2, device="cpu").cache_key()
        assert "tiny_qwen2" in first.cache_key()
    finally:
        clear_backend_cache()
    assert first._closed


@pytest.mark.slow
def test_real_smollm2_gguf_loads_generates_and_is_cached(tmp_path):
    gguf = find_smollm2_gguf()
    cache = tmp_path / "llm-cache"
    started = time.perf_counter()
    backend = TransformersBackend(gguf, cache_dir=cache, device="cpu")
    first_load = time.perf_counter() - started
    assert not backend.loaded.from_cache
    messages = [{"role": "user", "content": "Name one fruit."}]
    text = backend.generate(messages, max_new_tokens=8, temperature=0)
    assert text.strip(), "the real model should say something"
    assert backend.generate(messages, max_new_tokens=8, temperature=0) == text
    # The chain runs on it (its plans are poor; the result is a valid layout whichever path it took).
    result = plan_with_backend("a red apple", backend, max_new_tokens=12, repair_rounds=0,
                               offline_planner=_stub_offline)
    assert result.path in (chain.PATH_CHAIN, chain.PATH_STEP0_FALLBACK, chain.PATH_OFFLINE_FALLBACK)
    backend.close()
    # The dequantised model was saved once; the next load reads the cache, much faster.
    assert len(list(cache.glob("*/mepg_gguf_cache.json"))) == 1
    started = time.perf_counter()
    again = TransformersBackend(gguf, cache_dir=cache, device="cpu")
    cached_load = time.perf_counter() - started
    assert again.loaded.from_cache
    assert again.generate(messages, max_new_tokens=8, temperature=0) == text
    assert cached_load < first_load / 2, (first_load, cached_load)
    assert str(gguf) in again.cache_key()
    again.close()
    shutil.rmtree(cache, ignore_errors=True)  # ~0.5 GB of fp32 weights: do not leave it in pytest's tmp


def test_gguf_path_errors_name_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="GGUF file not found: .*missing.gguf"):
        TransformersBackend(folder, gguf_file="missing.gguf")
    broken = folder / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(ModelNotFoundError, match="cannot load GGUF model .*broken.gguf"):
        TransformersBackend(broken, cache_dir=tmp_path / "cache", device="cpu")


def test_unknown_dtype_and_device(tiny_qwen2):
    with pytest.raises(BackendError, match="dtype"):
        TransformersBackend(tiny_qwen2, dtype="int3")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA"):
            TransformersBackend(tiny_qwen2, device="cuda")


def test_modules_import_without_torch_side_effects():
    # mepg_core's planner modules import no ComfyUI module and no heavy library at import time.
    code = ("import sys; import mepg_core.planner.chain, mepg_core.planner.backends, "
            "mepg_core.planner.lora_training; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'comfy', 'nodes') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("text, done_at", [
    ('{"a": 1} and then prose', len('{"a": 1}')),
    ('Here: [1] {"a": "}{", "b": [1, {"c": "\\""}]} tail', len('Here: [1] {"a": "}{", "b": [1, {"c": "\\""}]}')),
    ('{"a": [1, 2', None),
    ("no json at all }", None),
])
def test_json_end_scanner(text, done_at):
    scanner = JSONEndScanner()
    finished = [i + 1 for i, ch in enumerate(text) if scanner.feed(ch)]
    assert (finished[0] if finished else None) == done_at


def test_generation_stops_after_the_json_object(tiny_backend):
    import torch

    from mepg_core.planner.backends import _json_end_criteria

    tok = tiny_backend.tokenizer
    prompt = tok("prompt text", return_tensors="pt")["input_ids"]
    answer = tok('{"a": "}", "b": [1]}', add_special_tokens=False)["input_ids"]
    criteria = _json_end_criteria(tok, prompt.shape[1])
    results = []
    for n in range(1, len(answer) + 1):
        ids = torch.cat([prompt, torch.tensor([answer[:n]])], dim=1)
        results.append(bool(criteria(ids, None)[0]))
    assert results[-1] and not any(results[:-1])


# --------------------------------------------------------------------------------------------------
# OpenAIBackend: response_format json_schema -> json_object (+schema) -> none


class _FormatHandler(http.server.BaseHTTPRequestHandler):
    """Answers the planner's steps with good JSON; refuses (HTTP 400) the response_format forms in
    ``refuse`` the way llama.cpp's server and vLLM word it."""

    refuse: tuple[str, ...] = ()
    hits: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        type(self).hits.append(body)
        rf = body.get("response_format")
        form = "none" if rf is None else rf["type"] + ("+schema" if "schema" in rf else "")
        if form in type(self).refuse:
            payload = json.dumps({"error": {"code": 400, "type": "invalid_request_error",
                                            "message": f"response_format type {rf['type']} is not supported"}})
            return self._send(400, payload.encode())
        content = json.dumps(GOOD[step_of(body["messages"])])
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        return self._send(200, json.dumps(reply).encode())

    def _send(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def format_server():
    from mepg_core.planner.backends import forget_endpoint_forms

    forget_endpoint_forms()
    handler = type("Handler", (_FormatHandler,), {"hits": [], "refuse": ()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.handler = handler
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
    forget_endpoint_forms()


def _forms(hits):
    out = []
    for body in hits:
        rf = body.get("response_format")
        out.append("none" if rf is None else rf["type"] + ("+schema" if "schema" in rf else ""))
    return out


def test_endpoint_is_asked_for_the_steps_json_schema(format_server):
    result = plan_with_backend("two cats on a red sofa, a lamp to the right of the sofa",
                               OpenAIBackend(format_server.base, "m", max_retries=0))
    assert result.path == chain.PATH_CHAIN
    hits = format_server.handler.hits
    assert _forms(hits) == ["json_schema"] * 4
    rf = hits[2]["response_format"]
    assert rf["json_schema"]["strict"] is True and rf["json_schema"]["name"] == "step2_boxes"
    assert rf["json_schema"]["schema"] == result.trace[2].schema.schema
    assert [t.attempts[0].constraint for t in result.trace] == ["json_schema"] * 4


def test_a_server_that_refuses_json_schema_still_plans_and_is_remembered(format_server, caplog):
    import logging

    format_server.handler.refuse = ("json_schema",)
    backend = OpenAIBackend(format_server.base, "m", max_retries=2, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="mepg.planner.backends"):
        result = plan_with_backend("two cats on a red sofa, a lamp to the right of the sofa", backend)
        again = asyncio.run(aplan_with_backend("two cats on a red sofa, a lamp to the right of the sofa",
                                               OpenAIBackend(format_server.base, "m")))
    assert result.path == again.path == chain.PATH_CHAIN
    # One refusal (not retried), then the next form for every later call, by every backend on that endpoint.
    assert _forms(format_server.handler.hits) == ["json_schema"] + ["json_object+schema"] * 8
    assert [t.attempts[0].constraint for t in result.trace] == ["json_object+schema"] * 4
    refusals = [r for r in caplog.records if "refuses response_format" in r.getMessage()]
    assert len(refusals) == 1 and "json_schema" in refusals[0].getMessage()
    assert backend.response_form() == "json_object+schema"
    from mepg_core.planner.frontend import describe_plan

    assert "step 0 (analysis): ok after 1 attempt (response_format json_object+schema)" in describe_plan(result)


def test_a_server_that_refuses_every_form_gets_plain_requests(format_server):
    format_server.handler.refuse = ("json_schema", "json_object+schema", "json_object")
    result = plan_with_backend("a red apple left of a green pear", OpenAIBackend(format_server.base, "m"),
                               repair_rounds=0)
    assert result.trace[0].attempts[0].constraint == "none"
    assert _forms(format_server.handler.hits)[:4] == ["json_schema", "json_object+schema", "json_object", "none"]
    assert "response_format" not in format_server.handler.hits[-1]


def test_an_http_400_about_something_else_is_not_a_refusal(stub_server):
    from mepg_core.planner.schemas import StepSchema, step1_spec

    stub_server.handler.mode = "404"
    backend = OpenAIBackend(stub_server.base, "m", max_retries=0)
    with pytest.raises(EndpointHTTPError, match="no such model"):
        backend.generate(MESSAGES, schema=StepSchema("s", step1_spec(4)))
    assert len(stub_server.handler.hits) == 1 and backend.response_form() == "json_schema"


def test_structured_off_sends_no_response_format(format_server):
    from mepg_core.planner.schemas import StepSchema, step1_spec

    backend = OpenAIBackend(format_server.base, "m", structured=False)
    answer = backend.generate(chain.step0_messages("a cat"), schema=StepSchema("s", step1_spec(4)))
    assert answer.constraint == "none" and _forms(format_server.handler.hits) == ["none"]


# --------------------------------------------------------------------------------------------------
# TransformersBackend: decoding constrained to the step's schema (llguidance)

needs_llguidance = pytest.mark.skipif(not __import__("mepg_core.planner.constrain", fromlist=["x"]).available(),
                                      reason="llguidance is not installed (the pack's llm extra)")


@pytest.mark.slow
@needs_llguidance
@pytest.mark.parametrize("step", ["step1", "step3"])
def test_a_random_model_under_the_grammar_writes_schema_valid_json(tiny_qwen2, step):
    import jsonschema

    from mepg_core.planner.schemas import StepSchema, step1_spec, step3_spec

    spec = step1_spec(3) if step == "step1" else step3_spec(["cat", "sofa"])
    schema = StepSchema(step, spec)
    backend = TransformersBackend(tiny_qwen2, device="cpu")
    assert backend.constrained
    free = backend.generate(MESSAGES, max_new_tokens=60, schema=None)
    assert free.constraint == "none"
    answer = backend.generate(MESSAGES, max_new_tokens=1500, schema=schema)
    assert answer.constraint == "grammar"
    jsonschema.validate(json.loads(answer), schema.schema)  # garbage weights, valid JSON of the right shape
    sampled = backend.generate(MESSAGES, max_new_tokens=1500, schema=schema, temperature=1.0, seed=4)
    jsonschema.validate(json.loads(sampled), schema.schema)
    off = TransformersBackend(tiny_qwen2, device="cpu", constrain="off")
    assert not off.constrained and off.generate(MESSAGES, max_new_tokens=20, schema=schema).constraint == "none"


def test_without_llguidance_the_backend_decodes_as_before(tiny_qwen2, monkeypatch):
    from mepg_core.planner import constrain
    from mepg_core.planner.frontend import describe_plan
    from mepg_core.planner.schemas import StepSchema, step1_spec

    monkeypatch.setattr(constrain, "available", lambda: False)
    backend = TransformersBackend(tiny_qwen2, device="cpu")
    assert not backend.constrained
    answer = backend.generate(MESSAGES, max_new_tokens=8, schema=StepSchema("s", step1_spec(3)))
    assert answer.constraint == "none"
    assert answer == backend.generate(MESSAGES, max_new_tokens=8)  # exactly today's decoding
    result = plan_with_backend("a red apple", backend, max_new_tokens=8, repair_rounds=0,
                               offline_planner=_stub_offline)
    assert "step 0 (analysis): failed after 1 attempt (unconstrained)" in describe_plan(result)


def test_a_bad_constraint_setting_is_a_clear_error(tiny_qwen2):
    with pytest.raises(BackendError, match="constrain must be"):
        TransformersBackend(tiny_qwen2, device="cpu", constrain="yes")
