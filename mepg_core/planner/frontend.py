"""Small helpers for the planner's front ends (the ComfyUI node, command lines). No ComfyUI imports.

* :func:`check_api_key_env` - a setting that should name an environment variable, refused when it looks
  like an API key pasted in its place (workflow files are shared: a key in one leaks with it).
* :func:`describe_plan` - the human-readable trace of a :class:`~.chain.PlanResult`: which path made the
  layout, how each step of the chain went, and every warning.
"""

from __future__ import annotations

import re

from .chain import (
    PATH_CHAIN,
    PATH_ELEMENTS_FALLBACK,
    PATH_OFFLINE,
    PATH_OFFLINE_FALLBACK,
    PATH_SINGLE_REGION_FALLBACK,
    PATH_STEP0_FALLBACK,
    PlanResult,
)

__all__ = ["ApiKeyInValueError", "check_api_key_env", "describe_plan", "looks_like_api_key"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prefixes of widely used API keys and tokens (OpenAI, Anthropic, Groq, Hugging Face, GitHub, GitLab,
# Google, xAI, Perplexity, Replicate, NVIDIA, Mistral/others' "key-").
_KEY_PREFIXES = ("sk-", "sk_", "gsk_", "hf_", "ghp_", "gho_", "ghs_", "ghu_", "github_pat_", "glpat-", "AIza",
                 "xai-", "pplx-", "r8_", "nvapi-", "key-", "Bearer ")
_MAX_ENV_NAME = 128

_PATH_TEXT = {
    PATH_CHAIN: "the full chain (steps 0-3) made the layout",
    PATH_STEP0_FALLBACK: "fallback: a later step failed, the layout is step 0's plan",
    PATH_ELEMENTS_FALLBACK: "fallback: step 3 failed, the layout is the arranger's placement of step 1's elements",
    PATH_OFFLINE_FALLBACK: "fallback: the model's answers could not be used, the offline planner made the layout",
    PATH_SINGLE_REGION_FALLBACK: "fallback: every planner failed, one region covers the canvas",
    PATH_OFFLINE: "the offline rule-based planner made the layout (no model)",
}


class ApiKeyInValueError(ValueError):
    """An API key (or something that looks like one) where the name of an environment variable belongs."""


def looks_like_api_key(value: str) -> bool:
    """Whether ``value`` looks like a secret rather than an environment variable's name.

    Environment variable names are short identifiers, conventionally upper case with underscores
    (``OPENAI_API_KEY``). Keys carry a known prefix (``sk-``, ``hf_`` ...), or are long runs of mixed-case
    letters and digits, or long hexadecimal/base64 strings.
    """
    text = value.strip()
    if not text:
        return False
    for prefix in _KEY_PREFIXES:
        if text.startswith(prefix):
            # "sk-..." can never be a variable name; "hf_token" can, so "hf_..." must also be long.
            if prefix.startswith("sk") or not _ENV_NAME.match(text) or len(text) >= 20:
                return True
    if len(text) > _MAX_ENV_NAME:
        return True
    if _ENV_NAME.match(text):
        parts = [p for p in text.split("_") if p]
        longest = max((len(p) for p in parts), default=0)
        mixed = any(c.islower() for c in text) and any(c.isupper() for c in text) and any(c.isdigit() for c in text)
        if len(text) >= 20 and mixed:
            return True  # "aB3dE9..." - names are not written like that
        if longest >= 32:
            return True  # one unbroken run of 32+ characters: a hex or base62 token
        return False
    # Not a valid name: a key if it is long and made of token characters.
    return len(text) >= 16 and re.fullmatch(r"[A-Za-z0-9_\-.+/=:]+", text) is not None


def check_api_key_env(value: str | None) -> str | None:
    """The cleaned environment variable name, ``None`` when empty (no authentication).

    Raises :class:`ApiKeyInValueError` when ``value`` looks like a key itself (the message never repeats
    it) and ``ValueError`` when it is not a valid variable name.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"api_key_env must be text (the name of an environment variable), got {type(value).__name__}")
    name = value.strip()
    if not name:
        return None
    if looks_like_api_key(name):
        raise ApiKeyInValueError(
            "api_key_env looks like an API key itself. Give the NAME of an environment variable that holds the "
            "key (for example OPENAI_API_KEY), and set that variable where ComfyUI runs: workflow files are "
            "shared and saved in image metadata, so a key typed into a node leaks with them. If this key was "
            "saved in a workflow or image, revoke it.")
    if not _ENV_NAME.match(name):
        raise ValueError(f"api_key_env must be the name of an environment variable (letters, digits and "
                         f"underscores, not starting with a digit), got {name!r}")
    return name


def describe_plan(result: PlanResult, *, notes: list[str] | tuple[str, ...] = (), has_adapter: bool = False) -> str:
    """The plan's trace as text: path, backend, time, one line per chain step, warnings and ``notes``.

    ``has_adapter``: whether the backend had a LoRA adapter (then step 0 is marked "LoRA on").
    """
    lines = [f"path: {result.path}", f"  {_PATH_TEXT.get(result.path, result.path)}",
             f"backend: {result.backend}", f"regions: {len(result.layout.regions)}",
             f"seconds: {result.seconds:.3f}"]
    if result.trace:
        lines.append("steps:")
        for step in result.trace:
            adapter = ", LoRA on" if step.use_adapter and has_adapter else ""
            head = f"  step {step.index} ({step.name}{adapter}): "
            n = len(step.attempts)
            how = _constraint_text(step)
            if step.skipped:
                lines.append(head + f"skipped ({step.skipped})")
            elif step.source == "arranger" and step.ok:
                lines.append(head + "placed by the arranger (boxes_from = arranger)")
            elif step.ok:
                lines.append(head + f"ok after {n} attempt{'s' if n != 1 else ''}{how}")
            else:
                last = step.attempts[-1] if step.attempts else None
                if last is not None and last.error:
                    why = f"backend error: {last.error}"
                elif last is not None and last.problems:
                    why = "; ".join(last.problems[:2]) + (" ..." if len(last.problems) > 2 else "")
                else:
                    why = "no usable answer"
                lines.append(head + f"failed after {n} attempt{'s' if n != 1 else ''}{how}: {_clip(why, 300)}")
    warnings = [*result.warnings, *notes]
    if warnings:
        lines.append("warnings:")
        lines += [f"  - {_clip(w, 500)}" for w in warnings]
    return "\n".join(lines)


_CONSTRAINT_TEXT = {
    "grammar": "decoding constrained to the step's JSON schema",
    "json_schema": "response_format json_schema",
    "json_object+schema": "response_format json_object+schema",
    "json_object": "response_format json_object",
    "none": "unconstrained",
}


def _constraint_text(step) -> str:
    """``" (unconstrained)"`` / ``" (response_format json_schema)"`` ...: how the step's answers were made."""
    kinds = list(dict.fromkeys(a.constraint for a in step.attempts if a.constraint))
    return f" ({', '.join(_CONSTRAINT_TEXT.get(k, k) for k in kinds)})" if kinds else ""


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
