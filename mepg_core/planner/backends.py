"""Chat backends for the planner: a local transformers model (+ LoRA), an OpenAI-compatible endpoint, a callable.

Every backend answers ``generate(messages, *, temperature, seed, max_new_tokens, use_adapter, tag) -> str``
for a list of ``{"role", "content"}`` messages, and ``agenerate`` (the same, awaitable). ``cache_key()``
names everything about the backend that decides its answers (never a secret).

* :class:`TransformersBackend` - a causal LM from a local folder (``config.json`` + weights) or a GGUF file
  (dequantised on load by transformers; the result is saved once into a cache folder, so later loads take
  well under a second). An optional PEFT LoRA adapter (safetensors) is applied on the one model in memory
  and switched on per call: ``use_adapter=True`` for the planner's step 0, off (``disable_adapter()``)
  otherwise. The adapter's shapes and recorded base model are checked against the loaded model.
* :class:`OpenAIBackend` - ``POST {base}/v1/chat/completions`` on any OpenAI-compatible server (Ollama,
  llama.cpp, vLLM, ``transformers serve``) through :mod:`.http_client` (standard library; the
  asynchronous call never blocks the event loop). Each call has a total deadline and an optional cancel
  check. The API key is read from an environment variable whose *name* is given; bounded retries with
  exponential backoff on connection failures, 429 and 5xx, never on answers that are not valid HTTP.
* :class:`CallableBackend` - wraps a Python function (tests, other code).

torch, transformers and peft are imported only when a :class:`TransformersBackend` is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import http_client
from .errors import (
    AdapterMismatchError,
    BackendError,
    CallInterrupted,
    EndpointBadResponseError,
    EndpointError,
    EndpointHTTPError,
    EndpointResponseTooLargeError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    ModelNotFoundError,
)
from .http_client import CallBudget, Target

__all__ = [
    "ADAPTER_SIDECAR",
    "RESPONSE_FORMS",
    "AdapterMismatchError",
    "Answer",
    "BackendError",
    "CallInterrupted",
    "CallableBackend",
    "ChatBackend",
    "EndpointBadResponseError",
    "EndpointError",
    "EndpointHTTPError",
    "EndpointResponseTooLargeError",
    "EndpointTimeoutError",
    "EndpointUnreachableError",
    "JSONEndScanner",
    "LoadedModel",
    "ModelNotFoundError",
    "OpenAIBackend",
    "TransformersBackend",
    "clear_backend_cache",
    "forget_endpoint_forms",
    "default_cache_dir",
    "load_causal_lm",
    "load_transformers_backend",
    "make_backend",
    "model_fingerprint",
]

logger = logging.getLogger("mepg.planner.backends")

# Written beside a LoRA adapter by lora_training: which base it was trained on (config summary + weights digest).
ADAPTER_SIDECAR = "mepg_adapter.json"
_GGUF_CACHE_MARKER = "mepg_gguf_cache.json"
_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: the default deadline of one endpoint call, retries included (a planner step makes one call per round)
DEFAULT_ENDPOINT_TIMEOUT_S = 30.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------------
# The interface


class Answer(str):
    """A model's answer text, with how it was constrained (``constraint``):

    ``"json_schema"``, ``"json_object+schema"``, ``"json_object"`` (the endpoint's ``response_format``
    form that was accepted), ``"grammar"`` (local decoding constrained to the schema) or ``"none"``.
    """

    constraint: str

    def __new__(cls, text: str, constraint: str = "none") -> Answer:
        obj = super().__new__(cls, text)
        obj.constraint = constraint
        return obj


class ChatBackend:
    """Base class of the planner's backends. Subclasses implement :meth:`generate` and :meth:`cache_key`.

    ``schema`` (optional): the answer's :class:`~.schemas.StepSchema`; a backend that can constrain its
    answer to it does, and says so with an :class:`Answer`.
    """

    name: str = "backend"
    #: whether ``use_adapter`` changes anything (a LoRA adapter is loaded)
    has_adapter: bool = False

    def generate(self, messages: list[dict[str, str]], *, temperature: float = 0.0, seed: int = 0,
                 max_new_tokens: int = 256, use_adapter: bool = False, tag: str = "", schema: Any = None) -> str:
        raise NotImplementedError

    async def agenerate(self, messages: list[dict[str, str]], *, temperature: float = 0.0, seed: int = 0,
                        max_new_tokens: int = 256, use_adapter: bool = False, tag: str = "",
                        schema: Any = None) -> str:
        # Default: the synchronous call in a worker thread, so an event loop is never blocked.
        extra = {"schema": schema} if schema is not None else {}
        return await asyncio.to_thread(self.generate, messages, temperature=temperature, seed=seed,
                                       max_new_tokens=max_new_tokens, use_adapter=use_adapter, tag=tag, **extra)

    def cache_key(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (a model in memory). Safe to call twice."""


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BackendError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise BackendError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
    return messages


# --------------------------------------------------------------------------------------------------
# Callable


class CallableBackend(ChatBackend):
    """A backend that calls ``fn(messages, **options)`` (or ``fn(messages)`` if it takes no options).

    ``options`` are ``temperature, seed, max_new_tokens, use_adapter, tag``. ``fn`` may be ``async``.
    Exceptions other than :class:`BackendError` are wrapped in one.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str = "callable", has_adapter: bool = False):
        if not callable(fn):
            raise TypeError("CallableBackend needs a callable")
        self.fn = fn
        self.name = name
        self.has_adapter = has_adapter
        try:
            params = inspect.signature(fn).parameters.values()
            self._takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        except (TypeError, ValueError):
            self._takes_options = False

    def _invoke(self, messages: list[dict[str, str]], options: dict[str, Any]) -> Any:
        return self.fn(messages, **options) if self._takes_options else self.fn(messages)

    def generate(self, messages, *, temperature=0.0, seed=0, max_new_tokens=256, use_adapter=False, tag="",
                 schema=None):
        options = dict(temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, use_adapter=use_adapter,
                       tag=tag, **({"schema": schema} if schema is not None else {}))
        try:
            out = self._invoke(_check_messages(messages), options)
            if inspect.isawaitable(out):
                if inspect.iscoroutine(out):
                    out.close()  # never awaited: close it so Python does not warn
                raise BackendError(f"{self.name}: the function is async; use agenerate / aplan_with_backend")
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of user code is a backend failure
            raise BackendError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        return _as_text(out, self.name)

    async def agenerate(self, messages, *, temperature=0.0, seed=0, max_new_tokens=256, use_adapter=False, tag="",
                        schema=None):
        options = dict(temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, use_adapter=use_adapter,
                       tag=tag, **({"schema": schema} if schema is not None else {}))
        try:
            out = self._invoke(_check_messages(messages), options)
            if inspect.isawaitable(out):
                out = await out
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        return _as_text(out, self.name)

    def cache_key(self) -> str:
        return f"callable:{self.name}"


def _as_text(out: Any, who: str) -> str:
    if out is None:
        return ""
    if not isinstance(out, str):
        raise BackendError(f"{who}: expected text from the model, got {type(out).__name__}")
    return out


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


class OpenAIBackend(ChatBackend):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``base_url``: ``http://host:port``, ``http://host:port/v1`` or the full ``.../chat/completions`` URL
    (no user-info: keys come from the environment). ``api_key_env``: the NAME of an environment variable
    holding the key (read at each request, never stored or shown); empty for servers without
    authentication. ``timeout``: the most seconds one call may take, retries and their waits included.
    ``max_retries``: extra attempts after a failure to connect, HTTP 429 or 5xx, waiting
    ``backoff * 2**n`` seconds (capped at 30) before attempt ``n + 1`` while the deadline allows; an
    answer that is not valid HTTP or JSON is never retried. ``should_cancel()``: polled while a call
    waits (see :class:`~.http_client.CallBudget`); true ends the call within
    :data:`~.http_client.POLL_S` seconds with :class:`~.errors.CallInterrupted`.

    Structured answers (``structured``, default on): a call with a schema sends ``response_format``, in
    the first of :data:`RESPONSE_FORMS` the endpoint has not refused: ``json_schema`` (strict),
    ``json_object`` with the schema beside it (llama.cpp), plain ``json_object``, then none. A refusal
    (an HTTP error naming the format) moves the endpoint to the next form for the life of the process,
    logged once; the returned :class:`Answer` says which form was used.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None,
                 timeout: float = DEFAULT_ENDPOINT_TIMEOUT_S, max_retries: int = 2, backoff: float = 0.5,
                 extra_body: dict[str, Any] | None = None, should_cancel: Callable[[], bool] | None = None,
                 structured: bool = True):
        target = Target.parse(_chat_url(base_url))
        if not isinstance(model, str) or not model.strip():
            raise BackendError("endpoint model name is empty; give the model the server should use")
        if api_key_env:
            if not _ENV_NAME.match(api_key_env):
                # Someone pasted the key itself: refuse without echoing it.
                raise BackendError("api_key_env must be the NAME of an environment variable (letters, digits, "
                                   "underscores), not the key itself")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise BackendError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 10:
            raise BackendError(f"max_retries must be an integer in [0, 10], got {max_retries!r}")
        if should_cancel is not None and not callable(should_cancel):
            raise BackendError("should_cancel must be a callable returning True to cancel")
        self._target = target
        self.url = target.shown  # what messages, logs and cache keys show (never a secret)
        self._url_digest = hashlib.sha256(target.path.encode()).hexdigest()[:16]
        self.model = model.strip()
        self.api_key_env = api_key_env or None
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = max(0.0, float(backoff))
        self.extra_body = dict(extra_body or {})
        self.should_cancel = should_cancel
        self.structured = bool(structured)
        self._form_key = f"{self.url}\x00{self._url_digest}"
        self.name = f"openai:{self.model}"

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def cache_key(self) -> str:
        return json.dumps({"kind": "openai", "url": self.url, "path": self._url_digest, "model": self.model,
                           "api_key_env": self.api_key_env, "extra": self.extra_body}, sort_keys=True)

    # The request

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise BackendError(f"environment variable {self.api_key_env} is not set (it should hold the API "
                                   f"key for {self.url})")
            headers["Authorization"] = f"Bearer {key.strip()}"
        return headers

    def _body(self, messages, temperature, seed, max_new_tokens, form: str = "none", schema: Any = None) -> bytes:
        body = {"model": self.model, "messages": _check_messages(messages), "temperature": float(temperature),
                "max_tokens": int(max_new_tokens), "seed": int(seed), "stream": False}
        response_format = _response_format(form, schema)
        if response_format is not None:
            body["response_format"] = response_format
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    # Structured answers: the first response_format form this endpoint accepts

    def _forms(self, schema: Any) -> list[str]:
        if schema is None or not self.structured or "response_format" in self.extra_body:
            return ["none"]
        with _ENDPOINT_FORMS_LOCK:
            first = _ENDPOINT_FORMS.get(self._form_key, 0)
        return list(RESPONSE_FORMS[first:])

    def _refused(self, form: str, exc: EndpointHTTPError) -> None:
        """Remember (for this process) that the endpoint refuses ``form``; log it once."""
        with _ENDPOINT_FORMS_LOCK:
            nxt = RESPONSE_FORMS.index(form) + 1
            if _ENDPOINT_FORMS.get(self._form_key, 0) >= nxt:
                return
            _ENDPOINT_FORMS[self._form_key] = nxt
        logger.warning("planner endpoint %s refuses response_format %s (%s); using %s from now on", self.url, form,
                       exc, RESPONSE_FORMS[nxt])

    def response_form(self) -> str:
        """The response_format form this endpoint is asked with now (``none`` once every form was refused)."""
        return self._forms(object())[0]

    def _parse(self, status: int, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace")
        if status >= 400:
            detail = _error_detail(text)
            raise EndpointHTTPError(f"{self.url} answered HTTP {status}: {detail}", url=self.url, status=status)
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise EndpointBadResponseError(f"{self.url} did not answer JSON (HTTP {status}): {_snippet(text)}",
                                           url=self.url, status=status) from None
        try:
            content = doc["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointBadResponseError(f"{self.url} answered JSON without choices[0].message.content: "
                                           f"{_snippet(text)}", url=self.url, status=status) from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise EndpointBadResponseError(f"{self.url}: choices[0].message.content is "
                                           f"{type(content).__name__}, not text", url=self.url, status=status)
        return content

    @staticmethod
    def _retryable(exc: EndpointError) -> bool:
        if isinstance(exc, EndpointUnreachableError):
            return True
        if isinstance(exc, EndpointHTTPError) and _refuses_format(exc):
            return False  # a server that refuses a response_format says so again on every retry
        return isinstance(exc, EndpointHTTPError) and exc.status is not None and (exc.status == 429 or
                                                                                 exc.status >= 500)

    def _delay(self, attempt: int) -> float:
        return min(30.0, self.backoff * (2 ** attempt))

    def _give_up(self, exc: EndpointError, attempts: int) -> EndpointError:
        if attempts > 1:
            exc.args = (f"{exc.args[0]} (after {attempts} attempts)",)
        return exc

    def _retry_delay(self, exc: EndpointError, attempt: int, budget: CallBudget) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if attempt >= self.max_retries or not self._retryable(exc):
            return None
        delay = self._delay(attempt)
        if delay >= budget.remaining():
            return None  # the deadline would pass while waiting
        logger.warning("planner endpoint: %s; retrying (%d/%d)", exc, attempt + 1, self.max_retries)
        return delay

    def generate(self, messages, *, temperature=0.0, seed=0, max_new_tokens=256, use_adapter=False, tag="",
                 schema=None):
        headers = self._headers()
        budget = CallBudget(self.timeout, self.should_cancel)
        for form in self._forms(schema):
            body = self._body(messages, temperature, seed, max_new_tokens, form, schema)
            try:
                return Answer(self._exchange(body, headers, budget), form)
            except EndpointHTTPError as exc:
                if form == "none" or not _refuses_format(exc):
                    raise
                self._refused(form, exc)
        raise AssertionError("unreachable")

    async def agenerate(self, messages, *, temperature=0.0, seed=0, max_new_tokens=256, use_adapter=False, tag="",
                        schema=None):
        headers = self._headers()
        budget = CallBudget(self.timeout, self.should_cancel)
        for form in self._forms(schema):
            body = self._body(messages, temperature, seed, max_new_tokens, form, schema)
            try:
                return Answer(await self._aexchange(body, headers, budget), form)
            except EndpointHTTPError as exc:
                if form == "none" or not _refuses_format(exc):
                    raise
                self._refused(form, exc)
        raise AssertionError("unreachable")

    def _exchange(self, body: bytes, headers: dict[str, str], budget: CallBudget) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                reply = http_client.post(self._target, body, headers, budget=budget, max_bytes=_MAX_RESPONSE_BYTES)
                return self._parse(reply.status, reply.body)
            except EndpointError as exc:
                delay = self._retry_delay(exc, attempt, budget)
                if delay is None:
                    raise self._give_up(exc, attempt + 1) from None
            http_client.sleep(delay, budget, self.url)
        raise AssertionError("unreachable")

    async def _aexchange(self, body: bytes, headers: dict[str, str], budget: CallBudget) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                reply = await http_client.apost(self._target, body, headers, budget=budget,
                                                max_bytes=_MAX_RESPONSE_BYTES)
                return self._parse(reply.status, reply.body)
            except EndpointError as exc:
                delay = self._retry_delay(exc, attempt, budget)
                if delay is None:
                    raise self._give_up(exc, attempt + 1) from None
            await http_client.asleep(delay, budget, self.url)
        raise AssertionError("unreachable")


#: the response_format forms asked for, most specific first; an endpoint that refuses one gets the next
#: (json_object+schema: llama.cpp's server and llama-cpp-python read a schema there)
RESPONSE_FORMS = ("json_schema", "json_object+schema", "json_object", "none")
# endpoint -> index into RESPONSE_FORMS of the first form it has not refused; for the life of the process
_ENDPOINT_FORMS: dict[str, int] = {}
_ENDPOINT_FORMS_LOCK = threading.Lock()
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar", "unexpected field",
                 "not supported", "unsupported")


def _response_format(form: str, schema: Any) -> dict[str, Any] | None:
    if schema is None or form == "none":
        return None
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema.name, "strict": True, "schema": schema.schema}}
    if form == "json_object+schema":
        return {"type": "json_object", "schema": schema.schema}
    if form == "json_object":
        return {"type": "json_object"}
    raise ValueError(f"unknown response_format form {form!r}")


def _refuses_format(exc: EndpointHTTPError) -> bool:
    """Whether an HTTP error answers the request's response_format (not the model, the key or the load).

    Servers say so differently: 400 (OpenAI, llama.cpp, vLLM), 422 (FastAPI validation), 501, even 500
    (older llama.cpp forks); each names the field or the schema in the message.
    """
    status = exc.status or 0
    text = str(exc).lower()
    return status in (400, 422, 500, 501) and any(w in text for w in _FORMAT_WORDS)


def forget_endpoint_forms() -> None:
    """Forget which response_format forms endpoints refused (tests; a server that was upgraded)."""
    with _ENDPOINT_FORMS_LOCK:
        _ENDPOINT_FORMS.clear()


def _chat_url(base: Any) -> Any:
    """The chat-completions URL for a base URL (query kept); anything unparsable is left to Target.parse."""
    if not isinstance(base, str):
        return base
    try:
        parts = urllib.parse.urlsplit(base.strip())
    except ValueError:
        return base
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if re.search(r"/v\d+$", path) else "/v1/chat/completions"
    return urllib.parse.urlunsplit(parts._replace(path=path))


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _error_detail(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return _snippet(text) if text.strip() else "(empty body)"
    if isinstance(doc, dict):
        err = doc.get("error", doc.get("detail", doc))
        if isinstance(err, dict):
            err = err.get("message", err)
        return _snippet(str(err))
    return _snippet(text)


# --------------------------------------------------------------------------------------------------
# Local transformers model


def default_cache_dir() -> Path:
    """Where dequantised GGUF models are kept: ``$MEPG_LLM_CACHE_DIR``, else ``~/.cache/mepg/llm``."""
    env = os.environ.get("MEPG_LLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mepg" / "llm"


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, with where they came from."""

    model: Any
    tokenizer: Any
    source: str  # the folder or GGUF file given
    base_id: str  # what an adapter records as its base (the source path)
    from_cache: bool = False  # a GGUF served from its dequantised cache


def _resolve_model_path(model_path: str | os.PathLike[str], gguf_file: str | None) -> tuple[Path, str | None]:
    """``(folder, gguf file name or None)``; clear errors for missing paths."""
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model path {path} is a file but not a .gguf; give a model folder "
                                     "(config.json + weights) or a .gguf file")
        return path.parent.resolve(), path.name
    folder = path.resolve()
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise ModelNotFoundError(f"GGUF file not found: {folder / gguf_file}")
        return folder, gguf_file
    if (folder / "config.json").is_file():
        return folder, None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return folder, ggufs[0]
    if ggufs:
        raise ModelNotFoundError(f"model folder {folder} holds several GGUF files {ggufs}; name one (gguf_file=)")
    raise ModelNotFoundError(f"model folder {folder} has no config.json and no .gguf file")


# Sizes in a model's config.json that must be positive integers, with a bound no real model reaches.
_CONFIG_SIZES = {"hidden_size": 2**17, "intermediate_size": 2**20, "num_hidden_layers": 2**12,
                 "num_attention_heads": 2**12, "num_key_value_heads": 2**12, "vocab_size": 2**24,
                 "max_position_embeddings": 2**24}
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


def check_model_config(folder: Path) -> dict[str, Any]:
    """Read ``folder/config.json`` and check what transformers would otherwise fail on without naming the
    file: valid JSON (NaN, deep nesting refused), an object with a ``model_type``, sane integer sizes.
    Raises :class:`ModelNotFoundError` naming the file and the field."""
    from ..layout import load_json, short_repr

    path = folder / "config.json"
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelNotFoundError(f"{path}: {path.stat().st_size} bytes; a model's config.json is far smaller")
        config = load_json(path.read_bytes())
    except OSError as exc:
        raise ModelNotFoundError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ModelNotFoundError(f"{path}: the model's config is {exc}") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{path}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise ModelNotFoundError(f"{path}: 'model_type' must name the architecture (e.g. \"qwen2\"), got "
                                 f"{short_repr(model_type)}")
    for key, limit in _CONFIG_SIZES.items():
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ModelNotFoundError(f"{path}: '{key}' must be a positive integer up to {limit}, got "
                                         f"{short_repr(value)}")
    return config


def _file_stamp(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path), "missing": True}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_stamp(folder: Path) -> list[dict[str, Any]]:
    names = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin",
                                                                              ".model", ".txt", ".jinja"))
    return [_file_stamp(p) for p in names]


def _gguf_cache_folder(gguf_path: Path, cache_dir: Path) -> Path:
    import transformers

    stamp = _file_stamp(gguf_path)
    stamp["transformers"] = transformers.__version__
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{gguf_path.stem}-{digest}"


def _strip_gguf_quantizer(model: Any) -> None:
    # transformers dequantises GGUF weights on load (no GGUF matmul kernel on CPU) but keeps the quantiser
    # attached, which makes save_pretrained refuse. The weights are plain tensors: forget the quantiser.
    model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def load_causal_lm(model_path: str | os.PathLike[str], *, gguf_file: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu",
                   dtype: str = "auto") -> LoadedModel:
    """Load a causal LM + tokenizer from a local folder or GGUF file (local files only, never the hub).

    A GGUF is dequantised by transformers, saved with ``save_pretrained`` into
    ``cache_dir/<stem>-<digest of path, size, mtime, transformers version>`` and loaded from there on
    later calls. An unwritable cache only costs speed (logged).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _resolve_model_path(model_path, gguf_file)
    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    source = str(folder / gguf) if gguf else str(folder)
    load_kwargs = {"dtype": torch_dtype, "local_files_only": True}

    if gguf is None:
        check_model_config(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(folder), **load_kwargs)
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a damaged model folder
            raise ModelNotFoundError(f"cannot load a causal language model from {folder}: "
                                     f"{type(exc).__name__}: {_snippet(str(exc), 400)[1:-1]}") from None
        return LoadedModel(_to_device(model, device), tokenizer, source, source)

    gguf_path = folder / gguf
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = _gguf_cache_folder(gguf_path, cache_root)
    if (cached / _GGUF_CACHE_MARKER).is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(cached), **load_kwargs)
            return LoadedModel(_to_device(model, device), tokenizer, source, source, from_cache=True)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("GGUF cache %s is unreadable (%s); converting again", cached, exc)

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotFoundError(f"cannot load GGUF model {gguf_path}: {exc}") from exc
    _strip_gguf_quantizer(model)
    logger.info("dequantised %s in %.1f s", gguf_path, time.perf_counter() - started)
    try:
        _save_atomically(model, tokenizer, cached, {"gguf": _file_stamp(gguf_path)})
    except OSError as exc:
        logger.warning("cannot write the GGUF cache %s (%s); the next load will convert again", cached, exc)
        return LoadedModel(_to_device(model.to(torch_dtype), device), tokenizer, source, source)
    # Reload from the cache: the same plain model the next run gets, without the GGUF loading state.
    del model
    tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(cached), **load_kwargs)
    return LoadedModel(_to_device(model, device), tokenizer, source, source, from_cache=False)


def _save_atomically(model: Any, tokenizer: Any, target: Path, info: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        _rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / _GGUF_CACHE_MARKER).write_text(json.dumps(info, indent=2))
    if target.exists():  # another process finished first; keep theirs
        _rmtree(tmp)
        return
    os.replace(tmp, target)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _resolve_device(device: str) -> str:
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype in (None, "auto"):
        # fp32 on CPU (half precision is slow there); bf16 where the GPU has it.
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise BackendError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def _to_device(model: Any, device: str) -> Any:
    model = model.to(device)
    model.eval()
    return model


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a base model for an adapter: architecture sizes + a digest of its embedding weights."""
    import torch

    cfg = model.config
    summary = {key: getattr(cfg, key, None) for key in ("model_type", "hidden_size", "num_hidden_layers",
                                                        "intermediate_size", "num_attention_heads",
                                                        "num_key_value_heads", "vocab_size")}
    emb = model.get_input_embeddings().weight
    sample = emb.detach().reshape(-1)[:4096].to(torch.float32).cpu().numpy().tobytes()
    summary["embedding_digest"] = hashlib.sha256(sample).hexdigest()[:16]
    return summary


def _describe(fp: dict[str, Any]) -> str:
    return (f"{fp.get('model_type')}, hidden {fp.get('hidden_size')}, {fp.get('num_hidden_layers')} layers, "
            f"vocab {fp.get('vocab_size')}")


_STRUCTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "vocab_size")


def check_adapter_matches(adapter_dir: Path, model: Any, model_id: str) -> list[str]:
    """Raise :class:`AdapterMismatchError` if the adapter cannot belong to ``model``; return warnings."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_base = config.get("base_model_name_or_path") or "(not recorded)"
    sidecar_path = adapter_dir / ADAPTER_SIDECAR
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    recorded = sidecar.get("base_fingerprint") or {}
    have = model_fingerprint(model)
    warnings: list[str] = []

    problems: list[str] = []
    if recorded:
        for key in _STRUCTURE_KEYS:
            if key in recorded and recorded[key] != have.get(key):
                problems.append(f"{key} {recorded[key]} vs {have.get(key)}")
        if not problems and recorded.get("embedding_digest") not in (None, have["embedding_digest"]):
            warnings.append(f"adapter {adapter_dir} was trained on {adapter_base!r}, whose weights differ from "
                            f"{model_id!r} (same architecture): results may be off")

    # Shapes: every LoRA pair must sit on a module of the base with matching in/out features.
    modules = dict(model.named_modules())
    weights = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not match:
                continue
            module_name, which = match.group(1), match.group(2)
            shape = f.get_slice(key).get_shape()
            module = modules.get(module_name)
            if module is None:
                problems.append(f"module {module_name} does not exist in the loaded model")
            elif hasattr(module, "in_features") and hasattr(module, "out_features"):
                if which == "A" and shape[1] != module.in_features:
                    problems.append(f"{module_name}: adapter input {shape[1]} vs model {module.in_features}")
                if which == "B" and shape[0] != module.out_features:
                    problems.append(f"{module_name}: adapter output {shape[0]} vs model {module.out_features}")
            if len(problems) >= 6:
                break
    if problems:
        expected = f" ({_describe(recorded)})" if recorded else ""
        raise AdapterMismatchError(
            f"LoRA adapter {adapter_dir} was trained for base model {adapter_base!r}{expected}, but the loaded "
            f"model is {model_id!r} ({_describe(have)}): " + "; ".join(problems[:6]))
    return warnings


class JSONEndScanner:
    """Watches generated text and says when the first JSON object in it is complete.

    The planner asks for one JSON object; a model that has closed it and goes on writing prose only
    spends time. Scanning starts at the first ``{``; braces and brackets inside strings do not count.
    """

    def __init__(self) -> None:
        self.started = False
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def feed(self, text: str) -> bool:
        for ch in text:
            if self.done:
                break
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif not self.started:
                if ch == "{":
                    self.started, self.depth = True, 1
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
        return self.done


def _json_end_criteria(tokenizer: Any, prompt_length: int) -> Any:
    from transformers import StoppingCriteria

    class _StopAfterJSON(StoppingCriteria):
        def __init__(self) -> None:
            self.scanner = JSONEndScanner()
            self.seen = prompt_length

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            new = input_ids[0, self.seen:].tolist()
            self.seen = input_ids.shape[1]
            done = self.scanner.feed(tokenizer.decode(new, skip_special_tokens=True)) if new else False
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return _StopAfterJSON()


class TransformersBackend(ChatBackend):
    """A local causal LM (folder or GGUF) with an optional LoRA adapter, loaded once.

    ``model_path``: a folder with ``config.json`` and weights, a folder with one ``.gguf``, or a ``.gguf``
    file. ``adapter_path``: a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    ``cache_dir``: where dequantised GGUF models are kept (default :func:`default_cache_dir`).
    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...; ``dtype``: ``auto`` (fp32 on CPU) or a name.
    ``stop_after_json``: end an answer once its first JSON object is closed (the planner asks for one).
    ``constrain``: ``"auto"`` decodes a call that comes with a schema under that schema's grammar when
    llguidance is installed (:mod:`.constrain`), ``"off"`` never does. :attr:`constrained` says
    whether it will; each :class:`Answer` says whether it was. ``grammar_repetition_penalty``: the
    repetition penalty of constrained calls (the grammar fixes the JSON's keys and punctuation; the
    penalty keeps a small model from filling a free text with one phrase over and over).
    """

    def __init__(self, model_path: str | os.PathLike[str], *, gguf_file: str | None = None,
                 adapter_path: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 device: str = "auto", dtype: str = "auto", top_p: float = 0.95, stop_after_json: bool = True,
                 constrain: str = "auto", grammar_repetition_penalty: float = 1.2):
        if constrain not in ("auto", "off"):
            raise BackendError(f"constrain must be 'auto' or 'off', got {constrain!r}")
        self._lock = threading.Lock()
        self.top_p = float(top_p)
        self.stop_after_json = bool(stop_after_json)
        self.constrain = constrain
        self.grammar_repetition_penalty = float(grammar_repetition_penalty)
        self._ll_tokenizer: Any = None
        self.warnings: list[str] = []
        adapter_dir = self._check_adapter_folder(adapter_path) if adapter_path else None
        loaded = load_causal_lm(model_path, gguf_file=gguf_file, cache_dir=cache_dir, device=device, dtype=dtype)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.device = str(next(loaded.model.parameters()).device)
        self.model_path = loaded.source
        self.adapter_path = str(adapter_dir) if adapter_dir else None
        self._stamp = {"model": loaded.source, "files": self._model_files_stamp(loaded.source),
                       "adapter": None, "device": self.device, "dtype": str(next(loaded.model.parameters()).dtype)}
        if adapter_dir is not None:
            self.warnings += check_adapter_matches(adapter_dir, loaded.model, loaded.base_id)
            for w in self.warnings:
                logger.warning("%s", w)
            from peft import PeftModel

            try:
                with warnings.catch_warnings():
                    # peft asks transformers a deprecated question about gradient checkpointing.
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                            category=FutureWarning)
                    self.model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=False)
            except Exception as exc:  # noqa: BLE001 - peft raises many types for a broken adapter
                raise AdapterMismatchError(f"cannot apply LoRA adapter {adapter_dir} to {loaded.base_id}: "
                                           f"{type(exc).__name__}: {exc}") from exc
            self.model.eval()
            self.has_adapter = True
            self._stamp["adapter"] = [_file_stamp(adapter_dir / "adapter_config.json"),
                                      _file_stamp(adapter_dir / "adapter_model.safetensors")]
        else:
            self.model = loaded.model
            self.has_adapter = False
        self.name = "transformers:" + Path(loaded.source).name + (
            f"+{Path(self.adapter_path).name}" if self.adapter_path else "")
        self._closed = False

    @staticmethod
    def _check_adapter_folder(adapter_path: str | os.PathLike[str]) -> Path:
        folder = Path(adapter_path).expanduser()
        if not folder.exists():
            raise ModelNotFoundError(f"LoRA adapter path not found: {folder}")
        if not folder.is_dir():
            raise ModelNotFoundError(f"LoRA adapter path {folder} is not a folder (expected adapter_config.json "
                                     "and adapter_model.safetensors in it)")
        if not (folder / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"LoRA adapter folder {folder} has no adapter_config.json")
        if not (folder / "adapter_model.safetensors").is_file():
            extra = " (only safetensors adapters are loaded, never pickled .bin files)" \
                if (folder / "adapter_model.bin").exists() else ""
            raise ModelNotFoundError(f"LoRA adapter folder {folder} has no adapter_model.safetensors{extra}")
        return folder.resolve()

    @staticmethod
    def _model_files_stamp(source: str) -> Any:
        path = Path(source)
        return _file_stamp(path) if path.is_file() else _folder_stamp(path)

    def cache_key(self) -> str:
        return json.dumps({"kind": "transformers", **self._stamp, "constrained": self.constrained,
                           "grammar_repetition_penalty": self.grammar_repetition_penalty}, sort_keys=True)

    @property
    def constrained(self) -> bool:
        """Whether calls with a schema are decoded under its grammar (llguidance installed, not switched off)."""
        from . import constrain

        return self.constrain == "auto" and constrain.available()

    def _grammar_processor(self, schema: Any, prompt_length: int) -> Any:
        from . import constrain

        if self._ll_tokenizer is None:
            self._ll_tokenizer = constrain.ll_tokenizer(self.tokenizer)
        try:
            return constrain.make_processor(self._ll_tokenizer, schema.schema, prompt_length)
        except constrain.ConstraintError as exc:
            raise BackendError(f"{self.name}: {exc}") from exc

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model_path!r}, adapter={self.adapter_path!r}, device={self.device!r})"

    # Encoding

    def encode(self, messages: list[dict[str, str]]) -> Any:
        """Token ids (1 x n tensor on the model's device) of ``messages`` ready for the assistant's answer."""
        messages = _check_messages(messages)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
        else:
            # No chat template: a plain transcript the base model can continue.
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
            ids = tok(text, return_tensors="pt")["input_ids"]
        return ids.to(self.current_device())

    def current_device(self) -> Any:
        """Where the weights are now (a host's memory manager may have moved them since loading)."""
        return next(self.model.parameters()).device

    def _adapter_context(self, use_adapter: bool) -> Any:
        if self.has_adapter and not use_adapter:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    # Generation

    def generate(self, messages, *, temperature=0.0, seed=0, max_new_tokens=256, use_adapter=False, tag="",
                 schema=None):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        if self._closed:
            raise BackendError(f"{self.name} was closed")
        input_ids = self.encode(messages)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and input_ids.shape[1] + max_new_tokens > limit:
            raise BackendError(f"{self.name}: the request is {input_ids.shape[1]} tokens and {max_new_tokens} more "
                               f"are asked for, but the model reads at most {limit}")
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        if temperature and temperature > 0:
            config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=True,
                                      temperature=float(temperature), top_p=self.top_p, eos_token_id=eos,
                                      pad_token_id=pad)
        else:
            config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, eos_token_id=eos,
                                      pad_token_id=pad)
        grammar_wanted = schema is not None and self.constrained
        if grammar_wanted and self.grammar_repetition_penalty != 1.0:
            config.repetition_penalty = self.grammar_repetition_penalty
        device = input_ids.device
        devices = [device] if device.type == "cuda" else []
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=devices):
            # A private RNG stream per call: the same seed gives the same sample, and nothing else's
            # random state moves.
            torch.manual_seed(int(seed))
            grammar = self._grammar_processor(schema, input_ids.shape[1]) if grammar_wanted else None
            with self._adapter_context(use_adapter):
                stops = [_json_end_criteria(self.tokenizer, input_ids.shape[1])] if self.stop_after_json else []
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          generation_config=config, stopping_criteria=stops or None,
                                          logits_processor=LogitsProcessorList([grammar]) if grammar else None)
        text = self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        return Answer(text, "grammar" if grammar is not None else "none")

    def next_token_logits(self, messages: list[dict[str, str]], *, use_adapter: bool = False) -> Any:
        """The model's logits for the first answer token (a cheap probe of adapter on/off)."""
        import torch

        input_ids = self.encode(messages)
        with self._lock, torch.inference_mode(), self._adapter_context(use_adapter):
            return self.model(input_ids=input_ids).logits[0, -1].float().cpu()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.model = None
        self.loaded = None
        import gc

        gc.collect()


# --------------------------------------------------------------------------------------------------
# Construction helpers for nodes and command lines

_BACKEND_CACHE: dict[str, TransformersBackend] = {}
_BACKEND_CACHE_LOCK = threading.Lock()


def load_transformers_backend(model_path: str | os.PathLike[str], *, gguf_file: str | None = None,
                              adapter_path: str | os.PathLike[str] | None = None,
                              cache_dir: str | os.PathLike[str] | None = None, device: str = "auto",
                              dtype: str = "auto", keep: int = 1) -> TransformersBackend:
    """A :class:`TransformersBackend`, reused while its files are unchanged (at most ``keep`` held).

    Keyed by the resolved paths, their sizes and modification times, device and dtype: a node can call
    this on every run without reloading the model.
    """
    folder, gguf = _resolve_model_path(model_path, gguf_file)
    source = folder / gguf if gguf else folder
    adapter = Path(adapter_path).expanduser().resolve() if adapter_path else None
    key = json.dumps({
        "model": str(source),
        "stamp": _file_stamp(source) if gguf else _folder_stamp(folder),
        "adapter": None if adapter is None else [str(adapter), _file_stamp(adapter / "adapter_config.json"),
                                                 _file_stamp(adapter / "adapter_model.safetensors")],
        "cache_dir": str(cache_dir) if cache_dir else None, "device": device, "dtype": dtype,
    }, sort_keys=True)
    with _BACKEND_CACHE_LOCK:
        hit = _BACKEND_CACHE.get(key)
        if hit is not None and not hit._closed:
            return hit
        # One model at a time by default: planner models are large next to the diffusion models.
        while len(_BACKEND_CACHE) >= max(1, keep):
            _old_key, old = _BACKEND_CACHE.popitem()
            old.close()
        backend = TransformersBackend(source, adapter_path=adapter, cache_dir=cache_dir, device=device,
                                      dtype=dtype)
        _BACKEND_CACHE[key] = backend
        return backend


def clear_backend_cache() -> None:
    """Close and forget every backend :func:`load_transformers_backend` holds."""
    with _BACKEND_CACHE_LOCK:
        for backend in _BACKEND_CACHE.values():
            backend.close()
        _BACKEND_CACHE.clear()


def make_backend(kind: str, **options: Any) -> ChatBackend | None:
    """``"offline"`` -> ``None`` (the offline planner); ``"transformers"`` -> :func:`load_transformers_backend`
    (``model_path``, ``gguf_file``, ``adapter_path``, ``cache_dir``, ``device``, ``dtype``); ``"openai"`` ->
    :class:`OpenAIBackend` (``base_url``, ``model``, ``api_key_env``, ``timeout``, ``max_retries``)."""
    kind = (kind or "offline").strip().lower()
    if kind == "offline":
        return None
    if kind == "transformers":
        if not options.get("model_path"):
            raise BackendError("the transformers backend needs model_path (a model folder or .gguf file)")
        return load_transformers_backend(**options)
    if kind == "openai":
        return OpenAIBackend(**options)
    raise BackendError(f"unknown backend {kind!r}; use offline, transformers or openai")
