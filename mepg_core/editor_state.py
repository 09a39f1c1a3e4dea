"""The layout editor's state: an edited layout plus the hash of the layout it was edited from.

The editor node keeps its state in one string widget (``editor_state``) so saved workflows and
API-queued prompts carry the edits and a headless run needs no browser. Its JSON form (version 1)::

    {"version": 1, "source_hash": "3f2a9c0d1b7e4a55", "layout": { ...a schema-v1 layout... }}

- ``layout``: the edited layout (read with :func:`~mepg_core.layout.parse_layout`, like every layout).
- ``source_hash``: :func:`layout_hash` of the input layout the edits were made on, or ``null`` for a
  layout written from scratch.

Which layout the node uses (:func:`resolve`):

- no input layout: the edited layout (an empty state is an error: there is nothing to edit);
- an input layout whose hash equals ``source_hash``: the edited layout (the edits are based on it);
- otherwise (the input changed, or the state is empty or has no ``source_hash``): the input layout; the
  node sends it to the editor in the browser, which starts a new state from it.

A bare layout object (no ``layout`` key) is accepted as a state with ``source_hash`` null. Nothing here
imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .layout import Layout, LayoutError, load_json, parse_layout, short_repr

STATE_VERSION = 1
# 64 regions with every text at its 2000-character limit stay below this.
MAX_STATE_CHARS = 1_000_000
HASH_CHARS = 16
BASE_EXPERT = "base"
_STATE_KEYS = ("version", "source_hash", "layout")

USED_EDITED = "edited"
USED_INPUT = "input"


class EditorStateError(ValueError):
    """An editor state that cannot be used. ``problems`` lists each one as ``"path: message"``."""

    def __init__(self, problems: list[str], headline: str = "invalid editor_state"):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{headline} ({len(self.problems)} problem(s)):\n{shown}")


@dataclass(frozen=True)
class EditorState:
    """A parsed state. ``layout`` is None for an empty state."""

    layout: Layout | None = None
    source_hash: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resolution:
    """What the editor node outputs: the layout, which one it was, and the state the editor should hold."""

    layout: Layout
    used: str  # USED_EDITED | USED_INPUT
    source_hash: str | None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def state_json(self) -> str:
        return make_state(self.layout, self.source_hash)


def canonical_json(layout: Layout) -> str:
    """The layout's JSON with sorted keys and no spaces: equal layouts give equal text."""
    return json.dumps(layout.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def layout_hash(layout: Layout) -> str:
    """First 16 hex digits of the SHA-256 of :func:`canonical_json` (of the normalised layout)."""
    return hashlib.sha256(canonical_json(layout).encode("utf-8")).hexdigest()[:HASH_CHARS]


def make_state(layout: Layout, source_hash: str | None) -> str:
    """The state JSON an editor holds for ``layout`` edited from the input whose hash is ``source_hash``."""
    return json.dumps({"version": STATE_VERSION, "source_hash": source_hash, "layout": layout.to_dict()},
                      ensure_ascii=False)


def parse_editor_state(text: str | None) -> EditorState:
    """Read the ``editor_state`` widget value; every problem is reported with its path.

    Raises :class:`EditorStateError` for anything unusable; repairable layout problems become warnings.
    """
    if text is None:
        return EditorState()
    if not isinstance(text, str):
        raise EditorStateError([f"editor_state: must be a string, got {type(text).__name__}"])
    if not text.strip():
        return EditorState()
    if len(text) > MAX_STATE_CHARS:
        raise EditorStateError([f"editor_state: {len(text)} characters; at most {MAX_STATE_CHARS}"])
    try:
        obj = load_json(text)
    except ValueError as exc:
        raise EditorStateError([f"editor_state: {exc}"]) from None
    if not isinstance(obj, dict):
        raise EditorStateError([f"editor_state: expected a JSON object, got {type(obj).__name__}"])

    if "layout" not in obj and "regions" in obj:  # a bare layout: edits with no source
        obj = {"version": STATE_VERSION, "source_hash": None, "layout": obj}

    problems: list[str] = []
    warnings: list[str] = []
    for key in obj:
        if key not in _STATE_KEYS:
            warnings.append(f"editor_state.{key}: unknown key ignored")
    version = obj.get("version", STATE_VERSION)
    if isinstance(version, bool) or version != STATE_VERSION:
        problems.append(f"editor_state.version: must be {STATE_VERSION}, got {_short(version)}")
    source_hash = obj.get("source_hash")
    if source_hash is not None and (not isinstance(source_hash, str) or len(source_hash) > 128):
        problems.append(f"editor_state.source_hash: must be a short string or null, got {_short(source_hash)}")
        source_hash = None
    source_hash = source_hash or None

    raw_layout = obj.get("layout")
    layout = None
    if raw_layout is None:
        problems.append("editor_state.layout: missing; expected a layout object")
    elif not isinstance(raw_layout, dict):
        problems.append(f"editor_state.layout: expected a layout object, got {type(raw_layout).__name__}")
    else:
        try:
            layout, layout_warnings = parse_layout(raw_layout)
            warnings += [_prefixed(w) for w in layout_warnings]
        except LayoutError as exc:
            problems += [_prefixed(p) for p in exc.problems]
    if problems:
        raise EditorStateError(problems)
    return EditorState(layout=layout, source_hash=source_hash, warnings=tuple(warnings))


def resolve(input_layout: Layout | None, state: EditorState) -> Resolution:
    """Choose between the edited and the input layout (see the module docstring)."""
    if input_layout is None:
        if state.layout is None:
            raise EditorStateError(["editor_state: empty and no layout is connected; connect a layout (a planner "
                                    "or Layout from JSON) or put a layout in editor_state"], "nothing to edit")
        return Resolution(state.layout, USED_EDITED, state.source_hash, state.warnings)
    current = layout_hash(input_layout)
    if state.layout is not None and state.source_hash == current:
        return Resolution(state.layout, USED_EDITED, current, state.warnings)
    return Resolution(input_layout, USED_INPUT, current, ())


def check_experts(layout: Layout, names: Iterable[str]) -> None:
    """Every region's forced expert must be one of ``names`` or ``"base"`` (case-insensitive).

    Raises :class:`EditorStateError` naming each region whose expert is unknown.
    """
    names = list(names)
    known = {n.lower() for n in names} | {BASE_EXPERT}
    choices = ", ".join([BASE_EXPERT, *[n for n in names if n.lower() != BASE_EXPERT]])
    problems = [f"regions[{i}].expert: {r.expert!r} is not in the connected expert stack (choose one of: {choices}, "
                "or null to let the gate decide)"
                for i, r in enumerate(layout.regions) if r.expert is not None and r.expert.lower() not in known]
    if problems:
        raise EditorStateError(problems, "unknown expert")


def _prefixed(problem: str) -> str:
    path, sep, rest = problem.partition(": ")
    if not sep:
        return f"editor_state.layout: {problem}"
    if path == "$":
        return f"editor_state.layout: {rest}"
    return f"editor_state.layout.{path}: {rest}"


def _short(value: Any) -> str:
    return short_repr(value)

