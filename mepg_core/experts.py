"""Expert stacks: the MoE-site weights of several SDXL UNets, stacked per site.

Vocabulary
----------
*UNet key*
    A tensor name relative to the diffusion model in ComfyUI's (ldm) layout, e.g.
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight``. Full checkpoints store it behind
    ``model.diffusion_model.``; UNet-only files store it bare. Diffusers-layout UNet files are refused.
*Site*
    One linear layer the MoE replaces, named by its module path (the UNet key without ``.weight``).
    Every transformer block (``input_blocks.N.1``, ``middle_block.1``, ``output_blocks.N.1`` →
    ``transformer_blocks.M``) has eight: ``attn1.to_q/to_k/to_v`` and ``attn2.to_q/to_k/to_v`` (no bias),
    ``ff.net.0.proj`` (GEGLU input projection, ``out = 2 × inner``, bias) and ``ff.net.2`` (bias).
    Sites are discovered from the keys of the base (70 blocks for SDXL, fewer for tiny test models).
*Expert*
    One source of site weights: a checkpoint file, a LoRA applied to a base, or in-memory tensors
    (e.g. the live model's weights after ComfyUI applied LoRAs to it).

What :func:`load_expert_stack` guarantees
-----------------------------------------
- Only ``.safetensors`` files are read (pickle formats can run code; they are refused with a ValueError).
- Files are opened with ``safetensors.safe_open`` and only site tensors are read; every other tensor
  (VAE, text encoders, resnets, …) stays on disk. Headers are checked before any tensor is read.
- Every expert has exactly the base's site keys with the base's shapes; otherwise a ValueError names the
  file and the first offending key (an SD1.x file shows up as a ``attn2.to_k`` shape mismatch with
  ``context_dim 768``).
- Per site one stacked tensor ``weights[path]: [E, out, in]`` and ``biases[path]: [E, out] | None`` in the
  requested dtype, allocated once and filled expert by expert (peak extra memory: one site tensor).
- Per expert: a name (default: file stem), style tags (default: derived from the name), the bytes it
  occupies at the MoE sites, and a content hash (see :func:`site_content_hash`).

Content hash
------------
``sha256`` over the expert's site tensors in stack order; for each tensor its UNet key, its dtype, its
shape and its raw bytes *as stored in the source* (before casting), so the identity of an expert does not
depend on the dtype the stack is built in, and two fine-tunes with identical headers still differ.
Hashing costs one pass over the bytes already being read (~2 GB/s). A LoRA expert's hash is
``sha256("mepg-lora-expert-v1", base hash, hash of the LoRA tensors it uses, strength)``.

LoRA experts
------------
``W_expert = W_base + strength · (alpha / rank) · up @ down`` per touched site (``alpha`` defaults to
``rank`` when the file has none, as in ComfyUI); full diffs (``.diff`` / ``.diff_b``) are added as they
are; untouched sites equal the base. Key formats understood (as ComfyUI's ``comfy/lora.py`` does): module
names ``lora_unet_<ldm or diffusers path with _>``, ``lycoris_<…>``, ``diffusion_model.<ldm path>``,
``[unet.]<diffusers path>`` (also with ``.processor.``), each with ``.lora_up/.lora_down``,
``.lora_B/.lora_A`` (with or without ``.weight``, ``.default``), ``_lora.up/_lora.down``,
``.lora.up/.lora.down``, ``.lora_linear_layer.up/down``, plus ``.alpha``. Keys for other modules
(text encoders, resnets, ``to_out``) are ignored and listed in :attr:`LoraReport.ignored_keys`; other
adapter types on a site (LoHa, LoKr, DoRA, …) raise a ValueError naming the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from safetensors import SafetensorError, safe_open

from .styles import canonical_style, style_family

CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
SITE_ROLES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "ff.net.0.proj",
    "ff.net.2",
)
# Sites whose input is the text context (attn2 keys/values), not the block's spatial tokens.
CONTEXT_INPUT_ROLES = ("attn2.to_k", "attn2.to_v")

_SITE_KEY_RE = re.compile(
    r"^((?:input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.transformer_blocks\.\d+)\."
    r"(attn1\.to_[qkv]|attn2\.to_[qkv]|ff\.net\.0\.proj|ff\.net\.2)\.(weight|bias)$"
)
_UNET_TOP_LEVEL = ("input_blocks.", "middle_block.", "output_blocks.")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

Shape = tuple[int, ...]
PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------
# Sites


@dataclass(frozen=True)
class SiteInfo:
    """One MoE site. ``weight`` is ``[out_features, in_features]``, ``bias`` (if any) ``[out_features]``."""

    path: str  # module path relative to the diffusion model, e.g. "middle_block.1.transformer_blocks.0.attn2.to_k"
    block: str  # "middle_block.1.transformer_blocks.0"
    role: str  # one of SITE_ROLES
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def weight_key(self) -> str:
        return self.path + ".weight"

    @property
    def bias_key(self) -> str:
        return self.path + ".bias"

    @property
    def tensor_keys(self) -> tuple[str, ...]:
        return (self.weight_key, self.bias_key) if self.has_bias else (self.weight_key,)

    @property
    def input_kind(self) -> str:
        """``"context"`` for attn2 keys/values (text tokens), ``"spatial"`` otherwise."""
        return "context" if self.role in CONTEXT_INPUT_ROLES else "spatial"

    def shape_of(self, key: str) -> Shape:
        return (self.out_features, self.in_features) if key == self.weight_key else (self.out_features,)


def is_site_key(unet_key: str) -> bool:
    """True for ``...transformer_blocks.N.<role>.weight|bias`` keys (relative UNet keys)."""
    return _SITE_KEY_RE.match(unet_key) is not None


def _block_sort_key(block: str) -> tuple:
    # input blocks, then middle, then output blocks, each in numeric order (the UNet's execution order).
    parts = block.split(".")
    group = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[parts[0]]
    numbers = tuple(int(p) for p in parts if p.isdigit())
    return (group,) + numbers


def discover_sites(
    shapes: Mapping[str, Union[Sequence[int], torch.Tensor]], source: str = "reference"
) -> list[SiteInfo]:
    """Find the MoE sites among relative UNet keys.

    ``shapes`` maps UNet keys (non-site keys are ignored) to shapes or tensors. Returns sites ordered by block
    (execution order) and then by :data:`SITE_ROLES`. Raises ValueError (naming ``source``) when no
    transformer block is found, a block lacks one of the eight sites, or the GEGLU pair is inconsistent.
    """
    found: dict[tuple[str, str], dict[str, Shape]] = {}
    for key, shape in shapes.items():
        match = _SITE_KEY_RE.match(key)
        if match:
            block, role, kind = match.groups()
            dims = shape.shape if isinstance(shape, torch.Tensor) else shape
            found.setdefault((block, role), {})[kind] = tuple(int(d) for d in dims)
    if not found:
        raise ValueError(
            f"{source}: no transformer-block q/k/v or feed-forward weights found; expected UNet keys like "
            "'input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight' (ComfyUI/ldm layout)"
        )
    blocks = sorted({block for block, _ in found}, key=_block_sort_key)
    sites: list[SiteInfo] = []
    for block in blocks:
        for role in SITE_ROLES:
            entry = found.get((block, role))
            path = f"{block}.{role}"
            if entry is None or "weight" not in entry:
                raise ValueError(f"{source}: transformer block '{block}' has no '{path}.weight'")
            weight_shape = entry["weight"]
            if len(weight_shape) != 2:
                raise ValueError(f"{source}: '{path}.weight' has shape {weight_shape}, expected a 2-D linear weight")
            if "bias" in entry and entry["bias"] != (weight_shape[0],):
                raise ValueError(f"{source}: '{path}.bias' has shape {entry['bias']}, expected ({weight_shape[0]},)")
            sites.append(SiteInfo(path, block, role, weight_shape[0], weight_shape[1], "bias" in entry))
        by_role = {s.role: s for s in sites[-len(SITE_ROLES) :]}
        proj, out = by_role["ff.net.0.proj"], by_role["ff.net.2"]
        if proj.out_features != 2 * out.in_features:
            raise ValueError(
                f"{source}: '{proj.path}' has {proj.out_features} outputs but '{out.path}' expects "
                f"{out.in_features} inputs; a GEGLU feed-forward needs out = 2 × inner"
            )
    return sites


# --------------------------------------------------------------------------------------------------
# Expert recipes


@dataclass
class ExpertSpec:
    """A recipe for one expert; nothing is read until :func:`load_expert_stack`.

    Build with :meth:`checkpoint`, :meth:`lora` or :meth:`from_tensors`.
    """

    kind: str  # "checkpoint" | "lora" | "tensors"
    path: str | None = None  # checkpoint file, or the LoRA file for kind "lora"
    base: ExpertSpec | None = None  # where a LoRA expert's base weights come from
    strength: float = 1.0  # LoRA strength
    tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    name: str | None = None
    tags: list[str] | None = None

    @classmethod
    def checkpoint(cls, path: PathLike, name: str | None = None, tags: Sequence[str] | None = None) -> ExpertSpec:
        return cls("checkpoint", path=os.fspath(path), name=name, tags=list(tags) if tags is not None else None)

    @classmethod
    def lora(
        cls,
        lora_path: PathLike,
        base: ExpertSpec | PathLike,
        strength: float = 1.0,
        name: str | None = None,
        tags: Sequence[str] | None = None,
    ) -> ExpertSpec:
        """An expert made of ``base`` (a checkpoint or tensors spec, or a checkpoint path) plus a LoRA."""
        if not isinstance(base, ExpertSpec):
            base = cls.checkpoint(base)
        if base.kind == "lora":
            raise ValueError("a LoRA expert's base must be a checkpoint or tensors, not another LoRA expert")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or abs(strength) > 1e6 \
                or isinstance(strength, float) and not math.isfinite(strength):
            raise ValueError(f"{os.fspath(lora_path)}: LoRA strength must be a finite number, got {strength!r}")
        return cls(
            "lora",
            path=os.fspath(lora_path),
            base=base,
            strength=float(strength),
            name=name,
            tags=list(tags) if tags is not None else None,
        )

    @classmethod
    def from_tensors(
        cls, name: str, tensors: Mapping[str, torch.Tensor], tags: Sequence[str] | None = None
    ) -> ExpertSpec:
        """Site tensors already in memory, keyed by UNet key (``diffusion_model.`` / ``model.diffusion_model.``
        prefixes are stripped). Non-site keys are ignored, so a whole UNet state dict may be passed."""
        return cls(
            "tensors", tensors=_strip_unet_prefixes(tensors), name=name, tags=list(tags) if tags is not None else None
        )

    @property
    def label(self) -> str:
        """How errors name this expert: the file path, or ``tensors:<name>``."""
        if self.kind == "tensors":
            return f"tensors:{self.name or '?'}"
        return str(self.path)


def _strip_unet_prefixes(mapping: Mapping[str, object]) -> dict[str, object]:
    stripped = {}
    for key, value in mapping.items():
        for prefix in (CHECKPOINT_UNET_PREFIX, "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        stripped[key] = value
    return stripped


@dataclass
class LoraReport:
    """What a LoRA file did: the site paths it changed and the keys it carried for anything else."""

    applied_sites: list[str]
    ignored_keys: list[str]


@dataclass
class ExpertInfo:
    """Facts about one expert of a stack. Edit ``name``/``tags`` through :class:`ExpertStack` methods."""

    name: str
    tags: list[str]
    content_hash: str  # hex sha256, see module docstring
    site_bytes: int  # bytes this expert occupies at the MoE sites in the stack's dtype
    source: str  # file path, "<lora> on <base>", or "tensors:<name>"
    kind: str  # "checkpoint" | "lora" | "tensors"
    lora: LoraReport | None = None

    @property
    def short_hash(self) -> str:
        return self.content_hash[:12]


# --------------------------------------------------------------------------------------------------
# Names and style tags

_STYLE_KEYWORDS = {
    "anime": ("anime", "animagine", "manga", "toon", "cartoon", "pony", "illustrious", "waifu", "niji", "kawaii"),
    "realism": ("real", "photo", "juggernaut", "lifelike", "cinematic"),
    "painting": ("paint", "oil", "watercolor", "watercolour", "impasto", "gouache"),
    "illustration": ("illustrat", "comic", "sketch", "lineart", "ink"),
    "3d": ("3d", "render", "cgi", "pixar", "clay"),
    "pixel": ("pixel",),
}
_NAME_NOISE = re.compile(r"^(sd|sdxl|xl|v\d*|vae|fp16|fp32|bf16|pruned|ema|final|lora|model|ckpt|\d+)$")


def _name_tokens(name: str) -> list[str]:
    # "realismEngineSDXL_v30VAE" -> ["realism", "engine", "sdxl", "v30", "vae"]
    raw = re.findall(r"\d+[a-z]*|[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+", name)
    return [t.lower() for t in raw]


def default_style_tags(name: str) -> list[str]:
    """Style tags guessed from a file name: canonical styles whose keywords start a name token
    (``animagineXL`` → ``["anime"]``, ``RealVisXL_V5.0`` → ``["realism"]``); otherwise the first
    meaningful token (``halcyon_xl`` → ``["halcyon"]``); ``[]`` if there is none."""
    tokens = _name_tokens(name)
    tags = [
        style
        for style, keywords in _STYLE_KEYWORDS.items()
        if any(token.startswith(keyword) for token in tokens for keyword in keywords)
    ]
    if tags:
        return tags
    meaningful = [t for t in tokens if not _NAME_NOISE.match(t)]
    return meaningful[:1]


def _file_stem(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else os.path.splitext(base)[0]


# --------------------------------------------------------------------------------------------------
# Hashing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def site_content_hash(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over ``(key, dtype, shape, raw bytes)`` of each tensor, in the given order (hex digest)."""
    digest = hashlib.sha256()
    for key, tensor in named_tensors:
        _hash_tensor(digest, key, tensor)
    return digest.hexdigest()


def _hash_tensor(digest, key: str, tensor: torch.Tensor) -> None:
    digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(_tensor_bytes(tensor))


def _combine_hashes(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading sources


def require_safetensors(path: PathLike, what: str = "expert checkpoint") -> str:
    """Return ``path`` as str if it names an existing ``.safetensors`` file; raise otherwise."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        ext = os.path.splitext(path)[1] or "(no extension)"
        raise ValueError(
            f"{path}: a {what} must be a .safetensors file (got {ext}); pickle-based formats such as "
            ".ckpt/.pt/.bin can run code when loaded and are not read"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


@contextlib.contextmanager
def open_safetensors(path: PathLike, role: str = "expert checkpoint") -> Iterator[Any]:
    """``safe_open`` (CPU, torch) of a file with a ``role`` ("expert checkpoint", "gate file" ...); a damaged
    file (a header too large or cut short, a truncated body) is a ValueError naming the file and its role,
    also when it shows only while tensors are read inside the block."""
    path = require_safetensors(path, role)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as exc:
        detail = str(exc).replace("Error while deserializing header: ", "")
        raise ValueError(f"{path}: this {role} is damaged or not a safetensors file ({detail})") from None


def _unet_prefix(keys: Iterable[str], label: str) -> str:
    keys = list(keys)
    if any(k.startswith(CHECKPOINT_UNET_PREFIX) for k in keys):
        return CHECKPOINT_UNET_PREFIX
    if any(k.startswith(_UNET_TOP_LEVEL) for k in keys):
        return ""
    raise ValueError(
        f"{label}: no UNet weights in ComfyUI layout (expected keys starting with "
        f"'{CHECKPOINT_UNET_PREFIX}input_blocks.' or 'input_blocks.'); diffusers-layout UNets are not supported"
    )


def read_unet_header(path: PathLike) -> dict[str, tuple[Shape, torch.dtype | str]]:
    """Shapes and dtypes of every UNet tensor of a checkpoint, read from the header only.

    Keys are relative UNet keys. Useful to check a file in a loader node before building a stack.
    """
    path = require_safetensors(path)
    with open_safetensors(path) as handle:
        keys = list(handle.keys())
        prefix = _unet_prefix(keys, path)
        header = {}
        for key in keys:
            if key.startswith(prefix):
                view = handle.get_slice(key)
                dtype_name = view.get_dtype()
                header[key[len(prefix) :]] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(dtype_name, dtype_name))
    return header


def _context_dim_hint(site: SiteInfo, got: Shape) -> str:
    if site.role not in CONTEXT_INPUT_ROLES or len(got) != 2:
        return ""
    family = {768: "an SD1.x checkpoint?", 1024: "an SD2.x checkpoint?", 1280: "an SDXL refiner?"}.get(
        got[1], "a different model family?"
    )
    return f" (context_dim {got[1]} vs {site.in_features}: {family})"


def check_sites_match(label: str, shapes: Mapping[str, Sequence[int]], sites: Sequence[SiteInfo]) -> None:
    """Raise ValueError naming ``label`` and the first offending key if ``shapes`` (relative UNet keys)
    does not hold exactly ``sites``' tensors with their shapes. Non-site keys are ignored."""
    site_by_key = {key: site for site in sites for key in site.tensor_keys}
    # Shape mismatches first: they say the most (an SD1.x file differs at attn2.to_k before anything else).
    for key, site in site_by_key.items():
        if key in shapes and tuple(shapes[key]) != site.shape_of(key):
            got = tuple(int(s) for s in shapes[key])
            raise ValueError(
                f"{label}: '{key}' has shape {got}, the base has {site.shape_of(key)}"
                f"{_context_dim_hint(site, got)}; all experts must share the base's architecture"
            )
    for key in site_by_key:
        if key not in shapes:
            raise ValueError(f"{label}: missing '{key}', which the base has; all experts must share its architecture")
    for key in shapes:
        if key not in site_by_key and is_site_key(key):
            raise ValueError(
                f"{label}: unexpected '{key}', which the base does not have; all experts must share its architecture"
            )


class _SourceReader:
    """Reads site tensors from one checkpoint file or tensor mapping; keeps a safe_open handle open."""

    def __init__(self, spec: ExpertSpec):
        self.spec = spec
        self._opened = None
        self._handle = None
        self._prefix = ""

    def __enter__(self) -> _SourceReader:
        if self.spec.kind == "checkpoint":
            self._opened = open_safetensors(self.spec.path, "expert checkpoint")
            self._handle = self._opened.__enter__()
            self._prefix = _unet_prefix(self._handle.keys(), self.spec.label)
        return self

    def __exit__(self, *exc) -> None:
        if self._opened is not None:
            opened, self._opened, self._handle = self._opened, None, None
            opened.__exit__(*exc)

    def shapes(self) -> dict[str, Shape]:
        """Relative UNet key -> shape for every UNet tensor (header only for files)."""
        if self._handle is None:
            return {k: tuple(t.shape) for k, t in self.spec.tensors.items()}
        prefix = self._prefix
        return {
            key[len(prefix) :]: tuple(self._handle.get_slice(key).get_shape())
            for key in self._handle.keys()
            if key.startswith(prefix)
        }

    def stored_dtype(self, key: str) -> torch.dtype | str:
        if self._handle is None:
            return self.spec.tensors[key].dtype
        name = self._handle.get_slice(self._prefix + key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name, name)

    def read(self, key: str) -> torch.Tensor:
        if self._handle is None:
            return self.spec.tensors[key]
        return self._handle.get_tensor(self._prefix + key)


def _source_identity(spec: ExpertSpec) -> tuple:
    if spec.kind == "checkpoint":
        return ("file", os.path.realpath(spec.path))
    return ("tensors", id(spec.tensors))


# --------------------------------------------------------------------------------------------------
# LoRA


_LORA_PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def diffusers_attention_names(unet_keys: Iterable[str]) -> dict[str, str]:
    """Map ldm transformer containers to diffusers names, derived from the UNet's key names.

    ``{"input_blocks.4.1": "down_blocks.1.attentions.0", "middle_block.1": "mid_block.attentions.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0", ...}``. The level structure is read from the keys:
    an input block with ``.0.op.weight`` is a downsampler that ends a level; output level ``x`` has one
    block more than the matching input level. Returns ``{}`` when the keys do not show the whole
    input-block sequence (e.g. only site keys are known), so diffusers-named LoRA keys stay unmatched.
    """
    keys = list(unet_keys)
    input_numbers, downsamplers, output_numbers = set(), set(), set()
    for key in keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            if parts[0] == "input_blocks":
                input_numbers.add(int(parts[1]))
                if key.startswith(f"input_blocks.{parts[1]}.0.op."):
                    downsamplers.add(int(parts[1]))
            elif parts[0] == "output_blocks":
                output_numbers.add(int(parts[1]))
    blocks = sorted(n for n in input_numbers if n > 0)  # block 0 is conv_in
    if not blocks or blocks != list(range(1, blocks[-1] + 1)):
        return {}
    names: dict[str, str] = {}
    level, index, per_level = 0, 0, []
    for n in blocks:
        if n in downsamplers:
            per_level.append(index)
            level, index = level + 1, 0
            continue
        names[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{index}"
        index += 1
    per_level.append(index)
    names["middle_block.1"] = "mid_block.attentions.0"
    n = 0
    for up_level, resnets in enumerate(reversed(per_level)):
        for index in range(resnets + 1):
            names[f"output_blocks.{n}.1"] = f"up_blocks.{up_level}.attentions.{index}"
            n += 1
    if output_numbers and max(output_numbers) != n - 1:
        return {}
    return names


def _lora_module_names(site: SiteInfo, diffusers_names: Mapping[str, str]) -> list[str]:
    container, _, rest = site.block.partition(".transformer_blocks.")
    ldm = site.path
    names = [
        "lora_unet_" + ldm.replace(".", "_"),
        "diffusion_model." + ldm,
        "lycoris_" + ldm.replace(".", "_"),
    ]
    diffusers_container = diffusers_names.get(container)
    if diffusers_container:
        diffusers = f"{diffusers_container}.transformer_blocks.{rest}.{site.role}"
        processor = diffusers.replace(".to_", ".processor.to_")
        names += [
            "lora_unet_" + diffusers.replace(".", "_"),
            "lycoris_" + diffusers.replace(".", "_"),
            diffusers,
            "unet." + diffusers,
            processor,
            "unet." + processor,
        ]
    return list(dict.fromkeys(names))


@dataclass
class _LoraDelta:
    up: torch.Tensor | None = None  # [out, rank]
    down: torch.Tensor | None = None  # [rank, in]
    alpha: float | None = None
    weight_diff: torch.Tensor | None = None  # [out, in]
    bias_diff: torch.Tensor | None = None  # [out]
    keys: tuple[str, ...] = ()


def _parse_lora(
    label: str, lora: Mapping[str, torch.Tensor], sites: Sequence[SiteInfo], diffusers_names: Mapping[str, str]
) -> tuple[dict[str, _LoraDelta], list[str]]:
    """Match LoRA keys to sites. Returns (site path -> delta, ignored keys)."""
    consumed: set[str] = set()
    deltas: dict[str, _LoraDelta] = {}
    owner_of_name: dict[str, str] = {}
    for site in sites:
        for module_name in _lora_module_names(site, diffusers_names):
            owner_of_name[module_name] = site.path
            delta = _LoraDelta()
            for up_suffix, down_suffix in _LORA_PAIR_SUFFIXES:
                up_key, down_key = module_name + up_suffix, module_name + down_suffix
                if up_key in lora and down_key in lora:
                    delta.up, delta.down = lora[up_key], lora[down_key]
                    delta.keys += (up_key, down_key)
                    break
            alpha_key = module_name + ".alpha"
            if delta.up is not None and alpha_key in lora:
                delta.alpha = float(lora[alpha_key].float().reshape(-1)[0])
                delta.keys += (alpha_key,)
            for suffix, attr in ((".diff", "weight_diff"), (".diff_b", "bias_diff")):
                if module_name + suffix in lora:
                    setattr(delta, attr, lora[module_name + suffix])
                    delta.keys += (module_name + suffix,)
            if not delta.keys:
                continue
            if site.path in deltas:
                raise ValueError(
                    f"{label}: two entries address site '{site.path}' ('{deltas[site.path].keys[0]}' and "
                    f"'{delta.keys[0]}')"
                )
            deltas[site.path] = delta
            consumed.update(delta.keys)
    ignored = sorted(k for k in lora if k not in consumed)
    for key in ignored:
        # A leftover key whose module part names a site is an adapter type we cannot apply exactly.
        cut_points = [m.start() for m in re.finditer(r"\.|_lora\.", key)]
        for cut in cut_points:
            if key[:cut] in owner_of_name:
                raise ValueError(
                    f"{label}: '{key}' targets site '{owner_of_name[key[:cut]]}' with a LoRA variant this "
                    "loader does not support (only plain LoRA up/down pairs with alpha, and full diffs)"
                )
    if not deltas:
        raise ValueError(
            f"{label}: none of its {len(lora)} keys addresses a MoE site (attention q/k/v or feed-forward of a "
            "transformer block); is it a LoRA for another model family, or for the text encoders only?"
        )
    return deltas, ignored


def _apply_lora_delta(
    label: str, site: SiteInfo, key: str, base: torch.Tensor, delta: _LoraDelta, strength: float
) -> torch.Tensor:
    """Base tensor (weight [out, in] or bias [out]) plus the LoRA's change, in float32."""
    result = base.float().clone()
    if key == site.weight_key:
        if delta.up is not None:
            up = delta.up.to(result.device, torch.float32).flatten(1)  # [out, rank]
            down = delta.down.to(result.device, torch.float32).flatten(1)  # [rank, in]
            rank = down.shape[0]
            if up.shape[1] != rank or (up.shape[0], down.shape[1]) != tuple(result.shape):
                raise ValueError(
                    f"{label}: LoRA '{delta.keys[0]}' up {tuple(delta.up.shape)} @ down {tuple(delta.down.shape)} "
                    f"does not give the site's weight shape {tuple(result.shape)}"
                )
            scale = strength * (delta.alpha / rank if delta.alpha is not None else 1.0)
            result += scale * (up @ down)
        if delta.weight_diff is not None:
            if tuple(delta.weight_diff.shape) != tuple(result.shape):
                raise ValueError(f"{label}: diff for '{site.path}' has shape {tuple(delta.weight_diff.shape)}")
            result += strength * delta.weight_diff.to(result.device, torch.float32)
    elif delta.bias_diff is not None:
        if tuple(delta.bias_diff.shape) != tuple(result.shape):
            raise ValueError(f"{label}: bias diff for '{site.path}' has shape {tuple(delta.bias_diff.shape)}")
        result += strength * delta.bias_diff.to(result.device, torch.float32)
    return result


def _load_lora_tensors(path: str) -> dict[str, torch.Tensor]:
    with open_safetensors(path, "LoRA file") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# --------------------------------------------------------------------------------------------------
# The stack


class ExpertStack:
    """Site weights of E experts stacked per site. Build with :func:`load_expert_stack`.

    Attributes:
        sites: ``list[SiteInfo]`` in execution order.
        experts: ``list[ExpertInfo]``, index ``i`` is row ``i`` of every stacked tensor.
        weights: ``{site path: Tensor [E, out, in]}``.
        biases: ``{site path: Tensor [E, out] | None}``.
        unet_keys: every UNet key name of the reference (used to map diffusers-named LoRA keys).
    """

    def __init__(
        self,
        sites: list[SiteInfo],
        experts: list[ExpertInfo],
        weights: dict[str, torch.Tensor],
        biases: dict[str, torch.Tensor | None],
        unet_keys: Sequence[str] = (),
    ):
        self.sites = list(sites)
        self.experts = list(experts)
        self.weights = weights
        self.biases = biases
        self.unet_keys = tuple(unet_keys)
        self._site_by_path = {site.path: site for site in self.sites}

    # -- facts
    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device

    @property
    def blocks(self) -> list[str]:
        """Transformer block paths in execution order, e.g. ``"input_blocks.4.1.transformer_blocks.0"``."""
        return list(dict.fromkeys(site.block for site in self.sites))

    def site(self, path: str) -> SiteInfo:
        return self._site_by_path[path]

    @property
    def site_bytes_per_expert(self) -> int:
        """Bytes one expert occupies at the MoE sites (weights and biases) in the stack's dtype."""
        return sum(
            self.weights[s.path][0].nbytes + (self.biases[s.path][0].nbytes if s.has_bias else 0) for s in self.sites
        )

    @property
    def nbytes(self) -> int:
        """Bytes of all stacked tensors (``num_experts × site_bytes_per_expert``)."""
        return sum(t.nbytes for t in self.weights.values()) + sum(
            t.nbytes for t in self.biases.values() if t is not None
        )

    def identity(self) -> dict:
        """What names this stack in gate files: expert names and hashes, and the site paths."""
        return {
            "experts": [{"name": e.name, "hash": e.content_hash} for e in self.experts],
            "sites": [s.path for s in self.sites],
        }

    def expert_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Expert ``index``'s site tensors as views, keyed by relative UNet key."""
        out = {}
        for site in self.sites:
            out[site.weight_key] = self.weights[site.path][index]
            if site.has_bias:
                out[site.bias_key] = self.biases[site.path][index]
        return out

    # -- names and tags
    def expert_index(self, ref: Union[str, int]) -> int:
        """Index of an expert named ``ref`` (case-insensitive), or else the only expert tagged ``ref``.

        Raises KeyError listing the experts when nothing (or more than one tagged expert) matches.
        """
        if isinstance(ref, int):
            if not 0 <= ref < self.num_experts:
                raise KeyError(f"expert index {ref} out of range (stack has {self.num_experts})")
            return ref
        wanted = ref.strip().lower()
        for i, expert in enumerate(self.experts):
            if expert.name.lower() == wanted:
                return i
        tagged = [i for i, e in enumerate(self.experts) if wanted in (t.lower() for t in e.tags)]
        if len(tagged) == 1:
            return tagged[0]
        known = ", ".join(f"'{e.name}' {e.tags}" for e in self.experts)
        why = "several experts have that tag" if tagged else "no expert has that name or tag"
        raise KeyError(f"expert '{ref}': {why}; experts: {known}")

    def style_prior(self, style: str | None) -> torch.Tensor | None:
        """``[E]`` float32 prior with 1 for the experts that suit ``style``, 0 elsewhere.

        An expert suits a style when it is named so, or when one of its tags is the same style in other
        words (``photorealistic`` finds a ``realism`` tag, see :mod:`.styles`); failing that, the
        experts tagged with a style of the same family (``watercolor`` finds ``painting``). ``None`` when
        ``style`` is empty or suits no expert (the caller then leaves routing to the gate)."""
        if not style:
            return None
        wanted = canonical_style(style)
        hits = [
            i for i, e in enumerate(self.experts)
            if e.name.lower() == style.strip().lower() or wanted in {canonical_style(t) for t in e.tags}
        ]
        family = style_family(wanted)
        if not hits and family is not None:
            hits = [i for i, e in enumerate(self.experts) if family in {style_family(t) for t in e.tags}]
        if not hits:
            return None
        prior = torch.zeros(self.num_experts, dtype=torch.float32)
        prior[hits] = 1.0
        return prior

    def rename_expert(self, ref: Union[str, int], new_name: str) -> None:
        index = self.expert_index(ref)
        new_name = new_name.strip()
        if not new_name:
            raise ValueError("an expert name cannot be empty")
        if any(i != index and e.name.lower() == new_name.lower() for i, e in enumerate(self.experts)):
            raise ValueError(f"another expert is already named '{new_name}'")
        self.experts[index].name = new_name

    def set_tags(self, ref: Union[str, int], tags: Sequence[str]) -> None:
        self.experts[self.expert_index(ref)].tags = [t.strip().lower() for t in tags if t.strip()]

    # -- placement
    def to(self, device: Union[str, torch.device]) -> ExpertStack:
        """Move every stacked tensor to ``device`` (in place); returns self."""
        for path in self.weights:
            self.weights[path] = self.weights[path].to(device)
            if self.biases[path] is not None:
                self.biases[path] = self.biases[path].to(device)
        return self

    def describe(self) -> str:
        lines = [
            f"{self.num_experts} experts, {len(self.blocks)} transformer blocks, {len(self.sites)} sites, {self.dtype}"
        ]
        for i, e in enumerate(self.experts):
            lines.append(
                f"  [{i}] {e.name} tags={e.tags} {e.site_bytes / 2**20:.1f} MiB hash={e.short_hash} ({e.source})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ExpertStack({json.dumps(self.expert_names)}, sites={len(self.sites)}, dtype={self.dtype})"


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate.lower() in taken:
        candidate, n = f"{name} ({n})", n + 1
    taken.add(candidate.lower())
    return candidate


def load_expert_stack(
    specs: Sequence[Union[ExpertSpec, PathLike]],
    dtype: torch.dtype | None = None,
    reference: Mapping[str, Union[torch.Tensor, Sequence[int]]] | None = None,
    device: Union[str, torch.device] = "cpu",
) -> ExpertStack:
    """Build an :class:`ExpertStack` from expert recipes (paths are checkpoint recipes).

    Args:
        specs: experts in stack order (row ``i`` of every stacked tensor is ``specs[i]``).
        dtype: storage dtype of the stack (the model's dtype, e.g. ``torch.float16``); ``None`` keeps the
            reference's stored dtype.
        reference: the base model's UNet tensors or shapes keyed by relative UNet key (e.g.
            ``model.diffusion_model.state_dict()``); fixes the sites and shapes every expert must match.
            ``None``: the first expert's (for a LoRA expert, its base's) header.
        device: where the stacked tensors are allocated.

    Raises:
        ValueError: a non-``.safetensors`` file, a file not in ComfyUI's layout, an expert whose site keys
            or shapes differ from the reference (naming file and key), an unusable LoRA.
        FileNotFoundError: a missing file.
    """
    if not specs:
        raise ValueError("an expert stack needs at least one expert")
    specs = [s if isinstance(s, ExpertSpec) else ExpertSpec.checkpoint(s) for s in specs]
    for spec in specs:
        if spec.kind == "lora":
            require_safetensors(spec.path, "LoRA file")
            if spec.base.kind == "checkpoint":
                require_safetensors(spec.base.path)
        elif spec.kind == "checkpoint":
            require_safetensors(spec.path)
        elif spec.kind != "tensors":
            raise ValueError(f"unknown expert kind '{spec.kind}'")

    # Every distinct weight source (checkpoints, tensor sets, LoRA bases) is header-checked up front.
    weight_sources: dict[tuple, ExpertSpec] = {}
    for spec in specs:
        source = spec.base if spec.kind == "lora" else spec
        weight_sources.setdefault(_source_identity(source), source)

    first_source = specs[0].base if specs[0].kind == "lora" else specs[0]
    if reference is not None:
        ref_items = _strip_unet_prefixes(reference)
        ref_shapes = {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(int(s) for s in v) for k, v in ref_items.items()
        }
        ref_label = "reference"
        ref_dtype = next(
            (v.dtype for k, v in ref_items.items() if isinstance(v, torch.Tensor) and is_site_key(k)), None
        )
    else:
        with _SourceReader(first_source) as reader:
            ref_shapes = reader.shapes()
        ref_label = first_source.label
        ref_dtype = None
    sites = discover_sites(ref_shapes, ref_label)

    for source in weight_sources.values():
        with _SourceReader(source) as reader:
            check_sites_match(source.label, reader.shapes(), sites)

    if ref_dtype is None:
        with _SourceReader(first_source) as reader:
            ref_dtype = reader.stored_dtype(sites[0].weight_key)
    stack_dtype = dtype or (ref_dtype if isinstance(ref_dtype, torch.dtype) else torch.float32)

    num_experts = len(specs)
    weights = {
        s.path: torch.empty((num_experts, s.out_features, s.in_features), dtype=stack_dtype, device=device)
        for s in sites
    }
    biases = {
        s.path: torch.empty((num_experts, s.out_features), dtype=stack_dtype, device=device) if s.has_bias else None
        for s in sites
    }

    # Rows that hold a source's weights exactly as stored, for reuse as a LoRA base.
    exact_rows: dict[tuple, tuple[int, str]] = {}
    source_hashes: dict[tuple, str] = {}
    experts: list[ExpertInfo] = []
    taken_names: set[str] = set()
    unet_keys = tuple(ref_shapes)
    diffusers_names = diffusers_attention_names(unet_keys)
    if not diffusers_names and reference is not None and first_source.kind == "checkpoint":
        # A reference of site keys alone does not show the level structure; the file's header does.
        with _SourceReader(first_source) as reader:
            unet_keys = tuple(reader.shapes())
        diffusers_names = diffusers_attention_names(unet_keys)

    for row, spec in enumerate(specs):
        lora_report = None
        if spec.kind in ("checkpoint", "tensors"):
            identity = _source_identity(spec)
            with _SourceReader(spec) as reader:
                digest = hashlib.sha256()
                stored_as_stack_dtype = True
                for site in sites:
                    for key in site.tensor_keys:
                        tensor = reader.read(key)
                        stored_as_stack_dtype &= tensor.dtype == stack_dtype
                        _hash_tensor(digest, key, tensor)
                        target = weights[site.path] if key == site.weight_key else biases[site.path]
                        target[row].copy_(tensor)
            content_hash = digest.hexdigest()
            source_hashes[identity] = content_hash
            if stored_as_stack_dtype:  # the row holds the source's exact values
                exact_rows.setdefault(identity, (row, content_hash))
            default_name = _file_stem(spec.path) if spec.kind == "checkpoint" else (spec.name or f"expert{row}")
            source = spec.label
        else:
            lora_tensors = _load_lora_tensors(spec.path)
            deltas, ignored = _parse_lora(spec.path, lora_tensors, sites, diffusers_names)
            base_identity = _source_identity(spec.base)
            reuse = exact_rows.get(base_identity)
            digest = hashlib.sha256()
            with _SourceReader(spec.base) as reader:
                for site in sites:
                    for key in site.tensor_keys:
                        target = weights[site.path] if key == site.weight_key else biases[site.path]
                        if reuse is not None:
                            base_tensor = target[reuse[0]]
                        else:
                            base_tensor = reader.read(key)
                            _hash_tensor(digest, key, base_tensor)
                        delta = deltas.get(site.path)
                        if delta is None:
                            target[row].copy_(base_tensor)
                        else:
                            target[row].copy_(
                                _apply_lora_delta(spec.path, site, key, base_tensor, delta, spec.strength)
                            )
            base_hash = reuse[1] if reuse is not None else source_hashes.setdefault(base_identity, digest.hexdigest())
            lora_hash = site_content_hash(
                (k, lora_tensors[k]) for k in sorted(k for d in deltas.values() for k in d.keys)
            )
            content_hash = _combine_hashes("mepg-lora-expert-v1", base_hash, lora_hash, repr(float(spec.strength)))
            lora_report = LoraReport([s.path for s in sites if s.path in deltas], ignored)
            default_name = _file_stem(spec.path)
            source = f"{spec.path} (strength {spec.strength:g}) on {spec.base.label}"
        name = _unique_name((spec.name or default_name).strip() or f"expert{row}", taken_names)
        tags = list(spec.tags) if spec.tags is not None else default_style_tags(name)
        site_bytes = sum(weights[s.path][row].nbytes + (biases[s.path][row].nbytes if s.has_bias else 0) for s in sites)
        experts.append(ExpertInfo(name, tags, content_hash, site_bytes, source, spec.kind, lora_report))

    return ExpertStack(sites, experts, weights, biases, unet_keys)
