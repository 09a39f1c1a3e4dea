"""Constrained decoding for the local transformers backend: every generated token keeps the answer inside
the step's JSON schema. Built on llguidance (optional: ``pip install llguidance``, the pack's ``llm``
extra); without it :func:`available` is false and the backend decodes as before, unconstrained.

Why llguidance: a 3 MB wheel with no dependencies (xgrammar pulls triton and a TVM runtime; outlines
brings its own model wrappers; lm-format-enforcer is pure Python and walks the vocabulary per token), a
Rust matcher that computes a token mask in well under a millisecond on CPU, and an interface that needs
only a fast tokenizer and the logits, so it works the same under transformers 4.x and 5.x. It is the
grammar engine behind llama.cpp's, vLLM's and SGLang's structured outputs too.

One :class:`GrammarLogits` per call: it feeds each new token to the matcher and masks the logits of the
next step to the tokens the grammar allows (only end-of-sequence once the JSON value is complete).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

__all__ = ["ConstraintError", "GrammarLogits", "available", "compile_grammar", "library_version", "make_processor"]

# Compact JSON: one space after "," and ":", no other whitespace (a small model under a grammar that allows
# any whitespace can spend its whole budget on newlines).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_GRAMMARS: OrderedDict[str, str] = OrderedDict()
_GRAMMARS_MAX = 64
_LOCK = threading.Lock()


class ConstraintError(RuntimeError):
    """The schema could not be turned into a grammar, or the matcher failed mid-answer."""


def available() -> bool:
    """Whether llguidance can be imported (the constrained path is used only then)."""
    try:
        import llguidance  # noqa: F401
        import llguidance.hf  # noqa: F401
    except ImportError:
        return False
    return True


def library_version() -> str | None:
    try:
        import llguidance
    except ImportError:
        return None
    return getattr(llguidance, "__version__", "unknown")


def compile_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema (cached by the schema's text)."""
    from llguidance import LLMatcher

    key = json.dumps(schema, sort_keys=True)
    with _LOCK:
        hit = _GRAMMARS.get(key)
        if hit is not None:
            _GRAMMARS.move_to_end(key)
            return hit
    grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConstraintError(f"the answer schema cannot be compiled to a grammar: {'; '.join(messages)}")
    with _LOCK:
        _GRAMMARS[key] = grammar
        while len(_GRAMMARS) > _GRAMMARS_MAX:
            _GRAMMARS.popitem(last=False)
    return grammar


def ll_tokenizer(hf_tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (about a second to build: keep it)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer)


class GrammarLogits:
    """A transformers logits processor (``__call__(input_ids, scores) -> scores``) for batch size 1.

    ``prompt_length``: tokens of the prompt, not fed to the matcher. The mask is applied in place:
    disallowed tokens get ``-inf``. ``steps``/``mask_seconds`` count the work, for the trace and the bench.
    """

    def __init__(self, matcher: Any, prompt_length: int):
        import torch

        self.matcher = matcher
        self.seen = prompt_length
        self.steps = 0
        self.mask_seconds = 0.0
        self._bits = torch.arange(32, dtype=torch.int32)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import time

        import torch
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        started = time.perf_counter()
        for token in input_ids[0, self.seen:].tolist():
            self.matcher.consume_token(int(token))
        self.seen = input_ids.shape[1]
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar matcher failed: {self.matcher.get_error()}")
        vocab = scores.shape[-1]
        mask = allocate_token_bitmask(1, vocab)
        fill_next_token_bitmask(self.matcher, mask, 0)
        # Unpack the 32-bit words into one flag per token (the library's own unpacking is torch.compile'd,
        # which on CPU costs a compiler run on first use).
        allowed = ((mask[0].unsqueeze(1) >> self._bits) & 1).reshape(-1)[:vocab].to(torch.bool)
        if allowed.shape[0] < vocab:
            allowed = torch.cat([allowed, torch.zeros(vocab - allowed.shape[0], dtype=torch.bool)])
        scores = scores.masked_fill(~allowed.to(scores.device).unsqueeze(0), float("-inf"))
        self.steps += 1
        self.mask_seconds += time.perf_counter() - started
        return scores


def make_processor(tokenizer: Any, schema: dict[str, Any], prompt_length: int) -> GrammarLogits:
    """A fresh :class:`GrammarLogits` for one answer; ``tokenizer`` from :func:`ll_tokenizer`."""
    from llguidance import LLMatcher

    matcher = LLMatcher(tokenizer, compile_grammar(schema), log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"the answer grammar cannot start: {matcher.get_error()}")
    return GrammarLogits(matcher, prompt_length)
