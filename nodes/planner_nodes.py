"""LLMLayoutPlanner: one complex prompt -> a layout, by the chain of thought on an LLM or by rules.

Glue only: model and adapter names are resolved inside ComfyUI's ``LLM`` model folder(s), the backend is
made by ``mepg_core.planner.backends`` and the plan by ``mepg_core.planner.chain``. transformers and peft
are imported by the transformers backend when it is first used, so the pack always loads. A local LLM is
held through ComfyUI's memory manager, like ComfyUI's own text encoders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..mepg_core.layout import MAX_REGIONS
from ..mepg_core.planner.backends import (
    AdapterMismatchError,
    BackendError,
    CallInterrupted,
    ChatBackend,
    EndpointHTTPError,
    EndpointTimeoutError,
    ModelNotFoundError,
    OpenAIBackend,
    load_transformers_backend,
)
from ..mepg_core.planner.chain import (
    DEFAULT_MAX_REGIONS,
    MAX_REPAIR_ROUNDS,
    STEP_NAMES,
    PlanningError,
    PlanResult,
    aplan_with_backend,
    plan_cache_key,
    plan_with_backend,
)
from ..mepg_core.planner.frontend import check_api_key_env, describe_plan
from ..mepg_core.planner.http_client import Target
from .types import CATEGORY, LayoutType

log = logging.getLogger("mepg")

NODE_NAME = "MEPG LLM Layout Planner"
LLM_FOLDER = "LLM"
ADAPTER_SUBFOLDER = "adapters"
NONE = "none"
BACKENDS = ("offline", "transformers", "openai")
ON_BACKEND_ERROR = ("error", "fallback")
MAX_SIZE = 16384
MAX_SEED = 0xFFFFFFFF
SCAN_DEPTH = 3  # folder levels searched below each LLM folder (and below its adapters folder)
ENDPOINT_TIMEOUT_S = 30.0  # default deadline of one model call, retries included
MAX_ENDPOINT_TIMEOUT_S = 3600.0
ENDPOINT_RETRIES = 2
BOXES_FROM = ("auto", "llm", "arranger")
# Below this many parameters a model names objects far better than it places boxes: "auto" lets the
# offline planner's arranger place them.
SMALL_MODEL_PARAMS = 7e9
_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
DEFAULT_PROMPT = ("two red apples on a wooden table, a blue cup to the right of the table, "
                  "a watercolor cat above the cup")


def register_llm_folder() -> None:
    """Planner models live in ``models/LLM`` (a folder other packs use too), unless ComfyUI knows it already."""
    if LLM_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(LLM_FOLDER, os.path.join(folder_paths.models_dir, LLM_FOLDER))


register_llm_folder()


# --------------------------------------------------------------------------------------------------
# Finding models and adapters (names are relative paths with "/"; only names found here are ever opened)


def llm_roots() -> list[str]:
    try:
        return [p for p in folder_paths.get_folder_paths(LLM_FOLDER) if os.path.isdir(p)]
    except KeyError:
        return []


def _walk(root: str, depth: int):
    """``(relative dir with "/", file names)`` for ``root`` and its sub-folders down to ``depth`` levels."""
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        level = 0 if not rel else rel.count("/") + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__") if level < depth else []
        yield rel, files


def list_models() -> list[str]:
    """Model folders (holding ``config.json``) and ``.gguf`` files under the LLM folder(s), adapters excluded."""
    found: set[str] = set()
    for root in llm_roots():
        for rel, files in _walk(root, SCAN_DEPTH):
            if rel == ADAPTER_SUBFOLDER or rel.startswith(ADAPTER_SUBFOLDER + "/"):
                continue
            if rel and "config.json" in files:
                found.add(rel)
            found.update(f"{rel}/{f}" if rel else f for f in files if f.lower().endswith(".gguf"))
    return sorted(found, key=str.lower)


def list_adapters() -> list[str]:
    """PEFT adapter folders (holding ``adapter_config.json``) under ``LLM/adapters``, relative to it."""
    found: set[str] = set()
    for root in llm_roots():
        base = os.path.join(root, ADAPTER_SUBFOLDER)
        if os.path.isdir(base):
            for rel, files in _walk(base, SCAN_DEPTH):
                if rel and "adapter_config.json" in files:
                    found.add(rel)
    return sorted(found, key=str.lower)


def _safe_name(name: str, what: str) -> list[str]:
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{NODE_NAME}: {what} {name!r} is not a name from the list")
    return parts


def _where_to_look() -> str:
    roots = folder_paths.get_folder_paths(LLM_FOLDER) if LLM_FOLDER in folder_paths.folder_names_and_paths else []
    return ", ".join(roots) or os.path.join(folder_paths.models_dir, LLM_FOLDER)


def resolve_model(name: str) -> str:
    """The full path of a listed model folder or ``.gguf`` file; a clear error otherwise."""
    if not name or name == NONE:
        raise ValueError(f"{NODE_NAME}: the transformers backend needs a model. Put a model folder (config.json + "
                         f"safetensors weights + tokenizer) or a .gguf file in {_where_to_look()}, refresh the "
                         "page and choose it in 'model'.")
    parts = _safe_name(name, "model")
    if name in list_models():
        for root in llm_roots():
            path = os.path.join(root, *parts)
            if (os.path.isfile(path) and path.lower().endswith(".gguf")) or \
                    os.path.isfile(os.path.join(path, "config.json")):
                return path
    raise FileNotFoundError(f"{NODE_NAME}: model {name!r} was not found in {_where_to_look()} (a folder with "
                            "config.json, or a .gguf file). It may have been moved or deleted; refresh the page "
                            "and choose another.")


def resolve_adapter(name: str) -> str | None:
    if not name or name == NONE:
        return None
    parts = _safe_name(name, "adapter")
    if name in list_adapters():
        for root in llm_roots():
            path = os.path.join(root, ADAPTER_SUBFOLDER, *parts)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                return path
    raise FileNotFoundError(f"{NODE_NAME}: LoRA adapter {name!r} was not found in "
                            f"{ADAPTER_SUBFOLDER}/ under {_where_to_look()} (a folder with adapter_config.json "
                            "and adapter_model.safetensors).")


def _stamp(path: str | None) -> Any:
    """Sizes and modification times of a file, or of the files directly in a folder (cheap; no hashing)."""
    if not path:
        return None
    try:
        if os.path.isfile(path):
            st = os.stat(path)
            return [path, st.st_size, st.st_mtime_ns]
        out = [path]
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                out.append([entry.name, st.st_size, st.st_mtime_ns])
        return out
    except OSError as exc:
        return [path, f"unreadable: {exc}"]


# --------------------------------------------------------------------------------------------------
# Results of LLM plans, by plan_cache_key (module level and bounded; the offline planner needs none)

_PLAN_CACHE: OrderedDict[str, PlanResult] = OrderedDict()
_PLAN_CACHE_SIZE = 32
_PLAN_CACHE_LOCK = threading.Lock()


def _cached_plan(key: str) -> PlanResult | None:
    with _PLAN_CACHE_LOCK:
        hit = _PLAN_CACHE.get(key)
        if hit is not None:
            _PLAN_CACHE.move_to_end(key)
        return hit


def _remember_plan(key: str, result: PlanResult) -> None:
    if any(a.error for step in result.trace for a in step.attempts):
        return  # a fallback forced by a backend failure (an endpoint that was down) must not stick
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE[key] = result
        _PLAN_CACHE.move_to_end(key)
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)


def clear_plan_cache() -> None:
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE.clear()


def model_parameters(backend: ChatBackend) -> float | None:
    """A backend's parameter count: counted for a local model, read from an endpoint's model name
    ("qwen2.5:7b-instruct" -> 7e9), ``None`` when unknown."""
    model = getattr(backend, "model", None)
    if isinstance(model, torch.nn.Module):
        return float(sum(p.numel() for p in model.parameters()))
    name = getattr(backend, "model", None) if isinstance(getattr(backend, "model", None), str) else backend.name
    match = _SIZE_IN_NAME.search(name or "")
    return float(match.group(1)) * 1e9 if match else None


def resolve_boxes_from(choice: str, backend: ChatBackend) -> tuple[str, str]:
    """``(llm | arranger, why)`` for the node's ``boxes_from`` choice."""
    if choice != "auto":
        return choice, "chosen"
    params = model_parameters(backend)
    if params is None:
        return "llm", "auto: the model's size is unknown"
    size = f"{params / 1e9:.2g} B parameters"
    if params < SMALL_MODEL_PARAMS:
        return "arranger", f"auto: {size}, under ~7 B"
    return "llm", f"auto: {size}"


class _LLMModule(torch.nn.Module):
    """The planner's LLM as one module that ComfyUI's ModelPatcher can move between devices."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm


# Local LLM backends -> their ModelPatcher; an entry goes when its backend is dropped from the backend cache.
_MANAGED_LLMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _managed_patcher(backend: ChatBackend, load_device, offload_device):
    """A ModelPatcher that lets ComfyUI's memory manager hold a local LLM like its own text encoders: loaded
    to ``load_device`` before the planner uses it, offloaded when sampling needs the memory, and released
    by ComfyUI's *Unload models*."""
    patcher = _MANAGED_LLMS.get(backend)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(_LLMModule(backend.model), load_device=load_device,
                                                   offload_device=offload_device)
        _MANAGED_LLMS[backend] = patcher
    return patcher


class _Interruptible(ChatBackend):
    """The backend, with ComfyUI's cancel check before every model call (repair rounds included) and, for a
    local LLM, its weights loaded through ComfyUI's memory manager first."""

    def __init__(self, inner: ChatBackend, patcher=None):
        self.inner = inner
        self.name = inner.name
        self.has_adapter = inner.has_adapter
        self.patcher = patcher

    def _prepare(self) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.patcher is not None:
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)

    def generate(self, messages, **options):
        self._prepare()
        return self.inner.generate(messages, **options)

    async def agenerate(self, messages, **options):
        self._prepare()
        return await self.inner.agenerate(messages, **options)

    def cache_key(self) -> str:
        return self.inner.cache_key()


def _progress_bar():
    bar = comfy.utils.ProgressBar(len(STEP_NAMES))

    def progress(step: int, total: int, label: str) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        log.debug("MEPG planner: %s", label)
        bar.update_absolute(step, total)

    return progress


def _failure(backend: str, exc: BaseException, hint: str = "") -> RuntimeError:
    return RuntimeError(f"{NODE_NAME} ({backend} backend): {exc}{hint}")


# --------------------------------------------------------------------------------------------------
# The node

DESCRIPTION = (
    "Plans a layout from one complex prompt: which objects, how many, where (boxes) and in which style. "
    "With an LLM it thinks in four steps, each answered as JSON, checked and repaired: step 0 analyses the "
    "prompt with the planner LoRA on (elements, sizes, places, a rough layout); step 1 lists the main "
    "elements with exact counts; step 2 gives every instance a box, correcting step 0's rough layout; step 3 "
    "adds the details of each region (colour, shape, size, texture, relations) and its style. If a step's "
    "answer cannot be used, the planner falls back to step 0's plan, then to the offline planner, and says "
    "so in plan_trace. Backends: 'offline' (default) is a fast deterministic rule-based planner, no model; "
    "'transformers' runs a local model from models/LLM (a folder or a .gguf file) with an optional LoRA "
    "adapter for step 0; 'openai' calls any OpenAI-compatible server (Ollama, llama.cpp, vLLM, "
    "transformers serve). Every step's answer is constrained to a JSON schema where the backend allows it "
    "(response_format on endpoints, constrained decoding on local models with llguidance installed). "
    "boxes_from: 'arranger' lets the offline planner's arranger place the elements, attributes and "
    "relations the model named (the default for models under ~7 B parameters); 'llm' keeps the model's "
    "boxes. Model output is only ever read as JSON, never run."
)


class LLMLayoutPlanner(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_LLMLayoutPlanner",
            display_name="LLM Layout Planner (MEPG)",
            category=f"{CATEGORY}/layout",
            description=DESCRIPTION,
            inputs=[
                io.String.Input("prompt", multiline=True, default=DEFAULT_PROMPT,
                                tooltip="The picture to plan, in plain words: objects, counts, colours, where "
                                        "they are relative to each other, styles. It is treated as a "
                                        "description, never as instructions to the model."),
                io.Combo.Input("backend", options=list(BACKENDS), default="offline",
                               tooltip="offline: rule-based, instant, deterministic, no model. transformers: a "
                                       "local LLM from models/LLM ('model', optional 'adapter'). openai: an "
                                       "OpenAI-compatible server ('endpoint_url', 'endpoint_model')."),
                io.Combo.Input("model", options=[NONE, *list_models()], default=NONE,
                               tooltip="For the transformers backend: a model folder (config.json + weights "
                                       "+ tokenizer) or a .gguf file in models/LLM. Loaded once and kept "
                                       "while its files are unchanged."),
                io.Combo.Input("adapter", options=[NONE, *list_adapters()], default=NONE,
                               tooltip="For the transformers backend: a planner LoRA (PEFT folder with "
                                       "adapter_config.json + adapter_model.safetensors) from "
                                       "models/LLM/adapters, used for step 0 only. It must have been trained "
                                       "on the chosen model."),
                io.String.Input("endpoint_url", default="http://127.0.0.1:11434/v1",
                                tooltip="For the openai backend: the server's base URL, e.g. "
                                        "http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8080/v1 "
                                        "(llama.cpp), http://127.0.0.1:8000/v1 (vLLM)."),
                io.String.Input("endpoint_model", default="",
                                tooltip="For the openai backend: the model name the server knows, e.g. "
                                        "'qwen2.5:7b-instruct' on Ollama."),
                io.String.Input("api_key_env", default="OPENAI_API_KEY",
                                tooltip="For the openai backend: the NAME of the environment variable that "
                                        "holds the API key (never the key itself: workflows are shared). "
                                        "If the variable is not set, no key is sent (fine for local servers); "
                                        "empty: never send one."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED,
                             tooltip="Makes sampling repeatable (LLM backends, temperature > 0). For the "
                                     "offline planner, 0 gives the canonical layout and other seeds vary "
                                     "sizes and positions a little."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="LLM sampling temperature; 0 = greedy (the same answer every time). "
                                       "Ignored by the offline planner."),
                io.Int.Input("max_regions", default=DEFAULT_MAX_REGIONS, min=1, max=MAX_REGIONS,
                             tooltip="At most this many regions (object instances) in the layout."),
                io.Int.Input("width", default=1024, min=64, max=MAX_SIZE, step=8,
                             tooltip="Canvas width in pixels the layout is planned for (object shapes keep "
                                     "their aspect ratio on it). Use the size you generate at."),
                io.Int.Input("height", default=1024, min=64, max=MAX_SIZE, step=8,
                             tooltip="Canvas height in pixels the layout is planned for."),
                io.Int.Input("repair_rounds", default=1, min=0, max=MAX_REPAIR_ROUNDS,
                             tooltip="How many times an LLM answer with problems (not JSON, wrong counts, "
                                     "bad boxes) is sent back with the list of problems before the step "
                                     "falls back."),
                io.Combo.Input("on_backend_error", options=list(ON_BACKEND_ERROR), default="error",
                               tooltip="When the model cannot answer at all (server unreachable, HTTP 500, "
                                       "timeout): 'error' stops the run with the reason; 'fallback' logs it "
                                       "and plans with step 0's plan or the offline planner. Unusable "
                                       "answers always fall back."),
                io.Float.Input("endpoint_timeout", default=ENDPOINT_TIMEOUT_S, min=1.0,
                               max=MAX_ENDPOINT_TIMEOUT_S, step=1.0, optional=True,
                               tooltip=f"For the openai backend: the most seconds one model call may take, "
                                       f"retries included (default {ENDPOINT_TIMEOUT_S:g} s; each step makes "
                                       "one call, plus one per repair round). A server that has not answered "
                                       "by then fails the step (see on_backend_error). Raise it for a slow "
                                       "model. Cancel stops a waiting call within a second."),
                io.Combo.Input("boxes_from", options=list(BOXES_FROM), default="auto", optional=True,
                               tooltip="Where the boxes come from. llm: the model writes them (step 2), "
                                       "checked and repaired. arranger: the model names the objects, counts, "
                                       "attributes and relations (step 1) and the offline planner's arranger "
                                       "places them so the relations hold; small models place boxes poorly. "
                                       "auto (default): arranger for models under ~7 B parameters (a local "
                                       "model's size is counted; an endpoint's is read from its name, e.g. "
                                       "'qwen2.5:3b'; unknown: llm)."),
            ],
            outputs=[
                LayoutType.Output("layout", display_name="layout",
                                  tooltip="The planned layout, for Region Mask Builder or the editor."),
                io.String.Output("layout_json", display_name="layout_json",
                                 tooltip="The layout as JSON (schema version 1), to save or edit."),
                io.String.Output("plan_trace", display_name="plan_trace",
                                 tooltip="How the layout was made: the path (chain, step0-fallback, "
                                         "offline-fallback, offline), each step's outcome and the warnings."),
            ],
        )

    @classmethod
    def validate_inputs(cls, backend: str, model: str, adapter: str, endpoint_url: str | None = None
                        ) -> bool | str:
        """Model and adapter names are checked only for the transformers backend, so a shared workflow that
        plans offline or over HTTP runs where the author's model files do not exist. An endpoint URL with
        credentials in it is refused at queue time, before the prompt (and the key) reaches the history."""
        if backend not in BACKENDS:
            return f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        if backend == "openai" and isinstance(endpoint_url, str):
            try:
                Target.parse(endpoint_url, "endpoint_url")
            except BackendError as exc:
                return str(exc)
        if backend != "transformers":
            return True
        if model == NONE:
            return f"the transformers backend needs a model: put one in {_where_to_look()} and choose it"
        if model not in list_models():
            return f"model {model!r} was not found in {_where_to_look()}"
        if adapter != NONE and adapter not in list_adapters():
            return f"LoRA adapter {adapter!r} was not found in {ADAPTER_SUBFOLDER}/ under {_where_to_look()}"
        return True

    @classmethod
    def fingerprint_inputs(cls, backend: str = "offline", model: str = NONE, adapter: str = NONE, **_: Any) -> str:
        """Runs again when the chosen model or adapter files change on disk (same names, new weights)."""
        if backend != "transformers":
            return backend
        try:
            return json.dumps([_stamp(resolve_model(model)), _stamp(resolve_adapter(adapter))])
        except Exception as exc:  # noqa: BLE001 - execute reports it properly
            return f"unresolved: {exc}"

    @classmethod
    async def execute(cls, prompt: str, backend: str, model: str, adapter: str, endpoint_url: str,
                      endpoint_model: str, api_key_env: str, seed: int, temperature: float, max_regions: int,
                      width: int, height: int, repair_rounds: int, on_backend_error: str = "error",
                      endpoint_timeout: float = ENDPOINT_TIMEOUT_S, boxes_from: str = "auto") -> io.NodeOutput:
        if backend not in BACKENDS:
            raise ValueError(f"{NODE_NAME}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if on_backend_error not in ON_BACKEND_ERROR:
            raise ValueError(f"{NODE_NAME}: on_backend_error must be 'error' or 'fallback', got {on_backend_error!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{NODE_NAME}: the prompt is empty; describe the picture to plan")
        if boxes_from not in BOXES_FROM:
            raise ValueError(f"{NODE_NAME}: boxes_from must be one of {', '.join(BOXES_FROM)}, got {boxes_from!r}")
        options = dict(max_regions=int(max_regions), width=int(width), height=int(height), seed=int(seed),
                       temperature=float(temperature), repair_rounds=int(repair_rounds),
                       on_backend_error="raise" if on_backend_error == "error" else "fallback")
        notes: list[str] = []
        chat: ChatBackend | None = None
        try:
            if backend == "offline":
                result = plan_with_backend(prompt, None, progress=_progress_bar(), **options)
            else:
                if backend == "transformers":
                    chat = cls._transformers_backend(model, adapter)
                    notes += getattr(chat, "warnings", [])
                else:
                    chat, note = cls._openai_backend(endpoint_url, endpoint_model, api_key_env, endpoint_timeout)
                    notes += [note] if note else []
                resolved, why = resolve_boxes_from(boxes_from, chat)
                options["boxes_from"] = resolved
                notes.append(f"boxes_from: {resolved} ({why})")
                key = plan_cache_key(prompt, chat, **options)
                result = _cached_plan(key)
                if result is None:
                    if backend == "openai":  # HTTP: awaited, so other async nodes run meanwhile
                        result = await aplan_with_backend(prompt, _Interruptible(chat), progress=_progress_bar(),
                                                          **options)
                    else:
                        result = plan_with_backend(prompt, _Interruptible(chat, _MANAGED_LLMS.get(chat)),
                                                   progress=_progress_bar(), **options)
                    _remember_plan(key, result)
        except PlanningError as exc:
            raise ValueError(f"{NODE_NAME}: {exc}") from None
        except CallInterrupted:
            # ComfyUI's cancel: reported by ComfyUI as an interruption, never as a failing endpoint.
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException() from None
        except EndpointTimeoutError as exc:
            raise _failure(backend, exc, " (raise endpoint_timeout for a slow model, or check the server)") from None
        except EndpointHTTPError as exc:
            hint = ""
            if exc.status in (401, 403):
                hint = (f" (the server wants an API key: set the environment variable named in api_key_env, "
                        f"{api_key_env.strip() or 'none given'}, where ComfyUI runs)")
            raise _failure(backend, exc, hint) from None
        except BackendError as exc:  # a model that could not answer (with on_backend_error = error)
            raise _failure(backend, exc) from None

        for w in result.warnings:
            log.warning("MEPG planner: %s", w)
        trace = describe_plan(result, notes=notes, has_adapter=chat is not None and chat.has_adapter)
        return io.NodeOutput(result.layout, result.layout.to_json(), trace)

    @staticmethod
    def _transformers_backend(model: str, adapter: str) -> ChatBackend:
        model_path = resolve_model(model)
        adapter_path = resolve_adapter(adapter)
        # Loaded where ComfyUI offloads text encoders, in the precision the load device runs best; ComfyUI's
        # memory manager moves it to the load device for each plan (see _managed_patcher).
        load_device = comfy.model_management.text_encoder_device()
        offload_device = comfy.model_management.text_encoder_offload_device()
        dtype = "auto"
        if load_device.type != "cpu":
            dtype = "bfloat16" if comfy.model_management.should_use_bf16(load_device) else "float16"
        try:
            backend = load_transformers_backend(model_path, adapter_path=adapter_path, device=str(offload_device),
                                                dtype=dtype)
            _managed_patcher(backend, load_device, offload_device)
            return backend
        except ImportError as exc:
            raise RuntimeError(f"{NODE_NAME}: the transformers backend needs the 'transformers' and 'peft' "
                               f"packages ({exc}); install the pack's requirements.txt") from None
        except AdapterMismatchError as exc:
            raise ValueError(f"{NODE_NAME}: adapter {adapter!r} does not fit model {model!r}: {exc}") from None
        except ModelNotFoundError as exc:
            raise FileNotFoundError(f"{NODE_NAME}: model {model!r}: {exc}") from None

    @staticmethod
    def _openai_backend(endpoint_url: str, endpoint_model: str, api_key_env: str, timeout: float
                        ) -> tuple[ChatBackend, str]:
        try:
            env_name = check_api_key_env(api_key_env)
        except ValueError as exc:
            raise ValueError(f"{NODE_NAME}: {exc}") from None
        note = ""
        if env_name and not os.environ.get(env_name):
            note = f"no API key sent: the environment variable {env_name} is not set"
            log.info("MEPG planner: %s", note)
            env_name = None
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or not 0 < timeout <= MAX_ENDPOINT_TIMEOUT_S:
            raise ValueError(f"{NODE_NAME}: endpoint_timeout must be a number of seconds in (0, "
                             f"{MAX_ENDPOINT_TIMEOUT_S:g}], got {timeout!r}")
        try:
            return OpenAIBackend(endpoint_url, endpoint_model, api_key_env=env_name, timeout=float(timeout),
                                 max_retries=ENDPOINT_RETRIES,
                                 should_cancel=comfy.model_management.processing_interrupted), note
        except BackendError as exc:
            raise ValueError(f"{NODE_NAME}: {exc}") from None

