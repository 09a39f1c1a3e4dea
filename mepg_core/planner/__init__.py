"""The layout planner: prompt -> layout (schema v1), plus plan scoring against GenEval-style metadata.

- :func:`plan_offline` — the deterministic rule-based planner (no model; the default backend).
- :func:`score_layouts` / :func:`score_layout` / :func:`load_metadata` — score plans the way GenEval
  scores images (:mod:`.scoring`).
- Command lines: ``python -m mepg_core.planner`` plans a JSONL file of prompts (:mod:`.__main__`);
  ``python -m mepg_core.planner.scoring`` scores a JSONL file of layouts.
"""

from typing import Any

from .offline import plan_offline
from .relations import relative_position

__all__ = ["plan_offline", "relative_position", "score_layout", "score_layouts", "load_metadata", "ScoreReport"]

_SCORING_NAMES = ("score_layout", "score_layouts", "load_metadata", "ScoreReport")


def __getattr__(name: str) -> Any:
    # Imported on first use, so ``python -m mepg_core.planner.scoring`` runs the module only once.
    if name in _SCORING_NAMES:
        from . import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
