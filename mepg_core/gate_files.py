"""Trained-gate files: linear gate parameters in ``.safetensors`` with the expert stack they belong to.

Layout (format ``mepg-gates``, version 1)
-----------------------------------------
Tensors, float32, one set per :class:`~.gating.MoETarget` path ``P`` (e.g.
``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` or ``...transformer_blocks.0.ff``):

- ``P.gate_weight``: ``[E, in]``
- ``P.gate_bias``: ``[E]``
- ``P.gate_sigma_weight``: ``[E, F]`` (only when the gates take the noise level, ``F`` features)

Metadata (all strings, JSON where structured):

- ``mepg.format`` = ``"mepg-gates"``, ``mepg.version`` = ``"1"``
- ``mepg.experts``: ``[{"name": ..., "hash": ...}, ...]`` in gate-row order (hash: see
  :mod:`.experts`, content hash)
- ``mepg.targets``: the target paths; ``mepg.sigma_features``: ``F`` (``"0"`` when absent)
- ``mepg.gate_options``: ``{"temperature", "top_k", "normalise"}`` used in training (defaults for use)
- anything passed as ``extra_metadata`` under ``mepg.extra.<key>``

Loading checks the file against a stack: the experts are matched by content hash (names may have been
edited; the same experts in another order are accepted and the gate rows reordered), the targets must be
the same set, each gate must fit its target's input size. Any mismatch is a ValueError that says what
differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from .experts import ExpertStack, open_safetensors, require_safetensors
from .gating import GateOptions, GateSet, moe_targets
from .layout import load_json, short_repr

GATE_FILE_FORMAT = "mepg-gates"
GATE_FILE_VERSION = "1"
_SUFFIXES = (".gate_weight", ".gate_bias", ".gate_sigma_weight")


@dataclass
class LoadedGates:
    gates: GateSet
    options: GateOptions
    experts: list[dict]  # as stored: [{"name", "hash"}] in the file's order
    extra: dict[str, str] = field(default_factory=dict)


def save_gate_file(
    path: str | os.PathLike,
    gates: GateSet,
    stack: ExpertStack,
    options: GateOptions | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write linear ``gates`` trained for ``stack`` to ``path`` (must end in ``.safetensors``)."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path}: gate files are written as .safetensors")
    if gates.mode != "linear":
        raise ValueError(f"only linear (trained or centroid) gates are saved; '{gates.mode}' gates have no parameters")
    if gates.num_experts != stack.num_experts:
        raise ValueError(f"gates are for {gates.num_experts} experts, the stack has {stack.num_experts}")
    targets = moe_targets(stack)
    tensors = {}
    for target in targets:
        gate = gates.site_gate(target)  # checks presence and input size
        tensors[target.path + ".gate_weight"] = gate.weight.detach().float().cpu().contiguous()
        tensors[target.path + ".gate_bias"] = gate.bias.detach().float().cpu().contiguous()
        if gate.sigma_weight is not None:
            tensors[target.path + ".gate_sigma_weight"] = gate.sigma_weight.detach().float().cpu().contiguous()
    metadata = {
        "mepg.format": GATE_FILE_FORMAT,
        "mepg.version": GATE_FILE_VERSION,
        "mepg.experts": json.dumps([{"name": e.name, "hash": e.content_hash} for e in stack.experts]),
        "mepg.targets": json.dumps([t.path for t in targets]),
        "mepg.sigma_features": str(gates.sigma_features),
        "mepg.gate_options": json.dumps((options or GateOptions()).to_dict()),
    }
    for key, value in (extra_metadata or {}).items():
        metadata[f"mepg.extra.{key}"] = str(value)
    save_file(tensors, path, metadata=metadata)


def read_gate_file_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a gate file (no tensors read): ``experts``, ``targets``,
    ``sigma_features``, ``gate_options``, ``extra``. Raises ValueError for other files."""
    path = require_safetensors(path, "gate file")
    with open_safetensors(path, "gate file") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("mepg.format") != GATE_FILE_FORMAT:
        raise ValueError(f"{path}: not an MEPG gate file (metadata 'mepg.format' is {metadata.get('mepg.format')!r})")
    if metadata.get("mepg.version") != GATE_FILE_VERSION:
        raise ValueError(
            f"{path}: gate file version {metadata.get('mepg.version')!r}, this pack reads {GATE_FILE_VERSION}"
        )
    try:
        info = {
            "experts": _metadata_json(metadata, "mepg.experts"),
            "targets": _metadata_json(metadata, "mepg.targets"),
            "sigma_features": int(metadata.get("mepg.sigma_features", "0")),
            "gate_options": _metadata_json(metadata, "mepg.gate_options", "{}"),
            "extra": {k[len("mepg.extra.") :]: v for k, v in metadata.items() if k.startswith("mepg.extra.")},
        }
    except ValueError as error:
        raise ValueError(f"{path}: damaged gate-file metadata ({error})") from None
    problems = _metadata_problems(info)
    if problems:
        raise ValueError(f"{path}: damaged gate-file metadata: " + "; ".join(problems))
    return info


def _metadata_json(metadata: dict, key: str, default: str | None = None):
    if key not in metadata and default is None:
        raise ValueError(f"'{key}' is missing")
    try:
        return load_json(metadata.get(key, default))
    except ValueError as error:
        raise ValueError(f"'{key}' is {error}") from None


def _metadata_problems(info: dict) -> list[str]:
    """What is wrong with the shapes of decoded gate-file metadata (each problem names its key)."""
    problems = []
    experts = info["experts"]
    if not isinstance(experts, list) or not experts:
        problems.append(f"'mepg.experts' must be a non-empty list of {{name, hash}} objects, got "
                        f"{short_repr(experts)}")
    else:
        for i, e in enumerate(experts):
            if not isinstance(e, dict):
                problems.append(f"'mepg.experts'[{i}] must be an object with name and hash, got {short_repr(e)}")
                continue
            for key in ("name", "hash"):
                if not isinstance(e.get(key), str) or not e.get(key):
                    problems.append(f"'mepg.experts'[{i}] has no {key}" if key not in e else
                                    f"'mepg.experts'[{i}].{key} must be a non-empty string, got {short_repr(e[key])}")
    targets = info["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        problems.append(f"'mepg.targets' must be a list of site paths, got {short_repr(targets)}")
    if info["sigma_features"] < 0:
        problems.append(f"'mepg.sigma_features' must be >= 0, got {info['sigma_features']}")
    options = info["gate_options"]
    if not isinstance(options, dict):
        problems.append(f"'mepg.gate_options' must be an object, got {short_repr(options)}")
    else:
        try:
            GateOptions.from_dict(options)
        except (TypeError, ValueError, OverflowError) as error:
            problems.append(f"'mepg.gate_options': {error}")
    return problems


def _describe(experts: list[dict]) -> str:
    return "[" + ", ".join(f"'{e['name']}' ({e['hash'][:12]})" for e in experts) + "]"


def _row_order(path: str, file_experts: list[dict], stack: ExpertStack) -> list[int]:
    """For each stack expert, the file's gate row that belongs to it (matched by content hash)."""
    stack_experts = [{"name": e.name, "hash": e.content_hash} for e in stack.experts]
    if len(file_experts) != len(stack_experts):
        raise ValueError(
            f"{path}: gates were trained for {len(file_experts)} experts {_describe(file_experts)}; "
            f"this stack has {len(stack_experts)} {_describe(stack_experts)}"
        )
    unused = list(range(len(file_experts)))
    order = []
    for index, expert in enumerate(stack_experts):
        match = next((row for row in unused if file_experts[row]["hash"] == expert["hash"]), None)
        if match is None:
            expected = file_experts[index]
            hint = ""
            if getattr(stack.experts[index], "kind", None) == "tensors":
                hint = (
                    f"; '{expert['name']}' is named by the model's weights as the patch loaded them, so another "
                    "checkpoint or storage dtype (e.g. fp8) gives another expert. To share gates across dtypes, "
                    "stack the base checkpoint with Expert Stack Loader and turn include_base off"
                )
            raise ValueError(
                f"{path}: gates were trained for a different expert stack; stack expert {index} "
                f"'{expert['name']}' ({expert['hash'][:12]}) is not among the file's experts "
                f"{_describe(file_experts)} (position {index} there: '{expected['name']}' ({expected['hash'][:12]}))"
                + hint
            )
        unused.remove(match)
        order.append(match)
    return order


def load_gate_file(path: str | os.PathLike, stack: ExpertStack) -> LoadedGates:
    """Read a gate file and check it belongs to ``stack``; returns gates in the stack's expert order."""
    path = require_safetensors(path, "gate file")
    info = read_gate_file_metadata(path)
    order = _row_order(path, info["experts"], stack)
    targets = moe_targets(stack)
    wanted = [t.path for t in targets]
    stored = set(info["targets"])
    missing = [p for p in wanted if p not in stored]
    extra = [p for p in info["targets"] if p not in set(wanted)]
    if missing or extra:

        def first(items):
            return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

        parts = []
        if missing:
            parts.append(f"no gates for {len(missing)} of this model's sites ({first(missing)})")
        if extra:
            parts.append(f"gates for {len(extra)} sites this model lacks ({first(extra)})")
        raise ValueError(f"{path}: made for a different UNet layout: " + "; ".join(parts))
    sigma_features = info["sigma_features"]
    reorder = torch.tensor(order, dtype=torch.long)
    params = {}
    with open_safetensors(path, "gate file") as handle:
        keys = set(handle.keys())
        for target in targets:
            weight_key, bias_key, sigma_key = (target.path + s for s in _SUFFIXES)
            for key in (weight_key, bias_key) + ((sigma_key,) if sigma_features else ()):
                if key not in keys:
                    raise ValueError(f"{path}: missing tensor '{key}'")
            weight = handle.get_tensor(weight_key).float()
            bias = handle.get_tensor(bias_key).float()
            sigma_weight = handle.get_tensor(sigma_key).float() if sigma_features else None
            expected = {
                weight_key: (stack.num_experts, target.in_features),
                bias_key: (stack.num_experts,),
                sigma_key: (stack.num_experts, sigma_features),
            }
            for key, tensor in ((weight_key, weight), (bias_key, bias), (sigma_key, sigma_weight)):
                if tensor is not None and tuple(tensor.shape) != expected[key]:
                    raise ValueError(
                        f"{path}: '{key}' has shape {tuple(tensor.shape)}, this stack needs {expected[key]}"
                    )
                if tensor is not None and not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(f"{path}: '{key}' has {bad} NaN or infinite values; the gate file is damaged "
                                     "(retrain or pick another)")
            params[target.path] = (
                weight[reorder],
                bias[reorder],
                None if sigma_weight is None else sigma_weight[reorder],
            )
    gates = GateSet("linear", stack.num_experts, sigma_features=sigma_features, params=params)
    return LoadedGates(gates, GateOptions.from_dict(info["gate_options"]), info["experts"], info["extra"])
