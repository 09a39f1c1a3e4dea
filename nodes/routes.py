"""Server routes under ``/mepg/`` for the layout editor's live feedback. No node depends on them.

- ``POST /mepg/plan`` ``{"prompt", "width"?, "height"?, "max_regions"?, "seed"?}`` -> the offline
  planner's layout for that prompt: ``{"layout", "source_hash", "warnings"}``.
- ``POST /mepg/validate`` ``{"layout", "experts"?}`` -> ``{"ok": true, "layout" (normalised),
  "source_hash", "warnings"}`` or ``{"ok": false, "errors": ["regions[1].box: ...", ...]}``.
- ``GET /mepg/experts?stack=<JSON list>`` -> the expert names of a stack described by the loader nodes
  the editor found upstream in the graph (each ``{"kind": "checkpoint"|"lora", "file", "name"}``, in
  stack order): ``{"names": ["base", ...], "experts": [...], "problems": [...], "available": {...}}``.
  Names follow ExpertStackLoader's rule (the name widget, else the file name without extension); files
  are only looked up in ComfyUI's model lists, never opened.

Malformed requests get HTTP 400 (413 when too large, 408 when the body does not arrive in time) with
``{"error": "..."}`` naming the field. Bodies are read whole, however the client sends them (chunked,
slow writes). ComfyUI also serves every route under ``/api``. Registered once, at pack import, and only
when a ``PromptServer`` exists.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

from ..mepg_core.editor_state import EditorStateError, check_experts, layout_hash
from ..mepg_core.layout import MAX_CANVAS, MAX_REGIONS, LayoutError, load_json, parse_layout, short_repr
from ..mepg_core.planner import plan_offline

log = logging.getLogger("mepg")

MAX_PLAN_BODY = 64 * 1024
MAX_VALIDATE_BODY = 512 * 1024
MAX_PROMPT_CHARS = 2000
MAX_STACK_QUERY_CHARS = 6000  # below aiohttp's 8190-byte request line
MAX_STACK_ENTRIES = 32
MAX_NAME_CHARS = 512
MAX_SEED = 0xFFFFFFFF
BODY_TIMEOUT_S = 10.0  # a body not complete after this long is refused (408): no handler waits for ever
_READ_CHUNK = 64 * 1024
KINDS = {"checkpoint": "checkpoints", "lora": "loras"}
_REGISTERED_FLAG = "_mepg_routes_registered"


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(exc: RequestError):
    from aiohttp import web

    return web.json_response({"error": str(exc)}, status=exc.status)


async def read_body(request, limit: int, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The whole request body, however it is sent (Content-Length or chunked, in any number of writes).

    413 past ``limit`` bytes (announced or received), 408 when it has not arrived within ``timeout``
    seconds, 400 when the transfer breaks off.
    """
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(f"body: {request.content_length} bytes; at most {limit}", 413)
    chunks: list[bytes] = []
    size = 0

    async def read_all() -> None:
        nonlocal size
        while chunk := await request.content.read(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body: more than {limit} bytes", 413)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read_all(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"body: not received in full within {timeout:g} s", 408) from None
    except (ConnectionError, EOFError) as exc:
        raise RequestError(f"body: the transfer broke off ({type(exc).__name__})") from None
    except Exception as exc:  # aiohttp's payload errors (a broken chunked encoding) have no common base here
        if type(exc).__module__.startswith("aiohttp"):
            raise RequestError(f"body: the transfer is malformed ({type(exc).__name__})") from None
        raise
    return b"".join(chunks)


async def _read_json_object(request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        obj = load_json(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(f"body: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise RequestError(f"body: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(f"body: expected a JSON object, got {type(obj).__name__}")
    return obj



def _int_field(obj: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{key}: must be an integer in [{lo}, {hi}], got {short_repr(value)}")
    return value


def _check_keys(obj: dict, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise RequestError(f"{short_repr(unknown[0])[1:-1]}: unknown key (allowed: {', '.join(allowed)})")


# --------------------------------------------------------------------------------------------------
# Pure request handling (tested without a server)


def plan_request(obj: dict[str, Any]) -> dict[str, Any]:
    _check_keys(obj, ("prompt", "width", "height", "max_regions", "seed"))
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"prompt: must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt: {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    if not prompt.strip():
        raise RequestError("prompt: empty; describe the picture to plan")
    width = _int_field(obj, "width", 1024, 64, MAX_CANVAS)
    height = _int_field(obj, "height", 1024, 64, MAX_CANVAS)
    max_regions = _int_field(obj, "max_regions", 16, 1, MAX_REGIONS)
    seed = _int_field(obj, "seed", 0, 0, MAX_SEED)
    try:
        planned = plan_offline(prompt, max_regions=max_regions, width=width, height=height, seed=seed)
        layout, warnings = parse_layout(planned, max_regions=max_regions)
    except (ValueError, LayoutError) as exc:
        raise RequestError(f"prompt: cannot be planned ({exc})") from None
    return {"layout": layout.to_dict(), "source_hash": layout_hash(layout), "warnings": warnings}


def validate_request(obj: dict[str, Any]) -> dict[str, Any]:
    _check_keys(obj, ("layout", "experts"))
    if "layout" not in obj:
        raise RequestError("layout: missing; send {\"layout\": {...}}")
    raw = obj["layout"]
    if not isinstance(raw, (dict, str)):
        raise RequestError(f"layout: expected an object or JSON text, got {type(raw).__name__}")
    experts = obj.get("experts")
    if experts is not None and (not isinstance(experts, list) or len(experts) > MAX_STACK_ENTRIES
                                or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in experts)):
        raise RequestError(f"experts: must be a list of at most {MAX_STACK_ENTRIES} names")
    try:
        layout, warnings = parse_layout(raw)
    except LayoutError as exc:
        return {"ok": False, "errors": exc.problems}
    if experts is not None:
        try:
            check_experts(layout, experts)
        except EditorStateError as exc:
            return {"ok": False, "errors": exc.problems}
    return {"ok": True, "layout": layout.to_dict(), "source_hash": layout_hash(layout), "warnings": warnings}


def parse_stack_query(text: str | None) -> list[dict[str, str]]:
    if text is None or not text.strip():
        return []
    if len(text) > MAX_STACK_QUERY_CHARS:
        raise RequestError(f"stack: {len(text)} characters; at most {MAX_STACK_QUERY_CHARS}")
    try:
        raw = load_json(text)
    except ValueError as exc:
        raise RequestError(f"stack: {exc}") from None
    if not isinstance(raw, list):
        raise RequestError(f"stack: expected a JSON list, got {type(raw).__name__}")
    if len(raw) > MAX_STACK_ENTRIES:
        raise RequestError(f"stack: {len(raw)} entries; at most {MAX_STACK_ENTRIES}")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise RequestError(f"stack[{i}]: expected an object with kind, file and name")
        kind, file, name = entry.get("kind"), entry.get("file", ""), entry.get("name", "")
        if not isinstance(kind, str) or kind not in KINDS:
            raise RequestError(f"stack[{i}].kind: must be one of {', '.join(KINDS)}, got {short_repr(kind)}")
        for key, value in (("file", file), ("name", name)):
            if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
                raise RequestError(f"stack[{i}].{key}: must be a string of at most {MAX_NAME_CHARS} characters")
        out.append({"kind": kind, "file": file, "name": name})
    return out


def experts_request(stack_text: str | None) -> dict[str, Any]:
    from .expert_nodes import expert_name, parse_tags, safetensors_files

    stack = parse_stack_query(stack_text)
    available = {folder: safetensors_files(folder) for folder in KINDS.values()}
    names, experts, problems, seen = ["base"], [], [], {"base"}
    for i, entry in enumerate(stack):
        if not entry["file"] and not entry["name"].strip():
            problems.append(f"stack[{i}]: no file chosen and no name")
            continue
        name = expert_name(entry["name"], entry["file"])
        found = entry["file"] in available[KINDS[entry["kind"]]]
        if not found:
            problems.append(f"stack[{i}].file: {entry['file']!r} is not in models/{KINDS[entry['kind']]}")
        if name.lower() in seen:
            problems.append(f"stack[{i}].name: {name!r} is already in the stack (names must be unique; 'base' is "
                            "reserved)")
            continue
        seen.add(name.lower())
        names.append(name)
        experts.append({"name": name, "kind": entry["kind"], "file": entry["file"], "found": found,
                        "tags": list(parse_tags("", entry["file"])) if entry["file"] else []})
    return {"names": names, "experts": experts, "problems": problems, "available": available}


# --------------------------------------------------------------------------------------------------
# aiohttp handlers


async def handle_plan(request):
    from aiohttp import web

    try:
        obj = await _read_json_object(request, MAX_PLAN_BODY)
        result = await asyncio.get_running_loop().run_in_executor(None, plan_request, obj)
    except RequestError as exc:
        return _error(exc)
    return web.json_response(result)


async def handle_validate(request):
    from aiohttp import web

    try:
        result = validate_request(await _read_json_object(request, MAX_VALIDATE_BODY))
    except RequestError as exc:
        return _error(exc)
    return web.json_response(result)


async def handle_experts(request):
    from aiohttp import web

    try:
        result = experts_request(request.query.get("stack"))
    except RequestError as exc:
        return _error(exc)
    return web.json_response(result)


def register_routes() -> bool:
    """Add the routes to ComfyUI's server, once; False (and nothing done) when there is no server.

    ComfyUI imports its ``server`` module and makes ``PromptServer.instance`` before it loads custom
    nodes; in-process uses of the pack (tests, scripts) have no server and get no routes.
    """
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None:
        return False
    if getattr(instance, _REGISTERED_FLAG, False):
        return True
    routes.post("/mepg/plan")(handle_plan)
    routes.post("/mepg/validate")(handle_validate)
    routes.get("/mepg/experts")(handle_experts)
    setattr(instance, _REGISTERED_FLAG, True)
    log.info("MEPG: layout editor routes registered under /mepg/")
    return True
