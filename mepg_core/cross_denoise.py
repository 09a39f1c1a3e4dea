"""Cross denoising: region-local windows for the first ``p1`` of the steps, then global denoising.

Written like k-diffusion's samplers: plain functions of a denoiser callable, so any host can drive it
(the ComfyUI guider in ``nodes/`` does). Shapes: latents are ``[B, C, H, W]``; masks ``[R, H, W]``.

The schedule, for step ``i`` (0-based) of ``N``:

- ``stage(i) = local`` while ``i + 1 <= p1 * N`` (the paper's ``t <= p1 N`` with ``t = i + 1``), else
  ``global``. Every ``interleave``-th local step (``(i + 1) % interleave == 0``) is a global step, to keep
  the picture aligned while regions develop (``interleave = 0`` disables this).
- A **global step** runs the global prompt on the whole latent. How region experts take part is the
  ``global_mode``:

  - ``"fusion"`` (the paper's global phase, eq. 2, ``x_t = sum_i alpha_i(t) x_t^(i)``): the global pass
    (routed by the gate alone: the "global expert") plus, per region, a pass on its window with its own
    prompt and expert seeing the current latent (no isolation: the picture is one now), fused like a local
    step with the global pass as the background: ``x0 = w_g * D_g + sum_i w_i * D_i``,
    ``w_i = alpha_g(t) * weight_i * m_i``, ``w_g = 1 - sum_i w_i``. ``alpha_g`` falls linearly from
    ``global_alpha_start`` at the first step of the global phase to ``global_alpha_end`` at the last step;
    interleaved global steps of the local phase use ``global_alpha_start``. Regions whose weight is 0 at a
    step cost nothing, so ``alpha_g = 0`` is one plain pass. Cost per global step: ``1 + window coverage``
    UNet passes (``window_coverage``; the windows of the local steps).
  - ``"bias"`` (cheaper: one pass): the global pass only, with the MoE routing favouring each region's
    experts inside its mask by the patch's ``global_region_bias`` (see :mod:`.moe_routing`); region
    prompts take no part.
- A **local step** denoises each region's window (its box grown by a context margin, aligned to a
  multiple of ``align`` latent cells; SDXL's UNet halves the size twice, so 4 cells suffice) with the
  region's own prompt, and the background with the global prompt, then fuses the predictions:
  ``x0 = w_bg * D_bg + sum_i w_i * D_i`` with ``w_i = alpha(i) * weight_i * m_i`` (``m_i`` the
  region's feathered latent mask, clipped to its window; ``weight_i`` the layout region's ``weight``,
  default 1) and ``w_bg = 1 - sum_i w_i`` (the region weights renormalised where they sum above 1, so
  overlapping regions share by their weights). A region of weight 0 takes no part: no pass, and the
  other passes see the current latent there. The background pass, too, runs on a window only: the box
  around where ``w_bg > 0``, grown by the same margin (with ``alpha = 1`` and regions filling one
  side of the picture, it skips that side).
  ``alpha`` ramps linearly from ``alpha_start`` at the first local step to ``alpha_end`` at the last.
- Isolation during local steps: each pass sees the current latent only where no *other* region has
  weight; elsewhere it sees the reference latent (the initial latent noised to the current sigma,
  which no prompt influences). So a region's prompt changes nothing outside its own mask support
  until the first global step, and each window is denoised as its own picture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

LOCAL = "local"
GLOBAL = "global"
GLOBAL_MODES = ("fusion", "bias")


@dataclass(frozen=True)
class CrossDenoiseSettings:
    """User settings of the schedule (see the module docstring for what each does)."""

    p1: float = 0.7
    interleave: int = 4
    alpha_start: float = 1.0
    alpha_end: float = 1.0
    context_margin: int = 4
    align: int = 4
    # Defaults argued in web/docs/MEPG_CrossDenoiseKSampler.md: the global expert leads (alpha < 0.5) and
    # takes over completely by the last step, so seams between windows are finished by one pass.
    global_mode: str = "fusion"
    global_alpha_start: float = 0.4
    global_alpha_end: float = 0.0

    def validate(self) -> None:
        problems = []
        if self.global_mode not in GLOBAL_MODES:
            problems.append(f"global_mode must be one of {GLOBAL_MODES}, got {self.global_mode!r}")
        if not 0.0 <= self.p1 <= 1.0:
            problems.append(f"p1 must be in [0, 1], got {self.p1}")
        if self.interleave < 0:
            problems.append(f"interleave must be >= 0, got {self.interleave}")
        for name in ("alpha_start", "alpha_end", "global_alpha_start", "global_alpha_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {v}")
        if self.context_margin < 0 or self.align < 1:
            problems.append(f"context_margin >= 0 and align >= 1 required, got {self.context_margin}, {self.align}")
        if problems:
            raise ValueError("cross-denoise settings: " + "; ".join(problems))


def local_step_count(n_steps: int, p1: float) -> int:
    """How many leading steps are in the local stage: ``floor(p1 * N)`` (robust to float error)."""
    return max(0, min(n_steps, math.floor(p1 * n_steps + 1e-9)))


def stage(step: int, n_steps: int, settings: CrossDenoiseSettings) -> str:
    """``"local"`` or ``"global"`` for 0-based ``step`` of ``n_steps``."""
    if step >= local_step_count(n_steps, settings.p1):
        return GLOBAL
    if settings.interleave > 0 and (step + 1) % settings.interleave == 0:
        return GLOBAL
    return LOCAL


def stage_plan(n_steps: int, settings: CrossDenoiseSettings) -> list[str]:
    return [stage(i, n_steps, settings) for i in range(n_steps)]


def local_alpha(step: int, n_steps: int, settings: CrossDenoiseSettings) -> float:
    """Region weight ``alpha`` at a local step: linear from ``alpha_start`` to ``alpha_end``."""
    n_local = local_step_count(n_steps, settings.p1)
    if n_local <= 1:
        return settings.alpha_start
    f = min(1.0, max(0.0, step / (n_local - 1)))
    return settings.alpha_start + (settings.alpha_end - settings.alpha_start) * f


def global_alpha(step: int, n_steps: int, settings: CrossDenoiseSettings) -> float:
    """Region weight ``alpha_g`` at a global step (fusion mode): linear from ``global_alpha_start`` at the
    first global-phase step to ``global_alpha_end`` at the last step; ``global_alpha_start`` for global
    steps interleaved in the local phase. 0 in bias mode (no region passes)."""
    if settings.global_mode != "fusion":
        return 0.0
    n_local = local_step_count(n_steps, settings.p1)
    span = n_steps - 1 - n_local
    f = 0.0 if span <= 0 else min(1.0, max(0.0, (step - n_local) / span))
    return settings.global_alpha_start + (settings.global_alpha_end - settings.global_alpha_start) * f


def step_index(sigma: float, sigmas: Sequence[float]) -> int:
    """The 0-based step whose interval ``(sigmas[i+1], sigmas[i]]`` holds ``sigma``.

    ``sigmas``: the run's schedule as floats (convert a tensor once per run, not per call).
    Multi-stage samplers also evaluate between ``sigmas[i]`` and ``sigmas[i+1]``; those evaluations
    belong to step ``i``.
    """
    n = len(sigmas) - 1
    for i in range(n):
        if sigma > sigmas[i + 1] + 1e-6 * max(1.0, abs(sigmas[i + 1])):
            return i
    return max(0, n - 1)


def window_for_box(box: tuple[int, int, int, int], width: int, height: int, margin: int, align: int
                   ) -> tuple[int, int, int, int]:
    """Grow a latent box by ``margin`` cells, then to a multiple of ``align`` cells, inside the latent.

    Returns half-open ``(x1, y1, x2, y2)``. Sizes are rounded up to a multiple of ``align`` where the
    latent allows (the UNet halves the size at each level; aligned windows avoid padding artefacts).
    """
    x1, y1, x2, y2 = box
    wx1, wx2 = _grow_axis(x1, x2, width, margin, align)
    wy1, wy2 = _grow_axis(y1, y2, height, margin, align)
    return wx1, wy1, wx2, wy2


def _grow_axis(a: int, b: int, size: int, margin: int, align: int) -> tuple[int, int]:
    a, b = max(0, a - margin), min(size, b + margin)
    want = min(size, -(-(b - a) // align) * align)
    extra = want - (b - a)
    a = max(0, a - extra // 2)
    b = a + want
    if b > size:
        a, b = size - want, size
    return a, b


@dataclass
class LocalPlan:
    """Everything a local step needs for one latent size (built once per sampling run).

    ``windows``: per region ``(x1, y1, x2, y2)`` in latent cells. ``masks``: ``[R, H, W]`` feathered
    masks clipped to the windows. ``visible``: ``[R + 1, H, W]`` bool, where each pass (regions, then
    the background last) sees the current latent. ``region_weights``: ``[R]``, each region's strength
    in fusion (the layout's ``weight``; None = all 1).
    """

    windows: list[tuple[int, int, int, int]]
    masks: torch.Tensor
    visible: torch.Tensor
    settings: CrossDenoiseSettings
    n_steps: int
    extras: dict = field(default_factory=dict)
    region_weights: torch.Tensor | None = None

    @property
    def n_regions(self) -> int:
        return len(self.windows)


def make_local_plan(latent_masks: torch.Tensor, latent_boxes: list[tuple[int, int, int, int]],
                    settings: CrossDenoiseSettings, n_steps: int,
                    region_weights: Sequence[float] | None = None) -> LocalPlan:
    """Windows, clipped masks and visibility for regions with ``latent_masks`` ``[R, H, W]`` and
    ``region_weights`` (``R`` finite numbers >= 0; default all 1)."""
    settings.validate()
    r, h, w = latent_masks.shape
    weights = torch.ones(r) if region_weights is None else torch.tensor([float(v) for v in region_weights])
    if weights.shape != (r,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"region weights must be {r} finite numbers >= 0, got {region_weights!r}")
    feather_reach = _mask_reach(latent_masks, latent_boxes)
    windows = [window_for_box(b, w, h, max(settings.context_margin, reach), settings.align)
               for b, reach in zip(latent_boxes, feather_reach)]
    masks = latent_masks.clone().float()
    for i, (x1, y1, x2, y2) in enumerate(windows):
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        masks[i] = masks[i] * inside
    support = (masks > 0) & (weights > 0)[:, None, None]
    visible = torch.ones((r + 1, h, w), dtype=torch.bool)
    for i in range(r):
        others = torch.cat([support[:i], support[i + 1:]]).any(dim=0) if r > 1 else torch.zeros(h, w, dtype=torch.bool)
        visible[i] = ~others
    visible[r] = ~support.any(dim=0) if r else torch.ones(h, w, dtype=torch.bool)
    return LocalPlan(windows, masks, visible, settings, n_steps, region_weights=weights)


def _mask_reach(masks: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> list[int]:
    """How far (cells) each mask extends beyond its box, so windows always contain the whole mask."""
    reach = []
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        ys, xs = torch.nonzero(m > 0, as_tuple=True)
        if len(xs) == 0:
            reach.append(0)
            continue
        reach.append(int(max(x1 - xs.min(), xs.max() + 1 - x2, y1 - ys.min(), ys.max() + 1 - y2, 0)))
    return reach


def fusion_weights(plan: LocalPlan, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend weights of a local step: regions ``[R, H, W]`` and background ``[H, W]`` (sum to 1).

    Region ``i`` weighs ``alpha * region_weights[i] * masks[i]``, renormalised where the regions sum above 1.
    """
    w = plan.masks * alpha
    if plan.region_weights is not None:
        w = w * plan.region_weights.to(w)[:, None, None]
    total = w.sum(dim=0)
    over = total > 1.0
    if over.any():
        w = torch.where(over[None], w / total.clamp(min=1e-12)[None], w)
        total = w.sum(dim=0)
    return w, (1.0 - total).clamp(min=0.0)


Denoise = Callable[[int, torch.Tensor], torch.Tensor]


def local_step(x: torch.Tensor, x_ref: torch.Tensor, plan: LocalPlan, alpha: float, denoise: Denoise
               ) -> torch.Tensor:
    """One fused local prediction.

    ``x``: the current latent ``[B, C, H, W]``; ``x_ref``: the reference latent at the same sigma.
    ``denoise(pass_index, x_in)`` returns the denoised prediction of ``x_in`` (a window crop
    ``[B, C, h, w]``) for region ``pass_index`` or, for ``pass_index == n_regions``, the background (its
    window from :func:`background_window`). Passes whose weight is zero everywhere are skipped.
    Returns ``[B, C, H, W]``.
    """
    weights, bg_weight = fusion_weights(plan, alpha)
    weights = weights.to(x.device, x.dtype)
    bg_weight = bg_weight.to(x.device, x.dtype)
    out = torch.zeros_like(x)
    for i, (x1, y1, x2, y2) in enumerate(plan.windows):
        wi = weights[i, y1:y2, x1:x2]
        if not bool((wi > 0).any()):
            continue
        seen = _compose(x, x_ref, plan.visible[i].to(x.device))[..., y1:y2, x1:x2]
        out[..., y1:y2, x1:x2] += wi * denoise(i, seen)
    bg_window = background_window(bg_weight, plan.settings.context_margin, plan.settings.align)
    if bg_window is not None:
        x1, y1, x2, y2 = bg_window
        seen = _compose(x, x_ref, plan.visible[plan.n_regions].to(x.device))[..., y1:y2, x1:x2]
        out[..., y1:y2, x1:x2] += bg_weight[y1:y2, x1:x2] * denoise(plan.n_regions, seen)
    return out


def global_step(x: torch.Tensor, plan: LocalPlan, alpha: float, denoise: Denoise) -> torch.Tensor:
    """One fused global prediction (fusion mode).

    ``denoise(pass_index, x_in)``: for ``pass_index == n_regions`` the global pass on the whole latent
    ``x`` ``[B, C, H, W]``; for a region, its pass on its window crop of ``x`` (the current latent
    everywhere). Passes whose weight is zero everywhere are skipped (``alpha = 0``: the global pass only).
    Returns ``[B, C, H, W]``.
    """
    weights, g_weight = fusion_weights(plan, alpha)
    weights = weights.to(x.device, x.dtype)
    g_weight = g_weight.to(x.device, x.dtype)
    out = torch.zeros_like(x)
    if bool((g_weight > 0).any()):
        out = g_weight * denoise(plan.n_regions, x)
    for i, (x1, y1, x2, y2) in enumerate(plan.windows):
        wi = weights[i, y1:y2, x1:x2]
        if bool((wi > 0).any()):
            out[..., y1:y2, x1:x2] += wi * denoise(i, x[..., y1:y2, x1:x2])
    return out


def background_window(bg_weight: torch.Tensor, margin: int, align: int) -> tuple[int, int, int, int] | None:
    """The latent window of the background pass: the box around where ``bg_weight`` ``[H, W]`` is positive,
    grown and aligned like a region's window. ``None`` when the background has no weight."""
    ys, xs = torch.nonzero(bg_weight > 0, as_tuple=True)
    if len(xs) == 0:
        return None
    h, w = bg_weight.shape
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return window_for_box(box, w, h, margin, align)


def _compose(x: torch.Tensor, x_ref: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    if bool(visible.all()):
        return x
    return torch.where(visible, x, x_ref)


def window_coverage(plan: LocalPlan, height: int, width: int) -> float:
    """Sum of window areas over the latent area: the extra UNet work of a local step."""
    return sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in plan.windows) / float(height * width)
