"""LLMLayoutPlanner inside real ComfyUI: the offline planner, the transformers backend with a tiny random
Qwen2 in the base's models/LLM (it answers garbage: the planner must fall back), bad settings, endpoint
failures, and the layout flowing into RegionMaskBuilder."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import json
import re
import shutil
import threading
import time
from pathlib import Path

import comfy_compat
import pytest
import torch
from mepg_planner_testing import build_tiny_qwen2, free_port, one_torch_thread

from mepg_core.layout import parse_layout
from mepg_core.planner.relations import relative_position

NODE = "MEPG_LLMLayoutPlanner"
TINY = "tiny_qwen2"

DEFAULTS = dict(backend="offline", model="none", adapter="none", endpoint_url="http://127.0.0.1:11434/v1",
                endpoint_model="", api_key_env="OPENAI_API_KEY", seed=0, temperature=0.0, max_regions=16,
                width=1024, height=1024, repair_rounds=1, on_backend_error="error")


def plan(comfy, prompt: str, **kw):
    args = {**DEFAULTS, **kw}
    return asyncio.run(comfy.node(NODE).execute(prompt, **args)).args


def llm_dir() -> Path:
    import folder_paths

    return Path(folder_paths.models_dir) / "LLM"


def planner_module():
    import inprocess

    return inprocess.pack_module("nodes.planner_nodes")


def refresh_lists():
    import folder_paths

    folder_paths.filename_list_cache.clear()


def combo_options(comfy, name: str) -> list[str]:
    schema = comfy.node(NODE).GET_SCHEMA()
    return next(i for i in schema.inputs if i.id == name).options


@pytest.fixture(scope="module")
def tiny_llm(comfy):
    """The tiny random Qwen2 as ``models/LLM/tiny_qwen2`` of the contract base (built once, reused)."""
    build_tiny_qwen2(llm_dir() / TINY)
    refresh_lists()
    yield TINY
    planner_module().clear_plan_cache()
    import inprocess

    inprocess.pack_module("mepg_core.planner.backends").clear_backend_cache()


# --------------------------------------------------------------------------------------------------
# The offline planner (the default)


def test_execute_is_async_and_the_node_is_registered(comfy):
    node = comfy.node(NODE)
    assert inspect.iscoroutinefunction(node.execute)
    schema = node.GET_SCHEMA()
    schema.validate()
    assert schema.display_name == "LLM Layout Planner (MEPG)" and schema.category == "MEPG/layout"
    assert combo_options(comfy, "backend") == ["offline", "transformers", "openai"]
    assert [o.io_type for o in schema.outputs] == ["MEPG_LAYOUT", "STRING", "STRING"]


def test_offline_plan_has_the_prompt_objects_counts_and_relation(comfy):
    layout, layout_json, trace = plan(comfy, "two red apples left of a blue cup", width=1216, height=832)
    labels = [r.label for r in layout.regions]
    assert sorted(labels) == ["apple", "apple", "cup"]
    apples = [r for r in layout.regions if r.label == "apple"]
    cup = next(r for r in layout.regions if r.label == "cup")
    assert all("red" in r.prompt for r in apples) and "blue" in cup.prompt
    for apple in apples:
        assert "left of" in relative_position(apple.box, cup.box, 1216, 832)
    assert (layout.canvas.width, layout.canvas.height) == (1216, 832)
    assert parse_layout(layout_json)[0].to_dict() == layout.to_dict()
    assert trace.startswith("path: offline\n") and "backend: offline" in trace


def test_offline_plan_is_deterministic(comfy):
    prompt = "three cats on a sofa and a lamp to the right of the sofa, anime style"
    first = plan(comfy, prompt, seed=5)
    assert plan(comfy, prompt, seed=5)[1] == first[1]
    assert plan(comfy, prompt, seed=0)[1] == plan(comfy, prompt, seed=0)[1]
    assert len(plan(comfy, prompt, max_regions=2)[0].regions) == 2


@pytest.mark.parametrize("prompt, match", [("", "prompt is empty"), ("   \n ", "prompt is empty"),
                                           ("a cat " * 2000, "at most 2000 can be planned")])
def test_empty_and_huge_prompts_are_clear_errors(comfy, prompt, match):
    with pytest.raises(ValueError, match=match):
        plan(comfy, prompt)


def test_planner_layout_feeds_region_mask_builder(comfy):
    layout = plan(comfy, "two red apples left of a blue cup", width=832, height=1216)[0]
    regions, _, masks, background, preview = comfy.node("MEPG_RegionMaskBuilder").execute(
        layout, width=832, height=1216, feather_px=0, overlap="smaller_on_top", global_weight=0.5).args
    assert masks.shape == (3, 1216, 832) and background.shape == (1, 1216, 832) and preview.shape == (1, 1216, 832, 3)
    assert torch.equal(masks.sum(0) + background[0], torch.ones(1216, 832))
    assert [s.label for s in regions.regions] == [r.label for r in layout.regions]


def test_planner_in_a_queued_graph(comfy):
    """Through ComfyUI's validation and executor (combo values checked, async execute awaited)."""
    prompt = {
        "plan": {"class_type": NODE, "inputs": {"prompt": "a dog beside a red car", **DEFAULTS}},
        "masks": {"class_type": "MEPG_RegionMaskBuilder",
                  "inputs": {"layout": ["plan", 0], "width": 512, "height": 512, "feather_px": 0,
                             "overlap": "smaller_on_top", "global_weight": 0.5}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["masks", 4]}},
    }
    history = comfy.run(prompt)
    assert "show" in history["outputs"]


def test_model_names_are_validated_only_for_the_transformers_backend(comfy):
    """A shared workflow that plans offline runs where the author's model does not exist."""
    inputs = {**DEFAULTS, "prompt": "a dog beside a red car", "model": "someone-elses-model", "adapter": "their-lora"}
    graph = {"plan": {"class_type": NODE, "inputs": inputs},
             "masks": {"class_type": "MEPG_RegionMaskBuilder",
                       "inputs": {"layout": ["plan", 0], "width": 512, "height": 512, "feather_px": 0,
                                  "overlap": "smaller_on_top", "global_weight": 0.5}},
             "show": {"class_type": "PreviewImage", "inputs": {"images": ["masks", 4]}}}
    assert "show" in comfy.run(graph)["outputs"]
    graph["plan"]["inputs"]["backend"] = "transformers"
    with pytest.raises(AssertionError, match="model 'someone-elses-model' was not found in .*models/LLM"):
        comfy.run(graph)


def test_progress_over_the_steps_and_cancel(comfy, monkeypatch):
    import comfy.model_management as model_management

    seen = comfy_compat.record_progress(monkeypatch)
    plan(comfy, "a cat")
    assert seen == [(0, 4), (4, 4)]  # the offline planner is one step
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            plan(comfy, "a cat")
    finally:
        model_management.interrupt_current_processing(False)


# --------------------------------------------------------------------------------------------------
# Model and adapter choices


def test_models_and_adapters_are_listed_from_the_llm_folder(comfy, tiny_llm):
    extra = llm_dir() / "listing-test"
    adapters = llm_dir() / "adapters" / "listing-test-adapter"
    try:
        (extra / "family").mkdir(parents=True, exist_ok=True)
        (extra / "family" / "small.Q4_K_M.gguf").write_bytes(b"")
        adapters.mkdir(parents=True, exist_ok=True)
        (adapters / "adapter_config.json").write_text("{}")
        (adapters / "config.json").write_text("{}")  # an adapter folder is never offered as a model
        refresh_lists()
        models = combo_options(comfy, "model")
        assert models[0] == "none" and TINY in models and "listing-test/family/small.Q4_K_M.gguf" in models
        assert not any(m.startswith("adapters") for m in models)
        assert combo_options(comfy, "adapter") == ["none", "listing-test-adapter"]
    finally:
        shutil.rmtree(extra, ignore_errors=True)
        shutil.rmtree(llm_dir() / "adapters", ignore_errors=True)
        refresh_lists()


def test_transformers_garbage_falls_back_to_a_valid_layout(comfy, tiny_llm, monkeypatch):
    import inprocess

    # Unconstrained decoding (as without llguidance): the random model's answers are not even JSON.
    monkeypatch.setattr(inprocess.pack_module("mepg_core.planner.constrain"), "available", lambda: False)
    prompt = "a red apple left of a blue cup"
    seen = comfy_compat.record_progress(monkeypatch)
    with one_torch_thread():
        layout, layout_json, trace = plan(comfy, prompt, backend="transformers", model=tiny_llm, max_regions=2,
                                          repair_rounds=0, boxes_from="llm")
    parse_layout(layout_json)
    assert 1 <= len(layout.regions) <= 2
    assert "path: offline-fallback" in trace and "backend: transformers:tiny_qwen2" in trace
    assert "step 0 (analysis, LoRA on)" not in trace  # no adapter chosen
    assert "step 0 (analysis): failed after 1 attempt (unconstrained)" in trace
    assert "using the offline planner" in trace
    assert [value for value, _ in seen] == [0, 1, 2, 3, 4]  # one tick per chain step, then done
    # Same inputs: the cached plan, at once (the model is not asked again).
    import time

    started = time.perf_counter()
    assert plan(comfy, prompt, backend="transformers", model=tiny_llm, max_regions=2, repair_rounds=0,
                boxes_from="llm")[1] == layout_json
    assert time.perf_counter() - started < 1.0


def test_local_llm_is_held_by_comfys_memory_manager(comfy, tiny_llm):
    """The LLM is a model ComfyUI knows: loaded through load_models_gpu for a plan, released by
    unload_all_models (ComfyUI's *Unload models*), and loaded again by the next plan."""
    import comfy.model_management as mm
    import inprocess

    nodes_mod = planner_module()
    backends = inprocess.pack_module("mepg_core.planner.backends")

    def plan_once():
        nodes_mod.clear_plan_cache()
        with one_torch_thread():
            plan(comfy, "a green kite above a house", backend="transformers", model=tiny_llm, max_regions=2,
                 repair_rounds=0)

    plan_once()
    (backend,) = backends._BACKEND_CACHE.values()
    patcher = nodes_mod._MANAGED_LLMS[backend]
    assert patcher.model.lm is backend.model
    weights = sum(t.numel() * t.element_size() for t in backend.model.state_dict().values())
    assert patcher.model_size() >= weights > 0
    assert [m for m in mm.current_loaded_models if m.model is patcher]
    mm.unload_all_models()
    assert not [m for m in mm.current_loaded_models if m.model is patcher]
    plan_once()
    assert [m for m in mm.current_loaded_models if m.model is patcher]
    assert nodes_mod._MANAGED_LLMS[backend] is patcher  # the same backend and patcher, not a second copy


def test_fingerprint_follows_the_model_files(comfy, tiny_llm):
    node = comfy.node(NODE)
    one = node.fingerprint_inputs(backend="transformers", model=tiny_llm, adapter="none")
    assert one == node.fingerprint_inputs(backend="transformers", model=tiny_llm, adapter="none")
    assert "config.json" in one
    assert node.fingerprint_inputs(backend="offline", model=tiny_llm, adapter="none") == "offline"


@pytest.mark.parametrize("model, error, match", [
    ("none", ValueError, "the transformers backend needs a model"),
    ("no-such-model", FileNotFoundError, "model 'no-such-model' was not found in .*models/LLM"),
    ("../checkpoints/tiny_sdxl_base.safetensors", ValueError, "is not a name from the list"),
])
def test_missing_model_is_a_clear_error(comfy, model, error, match):
    with pytest.raises(error, match=match):
        plan(comfy, "a cat", backend="transformers", model=model)


def test_adapter_for_another_base_is_a_clear_error(comfy, tiny_llm):
    from safetensors.torch import save_file

    folder = llm_dir() / "adapters" / "for-a-bigger-model"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": "some/other-model", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 48),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
                  str(folder / "adapter_model.safetensors"))
        refresh_lists()
        with pytest.raises(ValueError, match=r"adapter 'for-a-bigger-model' does not fit model 'tiny_qwen2'.*"
                                             r"some/other-model.*adapter input 48 vs model 32"):
            plan(comfy, "a cat", backend="transformers", model=tiny_llm, adapter="for-a-bigger-model")
        with pytest.raises(FileNotFoundError, match="adapter 'gone' was not found"):
            plan(comfy, "a cat", backend="transformers", model=tiny_llm, adapter="gone")
    finally:
        shutil.rmtree(llm_dir() / "adapters", ignore_errors=True)
        refresh_lists()


# --------------------------------------------------------------------------------------------------
# The OpenAI-compatible backend: settings and failures


@pytest.mark.parametrize("value", ["sk-proj-4f9Qx2Lm8Zt7Rb1Vc6Nd3Kh5Jw0Ys", "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345",
                                   "aB3dE9fG1hJ2kL4mN6pQ8rS0tU"])
def test_a_key_in_api_key_env_is_refused(comfy, value):
    with pytest.raises(ValueError, match="looks like an API key itself.*workflow files are shared") as info:
        plan(comfy, "a cat", backend="openai", endpoint_model="m", api_key_env=value)
    assert value not in str(info.value)


def test_unreachable_endpoint_is_a_clear_error(comfy):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RuntimeError, match=rf"openai backend\): cannot reach {re.escape(url)}/chat/completions"):
        plan(comfy, "a cat", backend="openai", endpoint_url=url, endpoint_model="m", api_key_env="")


def test_endpoint_settings_are_checked(comfy):
    with pytest.raises(ValueError, match="endpoint model name is empty"):
        plan(comfy, "a cat", backend="openai", endpoint_model=" ")
    with pytest.raises(ValueError, match="must start with http"):
        plan(comfy, "a cat", backend="openai", endpoint_url="file:///etc/passwd", endpoint_model="m")


class _Answers(http.server.BaseHTTPRequestHandler):
    """Error paths only: HTTP 500, or a well-formed chat completion whose content is not a plan."""

    mode = "500"
    hits: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.hits.append(self.headers.get("Authorization"))
        if self.mode == "500":
            body, status = b'{"error": {"message": "model exploded"}}', 500
        else:
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "I like turtles."}}]}).encode()
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answers(monkeypatch):
    monkeypatch.setattr(planner_module(), "ENDPOINT_RETRIES", 0)
    handler = type("Handler", (_Answers,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.handler = handler
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()
    planner_module().clear_plan_cache()


def test_http_500_is_an_error_or_a_logged_fallback(comfy, answers, monkeypatch):
    monkeypatch.delenv("MEPG_TEST_UNSET_KEY", raising=False)
    with pytest.raises(RuntimeError, match="HTTP 500: 'model exploded'"):
        plan(comfy, "a cat on a mat", backend="openai", endpoint_url=answers.url, endpoint_model="m")
    layout, layout_json, trace = plan(comfy, "a cat on a mat", backend="openai", endpoint_url=answers.url,
                                      endpoint_model="m", api_key_env="MEPG_TEST_UNSET_KEY",
                                      on_backend_error="fallback")
    parse_layout(layout_json)
    assert "path: offline-fallback" in trace and "backend error:" in trace and "HTTP 500" in trace
    assert "no API key sent: the environment variable MEPG_TEST_UNSET_KEY is not set" in trace
    assert set(answers.handler.hits) == {None}


def test_endpoint_garbage_falls_back_and_the_key_comes_from_the_env(comfy, answers, monkeypatch):
    answers.handler.mode = "garbage"
    monkeypatch.setenv("MEPG_TEST_API_KEY", "test-secret-value")
    layout, layout_json, trace = plan(comfy, "two dogs under a tree", backend="openai", endpoint_url=answers.url,
                                      endpoint_model="m", api_key_env="MEPG_TEST_API_KEY", repair_rounds=0)
    assert sorted(r.label for r in layout.regions) == ["dog", "dog", "tree"]
    assert "path: offline-fallback" in trace and "no JSON object found" in trace
    assert "test-secret-value" not in trace + layout_json
    assert answers.handler.hits == ["Bearer test-secret-value"] * 2  # steps 0 and 1, no repair rounds


# --------------------------------------------------------------------------------------------------
# A stuck endpoint: ComfyUI's interrupt and the node's deadline


def test_interrupt_stops_a_stuck_endpoint_call_and_says_interrupted(comfy):
    import comfy.model_management as mm
    from misbehaving_http import MisbehavingEndpoint

    with MisbehavingEndpoint("never") as ep:
        timer = threading.Timer(0.5, mm.interrupt_current_processing, args=(True,))
        timer.start()
        started = time.perf_counter()
        try:
            with pytest.raises(mm.InterruptProcessingException):
                plan(comfy, "a cat", backend="openai", endpoint_url=ep.url, endpoint_model="m", api_key_env="",
                     on_backend_error="fallback", endpoint_timeout=120.0)
        finally:
            timer.cancel()
        latency = time.perf_counter() - started - 0.5
        assert latency < 2.0, latency
        assert not mm.processing_interrupted()  # the flag is consumed, the next prompt runs
        assert ep.closed_by_client.wait(2)


def test_the_endpoint_deadline_is_the_node_input(comfy, monkeypatch):
    from misbehaving_http import MisbehavingEndpoint

    monkeypatch.setattr(planner_module(), "ENDPOINT_RETRIES", 2)
    with MisbehavingEndpoint("never") as ep:
        started = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"did not answer within 1 s \(raise endpoint_timeout"):
            plan(comfy, "a cat", backend="openai", endpoint_url=ep.url, endpoint_model="m", api_key_env="",
                 endpoint_timeout=1.0)
        assert time.perf_counter() - started < 2.5 and ep.requests == 1
    with pytest.raises(ValueError, match="endpoint_timeout must be a number of seconds"):
        plan(comfy, "a cat", backend="openai", endpoint_model="m", endpoint_timeout=float("nan"))


def test_the_default_deadline_is_well_under_a_minute_and_stated_in_the_tooltip(comfy):
    schema = comfy.node(NODE).GET_SCHEMA()
    timeout = next(i for i in schema.inputs if i.id == "endpoint_timeout")
    assert timeout.default <= 30 and f"default {timeout.default:g} s" in timeout.tooltip and timeout.optional


@pytest.mark.parametrize("url", ["http://user:sk-SECRET-42@127.0.0.1:9/v1", "http://sk-SECRET-42@127.0.0.1:9/v1"])
def test_credentials_in_the_endpoint_url_are_refused_at_queue_time_without_echo(comfy, url):
    message = comfy.node(NODE).validate_inputs("openai", "none", "none", endpoint_url=url)
    assert isinstance(message, str) and "credentials" in message and "SECRET" not in message
    with pytest.raises(ValueError, match="credentials") as info:
        plan(comfy, "a cat", backend="openai", endpoint_url=url, endpoint_model="m", api_key_env="")
    assert "SECRET" not in str(info.value)
    assert comfy.node(NODE).validate_inputs("offline", "none", "none", endpoint_url=url) is True


# --------------------------------------------------------------------------------------------------
# boxes_from and structured answers


class _GoodAnswers(http.server.BaseHTTPRequestHandler):
    """Answers every chain step with a good JSON answer; records the requests."""

    hits: list = []

    def do_POST(self):  # noqa: N802
        from mepg_planner_testing import GOOD, step_of

        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.hits.append(body)
        content = json.dumps(GOOD[step_of(body["messages"])])
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def good_endpoint():
    handler = type("Handler", (_GoodAnswers,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.handler = handler
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()
    planner_module().clear_plan_cache()


def test_boxes_from_arranger_and_llm_through_the_node(comfy, good_endpoint):
    from mepg_planner_testing import PROMPT_TWO_CATS, STEP2

    kw = dict(backend="openai", endpoint_url=good_endpoint.url, endpoint_model="qwen2.5:3b-instruct")
    layout, _, trace = plan(comfy, PROMPT_TWO_CATS, boxes_from="auto", **kw)
    assert "path: chain" in trace and "boxes_from: arranger (auto: 3 B parameters, under ~7 B)" in trace
    assert "step 2 (coordinates): placed by the arranger (boxes_from = arranger)" in trace
    assert "(response_format json_schema)" in trace
    assert len(good_endpoint.handler.hits) == 3  # steps 0, 1 and 3; the arranger placed the boxes
    lamp, sofa = layout.regions[3].box, layout.regions[2].box
    assert "right of" in relative_position(lamp, sofa)
    layout, _, trace = plan(comfy, PROMPT_TWO_CATS, boxes_from="llm", **kw)
    assert "boxes_from: llm (chosen)" in trace and len(good_endpoint.handler.hits) == 7
    assert [list(r.box) for r in layout.regions] == [b["box"] for b in STEP2["boxes"]]
    assert good_endpoint.handler.hits[-2]["response_format"]["json_schema"]["name"] == "step2_boxes"
    with pytest.raises(ValueError, match="boxes_from must be one of"):
        plan(comfy, PROMPT_TWO_CATS, boxes_from="model", **kw)


@pytest.mark.parametrize("name, expected", [("qwen2.5:7b-instruct", "llm"), ("llama3.2:3b", "arranger"),
                                            ("SmolLM2-135M", "llm"), ("phi-3.5-mini-3.8B", "arranger"),
                                            ("gpt-4o", "llm"), ("mixtral-8x22b", "llm")])
def test_boxes_from_auto_reads_an_endpoints_size_from_its_name(comfy, name, expected):
    from mepg_core.planner.backends import OpenAIBackend

    choice, why = planner_module().resolve_boxes_from("auto", OpenAIBackend("http://127.0.0.1:1", name))
    assert choice == expected, why


def test_boxes_from_auto_counts_a_local_models_parameters(comfy, tiny_llm):
    with one_torch_thread():
        _, _, trace = plan(comfy, "a red apple", backend="transformers", model=tiny_llm, max_regions=2,
                           repair_rounds=0)
    assert re.search(r"boxes_from: arranger \(auto: [\d.e+-]+ B parameters, under ~7 B\)", trace), trace


def test_boxes_from_is_stated_in_the_tooltip_and_help_page(comfy):
    schema = comfy.node(NODE).GET_SCHEMA()
    tooltip = next(i for i in schema.inputs if i.id == "boxes_from").tooltip
    assert "7 B" in tooltip and "arranger" in tooltip
    page = (Path(__file__).resolve().parents[2] / "web" / "docs" / f"{NODE}.md").read_text()
    assert "boxes_from" in page and "7 B" in page
