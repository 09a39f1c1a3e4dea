"""Plan a file of prompts into a file of layouts.

    python -m mepg_core.planner --in PROMPTS.jsonl --out LAYOUTS.jsonl [--backend offline]
        [--max-regions N] [--width W --height H] [--seed S] [--keep-going]

Each input line is a JSON object with at least ``"prompt"`` (GenEval's metadata lines work as they are);
``"seed"``, ``"width"``, ``"height"`` and ``"max_regions"`` on a line override the command-line values for
that line. Each output line is the layout (schema v1 JSON) for the input line at the same position.
``-`` reads stdin / writes stdout. A line that cannot be planned stops the run with its line number, or
with ``--keep-going`` becomes ``{"error": "..."}`` in its place (exit status 1 at the end).

Backends: ``offline`` (default) is :func:`~mepg_core.planner.offline.plan_offline`. ``transformers``
and ``openai`` run the LLM chain and are loaded only when asked for; the CLI calls

    backend = backends.make_backend(kind, **options)          # mepg_core/planner/backends.py
    result = chain.plan_with_backend(prompt, backend, max_regions=N, width=W, height=H, seed=S,
                                     temperature=T)           # mepg_core/planner/chain.py
    layout = result.layout                                    # or the result itself if it is a layout

with ``options`` = ``model_path``, ``gguf_file``, ``adapter_path``, ``device`` (transformers) or
``base_url``, ``model``, ``api_key_env``, ``timeout`` (openai), from the flags below. Score the output
with ``python -m mepg_core.planner.scoring --layouts LAYOUTS.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ..layout import Layout, LayoutError, parse_layout
from .offline import plan_offline

BACKENDS = ("offline", "transformers", "openai")
_LINE_OVERRIDES = ("seed", "width", "height", "max_regions")


class CommandError(Exception):
    """A problem the command line reports in one line and exits 2 for."""


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mepg_core.planner",
        description="Plan prompts (JSONL, one {\"prompt\": ...} per line) into layouts (JSONL).")
    ap.add_argument("--in", dest="inp", required=True, help="input JSONL ('-' for stdin)")
    ap.add_argument("--out", dest="out", required=True, help="output JSONL ('-' for stdout)")
    ap.add_argument("--backend", choices=BACKENDS, default="offline", help="planner backend (default: offline)")
    ap.add_argument("--max-regions", type=int, default=16, help="at most this many regions per layout")
    ap.add_argument("--width", type=int, default=1024, help="canvas width in pixels")
    ap.add_argument("--height", type=int, default=1024, help="canvas height in pixels")
    ap.add_argument("--seed", type=int, default=0, help="0: canonical layouts; other seeds jitter reproducibly")
    ap.add_argument("--engine", choices=("rules", "english"), default="english",
                    help="offline backend: 'english' (default: spaCy parse + composition arranger) or 'rules' "
                         "(the earlier word rules)")
    ap.add_argument("--keep-going", action="store_true", help="write {\"error\": ...} for a bad line and go on")
    llm = ap.add_argument_group("LLM backends (transformers, openai)")
    llm.add_argument("--model-path", help="transformers: model folder or .gguf file")
    llm.add_argument("--gguf-file", help="transformers: the .gguf file inside --model-path")
    llm.add_argument("--adapter-path", help="transformers: PEFT LoRA adapter folder for step 0")
    llm.add_argument("--device", default=None, help="transformers: cpu, cuda, auto")
    llm.add_argument("--base-url", help="openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    llm.add_argument("--model", help="openai: model name the server should use")
    llm.add_argument("--api-key-env", help="openai: NAME of the environment variable holding the API key")
    llm.add_argument("--timeout", type=float, default=None, help="openai: seconds per request")
    llm.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    llm.add_argument("--boxes-from", choices=("llm", "arranger"), default="llm",
                     help="step 2's boxes from the model (llm) or from the offline planner's arranger")
    return ap


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.backend == "transformers":
        pairs = {"model_path": args.model_path, "gguf_file": args.gguf_file, "adapter_path": args.adapter_path,
                 "device": args.device}
    else:
        pairs = {"base_url": args.base_url, "model": args.model, "api_key_env": args.api_key_env,
                 "timeout": args.timeout}
    return {k: v for k, v in pairs.items() if v is not None}


def make_planner(args: argparse.Namespace) -> Callable[..., Layout]:
    """A function ``(prompt, *, max_regions, width, height, seed) -> Layout`` for the chosen backend."""
    if args.backend == "offline":
        engine = getattr(args, "engine", "english")
        return lambda prompt, **kw: plan_offline(prompt, engine=engine, **kw)
    try:
        from .backends import make_backend
        from .chain import plan_with_backend
    except ImportError as exc:
        raise CommandError(f"backend {args.backend!r} is not available: the LLM planner modules "
                           f"(mepg_core/planner/chain.py, backends.py) could not be imported ({exc}); "
                           "use --backend offline") from None
    options = _backend_options(args)
    required = ("model_path",) if args.backend == "transformers" else ("base_url", "model")
    missing = ["--" + k.replace("_", "-") for k in required if not options.get(k)]
    if missing:
        raise CommandError(f"backend {args.backend!r} needs {' and '.join(missing)}")
    try:
        backend = make_backend(args.backend, **options)
    except Exception as exc:  # the backend's own error says what is missing (model folder, URL ...)
        raise CommandError(f"backend {args.backend!r} could not be set up: {exc}") from None

    def plan(prompt: str, **kwargs: Any) -> Layout:
        result = plan_with_backend(prompt, backend, temperature=args.temperature, boxes_from=args.boxes_from,
                                   **kwargs)
        layout = getattr(result, "layout", result)
        return layout if isinstance(layout, Layout) else parse_layout(layout)[0]

    return plan


def _open_in(path: str) -> TextIO:
    return sys.stdin if path == "-" else open(path, encoding="utf-8")


def _open_out(path: str) -> TextIO:
    return sys.stdout if path == "-" else open(path, "w", encoding="utf-8")


def _line_settings(obj: dict[str, Any], args: argparse.Namespace, where: str) -> dict[str, Any]:
    settings = {"seed": args.seed, "width": args.width, "height": args.height, "max_regions": args.max_regions}
    for key in _LINE_OVERRIDES:
        if key in obj:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
            settings[key] = value
    return settings


def run(args: argparse.Namespace) -> int:
    planner = make_planner(args)
    errors = 0
    try:
        src = _open_in(args.inp)
    except OSError as exc:
        raise CommandError(f"cannot read {args.inp}: {exc}") from None
    with src:
        lines = list(src)
    try:
        dst = _open_out(args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from None
    try:
        for no, line in enumerate(lines, 1):
            where = f"{args.inp}:{no}"
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"{where}: expected a JSON object with a string \"prompt\"")
                settings = _line_settings(obj, args, where)
                layout = planner(obj["prompt"], **settings)
                dst.write(json.dumps(layout.to_dict(), ensure_ascii=False) + "\n")
            except Exception as exc:
                # The offline planner raises ValueError/TypeError for bad input; anything else is a bug.
                # An LLM backend may fail in its own ways (endpoint down, HTTP 500): report the line.
                if args.backend == "offline" and not isinstance(exc, (ValueError, TypeError, LayoutError)):
                    raise
                msg = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
                if not args.keep_going:
                    raise CommandError(msg) from None
                errors += 1
                print(f"error: {msg}", file=sys.stderr)
                dst.write(json.dumps({"error": msg}, ensure_ascii=False) + "\n")
    finally:
        if dst is not sys.stdout:
            dst.close()
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return run(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
