"""Gate training, the method's stage 2: only the gates of a frozen expert stack learn (pure torch).

The host (ComfyUI glue in ``nodes/gate_training_nodes.py``, or ``scripts/train_gates.py``) supplies a
``denoise_fn`` that runs the MoE-patched UNet; this module never imports ComfyUI.

The objective
-------------
ComfyUI's (k-diffusion) parameterisation: a clean latent ``x0: [B, C, H, W]`` (already scaled the way the
model expects it, i.e. after ``process_latent_in``), noise ``ε ~ N(0, I)`` and a noise level ``σ: [B]``
give the model input ``x_σ = x0 + σ·ε``. Per step the loop

1. draws a timestep ``t ~ U{0, …, T-1}`` per sample (uniform over the training schedule, as SDXL was
   trained; ``σ = schedule[t]``, by default SDXL's 1000-step scaled-linear schedule, see
   :func:`sdxl_sigmas`) and the noise, both from a generator seeded by ``(seed, micro-step, position in
   the global micro-batch)``, so they do not depend on how many processes share the batch;
2. calls ``denoise_fn(x_σ [B, C, H, W], σ [B], conds: list of B host objects) -> prediction [B, C, H, W]``
   in the model's own parameterisation (``prediction_type``): ``"eps"`` (SDXL base: the noise ``ε``) or
   ``"v"`` (``v = α·ε - s·x0`` with ``α = 1/√(1+σ²)``, ``s = σ/√(1+σ²)``; ``σ_data = 1``);
   :func:`prediction_from_denoised` turns a denoiser's ``x0`` estimate into either;
3. takes the mean squared error against that target (float32) — the loss the model was trained with.

Only gate parameters are trainable: the trainer checks that every parameter that requires a gradient in
the MoE modules is a gate parameter, that the expert weights and any ``frozen`` module (the host's base
UNet) require none, and that a gradient reaches the gates (otherwise the denoise function does not run
these modules and training would silently do nothing).

Routing during training
-----------------------
The gates route as configured on the runtime (``GateOptions``: temperature, top-k, normalise). With
top-k in effect, ε-greedy exploration (Mixture-of-States; default ``ε = 0.05``) replaces a token's top-k
set by random experts with probability ε (:class:`~.gating.Exploration`, set through
``runtime.exploring``); dense routing has nothing to explore. Optional style labels add
``style_loss_weight · mean(-log Σ_{i ∈ S} w_i)`` over all tokens of a labelled sample, ``S`` the experts
tagged with (or named) the label — a nudge towards the experts users expect for that style.

Optimiser
---------
AdamW on the gate parameters; learning rate per optimiser step ``s`` (0-based, see
:func:`learning_rate_at`): linear warm-up ``lr·(s+1)/W`` for ``s < W``, then cosine decay from ``lr`` to
``min_lr_ratio·lr`` over the remaining steps. Gate weight matrices learn at ``lr / in_features``
(``lr_scaling="fan_in"``, see :meth:`GateTrainer.lr_scale`), biases at ``lr``. Gradient accumulation: one
optimiser step per ``grad_accumulation`` micro-batches of ``batch_size`` samples (the loss is averaged over
them). The loss history holds one value per optimiser step (the mean diffusion loss of its micro-batches).

Data
----
:class:`LatentDataset`: latents (one ``[N, C, H, W]`` tensor or a list of ``[C, H, W]`` of mixed sizes)
with one host conditioning object per sample (or one for all), optional style labels, and optional fixed
per-sample noise and σ (pre-noised pairs, e.g. for distillation: then step 1 uses them instead of drawing).
Samples of different sizes never share a batch: each batch is drawn from one size bucket (per epoch:
buckets shuffled, cut into batches, batch order shuffled; all seeded by ``(seed, epoch)``).
:class:`ImageCaptionFolder` reads the usual trainer layout (``name.png`` + ``name.txt`` caption, optional
``name.style`` label) and sizes images for encoding (see there); encoding needs the host's VAE and text
encoder (:func:`encode_folder`). :func:`save_latent_dataset` / :func:`load_latent_dataset` store encoded
data as ``.safetensors`` (format documented there) for long runs.

Data sets that do not fit in memory stream from a folder, a JSONL or tar shards with a latent cache
(:class:`~.training.streaming.StreamingLatentData`).

Several processes
-----------------
With a ``runner`` (:mod:`.training.distributed`, e.g. under ``accelerate launch``) the batches above are
*global* micro-batches of ``batch_size × processes``; rank ``r`` takes the ``r``-th slice, its loss is
weighted so that DDP's gradient average equals the mean over the whole global batch (a bucket's last,
smaller batch included), and only the gate parameters are wrapped in DDP. So ``N`` processes × batch
``b`` train what one process × batch ``N·b`` trains, up to float rounding; ε-greedy draws come from a
generator per rank.

Checkpoints and resume
----------------------
With ``checkpoint_dir`` set, every ``checkpoint_every`` steps and at the end two files are written
(atomically: a temporary file renamed into place):

- ``gates-step<N>.safetensors``: a gate file (:mod:`.gate_files`) that ``MEPG_GatedMoEPatch`` loads;
- ``state-step<N>.safetensors``: everything needed to resume — gate parameters (``param.<name>``), AdamW
  moments (``optim.<name>.exp_avg`` / ``.exp_avg_sq`` / ``.step``), and metadata: format
  ``mepg-gate-training-state`` v1, step, micro-step, loss history, config, the stack identity (expert
  names, content hashes, targets).

Only the newest ``keep_checkpoints`` pairs are kept (older ones are deleted after a new one is complete).
Resuming (:meth:`GateTrainer.resume`) restores all of it; since every random draw is seeded by
``(seed, step)``, a resumed run reproduces the uninterrupted one exactly (same device and dtype). A state
file for another stack, another global batch or another data set is refused, naming what differs. State
files also hold the number of processes, the global batch, the data set's fingerprint and every rank's
random generators (``rng.<rank>.torch`` / ``.cuda``, restored when resuming with as many processes);
only rank 0 writes them, the others wait until they are complete.

Failure: a non-finite loss or gradient stops training with :class:`GateTrainingError` before any update
is applied; checkpoints already on disk are left as they are and the error names the last good one.

Command line: ``python -m mepg_core.gate_training --help`` (data checks and checkpoint inspection; the
training run itself is ``scripts/train_gates.py``, which needs ComfyUI for the UNet).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import save_file

from .experts import ExpertStack, open_safetensors, require_safetensors
from .gate_files import save_gate_file
from .gating import Exploration, GateSet, MoEModules
from .training.buckets import IMAGE_EXTENSIONS, RESIZE_MODES, Sizing, image_size
from .training.buckets import aspect_buckets as aspect_buckets  # re-exported (its home is training.buckets)
from .training.distributed import LocalRunner, ParameterHolder, rank_positions, rng_state, set_rng_state

PREDICTION_TYPES = ("eps", "v")
STATE_FORMAT = "mepg-gate-training-state"
STATE_VERSION = "1"
DATASET_FORMAT = "mepg-latent-dataset"
DATASET_VERSION = "1"
GATE_PARAM_NAMES = ("gate_weight", "gate_bias", "gate_sigma_weight")


class GateTrainingError(RuntimeError):
    """Training stopped (non-finite loss or gradient, no gradient reaching the gates)."""


# --------------------------------------------------------------------------------------------------
# Noise schedule and objective


def sdxl_sigmas(num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """SDXL's training schedule as noise levels ``[T]`` float32, ascending: ``β_t`` scaled-linear
    (``linspace(√start, √end, T)²``), ``ᾱ_t = Π(1 - β)``, ``σ_t = √((1 - ᾱ_t) / ᾱ_t)`` (0.0292 … 14.6)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def _sigma_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)


def noisy_latent(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Model input ``x_σ = x0 + σ·ε`` for ``x0, noise: [B, C, H, W]``, ``sigma: [B]``."""
    return x0 + _sigma_view(sigma, x0) * noise


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the model should predict: ``ε`` (``"eps"``) or ``v = (ε - σ·x0) / √(1+σ²)`` (``"v"``)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "eps":
        return noise
    s = _sigma_view(sigma, x0)
    return (noise - s * x0) / torch.sqrt(1.0 + s * s)


def prediction_from_denoised(
    x_noisy: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """A denoiser's clean estimate ``denoised`` (what ComfyUI's ``apply_model`` returns) as the model's own
    prediction: ``ε̂ = (x_σ - x̂0) / σ``, or ``v̂ = (x_σ / (1+σ²) - x̂0) · √(1+σ²) / σ`` (inverse of
    ComfyUI's ``EPS`` / ``V_PREDICTION`` ``calculate_denoised`` with ``σ_data = 1``)."""
    _check_prediction_type(prediction_type)
    s = _sigma_view(sigma, denoised)
    x = x_noisy.to(denoised.dtype)
    if prediction_type == "eps":
        return (x - denoised) / s
    return (x / (1.0 + s * s) - denoised) * torch.sqrt(1.0 + s * s) / s


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def learning_rate_at(
    step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``: linear warm-up
    ``base·(step+1)/warmup`` for ``step < warmup``, then ``base·(m + (1-m)·½(1 + cos(π·p)))`` with
    ``p = (step - warmup) / (total - warmup)`` and ``m = min_lr_ratio`` (``p`` clamped to [0, 1])."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _seed_for(*parts: int | str) -> int:
    # A stable 63-bit seed from several integers/strings (crc-mixed; independent of Python's hash seed).
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 1_000_003 + zlib.crc32(str(part).encode())) % (2**63)
    return value


# --------------------------------------------------------------------------------------------------
# Data


def _as_sample_list(latents: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(latents, torch.Tensor):
        if latents.dim() != 4:
            raise ValueError(f"latents must be [N, C, H, W], got {tuple(latents.shape)}")
        return list(latents.unbind(0))
    out = []
    for i, latent in enumerate(latents):
        if latent.dim() == 4:
            out.extend(latent.unbind(0))  # a [b, C, H, W] chunk (ComfyUI LATENT "samples")
        elif latent.dim() == 3:
            out.append(latent)
        else:
            raise ValueError(f"latent {i} must be [C, H, W] or [b, C, H, W], got {tuple(latent.shape)}")
    return out


class LatentDataset:
    """Training samples: clean latents with their conditioning.

    Args:
        latents: ``[N, C, H, W]`` or a list of ``[C, H, W]`` / ``[b, C, H, W]`` tensors (sizes may differ),
            already scaled for the model (ComfyUI: ``model.process_latent_in(samples)``).
        conds: one host conditioning object per sample, or a single one used for all (opaque to this
            module; ``denoise_fn`` receives the batch's as a list).
        styles: optional style label per sample (``None``/``""``: unlabelled).
        noise, sigmas: optional fixed noise per sample (``[N, C, H, W]`` or list of ``[C, H, W]``) and
            σ per sample (``[N]``): pre-noised training pairs used instead of random draws.
        captions: optional captions (for reports only).
    """

    def __init__(
        self,
        latents: torch.Tensor | Sequence[torch.Tensor],
        conds: Sequence[Any] | Any,
        styles: Sequence[str | None] | None = None,
        noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        sigmas: torch.Tensor | Sequence[float] | None = None,
        captions: Sequence[str] | None = None,
    ):
        self.latents = _as_sample_list(latents)
        count = len(self.latents)
        if count == 0:
            raise ValueError("the training data set is empty (no latents)")
        if isinstance(conds, (list, tuple)) and len(conds) != 1:
            if len(conds) != count:
                raise ValueError(f"{len(conds)} conditionings for {count} latents; give one per latent, or one")
            self.conds = list(conds)
        else:
            single = conds[0] if isinstance(conds, (list, tuple)) else conds
            self.conds = [single] * count
        self.styles = [s or None for s in styles] if styles is not None else [None] * count
        if len(self.styles) != count:
            raise ValueError(f"{len(self.styles)} style labels for {count} latents")
        self.captions = list(captions) if captions is not None else [""] * count
        self.noise = None
        if noise is not None:
            self.noise = _as_sample_list(noise)
            if len(self.noise) != count or any(n.shape != x.shape for n, x in zip(self.noise, self.latents)):
                raise ValueError("fixed noise must have one tensor per latent, each of the latent's shape")
        self.sigmas = None
        if sigmas is not None:
            self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
            if self.sigmas.shape[0] != count or not bool((self.sigmas > 0).all()):
                raise ValueError("fixed sigmas must be one positive value per latent")
        if (self.noise is None) != (self.sigmas is None):
            raise ValueError("fixed noise and fixed sigmas go together (pre-noised pairs)")

    def __len__(self) -> int:
        return len(self.latents)

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """``{latent shape: sample indices}`` in first-seen order."""
        out: dict[tuple[int, ...], list[int]] = {}
        for i, latent in enumerate(self.latents):
            out.setdefault(tuple(latent.shape), []).append(i)
        return out

    def batch(self, indices: Sequence[int]) -> dict:
        """``{"x0": [B, C, H, W] float32, "conds": list, "styles": list, "noise": [B, C, H, W] | None,
        "sigma": [B] | None}`` for indices of one size bucket."""
        shapes = {tuple(self.latents[i].shape) for i in indices}
        if len(shapes) != 1:
            raise ValueError(f"a batch mixes latent sizes {sorted(shapes)}")
        return {
            "x0": torch.stack([self.latents[i] for i in indices]).float(),
            "conds": [self.conds[i] for i in indices],
            "styles": [self.styles[i] for i in indices],
            "noise": None if self.noise is None else torch.stack([self.noise[i] for i in indices]).float(),
            "sigma": None if self.sigmas is None else self.sigmas[list(indices)],
        }


@dataclass
class FolderItem:
    image_path: str
    caption: str
    style: str | None


class ImageCaptionFolder:
    """A folder of training images in the layout other trainers use.

    ``photo1.png`` + ``photo1.txt`` (its caption, UTF-8) [+ ``photo1.style``: a style label such as
    ``anime``]. Images: ``.png .jpg .jpeg .webp .bmp`` (case-insensitive), in sorted order; sub-folders are
    not searched. A missing caption is an error naming the image unless ``allow_missing_captions``
    (then ``""``).

    Sizing (images of mixed sizes are normal): ``"bucket"`` (SDXL aspect buckets, batches never mix them)
    or ``"center_crop"``, see :class:`~.training.buckets.Sizing`. For data sets that do not fit in memory
    (and tar shards or a JSONL of paths) see :mod:`.training.streaming`.

    Raises ValueError for a missing folder or one without images (naming the extensions looked for).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        resolution: int = 1024,
        mode: str = "bucket",
        allow_missing_captions: bool = False,
        bucket_step: int = 64,
    ):
        self.folder = os.fspath(folder)
        self.sizing = Sizing(resolution, mode, bucket_step)
        if not os.path.isdir(self.folder):
            raise ValueError(f"{self.folder}: training data folder not found")
        self.resolution, self.mode, self.buckets = self.sizing.resolution, mode, self.sizing.buckets
        names = sorted(
            n
            for n in os.listdir(self.folder)
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(self.folder, n))
        )
        if not names:
            raise ValueError(
                f"{self.folder}: no training images (looked for {', '.join(IMAGE_EXTENSIONS)} files, each with a "
                "same-named .txt caption beside it)"
            )
        self.items: list[FolderItem] = []
        for name in names:
            stem = os.path.splitext(os.path.join(self.folder, name))[0]
            caption = _read_text(stem + ".txt")
            if caption is None:
                if not allow_missing_captions:
                    raise ValueError(f"{self.folder}: '{name}' has no caption file '{os.path.basename(stem)}.txt'")
                caption = ""
            self.items.append(FolderItem(os.path.join(self.folder, name), caption, _read_text(stem + ".style") or None))

    def __len__(self) -> int:
        return len(self.items)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` an image of this size is trained at."""
        return self.sizing.target_size(width, height)

    def load(self, index: int) -> tuple[torch.Tensor, str, str | None]:
        """``(image [H, W, 3] float32 in [0, 1] (ComfyUI IMAGE layout, without the batch axis), caption,
        style)`` with the image sized as described above."""
        from PIL import Image

        item = self.items[index]
        with Image.open(item.image_path) as opened:
            return self.sizing.pixels(opened), item.caption, item.style

    def sizes(self) -> dict[tuple[int, int], int]:
        """``{(width, height): image count}`` without decoding pixels."""
        counts: dict[tuple[int, int], int] = {}
        for item in self.items:
            key = self.target_size(*image_size(item.image_path))
            counts[key] = counts.get(key, 0) + 1
        return counts


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def encode_folder(
    folder: ImageCaptionFolder,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[str], Any],
    progress: Callable[[int, int], None] | None = None,
) -> LatentDataset:
    """Encode every image and caption with the host's encoders: ``encode_image(image [1, H, W, 3]) ->
    latent [1, C, H/8, W/8]`` (scaled for the model), ``encode_text(caption) -> cond``."""
    latents, conds, styles, captions = [], [], [], []
    for i in range(len(folder)):
        image, caption, style = folder.load(i)
        latents.append(encode_image(image[None])[0])
        conds.append(encode_text(caption))
        styles.append(style)
        captions.append(caption)
        if progress is not None:
            progress(i + 1, len(folder))
    return LatentDataset(latents, conds, styles=styles, captions=captions)


def save_latent_dataset(
    path: str | os.PathLike,
    latents: Sequence[torch.Tensor],
    contexts: Sequence[torch.Tensor],
    pooled: Sequence[torch.Tensor] | None = None,
    captions: Sequence[str] | None = None,
    styles: Sequence[str | None] | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    sigmas: Sequence[float] | None = None,
    latent_space: str = "raw",
) -> None:
    """Write encoded training data as ``.safetensors`` (format ``mepg-latent-dataset`` v1).

    Tensors per sample ``i`` (five-digit index): ``sample.00000.latent`` ``[C, H, W]`` (VAE latent;
    ``latent_space`` says whether it is ``"raw"`` — ComfyUI's LATENT ``samples``, the host scales it — or
    ``"model"`` — already scaled), ``sample.00000.context`` ``[T, D]`` (cross-attention conditioning, SDXL:
    ``[77·k, 2048]``), optional ``sample.00000.pooled`` ``[P]`` (SDXL: ``[1280]``), optional
    ``sample.00000.noise`` ``[C, H, W]`` and ``sample.00000.sigma`` ``[1]`` (pre-noised pairs). Metadata:
    ``mepg.format``, ``mepg.version``, ``mepg.count``, ``mepg.latent_space``, ``mepg.captions`` and
    ``mepg.styles`` (JSON lists).
    """
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path}: data sets are written as .safetensors")
    count = len(latents)
    if count == 0 or len(contexts) != count or (pooled is not None and len(pooled) != count):
        raise ValueError("one latent, one context (and one pooled vector, if any) per sample")
    if latent_space not in ("raw", "model"):
        raise ValueError("latent_space must be 'raw' or 'model'")
    tensors = {}
    for i in range(count):
        key = f"sample.{i:05d}"
        tensors[f"{key}.latent"] = latents[i].detach().float().cpu().contiguous()
        tensors[f"{key}.context"] = contexts[i].detach().float().cpu().contiguous()
        if pooled is not None:
            tensors[f"{key}.pooled"] = pooled[i].detach().float().cpu().reshape(-1).contiguous()
        if noise is not None:
            tensors[f"{key}.noise"] = noise[i].detach().float().cpu().contiguous()
            tensors[f"{key}.sigma"] = torch.tensor([float(sigmas[i])])
    metadata = {
        "mepg.format": DATASET_FORMAT,
        "mepg.version": DATASET_VERSION,
        "mepg.count": str(count),
        "mepg.latent_space": latent_space,
        "mepg.captions": json.dumps(list(captions) if captions is not None else [""] * count),
        "mepg.styles": json.dumps(list(styles) if styles is not None else [None] * count),
    }
    _atomic_save(tensors, path, metadata)


def load_latent_dataset(path: str | os.PathLike) -> tuple[LatentDataset, str]:
    """Read a :func:`save_latent_dataset` file → ``(dataset, latent_space)``; each sample's cond is
    ``{"context": [T, D], "pooled": [P] | None, "caption": str}`` for the host to turn into its own."""
    path = require_safetensors(path, "training data file")
    with open_safetensors(path, "training data file") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("mepg.format") != DATASET_FORMAT:
            raise ValueError(f"{path}: not an MEPG latent data set (metadata 'mepg.format' is "
                             f"{metadata.get('mepg.format')!r})")
        count = int(metadata.get("mepg.count", "0"))
        keys = set(handle.keys())
        captions = json.loads(metadata.get("mepg.captions", "[]")) or [""] * count
        styles = json.loads(metadata.get("mepg.styles", "[]")) or [None] * count
        latents, conds, noise, sigmas = [], [], [], []
        for i in range(count):
            key = f"sample.{i:05d}"
            for part in ("latent", "context"):
                if f"{key}.{part}" not in keys:
                    raise ValueError(f"{path}: missing tensor '{key}.{part}'")
            latents.append(handle.get_tensor(f"{key}.latent"))
            pooled = handle.get_tensor(f"{key}.pooled") if f"{key}.pooled" in keys else None
            conds.append({"context": handle.get_tensor(f"{key}.context"), "pooled": pooled, "caption": captions[i]})
            if f"{key}.noise" in keys:
                noise.append(handle.get_tensor(f"{key}.noise"))
                sigmas.append(float(handle.get_tensor(f"{key}.sigma").reshape(-1)[0]))
    if count == 0:
        raise ValueError(f"{path}: the data set is empty")
    if noise and len(noise) != count:
        raise ValueError(f"{path}: fixed noise is given for some samples only")
    dataset = LatentDataset(latents, conds, styles=styles, captions=captions,
                            noise=noise or None, sigmas=sigmas or None)
    return dataset, metadata.get("mepg.latent_space", "raw")


# --------------------------------------------------------------------------------------------------
# Configuration, progress, result


@dataclass
class GateTrainingConfig:
    """Settings of one training run (all plain values: stored in checkpoints as JSON)."""

    steps: int = 1000  # optimiser steps
    learning_rate: float = 1e-2
    batch_size: int = 1
    grad_accumulation: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None
    lr_scaling: str = "fan_in"  # "fan_in": gate weight matrices learn at lr / in_features; "none"
    epsilon: float = 0.05  # ε-greedy exploration (top-k routing only)
    prediction_type: str = "eps"
    seed: int = 0
    style_loss_weight: float = 0.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (when checkpoint_dir is set)
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        _check_prediction_type(self.prediction_type)
        for name in ("steps", "batch_size", "grad_accumulation"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_steps must be ≥ 0 and min_lr_ratio in [0, 1]")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.lr_scaling not in ("fan_in", "none"):
            raise ValueError(f"lr_scaling must be 'fan_in' or 'none', got {self.lr_scaling!r}")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be ≥ 1")
        self.betas = tuple(float(b) for b in self.betas)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class TrainingProgress:
    step: int  # optimiser steps done (1 … total)
    total: int
    loss: float  # this step's mean diffusion loss
    learning_rate: float
    seconds: float  # since train() started
    samples: int = 0  # samples in this step, over all processes
    aux: float = 0.0  # this step's style loss
    epoch: int = 0  # 0-based epoch of the step's last micro-batch


@dataclass
class TrainingResult:
    gates: GateSet
    loss_history: list[float]  # one per optimiser step, from step 1 (including resumed ones)
    aux_history: list[float]  # style loss per step (zeros without style labels)
    steps: int  # optimiser steps done in total
    seconds: float  # this call's wall time
    stopped: bool = False  # should_stop() ended the run early
    checkpoints: list[str] = field(default_factory=list)  # state files of this call, oldest first
    explored_fraction: float | None = None  # tokens whose top-k set was redrawn (None: dense routing)


# --------------------------------------------------------------------------------------------------
# The trainer


DenoiseFn = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]


class GateTrainer:
    """Trains the gates of ``modules`` through ``denoise_fn`` (see the module docstring).

    Args:
        modules: the MoE modules the host's model runs (linear gates; their runtime's ``GateOptions`` are
            the routing used in training and saved with the gates).
        denoise_fn: ``(x_σ [B, C, H, W], σ [B], conds list[B]) -> prediction [B, C, H, W]``.
        dataset: a :class:`LatentDataset`.
        config: a :class:`GateTrainingConfig`.
        stack: the expert stack (names the gates in files; resolves style labels). Needed for checkpoints.
        sigmas: the training schedule ``[T]`` (default :func:`sdxl_sigmas`).
        frozen: modules that must stay frozen (the host's UNet); a trainable parameter there is an error.
        device: where inputs are put (default: the gates' device).
    """

    def __init__(
        self,
        modules: MoEModules,
        denoise_fn: DenoiseFn,
        dataset: LatentDataset,
        config: GateTrainingConfig,
        stack: ExpertStack | None = None,
        sigmas: torch.Tensor | None = None,
        frozen: Iterable[torch.nn.Module] = (),
        device: torch.device | str | None = None,
        runner: LocalRunner | None = None,
    ):
        self.modules = modules
        self.denoise_fn = denoise_fn
        self.dataset = dataset
        self.config = config
        self.stack = stack
        self.schedule = (sdxl_sigmas() if sigmas is None else torch.as_tensor(sigmas)).detach().float().cpu()
        if self.schedule.dim() != 1 or self.schedule.numel() < 1 or not bool((self.schedule > 0).all()):
            raise ValueError("sigmas must be a 1-D schedule of positive noise levels")
        self.named_params = check_only_gates_trainable(modules, frozen)
        self.params = [p for _, p in self.named_params]
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.runner = runner or LocalRunner(self.device)
        groups: dict[float, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, param in self.named_params:
            groups.setdefault(self.lr_scale(param), []).append((name, param))
        self._ordered = [item for scale in sorted(groups) for item in groups[scale]]  # optimiser index order
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for _, p in groups[scale]], "lr_scale": scale} for scale in sorted(groups)],
            lr=config.learning_rate,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        self.step = 0  # optimiser steps done
        self.micro_step = 0  # micro-batches done (the data position: the plan is a function of it)
        self.loss_history: list[float] = []
        self.aux_history: list[float] = []
        self.last_checkpoint: str | None = None
        self.global_batch = config.batch_size * self.runner.world_size
        self._buckets = list(dataset.buckets().values())
        self._batches_per_epoch = sum(math.ceil(len(b) / self.global_batch) for b in self._buckets)
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        # Only the gate parameters take part in DDP (broadcast at the start, gradients all-reduced).
        self.runner.wrap(ParameterHolder(self.named_params))
        top_k = modules.runtime.options.effective_top_k(self.num_experts)
        if top_k == 1 and modules.runtime.options.normalise:
            raise ValueError(
                "top-1 routing with normalised weights gives the kept expert weight 1 whatever the gate says, so "
                "no gradient reaches the gates; train with top_k ≥ 2 (ε-greedy explores the rest) or dense "
                "routing, then use top-1 at inference if you like"
            )
        self.exploring = top_k is not None and config.epsilon > 0
        self._style_priors = self._resolve_style_priors()

    def lr_scale(self, param: torch.nn.Parameter) -> float:
        """Per-parameter learning-rate factor: ``1 / fan_in`` for gate weight matrices (``[E, in]``, the
        token or noise-level features) when ``config.lr_scaling == "fan_in"``, else 1 (biases always 1).

        Adam moves every coordinate by about the learning rate, so a weight row over ``in`` features moves
        a logit by up to ``lr · Σ|x_i|`` per step — for SDXL's 2048-wide text context thousands of times
        what the bias moves, which saturates the sigmoids within a few steps. With ``1 / fan_in`` a step
        moves weight and bias contributions to a logit by comparable amounts (as in μP's Adam rule)."""
        if self.config.lr_scaling == "fan_in" and param.dim() == 2:
            return 1.0 / param.shape[-1]
        return 1.0

    @property
    def num_experts(self) -> int:
        return next(iter(self.modules.targets.values())).num_experts

    # -- data order
    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        generator = torch.Generator().manual_seed(_seed_for(self.config.seed, "epoch", epoch))
        size = self.global_batch
        batches = []
        for bucket in self._buckets:
            order = [bucket[int(i)] for i in torch.randperm(len(bucket), generator=generator)]
            batches += [order[i : i + size] for i in range(0, len(order), size)]
        plan = [batches[int(i)] for i in torch.randperm(len(batches), generator=generator)]
        self._plan_cache = (epoch, plan)
        return plan

    def batch_indices(self, micro_step: int) -> list[int]:
        """The sample indices of global micro-batch ``micro_step``: a pure function of the seed, the step
        and the global batch (``batch_size`` × processes), so any split over processes sees one order."""
        epoch, position = divmod(micro_step, self._batches_per_epoch)
        return self._epoch_plan(epoch)[position]

    def rank_share(self, micro_step: int) -> tuple[list[int], list[int], int]:
        """``(sample indices, their positions in the global micro-batch, its size)`` for this process:
        rank ``r`` takes the ``r``-th contiguous slice (``batch_size`` samples; a bucket's last, smaller
        batch is split as evenly as possible). A rank left with nothing recomputes the first sample with
        position -1 (weight 0) so that every rank runs the same passes."""
        ids = self.batch_indices(micro_step)
        positions = rank_positions(len(ids), self.runner.rank, self.runner.world_size)
        return [ids[max(p, 0)] for p in positions], positions, len(ids)

    def _batch_stream(self) -> Iterator[dict]:
        # This process's micro-batches from self.micro_step on; the data set may prefetch within an epoch
        # and, at an epoch's end, bring its latent cache up to date across processes.
        fetch = getattr(self.dataset, "batches", None) or (lambda requests: map(self.dataset.batch, requests))
        micro = self.micro_step
        while True:
            epoch, position = divmod(micro, self._batches_per_epoch)
            first = epoch * self._batches_per_epoch
            yield from fetch([self.rank_share(first + p)[0] for p in range(position, self._batches_per_epoch)])
            if hasattr(self.dataset, "end_epoch"):
                self.dataset.end_epoch(self.runner)
            micro = first + self._batches_per_epoch

    def _labelled_count(self, ids: Sequence[int]) -> int:
        return sum(1 for i in ids if self.dataset.styles[i] in self._style_priors) if self._style_priors else 0

    def _resolve_style_priors(self) -> dict[str, torch.Tensor]:
        labels = {s for s in self.dataset.styles if s}
        if not labels or self.config.style_loss_weight <= 0:
            return {}
        if self.stack is None:
            raise ValueError("style labels need the expert stack (GateTrainer(stack=...)) to find their experts")
        priors = {}
        for label in sorted(labels):
            prior = self.stack.style_prior(label)
            if prior is not None:
                priors[label] = prior > 0
        return priors

    # -- one optimiser step
    def _micro_loss(self, micro_step: int, batch: dict, positions: list[int], count: int,
                    labelled: int) -> torch.Tensor:
        """This process's weighted objective for micro-batch ``micro_step``: ``Σ_i w_i·mse_i`` with
        ``w_i = processes / count`` (0 for padding), so that DDP's average over processes is the mean over
        the whole global micro-batch; the style term likewise over its ``labelled`` samples. Noise and
        timestep of each sample are drawn from a generator seeded by ``(seed, micro-step, position)``.
        Leaves the detached sums of the real samples' losses in ``self._sums``."""
        x0 = batch["x0"]
        if batch["noise"] is not None:
            noise, sigma = batch["noise"], batch["sigma"].float()
        else:
            noise, timesteps = torch.empty_like(x0), []
            for row, position in enumerate(positions):
                generator = torch.Generator().manual_seed(_seed_for(self.config.seed, "sample", micro_step,
                                                                    max(position, 0)))
                noise[row] = torch.randn(x0.shape[1:], generator=generator)
                timesteps.append(int(torch.randint(0, self.schedule.numel(), (1,), generator=generator)))
            sigma = self.schedule[torch.tensor(timesteps)]
        target = prediction_target(x0, noise, sigma, self.config.prediction_type)
        x_noisy = noisy_latent(x0, noise, sigma)
        exploration = None
        if self.exploring:  # per-rank draws: each process explores its own tokens independently
            seed = _seed_for(self.config.seed, "explore", micro_step, self.runner.rank)
            exploration = Exploration(self.config.epsilon, torch.Generator().manual_seed(seed))
        real = torch.tensor([p >= 0 for p in positions])
        weights = real.double() * (self.runner.world_size / count)
        style_rows = self._style_rows(batch["styles"])
        aux_terms: list[torch.Tensor] = []

        def observe(module, weights):
            if weights.shape[0] != style_rows[0].shape[0]:
                return  # a call with another batch layout (not ours)
            rows, allowed = style_rows
            chosen = (weights[rows] * allowed[rows][:, None, :].to(weights)).sum(-1)
            aux_terms.append(-torch.log(chosen.clamp_min(1e-6)).flatten(1).mean(1))  # [labelled rows]

        with contextlib.ExitStack() as scope:
            scope.enter_context(self.modules.runtime.exploring(exploration))
            if style_rows is not None:
                scope.enter_context(self.modules.runtime.observing(observe))
            prediction = self.denoise_fn(x_noisy.to(self.device), sigma.to(self.device), batch["conds"])
        if tuple(prediction.shape) != tuple(x0.shape):
            raise GateTrainingError(f"denoise_fn returned {tuple(prediction.shape)} for input {tuple(x0.shape)}")
        per_sample = ((prediction.float() - target.to(prediction.device)) ** 2).flatten(1).mean(1)
        objective = (per_sample * weights.to(per_sample)).sum()
        loss_sum = per_sample.detach().double().cpu()[real].sum()
        aux_sum = torch.zeros((), dtype=torch.float64)
        if aux_terms and labelled:
            rows = style_rows[0].cpu()
            aux = torch.stack(aux_terms).mean(0)  # per labelled row, over the site calls
            kept = real[rows].to(aux.device)
            objective = objective + self.config.style_loss_weight * (aux * kept).sum() * (
                self.runner.world_size / labelled)
            aux_sum = aux.detach().double().cpu()[kept.cpu()].sum()
        self._sums = (loss_sum, aux_sum, exploration)
        return objective

    def _style_rows(self, styles: list[str | None]):
        if not self._style_priors:
            return None
        allowed = torch.zeros(len(styles), self.num_experts, dtype=torch.bool)
        rows = torch.zeros(len(styles), dtype=torch.bool)
        for i, label in enumerate(styles):
            if label in self._style_priors:
                allowed[i] = self._style_priors[label]
                rows[i] = True
        if not bool(rows.any()):
            return None
        return rows.to(self.device), allowed.to(self.device)

    def _fail(self, what: str) -> GateTrainingError:
        self.optimizer.zero_grad(set_to_none=True)
        where = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was written yet"
        )
        return GateTrainingError(
            f"gate training stopped at step {self.step + 1}: {what}; no update was applied and {where}. "
            "Lower the learning rate, or check the data and the model's dtype."
        )

    def train(
        self,
        progress: Callable[[TrainingProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainingResult:
        """Run until ``config.steps`` optimiser steps are done (continuing a resumed run). In a distributed
        run every process calls this; they stop together when ``should_stop`` says so on any of them."""
        config, runner = self.config, self.runner
        started = time.perf_counter()
        written: list[str] = []
        explored = torch.zeros(2, dtype=torch.float64)  # tokens redrawn, tokens seen (this process)
        stopped = False
        stream = self._batch_stream()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                while self.step < config.steps:
                    if should_stop is not None:
                        wanted = torch.tensor([1.0 if should_stop() else 0.0], dtype=torch.float64)
                        if float(runner.all_sum(wanted)[0]) > 0:
                            stopped = True
                            break
                    lr = learning_rate_at(self.step, config.steps, config.learning_rate, config.warmup_steps,
                                          config.min_lr_ratio)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group["lr_scale"]
                    self.optimizer.zero_grad(set_to_none=True)
                    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, samples, style-loss sum, labelled
                    first_micro_step = self.micro_step
                    for index in range(config.grad_accumulation):
                        micro = self.micro_step
                        _ids, positions, count = self.rank_share(micro)
                        labelled = self._labelled_count(self.batch_indices(micro))
                        batch = next(stream)
                        with runner.sync(index == config.grad_accumulation - 1):
                            objective = runner.forward(lambda b=batch, p=positions, c=count, n=labelled, m=micro:
                                                       self._micro_loss(m, b, p, c, n))
                            (objective / config.grad_accumulation).backward()
                        loss_sum, aux_sum, exploration = self._sums
                        main = runner.rank == 0  # the global counts enter once
                        sums += torch.tensor([float(loss_sum), count if main else 0, float(aux_sum),
                                              labelled if main else 0], dtype=torch.float64)
                        if exploration is not None:
                            explored += torch.tensor([exploration.explored, exploration.tokens], dtype=torch.float64)
                        self.micro_step += 1
                    grads = [p.grad for p in self.params if p.grad is not None]
                    if not grads:
                        raise GateTrainingError(
                            "no gradient reached the gates: denoise_fn does not run these MoE modules (is the model "
                            "patched with them, and are the gates token-dependent 'linear' gates?)"
                        )
                    sums = runner.all_sum(sums)  # the global micro-batches' sums (counts were split evenly)
                    loss = float(sums[0] / sums[1])
                    if not math.isfinite(loss):
                        self.micro_step = first_micro_step
                        raise self._fail(f"the loss is {loss}")
                    if not all(bool(torch.isfinite(g).all()) for g in grads):  # all-reduced: alike on every rank
                        self.micro_step = first_micro_step
                        raise self._fail("a gate gradient is not finite")
                    if config.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
                    self.optimizer.step()
                    self.step += 1
                    self.loss_history.append(loss)
                    self.aux_history.append(float(sums[2] / sums[3]) if float(sums[3]) else 0.0)
                    if progress is not None:
                        progress(TrainingProgress(self.step, config.steps, loss, lr, time.perf_counter() - started,
                                                  samples=round(float(sums[1])), aux=self.aux_history[-1],
                                                  epoch=(self.micro_step - 1) // self._batches_per_epoch))
                    if config.checkpoint_dir and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        written.append(self.save_checkpoint())
                saved_now = bool(written) and os.path.basename(written[-1]) == _checkpoint_names(self.step)[1]
                if config.checkpoint_dir and not saved_now and self.step > 0:
                    written.append(self.save_checkpoint())
        finally:
            stream.close()
        self.optimizer.zero_grad(set_to_none=True)
        explored = runner.all_sum(explored)
        return TrainingResult(
            gates=self.modules.gate_set(),
            loss_history=list(self.loss_history),
            aux_history=list(self.aux_history),
            steps=self.step,
            seconds=time.perf_counter() - started,
            stopped=stopped,
            checkpoints=written,
            explored_fraction=float(explored[0] / explored[1]) if float(explored[1]) else None,
        )

    # -- checkpoints
    def _identity(self) -> dict:
        identity = dict(self.modules.stack_identity)
        identity["targets"] = [t.path for t in self.modules.target_infos]
        return identity

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Gate parameters and AdamW moments by parameter name (CPU, float32 for moments)."""
        tensors = {}
        state = self.optimizer.state
        for name, param in self.named_params:
            tensors[f"param.{name}"] = param.detach().float().cpu().contiguous()
            if param in state and state[param]:
                s = state[param]
                tensors[f"optim.{name}.exp_avg"] = s["exp_avg"].detach().cpu().contiguous()
                tensors[f"optim.{name}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu().contiguous()
                tensors[f"optim.{name}.step"] = torch.as_tensor(s["step"]).detach().float().cpu().reshape(1)
        return tensors

    def save_checkpoint(self, directory: str | None = None) -> str:
        """Write ``gates-step<N>.safetensors`` and ``state-step<N>.safetensors``; returns the state path.
        Prunes to the newest ``keep_checkpoints`` pairs once both files are in place."""
        directory = directory or self.config.checkpoint_dir
        if not directory:
            raise ValueError("no checkpoint directory (GateTrainingConfig.checkpoint_dir)")
        if self.stack is None:
            raise ValueError("checkpoints name the expert stack: pass GateTrainer(stack=...)")
        gate_name, state_name = _checkpoint_names(self.step)
        gate_path, state_path = os.path.join(directory, gate_name), os.path.join(directory, state_name)
        if hasattr(self.dataset, "checkpoint"):
            self.dataset.checkpoint()  # e.g. write out the latent cache encoded so far
        rng = self.runner.gather_objects(rng_state())  # every process's generators, rank order
        if self.runner.is_main:
            self._write_checkpoint(directory, gate_path, state_path, rng)
        self.runner.barrier()  # the files are complete before any process goes on (or resumes from them)
        self.last_checkpoint = state_path
        return state_path

    def _write_checkpoint(self, directory: str, gate_path: str, state_path: str, rng: list) -> None:
        os.makedirs(directory, exist_ok=True)
        extra = {"step": str(self.step), "loss": repr(self.loss_history[-1]) if self.loss_history else "nan"}
        partial = gate_path[: -len(".safetensors")] + ".partial.safetensors"
        save_gate_file(partial, self.modules.gate_set(), self.stack, self.modules.runtime.options, extra)
        os.replace(partial, gate_path)
        metadata = {
            "mepg.format": STATE_FORMAT,
            "mepg.version": STATE_VERSION,
            "mepg.step": str(self.step),
            "mepg.micro_step": str(self.micro_step),
            "mepg.loss_history": json.dumps(self.loss_history),
            "mepg.aux_history": json.dumps(self.aux_history),
            "mepg.config": self.config.to_json(),
            "mepg.identity": json.dumps(self._identity()),
            "mepg.gate_options": json.dumps(self.modules.runtime.options.to_dict()),
            "mepg.world_size": str(self.runner.world_size),
            "mepg.global_batch": str(self.global_batch),
            "mepg.data": getattr(self.dataset, "fingerprint", ""),
            "mepg.rng_python": json.dumps([python for _, python in rng]),
        }
        tensors = self.state_tensors()
        for rank, (generators, _) in enumerate(rng):
            tensors.update({f"rng.{rank}.{kind}": state for kind, state in generators.items()})
        _atomic_save(tensors, state_path, metadata)
        self._prune(directory)

    def _prune(self, directory: str) -> None:
        steps = sorted(checkpoint_steps(directory))
        for old in steps[: -self.config.keep_checkpoints]:
            for name in _checkpoint_names(old):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, name))

    def resume(self, path: str | os.PathLike) -> int:
        """Restore a state file (or the newest one in a directory); returns the step it had reached.

        Raises ValueError for another format, another expert stack or another set of targets.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"{path}: no gate-training checkpoint there to resume from")
        if os.path.isdir(path):
            steps = checkpoint_steps(path)
            if not steps:
                raise ValueError(f"{path}: no gate-training checkpoint (state-step*.safetensors) to resume from")
            path = os.path.join(path, _checkpoint_names(max(steps))[1])
        info = read_training_state(path)
        mine, theirs = self._identity(), info["identity"]
        mismatch = _identity_mismatch(theirs, mine)
        if mismatch:
            raise ValueError(f"{path}: this checkpoint belongs to another expert stack: {mismatch}")
        if info["step"] > self.config.steps:
            raise ValueError(f"{path}: the checkpoint is at step {info['step']}, beyond steps={self.config.steps}")
        saved_batch = info["global_batch"] or int(info["config"].get("batch_size", self.config.batch_size))
        if saved_batch != self.global_batch:
            raise ValueError(
                f"{path}: the run had a global batch of {saved_batch} (batch size × processes), this one has "
                f"{self.global_batch} ({self.config.batch_size} × {self.runner.world_size}); the data order "
                "depends on it: resume with the same product"
            )
        fingerprint = getattr(self.dataset, "fingerprint", "")
        if info["data"] and fingerprint and info["data"] != fingerprint:
            raise ValueError(f"{path}: the checkpoint was trained on another data set (or another sizing of it)")
        with open_safetensors(path, "gate-training state file") as handle:
            keys = set(handle.keys())
            rank = self.runner.rank
            if info["world_size"] == self.runner.world_size and f"rng.{rank}.torch" in keys:
                set_rng_state({kind: handle.get_tensor(f"rng.{rank}.{kind}") for kind in ("torch", "cuda")
                               if f"rng.{rank}.{kind}" in keys}, info["rng_python"][rank])
            for name, param in self.named_params:
                key = f"param.{name}"
                if key not in keys:
                    raise ValueError(f"{path}: no '{key}' (gates with another layout, e.g. another sigma input size)")
                value = handle.get_tensor(key)
                if value.shape != param.shape:
                    raise ValueError(f"{path}: '{key}' has shape {tuple(value.shape)}, the gate {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(value.to(param.device, param.dtype))
            state = {}
            for index, (name, param) in enumerate(self._ordered):
                if f"optim.{name}.exp_avg" in keys:
                    state[index] = {
                        "step": handle.get_tensor(f"optim.{name}.step").reshape(()),
                        "exp_avg": handle.get_tensor(f"optim.{name}.exp_avg").to(param.device),
                        "exp_avg_sq": handle.get_tensor(f"optim.{name}.exp_avg_sq").to(param.device),
                    }
        saved = self.optimizer.state_dict()
        saved["state"] = state
        self.optimizer.load_state_dict(saved)
        self.step = info["step"]
        self.micro_step = info["micro_step"]
        self.loss_history = list(info["loss_history"])
        self.aux_history = list(info["aux_history"]) or [0.0] * len(self.loss_history)
        self.last_checkpoint = path
        return self.step


def check_only_gates_trainable(
    modules: MoEModules, frozen: Iterable[torch.nn.Module] = ()
) -> list[tuple[str, torch.nn.Parameter]]:
    """The named gate parameters of ``modules`` after checking that nothing else can train.

    Raises ValueError when the gates are not linear (uniform/forced gates have no parameters), a
    parameter other than a gate requires a gradient (in ``modules`` or in any ``frozen`` module), or a
    gate parameter does not.
    """
    gates = modules.gate_set()
    if gates.mode != "linear":
        raise ValueError(
            f"the model's gates are '{gates.mode}' (no parameters); training needs linear gates — start from "
            "GateSet.random / GateSet.zeros or a gate file"
        )
    named = []
    for name, param in modules.named_parameters():
        is_gate = name.rsplit(".", 1)[-1] in GATE_PARAM_NAMES
        if is_gate and not param.requires_grad:
            raise ValueError(f"gate parameter '{name}' does not require a gradient")
        if not is_gate and param.requires_grad:
            raise ValueError(f"'{name}' requires a gradient: expert weights must stay frozen")
        if is_gate:
            named.append((name, param))
    gate_ids = {id(p) for _, p in named}
    for module in frozen:
        for name, param in module.named_parameters():
            if param.requires_grad and id(param) not in gate_ids:
                raise ValueError(
                    f"'{name}' of the base model requires a gradient: only the gates may train "
                    "(call requires_grad_(False) on the base model first)"
                )
    if not named:
        raise ValueError("the MoE modules have no gate parameters")
    return named


def _identity_mismatch(stored: Mapping, current: Mapping) -> str | None:
    s_exp, c_exp = stored.get("experts", []), current.get("experts", [])
    if [e["hash"] for e in s_exp] != [e["hash"] for e in c_exp]:

        def names(experts):
            return "[" + ", ".join(f"'{e['name']}' ({e['hash'][:12]})" for e in experts) + "]"

        return f"it was trained with experts {names(s_exp)}, this run has {names(c_exp)}"
    if list(stored.get("targets", [])) != list(current.get("targets", [])):
        return "the MoE sites differ (another UNet layout)"
    return None


def _checkpoint_names(step: int) -> tuple[str, str]:
    return f"gates-step{step:07d}.safetensors", f"state-step{step:07d}.safetensors"


def checkpoint_steps(directory: str) -> list[int]:
    """Steps with a complete checkpoint (state file) in ``directory``, ascending."""
    steps = []
    for path in glob.glob(os.path.join(glob.escape(directory), "state-step*.safetensors")):
        match = re.fullmatch(r"state-step(\d+)\.safetensors", os.path.basename(path))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def read_training_state(path: str | os.PathLike) -> dict:
    """Metadata of a state file: ``step``, ``micro_step``, ``loss_history``, ``aux_history``, ``config``,
    ``identity``, ``gate_options``, ``world_size``, ``global_batch`` (0: not recorded), ``data`` (the data
    set's fingerprint, "" when none), ``rng_python`` (per rank). Raises ValueError for other files."""
    path = require_safetensors(path, "gate-training state file")
    with open_safetensors(path, "gate-training state file") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("mepg.format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a gate-training state file (metadata 'mepg.format' is "
                         f"{metadata.get('mepg.format')!r}; gate files cannot resume a run)")
    if metadata.get("mepg.version") != STATE_VERSION:
        raise ValueError(f"{path}: state version {metadata.get('mepg.version')!r}, this pack reads {STATE_VERSION}")
    return {
        "step": int(metadata["mepg.step"]),
        "micro_step": int(metadata["mepg.micro_step"]),
        "loss_history": json.loads(metadata.get("mepg.loss_history", "[]")),
        "aux_history": json.loads(metadata.get("mepg.aux_history", "[]")),
        "config": json.loads(metadata.get("mepg.config", "{}")),
        "identity": json.loads(metadata.get("mepg.identity", "{}")),
        "gate_options": json.loads(metadata.get("mepg.gate_options", "{}")),
        "world_size": int(metadata.get("mepg.world_size", "1")),
        "global_batch": int(metadata.get("mepg.global_batch", "0")),
        "data": metadata.get("mepg.data", ""),
        "rng_python": json.loads(metadata.get("mepg.rng_python", "[]")),
    }


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    partial = path[: -len(".safetensors")] + ".partial.safetensors"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------------
# Routing statistics


@contextlib.contextmanager
def routing_recorder(modules: MoEModules) -> Iterator[dict[str, torch.Tensor]]:
    """Collect mean routing weights while the block runs: yields a dict that fills with
    ``{"sum": [E] float64, "tokens": [1], "per_site": {path: [E]}}``-style running sums; use
    :func:`mean_routing` on it afterwards. Counts every token of every site call (all rows)."""
    record: dict[str, Any] = {"sum": None, "tokens": 0, "per_site": {}}

    def observe(module, weights):
        flat = weights.detach().reshape(-1, weights.shape[-1]).double().cpu()
        total = flat.sum(0)
        record["sum"] = total if record["sum"] is None else record["sum"] + total
        record["tokens"] += flat.shape[0]
        site = record["per_site"].setdefault(module.path, [torch.zeros_like(total), 0])
        site[0] += total
        site[1] += flat.shape[0]

    with modules.runtime.observing(observe):
        yield record


def mean_routing(record: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(mean weights [E] over all tokens of all site calls, {site path: mean [E]})`` from
    :func:`routing_recorder`; every site call's tokens count once."""
    if not record["tokens"]:
        raise ValueError("no routed tokens were recorded (did the model run the MoE modules?)")
    overall = (record["sum"] / record["tokens"]).float()
    per_site = {path: (s / n).float() for path, (s, n) in record["per_site"].items()}
    return overall, per_site


def initial_gates(
    stack: ExpertStack, sigma_features: int = 8, seed: int = 0, std: float = 0.02
) -> GateSet:
    """Fresh trainable gates: small seeded random rows (near-uniform routing; the randomness breaks the
    ties a zero start would give top-k) with a noise-level input of ``sigma_features`` features."""
    return GateSet.random(stack, std=std, seed=seed, sigma_features=sigma_features)


# --------------------------------------------------------------------------------------------------
# Command line (no ComfyUI here: data checks and checkpoint inspection)

_HELP = """\
Gate training (MEPG stage 2) — tools that need no ComfyUI.

Training itself runs the SDXL UNet, which lives in ComfyUI; start it with

    .venv/bin/python scripts/train_gates.py --base BASE.safetensors \\
        --experts photo.safetensors anime.safetensors ... \\
        (--data-folder IMAGES/ | --data DATA.safetensors) --steps 2000 --out-dir runs/gates

(see `scripts/train_gates.py --help`), or in a workflow with the MEPG_TrainMoEGate node. The core loop
(`GateTrainer` in this module) also runs on any `denoise_fn(x_noisy, sigma, conds) -> prediction` a host
provides.
"""


def _cmd_check_folder(args) -> int:
    folder = ImageCaptionFolder(args.folder, args.resolution, args.resize, args.allow_missing_captions)
    styles: dict[str, int] = {}
    for item in folder.items:
        styles[item.style or "-"] = styles.get(item.style or "-", 0) + 1
    print(f"{args.folder}: {len(folder)} images with captions")
    for (w, h), n in sorted(folder.sizes().items()):
        print(f"  {w}x{h} ({args.resize}): {n} images (latent {w // 8}x{h // 8})")
    print("  styles: " + ", ".join(f"{k}: {v}" for k, v in sorted(styles.items())))
    return 0


def _cmd_check_data(args) -> int:
    dataset, space = load_latent_dataset(args.path)
    print(f"{args.path}: {len(dataset)} samples, latent space '{space}', "
          f"{'pre-noised' if dataset.noise is not None else 'noise drawn per step'}")
    for shape, idx in dataset.buckets().items():
        print(f"  latent {list(shape)}: {len(idx)} samples")
    return 0


def _cmd_show(args) -> int:
    path = args.path
    if os.path.isdir(path):
        steps = checkpoint_steps(path)
        if not steps:
            print(f"{path}: no checkpoints", file=sys.stderr)
            return 1
        path = os.path.join(path, _checkpoint_names(max(steps))[1])
    info = read_training_state(path)
    history = info["loss_history"]
    print(f"{path}: step {info['step']} of {info['config'].get('steps')}")
    if history:
        print(f"  loss: first {history[0]:.6g}, last {history[-1]:.6g}, min {min(history):.6g}")
    print("  experts: " + ", ".join(f"{e['name']} ({e['hash'][:12]})" for e in info["identity"].get("experts", [])))
    print(f"  sites: {len(info['identity'].get('targets', []))}, gate options: {info['gate_options']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mepg_core.gate_training",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    folder = sub.add_parser("check-folder", help="list a training image folder: images, buckets, styles")
    folder.add_argument("folder")
    folder.add_argument("--resolution", type=int, default=1024)
    folder.add_argument("--resize", choices=RESIZE_MODES, default="bucket")
    folder.add_argument("--allow-missing-captions", action="store_true")
    folder.set_defaults(run=_cmd_check_folder)
    data = sub.add_parser("check-data", help="summarise an encoded data set (.safetensors)")
    data.add_argument("path")
    data.set_defaults(run=_cmd_check_data)
    show = sub.add_parser("show", help="summarise a training checkpoint (state file or run directory)")
    show.add_argument("path")
    show.set_defaults(run=_cmd_show)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
