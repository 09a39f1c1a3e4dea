"""Spatial-semantic routing: which expert each token of each model call favours.

Bridges the layout side (regions with a style or a forced expert, the cross-denoise plan) and the
gated blocks (:class:`~.gating.RoutingContext`). The sampler announces each pass with :meth:`MoERouting.enter`
(a local window of one region, the background, or a global pass); the host's wrapper around the
diffusion model asks :meth:`MoERouting.context_for` for the routing of the call it is about to make.

Routes:

- a region's **own route** (local window passes): its forced expert (``region.expert``, one-hot: the gate
  is not consulted), else its style as a *prior on the gate* (``raw = style_prior × sigmoid(G(x))`` per
  token, so a trained gate still shapes routing among the style's experts and experts outside the style get
  nothing; with an untrained uniform gate this is equal weights over the style's experts), else the gate;
- **global passes**: tokens inside a region's mask get ``prior = (1 - bias) + bias * own`` on top of
  the gate, so the global expert mix leads and the region's expert is favoured by ``bias``; tokens
  outside every region are routed by the gate alone;
- background passes and calls with no announced pass (e.g. a plain KSampler): the gate alone.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .experts import ExpertStack
from .gating import RegionRoute, RoutingContext

_PASS: contextvars.ContextVar[PassInfo | None] = contextvars.ContextVar("mepg_moe_pass", default=None)


@dataclass(frozen=True)
class CallFrame:
    """Where the rows of one model call lie on the latent the sampler is working on.

    ``canvas_hw``: that latent's ``(H, W)`` in cells (a window's size during a window pass).
    ``chunk_areas``: per chunk of rows (ComfyUI batches conditions as equal chunks), the area
    ``(h, w, y, x)`` the chunk was cropped to, or ``None`` for the whole canvas (ComfyUI runs an area
    condition's rows on its area only).
    """

    canvas_hw: tuple[int, int]
    chunk_areas: tuple[tuple[int, int, int, int] | None, ...] = ()

    def row_areas(self, batch_size: int) -> list[tuple[int, int, int, int] | None] | None:
        """Each row's area, or None when no chunk is cropped (or the rows do not split into the chunks)."""
        if not any(a is not None for a in self.chunk_areas) or batch_size % len(self.chunk_areas):
            return None
        per_chunk = batch_size // len(self.chunk_areas)
        return [area for area in self.chunk_areas for _ in range(per_chunk)]


@dataclass(frozen=True)
class PassInfo:
    """One announced model pass. ``kind``: ``"local"`` (a region window), ``"background"`` or ``"global"``."""

    kind: str
    region_index: int | None
    routes: tuple[RegionRoute, ...]
    region_map: torch.Tensor | None  # [H, W] long at latent resolution, -1 outside regions


class MoERouting:
    """Routing policy of one patched model (one expert stack)."""

    def __init__(self, stack: ExpertStack, global_region_bias: float = 0.5, uncond_policy: str = "same",
                 uses_sigma: bool = False):
        """``uses_sigma``: whether the gates take the noise level as input. When they do not, routing
        contexts carry no sigma and are reused across calls (token groups are then computed once per pass
        kind and latent size instead of at every model call)."""
        if not 0.0 <= global_region_bias <= 1.0:
            raise ValueError(f"global_region_bias must be in [0, 1], got {global_region_bias}")
        self.stack = stack
        self.global_region_bias = float(global_region_bias)
        self.uncond_policy = uncond_policy
        self.uses_sigma = bool(uses_sigma)
        self._contexts: dict[tuple, tuple[RoutingContext, torch.Tensor | None]] = {}
        self._region_maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- per region ------------------------------------------------------------------------------------
    def own_weights(self, expert: str | None, style: str | None) -> torch.Tensor | None:
        """``[E]`` weights a region asks for, or None to leave it to the gate. Unknown expert names raise."""
        n = self.stack.num_experts
        if expert:
            try:
                index = self.stack.expert_index(expert)
            except KeyError as exc:
                raise ValueError(f"region expert {expert!r} is not in the expert stack: {exc}") from None
            return torch.nn.functional.one_hot(torch.tensor(index), n).float()
        prior = self.stack.style_prior(style)
        if prior is None or float(prior.sum()) <= 0:
            return None
        return prior / prior.sum()

    def own_route(self, expert: str | None, style: str | None) -> RegionRoute:
        """A forced expert stays forced; a style multiplies the gate (``prior × sigmoid(G(x))``), it does not
        replace it. Cost: with a linear gate a styled region's tokens are routed per token (gate matmul plus
        one pass per expert the prior allows) instead of one merged matmul; a uniform gate keeps the fast path."""
        w = self.own_weights(expert, style)
        if w is None:
            return RegionRoute.gate()
        if expert:
            return RegionRoute.forced(int(w.argmax()))
        return RegionRoute.prior((w > 0).float())

    def global_route(self, expert: str | None, style: str | None) -> RegionRoute:
        w = self.own_weights(expert, style)
        if w is None:
            return RegionRoute.gate()
        return RegionRoute.prior((1.0 - self.global_region_bias) + self.global_region_bias * w)

    def region_routes(self, regions: Sequence[Any], mode: str = "own") -> tuple[RegionRoute, ...]:
        """One route per region: its own route (``mode="own"``, as in its local window) or its global-step
        route (``"favour"``: the gate, with the region's experts favoured by ``global_region_bias``)."""
        if mode not in ("own", "favour"):
            raise ValueError(f"region route mode must be 'own' or 'favour', got {mode!r}")
        make = self.own_route if mode == "own" else self.global_route
        return tuple(make(r.expert, r.style) for r in regions)

    def region_map(self, masks: torch.Tensor) -> torch.Tensor:
        """``[H, W]`` long: the region of each latent cell of ``masks`` ``[R, H, W]`` (-1 outside every region)."""
        return self._region_map(masks)

    # -- passes ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def enter(self, kind: str, region_index: int | None, regions: Sequence[Any], masks: torch.Tensor | None
              ) -> Iterator[PassInfo]:
        """Announce a pass. ``regions``: objects with ``expert`` and ``style``; ``masks``: ``[R, H, W]``
        latent masks (needed for global passes)."""
        if kind == "local" and region_index is None:
            kind = "background"
        if kind == "local":
            spec = regions[region_index]
            info = PassInfo(kind, region_index, (self.own_route(spec.expert, spec.style),), None)
        elif kind == "global" and regions and masks is not None:
            routes = tuple(self.global_route(r.expert, r.style) for r in regions)
            info = PassInfo(kind, None, routes, self._region_map(masks))
        else:
            info = PassInfo("background" if kind == "local" else kind, None, (), None)
        token = _PASS.set(info)
        try:
            yield info
        finally:
            _PASS.reset(token)

    def _region_map(self, masks: torch.Tensor) -> torch.Tensor:
        """``[H, W]`` region index per latent cell (-1 outside), cached per masks tensor of a sampling run."""
        cached = self._region_maps.get(id(masks))
        if cached is not None and cached[0] is masks:
            return cached[1]
        strongest, which = masks.max(dim=0)
        region_map = torch.where(strongest > 0.5, which, torch.full_like(which, -1))
        if len(self._region_maps) > 8:
            self._region_maps.clear()
        self._region_maps[id(masks)] = (masks, region_map)
        return region_map

    @contextlib.contextmanager
    def fixed_regions(self, region_map: torch.Tensor, routes: Sequence[RegionRoute]) -> Iterator[PassInfo]:
        """Route every call inside the block by ``region_map`` (``[H, W]`` long, -1 = gate) and ``routes``,
        e.g. to run a plain sampler with region-routed experts."""
        token = _PASS.set(PassInfo("global", None, tuple(routes), region_map))
        try:
            yield _PASS.get()
        finally:
            _PASS.reset(token)

    @staticmethod
    def current_pass() -> PassInfo | None:
        return _PASS.get()

    def context_for(self, batch_size: int, cond_or_uncond: Sequence[int] | None, sigma: torch.Tensor | None,
                    latent_hw: tuple[int, int], frame: CallFrame | None = None) -> RoutingContext:
        """The routing context of one diffusion-model call of ``batch_size`` rows on a ``latent_hw`` latent.

        ``cond_or_uncond``: ComfyUI's per-chunk flags (0 cond, 1 uncond); rows are split evenly among chunks.
        ``frame``: where the rows lie on the sampled latent (area conditions run on crops of it); without
        one the call's latent is taken to be the whole canvas.
        """
        is_uncond = None
        if cond_or_uncond:
            per_chunk = max(1, batch_size // len(cond_or_uncond))
            is_uncond = [bool(flag == 1) for flag in cond_or_uncond for _ in range(per_chunk)][:batch_size]
            if len(is_uncond) != batch_size:
                is_uncond = None
        info = _PASS.get()
        key = None
        if not self.uses_sigma:
            sigma = None
            key = (None if info is None else (info.kind, info.region_index, info.routes, id(info.region_map)),
                   batch_size, None if is_uncond is None else tuple(is_uncond), tuple(latent_hw), frame)
            cached = self._contexts.get(key)
            region_map = None if info is None else info.region_map
            if cached is not None and cached[1] is region_map:  # identity guards against a reused id()
                return cached[0]
        context = self._build_context(info, batch_size, is_uncond, sigma, latent_hw, frame)
        if key is not None:
            if len(self._contexts) > 64:
                self._contexts.clear()
            self._contexts[key] = (context, None if info is None else info.region_map)
        return context

    def _build_context(self, info: PassInfo | None, batch_size: int, is_uncond, sigma, latent_hw,
                       frame: CallFrame | None = None) -> RoutingContext:
        common = {"is_uncond": is_uncond, "uncond_policy": self.uncond_policy, "sigma": sigma}
        if info is None or info.kind == "background" or not info.routes:
            return RoutingContext.gate_only(batch_size, **common)
        if info.kind == "local":
            return RoutingContext(batch_size, routes=info.routes, row_region=[0] * batch_size, **common)
        if info.region_map is None:
            return RoutingContext.gate_only(batch_size, **common)
        region_map = rows_region_map(info.region_map, batch_size, tuple(latent_hw), frame)
        return RoutingContext(batch_size, routes=info.routes, region_map=region_map, **common)


def rows_region_map(region_map: torch.Tensor, batch_size: int, latent_hw: tuple[int, int],
                    frame: CallFrame | None) -> torch.Tensor:
    """The region map of a call's rows: ``region_map`` ``[H, W]`` (the canvas), or ``[B, h, w]`` crops of it
    when chunks ran on areas. Raises a ValueError when the call's latent is not (a crop of) the canvas:
    a tiling sampler or patch ran the model on tiles whose place the routing cannot know."""
    canvas = tuple(frame.canvas_hw) if frame is not None else tuple(latent_hw)
    if tuple(region_map.shape) != canvas:
        raise ValueError(
            f"MEPG MoE routing: the model was called on a {canvas[1]}x{canvas[0]} latent (cells), but the "
            f"regions are laid out on {region_map.shape[1]}x{region_map.shape[0]}: a tiled sampler or a "
            "tiling patch runs the model on tiles whose place in the picture is unknown, so regions cannot be "
            "routed there. Remove the tiling, or sample that model without regions")
    areas = frame.row_areas(batch_size) if frame is not None else None
    if areas is None:
        if canvas != tuple(latent_hw):
            raise ValueError(
                f"MEPG MoE routing: a {latent_hw[1]}x{latent_hw[0]} model input on a {canvas[1]}x{canvas[0]} "
                "canvas with no area to place it (a patch that tiles the latent?); regions cannot be routed there")
        return region_map
    crops = []
    for area in areas:
        crop = region_map if area is None else region_map[area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
        if tuple(crop.shape) != tuple(latent_hw):
            raise ValueError(f"MEPG MoE routing: a row's area {area} does not give its {latent_hw} input")
        crops.append(crop)
    return torch.stack(crops)
