"""Gated mixture-of-experts blocks for the MoE sites of a UNet (pure torch, no ComfyUI).

Every MoE site of an :class:`~.experts.ExpertStack` becomes a module that replaces the original one:

- :class:`GatedLinear` replaces an ``nn.Linear`` (attn1/attn2 ``to_q``/``to_k``/``to_v``):
  ``forward(x: [B, T, in]) -> [B, T, out]``, ``y = Σ_i w_i · (x @ W_i.T + b_i)``.
- :class:`GatedFeedForward` replaces a transformer block's ``ff`` (``net.0.proj`` → GEGLU → ``net.2``):
  ``forward(x: [B, T, dim]) -> [B, T, dim_out]``, ``y = Σ_i w_i · FF_i(x)``; GEGLU is not linear, so
  whole-FF outputs are mixed, one pass per expert with non-zero weight.

Mixing weights ``w: [B, T, E]``
-------------------------------
1. ``raw`` per token comes from the site's gate ``G`` (see :class:`SiteGate`) or from a region route:

   - gate ``uniform``: ``raw_i = 0.5`` (``sigmoid(0)``) for every expert, independent of ``x``;
   - gate ``forced``: one-hot on one expert;
   - gate ``linear``: ``raw = sigmoid(G(x) / temperature)`` with ``G(x) = x @ weight.T + bias`` (+
     ``sigma_embedding(sigma) @ sigma_weight.T`` when the gate takes the noise level); trained gates and
     style-centroid gates are linear;
   - region route ``forced`` / ``fixed``: ``raw`` is the route's vector (the gate is not consulted);
   - region route ``prior``: ``raw = gate raw × prior`` (per token; constant if the gate is);
   - region route ``gate`` or no region: the gate alone.
2. top-k (``GateOptions.top_k``): only the k largest stay, ties go to the lower expert index.
3. normalise (``GateOptions.normalise``): ``w = raw / Σ raw``.

Equivalences this gives (and the tests check): a one-hot ``w`` on expert j equals expert j's own module
exactly (its weights are used as they are); with ``normalise=True`` a stack of one expert equals that
expert for any gate (``w = raw / raw = 1``), and identical experts equal any one of them up to rounding;
with ``normalise=False`` the uniform gate gives ``0.5 · Σ_i Expert_i`` (not the base).

Fast paths
----------
Tokens are grouped once per call and token count (cached in the :class:`RoutingContext`): every group whose
weights do not depend on ``x`` (forced/fixed routes, uniform/forced gates) is one vector. For
:class:`GatedLinear` such a group costs one matmul with ``Σ_i w_i W_i`` (merged in float32; a one-hot
group uses ``W_j`` itself, no merge); for :class:`GatedFeedForward` one pass per expert with non-zero
weight. Tokens whose weights depend on ``x`` are dispatched per expert: with top-k or a prior only the
tokens an expert got go through it (``index_select`` / ``index_add_``); Python loops run over experts and
groups, never over tokens. Merged weights can be kept across calls in a :class:`MergedWeightCache` (keyed
by site, weight vector, dtype and device: the step is not part of the key because the weight vector is,
and expert weights never change; a byte budget bounds it).

Routing context
---------------
One :class:`MoERuntime` is shared by all modules of one patched model. Per model call the caller (the
ComfyUI wrapper around the diffusion model) builds a :class:`RoutingContext` and runs the model inside
``with runtime.activate(ctx):``. The context is kept in a module-level ``contextvars.ContextVar``, so it
is visible only to the modules of that runtime and only during that call; without an active context every
token is routed by the gate alone. See :class:`RoutingContext` for what it carries.

Training hooks
--------------
Gate training (:mod:`.gate_training`) uses two runtime-level hooks that inference never sets:
``runtime.exploring(Exploration(epsilon, generator))`` makes every top-k site of the runtime route a
fraction ``epsilon`` of its tokens to random expert sets (ε-greedy, :class:`Exploration`), and
``runtime.observing(fn)`` calls ``fn(module, weights [B, T, E])`` from each site's forward with the weights
it used (routing statistics, auxiliary routing losses). Expert weights created under
``torch.inference_mode`` (as ComfyUI creates them) are copied per call when a gradient flows through them.

Module contract for ComfyUI (why parameters are named as they are): every site module is a leaf module
whose own ``nn.Parameter``s are the expert weights (``requires_grad=False``, sharing storage with the
stack) and the gate (trainable); nothing is called ``weight``/``bias``, so ComfyUI's weight-patch lookups
never mistake them for the original layer's. Weights on another device or dtype than the input are cast
per call (works when offloaded, fast when loaded to the compute device).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertStack

GATE_MODES = ("uniform", "forced", "linear")
ROUTE_KINDS = ("gate", "forced", "fixed", "prior")
UNCOND_POLICIES = ("same", "gate", "forced")


# --------------------------------------------------------------------------------------------------
# Options and weight post-processing


@dataclass(frozen=True)
class GateOptions:
    """How raw gate values become mixing weights. ``top_k=None`` (or ≥ E) keeps every expert."""

    temperature: float = 1.0
    top_k: int | None = None
    normalise: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be an integer ≥ 1 or None, got {self.top_k}")

    def effective_top_k(self, num_experts: int) -> int | None:
        return None if self.top_k is None or self.top_k >= num_experts else int(self.top_k)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "normalise": self.normalise}

    @classmethod
    def from_dict(cls, data: Mapping) -> GateOptions:
        return cls(float(data.get("temperature", 1.0)), data.get("top_k"), bool(data.get("normalise", True)))


@dataclass
class Exploration:
    """ε-greedy exploration of top-k routing, for gate training (Mixture-of-States).

    With probability ``epsilon`` (independently per token and site) a token's top-k set is replaced by
    ``k`` experts drawn uniformly without replacement; the kept gate values are then normalised as usual,
    so the gradient reaches the gates of the experts that were tried. A random set can equal the greedy
    one, so the fraction of tokens whose set actually changes is ``epsilon · (1 - 1 / C(E, k))``.
    Applies only where top-k is in effect (``GateOptions.top_k < E``) and only to token-dependent (linear)
    gates; dense routing has nothing to explore.

    Random numbers come from ``generator`` (its device; results are moved to the tokens' device), or the
    global generator of the tokens' device when ``None``. ``tokens`` / ``explored`` count the tokens seen
    and the tokens whose set was redrawn (for monitoring and tests).
    """

    epsilon: float = 0.05
    generator: torch.Generator | None = None
    tokens: int = 0
    explored: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and 0.0 <= self.epsilon <= 1.0):
            raise ValueError(f"exploration epsilon must be in [0, 1], got {self.epsilon}")

    def redraw(self, order: torch.Tensor, num_experts: int) -> torch.Tensor:
        """``order: [..., k]`` expert indices (the greedy top-k) → the same shape, with the rows picked for
        exploration replaced by random sets of ``k`` distinct experts."""
        k = order.shape[-1]
        flat = order.reshape(-1, k)
        count = flat.shape[0]
        device = self.generator.device if self.generator is not None else order.device
        explore = torch.rand(count, generator=self.generator, device=device) < self.epsilon
        random_sets = torch.rand(count, num_experts, generator=self.generator, device=device).argsort(dim=-1)[:, :k]
        self.tokens += count
        self.explored += int(explore.sum())
        chosen = torch.where(explore[:, None].to(order.device), random_sets.to(order.device), flat)
        return chosen.reshape(order.shape)


def mix_weights(
    raw: torch.Tensor, top_k: int | None, normalise: bool, exploration: Exploration | None = None
) -> torch.Tensor:
    """``raw: [..., E]`` (≥ 0) → weights ``[..., E]``: keep the ``top_k`` largest (ties → lower index),
    then divide by their sum if ``normalise``. Differentiable in the kept entries. With ``exploration``
    (training only) some tokens keep a random top-k set instead (see :class:`Exploration`)."""
    if top_k is not None and top_k < raw.shape[-1]:
        order = torch.sort(raw, dim=-1, descending=True, stable=True).indices[..., :top_k]
        if exploration is not None and exploration.epsilon > 0:
            order = exploration.redraw(order, raw.shape[-1])
        keep = torch.zeros_like(raw, dtype=torch.bool).scatter_(-1, order, True)
        raw = torch.where(keep, raw, torch.zeros_like(raw))
    if normalise:
        raw = raw / raw.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)
    return raw


@functools.lru_cache(maxsize=4096)
def _final_constant_weights(raw: tuple[float, ...], top_k: int | None, normalise: bool) -> tuple[float, ...]:
    # Token-independent vectors are post-processed once on the CPU (float64) and kept as Python floats.
    return tuple(float(v) for v in mix_weights(torch.tensor(raw, dtype=torch.float64), top_k, normalise))


def sigma_embedding(sigma: torch.Tensor, num_features: int) -> torch.Tensor:
    """Noise level as gate input: ``sigma [B]`` → ``[B, num_features]`` float32.

    ``c = log(sigma) / 4``; features ``sin(c · 2^k)`` then ``cos(c · 2^k)`` for ``k = 0 … F/2 - 1``.
    """
    if num_features <= 0 or num_features % 2:
        raise ValueError(f"num_features must be a positive even number, got {num_features}")
    c = torch.log(sigma.float().reshape(-1).clamp_min(1e-8)) / 4.0
    freqs = 2.0 ** torch.arange(num_features // 2, dtype=torch.float32, device=c.device)
    angles = c[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


# --------------------------------------------------------------------------------------------------
# Targets: the modules that get replaced


@dataclass(frozen=True)
class MoETarget:
    """One module to replace. ``path`` is relative to the diffusion model (ComfyUI object patch:
    ``"diffusion_model." + path``): a site path for linear sites, ``"<block>.ff"`` for feed-forwards."""

    path: str
    kind: str  # "linear" | "feedforward"
    input_kind: str  # "spatial" (the block's image tokens) | "context" (attn2 k/v: text tokens)
    in_features: int
    out_features: int
    sites: tuple[str, ...]  # stack site paths it uses: (site,) or (ff.net.0.proj, ff.net.2)


def moe_targets(stack: ExpertStack) -> list[MoETarget]:
    """Per transformer block: six linear targets (attn1/attn2 q, k, v) then its feed-forward."""
    targets = []
    for block in stack.blocks:
        for role in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v"):
            site = stack.site(f"{block}.{role}")
            targets.append(
                MoETarget(site.path, "linear", site.input_kind, site.in_features, site.out_features, (site.path,))
            )
        proj, out = stack.site(f"{block}.ff.net.0.proj"), stack.site(f"{block}.ff.net.2")
        targets.append(
            MoETarget(
                f"{block}.ff", "feedforward", "spatial", proj.in_features, out.out_features, (proj.path, out.path)
            )
        )
    return targets


# --------------------------------------------------------------------------------------------------
# Gates


@dataclass
class SiteGate:
    """The gate of one target. ``weight [E, in]``, ``bias [E]``, ``sigma_weight [E, F]`` (float32) only
    for mode ``"linear"``; ``forced_expert`` only for mode ``"forced"``."""

    mode: str
    num_experts: int
    forced_expert: int | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    sigma_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got '{self.mode}'")
        if self.mode == "forced" and not (
            self.forced_expert is not None and 0 <= self.forced_expert < self.num_experts
        ):
            raise ValueError(f"forced expert {self.forced_expert} out of range for {self.num_experts} experts")
        if self.mode == "linear":
            if self.weight is None or self.bias is None:
                raise ValueError("a linear gate needs weight [E, in] and bias [E]")
            if (
                self.weight.dim() != 2
                or self.weight.shape[0] != self.num_experts
                or tuple(self.bias.shape) != (self.num_experts,)
            ):
                raise ValueError(
                    f"gate weight {tuple(self.weight.shape)} / bias {tuple(self.bias.shape)} do not fit "
                    f"{self.num_experts} experts"
                )
            if self.sigma_weight is not None and (
                self.sigma_weight.dim() != 2 or self.sigma_weight.shape[0] != self.num_experts
            ):
                raise ValueError(
                    f"gate sigma_weight {tuple(self.sigma_weight.shape)} does not fit {self.num_experts} experts"
                )

    @property
    def sigma_features(self) -> int:
        return 0 if self.sigma_weight is None else int(self.sigma_weight.shape[1])

    def constant_raw(self) -> tuple[float, ...] | None:
        """``raw`` when it does not depend on the input (uniform, forced), else ``None``."""
        if self.mode == "uniform":
            return (0.5,) * self.num_experts
        if self.mode == "forced":
            return tuple(1.0 if i == self.forced_expert else 0.0 for i in range(self.num_experts))
        return None


class GateSet:
    """Gates for every target of a stack.

    ``params[target path] = (weight [E, in], bias [E], sigma_weight [E, F] | None)`` for mode
    ``"linear"``; uniform and forced gate sets carry no tensors.
    """

    def __init__(
        self,
        mode: str,
        num_experts: int,
        forced_expert: int | None = None,
        sigma_features: int = 0,
        params: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None,
    ):
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got '{mode}'")
        if mode == "linear" and params is None:
            raise ValueError("a linear gate set needs params")
        self.mode = mode
        self.num_experts = int(num_experts)
        self.forced_expert = forced_expert
        self.sigma_features = int(sigma_features)
        self.params = dict(params or {})
        if mode == "forced":
            SiteGate(mode, self.num_experts, forced_expert)  # raises on an out-of-range expert

    def site_gate(self, target: MoETarget) -> SiteGate:
        if self.mode != "linear":
            return SiteGate(self.mode, self.num_experts, self.forced_expert)
        if target.path not in self.params:
            raise ValueError(f"gate set has no gate for '{target.path}'")
        weight, bias, sigma_weight = self.params[target.path]
        if weight.shape[-1] != target.in_features:
            raise ValueError(
                f"gate for '{target.path}' takes {weight.shape[-1]} inputs, the site has {target.in_features}"
            )
        return SiteGate("linear", self.num_experts, None, weight, bias, sigma_weight)

    # -- constructors
    @classmethod
    def uniform(cls, num_experts: int) -> GateSet:
        return cls("uniform", num_experts)

    @classmethod
    def forced(cls, num_experts: int, expert: int) -> GateSet:
        return cls("forced", num_experts, forced_expert=expert)

    @classmethod
    def zeros(cls, stack: ExpertStack, sigma_features: int = 0) -> GateSet:
        """Linear gates with all-zero parameters (they start out uniform): the start of gate training."""
        return cls.random(stack, std=0.0, sigma_features=sigma_features)

    @classmethod
    def random(cls, stack: ExpertStack, std: float = 0.02, seed: int = 0, sigma_features: int = 0) -> GateSet:
        """Linear gates with N(0, std²/in) weights and zero bias (seeded)."""
        generator = torch.Generator().manual_seed(seed)
        params = {}
        for target in moe_targets(stack):
            weight = torch.randn(stack.num_experts, target.in_features, generator=generator) * (
                std / math.sqrt(target.in_features)
            )
            sigma_weight = (
                torch.randn(stack.num_experts, sigma_features, generator=generator) * std if sigma_features else None
            )
            params[target.path] = (weight, torch.zeros(stack.num_experts), sigma_weight)
        return cls("linear", stack.num_experts, sigma_features=sigma_features, params=params)

    @classmethod
    def from_centroids(cls, stack: ExpertStack, means: Mapping[str, torch.Tensor], sharpness: float = 4.0) -> GateSet:
        """Training-free style gates from per-target mean inputs ``means[path]: [E, in]`` (expert i's mean
        input at that target on its style prompt, e.g. from :class:`InputMeanRecorder`); see
        :func:`centroid_gate_params`."""
        params = {}
        for target in moe_targets(stack):
            if target.path not in means:
                raise ValueError(f"no mean inputs recorded for '{target.path}'")
            weight, bias = centroid_gate_params(means[target.path], sharpness)
            params[target.path] = (weight, bias, None)
        return cls("linear", stack.num_experts, params=params)


def centroid_gate_params(means: torch.Tensor, sharpness: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear gate rows from per-expert mean inputs ``means [E, in]`` → ``(weight [E, in], bias [E])``.

    With ``m̄`` the mean of the centroids and ``d_i = m_i - m̄``:
    ``G_i(x) = sharpness · 2 d_i·(x - (m_i + m̄)/2) / |d_i|²``, i.e. ``+sharpness`` at ``m_i``,
    ``-sharpness`` at ``m̄``, and positive exactly where ``x`` is nearer to ``m_i`` than to ``m̄``
    (the half-space between them). An expert whose centroid equals ``m̄`` gets a zero row (raw 0.5).
    """
    if means.dim() != 2:
        raise ValueError(f"means must be [E, in], got {tuple(means.shape)}")
    m = means.double()
    m_bar = m.mean(dim=0)
    d = m - m_bar
    norm2 = (d * d).sum(dim=1)
    usable = norm2 > 1e-12 * norm2.max().clamp_min(1e-300)
    scale = torch.where(usable, 2.0 * sharpness / norm2.clamp_min(1e-300), torch.zeros_like(norm2))
    weight = d * scale[:, None]
    bias = -0.5 * scale * (d * (m + m_bar)).sum(dim=1)
    return weight.float(), bias.float()


class InputMeanRecorder:
    """Accumulates each target's mean input per expert, for :meth:`GateSet.from_centroids`.

    Usage: for each expert ``j``: ``recorder.expert = j``; run the patched model on expert j's style
    prompt with ``RoutingContext.forced(batch, j, recorder=recorder)`` active. Uncond rows are skipped
    unless ``include_uncond``. Sums are kept in float64 on the CPU.
    """

    def __init__(self, num_experts: int, include_uncond: bool = False):
        self.num_experts = num_experts
        self.include_uncond = include_uncond
        self.expert = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, path: str, x: torch.Tensor, is_uncond: torch.Tensor | None) -> None:
        """``x: [B, T, in]``; ``is_uncond: [B]`` bool or None."""
        x = x.detach()
        if is_uncond is not None and not self.include_uncond:
            x = x[~is_uncond.to(x.device)]
        if x.numel() == 0:
            return
        flat = x.reshape(-1, x.shape[-1])
        if path not in self._sums:
            self._sums[path] = torch.zeros(self.num_experts, flat.shape[1], dtype=torch.float64)
            self._counts[path] = torch.zeros(self.num_experts, dtype=torch.float64)
        self._sums[path][self.expert] += flat.double().sum(dim=0).cpu()
        self._counts[path][self.expert] += flat.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        """``{path: [E, in] float32}``; raises if some expert never ran at some target."""
        out = {}
        for path, sums in self._sums.items():
            counts = self._counts[path]
            if (counts == 0).any():
                missing = [i for i in range(self.num_experts) if counts[i] == 0]
                raise ValueError(f"no inputs recorded for expert(s) {missing} at '{path}'")
            out[path] = (sums / counts[:, None]).float()
        return out


# --------------------------------------------------------------------------------------------------
# Routing context


@dataclass(frozen=True)
class RegionRoute:
    """How the tokens of one region are routed (see the module docstring, step 1).

    ``kind``: ``"gate"`` (the gate decides), ``"forced"`` (``expert``), ``"fixed"`` (``weights`` used as
    raw, token-independent: fast path), ``"prior"`` (``weights`` multiply the gate's raw per token).
    ``parts`` is internal: an area-weighted mix of other routes (for rows that span several regions at
    sites whose tokens are not spatial).
    """

    kind: str = "gate"
    expert: int | None = None
    weights: tuple[float, ...] | None = None
    parts: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROUTE_KINDS + ("mix",):
            raise ValueError(f"route kind must be one of {ROUTE_KINDS}, got '{self.kind}'")
        if self.kind == "forced" and (self.expert is None or self.expert < 0):
            raise ValueError("a forced route needs an expert index ≥ 0")
        if self.kind in ("fixed", "prior"):
            if not self.weights or any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"route weights must be finite, ≥ 0 and not all zero, got {self.weights}")

    @classmethod
    def gate(cls) -> RegionRoute:
        return cls("gate")

    @classmethod
    def forced(cls, expert: int) -> RegionRoute:
        return cls("forced", expert=int(expert))

    @classmethod
    def fixed(cls, weights: Sequence[float] | torch.Tensor) -> RegionRoute:
        return cls("fixed", weights=tuple(float(w) for w in torch.as_tensor(weights).reshape(-1).tolist()))

    @classmethod
    def prior(cls, weights: Sequence[float] | torch.Tensor) -> RegionRoute:
        return cls("prior", weights=tuple(float(w) for w in torch.as_tensor(weights).reshape(-1).tolist()))


@dataclass
class _TokenPlan:
    """How the ``B·T`` flattened tokens of one call split into groups (positions on the compute device)."""

    constant_groups: list[tuple[tuple[float, ...], torch.Tensor | None]]  # (raw [E], positions | None = all)
    has_dynamic: bool
    dynamic_positions: torch.Tensor | None  # None = all tokens
    dynamic_prior: torch.Tensor | None  # [N_dyn, E] float32, or None (no prior)
    dynamic_rows: torch.Tensor | None  # [N_dyn] batch row of each dynamic token


class RoutingContext:
    """Per-call routing facts for one batch of ``B`` rows.

    Args:
        batch_size: ``B``, the model input's batch size (cond and uncond rows together).
        routes: ``routes[r]`` is region ``r``'s :class:`RegionRoute`.
        row_region: ``[B]`` long: the region of each whole row (``-1``: gate only). Used for every token
            when ``region_map`` is absent, and for tokens that are not spatial (attn2 keys/values).
        region_map: ``[B, H, W]`` long at latent resolution: the region of each latent pixel (``-1``: gate
            only). A site with ``T`` spatial tokens uses ``region_map[:, ::f, ::f]`` for the ``f = 1, 2, 4…``
            with ``ceil(H/f)·ceil(W/f) == T`` (the UNet's stride-2 downsampling; tokens row-major). Sites
            whose tokens are not spatial, or whose ``T`` matches no level, route each row by ``row_region``
            if given; otherwise a row whose map holds one region uses it, and a row spanning several regions
            uses their area-weighted mix when all are forced/fixed (gate only otherwise).
        is_uncond: ``[B]`` bool, the unconditional (negative) rows.
        uncond_policy: ``"same"`` (uncond rows routed like any row), ``"gate"`` (their region routes are
            ignored), ``"forced"`` (they all use ``uncond_expert``).
        sigma: ``[B]`` noise level per row (or ``[B / n]``: the sigmas of one chunk when the batch is ``n``
            chunks of the same latents, as ComfyUI batches cond and uncond; tiled); required when gates
            take it as input.
        options: overrides the runtime's :class:`GateOptions` for this call.
        recorder: an :class:`InputMeanRecorder` to feed (centroid calibration).
    """

    def __init__(
        self,
        batch_size: int,
        routes: Sequence[RegionRoute] = (),
        row_region: torch.Tensor | Sequence[int] | None = None,
        region_map: torch.Tensor | None = None,
        is_uncond: torch.Tensor | Sequence[bool] | None = None,
        uncond_policy: str = "same",
        uncond_expert: int = 0,
        sigma: torch.Tensor | Sequence[float] | None = None,
        options: GateOptions | None = None,
        recorder: InputMeanRecorder | None = None,
    ):
        self.batch_size = int(batch_size)
        self.routes = list(routes)
        self.options = options
        self.recorder = recorder
        if uncond_policy not in UNCOND_POLICIES:
            raise ValueError(f"uncond_policy must be one of {UNCOND_POLICIES}, got '{uncond_policy}'")
        self.uncond_policy = uncond_policy
        self.uncond_expert = int(uncond_expert)
        num_routes = len(self.routes)

        def rows_tensor(value, dtype, what):
            tensor = torch.as_tensor(value, dtype=dtype).detach().to("cpu").reshape(-1)
            if tensor.shape[0] != self.batch_size:
                raise ValueError(f"{what} has {tensor.shape[0]} rows, the batch has {self.batch_size}")
            return tensor

        self.row_region = None if row_region is None else rows_tensor(row_region, torch.long, "row_region")
        self.is_uncond = None if is_uncond is None else rows_tensor(is_uncond, torch.bool, "is_uncond")
        self.sigma = None if sigma is None else torch.as_tensor(sigma).detach().reshape(-1).float()
        if self.sigma is not None and self.sigma.shape[0] != self.batch_size:
            rows = self.sigma.shape[0]
            if rows == 0 or self.batch_size % rows:
                raise ValueError(f"sigma has {rows} rows, the batch has {self.batch_size}")
            # One value for all rows, or the sigmas of one chunk when the batch is several chunks of it
            # concatenated (ComfyUI batches cond and uncond chunks of the same latents this way).
            self.sigma = self.sigma.repeat(self.batch_size // rows)
        self.region_map = None
        if region_map is not None:
            region_map = torch.as_tensor(region_map).detach().to("cpu", torch.long)
            if region_map.dim() == 2:
                region_map = region_map.unsqueeze(0).expand(self.batch_size, -1, -1)
            if region_map.dim() != 3 or region_map.shape[0] != self.batch_size:
                raise ValueError(f"region_map must be [B={self.batch_size}, H, W], got {tuple(region_map.shape)}")
            self.region_map = region_map
        for what, ids in (("row_region", self.row_region), ("region_map", self.region_map)):
            if ids is not None and ids.numel() and (ids.min() < -1 or ids.max() >= num_routes):
                raise ValueError(f"{what} holds region ids outside -1…{num_routes - 1}")

        # Internal route table = user routes + synthetic ones (row mixes, the uncond expert).
        self._table: list[RegionRoute] = list(self.routes)
        self._row_ids = self._compute_row_ids()
        self._uncond_route_id = None
        if self.is_uncond is not None and self.uncond_policy == "forced":
            self._table.append(RegionRoute.forced(self.uncond_expert))
            self._uncond_route_id = len(self._table) - 1
        self._token_ids_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._plans: dict[tuple, _TokenPlan] = {}
        self._sigma_on: dict[torch.device, torch.Tensor] = {}
        self._expanded: dict[int, RoutingContext] = {}

    # -- convenience constructors
    @classmethod
    def gate_only(cls, batch_size: int, **kwargs) -> RoutingContext:
        """Every token routed by the gate (still carries sigma / is_uncond / options)."""
        return cls(batch_size, **kwargs)

    @classmethod
    def forced(cls, batch_size: int, expert: int, **kwargs) -> RoutingContext:
        """Every row on one expert (global steps with a chosen expert; centroid calibration)."""
        return cls(batch_size, routes=[RegionRoute.forced(expert)], row_region=[0] * batch_size, **kwargs)

    # -- token → route id
    def _compute_row_ids(self) -> torch.Tensor:
        if self.row_region is not None:
            return self.row_region.clone()
        ids = torch.full((self.batch_size,), -1, dtype=torch.long)
        if self.region_map is None:
            return ids
        for row in range(self.batch_size):
            values, counts = torch.unique(self.region_map[row], return_counts=True)
            if values.numel() == 1:
                ids[row] = int(values[0])
            elif bool((values >= 0).all()) and all(self.routes[int(v)].kind in ("forced", "fixed") for v in values):
                total = float(counts.sum())
                parts = tuple((int(v), float(c) / total) for v, c in zip(values, counts))
                self._table.append(RegionRoute("mix", parts=parts))
                ids[row] = len(self._table) - 1
        return ids

    def _spatial_ids(self, num_tokens: int) -> torch.Tensor | None:
        height, width = self.region_map.shape[1:]
        factor = 1
        while True:
            h, w = -(-height // factor), -(-width // factor)
            if h * w == num_tokens:
                return self.region_map[:, ::factor, ::factor].reshape(self.batch_size, num_tokens)
            if h * w < num_tokens or (h == 1 and w == 1):
                return None
            factor *= 2

    def token_route_ids(self, num_tokens: int, input_kind: str) -> torch.Tensor:
        """``[B, T]`` long (CPU): each token's id in the internal route table; ``-1`` = gate only."""
        key = (num_tokens, input_kind)
        if key not in self._token_ids_cache:
            ids = None
            if input_kind == "spatial" and self.region_map is not None:
                ids = self._spatial_ids(num_tokens)
            if ids is None:
                ids = self._row_ids[:, None].expand(self.batch_size, num_tokens)
            ids = ids.clone()
            if self.is_uncond is not None and self.uncond_policy != "same":
                ids[self.is_uncond] = -1 if self.uncond_policy == "gate" else self._uncond_route_id
            self._token_ids_cache[key] = ids
        return self._token_ids_cache[key]

    # -- planning
    def _route_raw(self, route_id: int, num_experts: int, gate_raw: tuple[float, ...] | None):
        """("const", raw) or ("dynamic", prior | None) for one route id."""
        route = self._table[route_id] if route_id >= 0 else RegionRoute.gate()
        if route.kind == "gate":
            return ("const", gate_raw) if gate_raw is not None else ("dynamic", None)
        if route.kind == "forced":
            if route.expert >= num_experts:
                raise ValueError(f"route {route_id} forces expert {route.expert}; the stack has {num_experts}")
            return ("const", tuple(1.0 if i == route.expert else 0.0 for i in range(num_experts)))
        if route.kind == "mix":
            mixed = [0.0] * num_experts
            for part_id, fraction in route.parts:
                _, raw = self._route_raw(part_id, num_experts, gate_raw)
                mixed = [m + fraction * r for m, r in zip(mixed, raw)]
            return ("const", tuple(mixed))
        if len(route.weights) != num_experts:
            raise ValueError(f"route {route_id} has {len(route.weights)} weights; the stack has {num_experts} experts")
        if route.kind == "fixed":
            return ("const", route.weights)
        if gate_raw is not None:  # prior on a token-independent gate stays token-independent
            return ("const", tuple(g * p for g, p in zip(gate_raw, route.weights)))
        return ("dynamic", route.weights)

    def plan(
        self,
        num_tokens: int,
        input_kind: str,
        num_experts: int,
        gate_raw: tuple[float, ...] | None,
        device: torch.device,
    ) -> _TokenPlan:
        """Token groups for a site with ``num_tokens`` tokens per row (cached per call)."""
        key = (num_tokens, input_kind, num_experts, gate_raw, torch.device(device))
        if key in self._plans:
            return self._plans[key]
        flat = self.token_route_ids(num_tokens, input_kind).reshape(-1)
        total = flat.numel()
        const_ids: dict[tuple[float, ...], list[int]] = {}
        dynamic_ids: dict[int, tuple[float, ...] | None] = {}
        for route_id in torch.unique(flat).tolist():
            kind, value = self._route_raw(route_id, num_experts, gate_raw)
            if kind == "const":
                if sum(value) <= 0:
                    raise ValueError(
                        f"route {route_id} gives every expert zero weight (a prior with no overlap with the gate?)"
                    )
                const_ids.setdefault(tuple(float(v) for v in value), []).append(route_id)
            else:
                dynamic_ids[route_id] = value

        def positions(ids: list[int]) -> torch.Tensor | None:
            mask = torch.isin(flat, torch.tensor(ids, dtype=torch.long))
            found = torch.nonzero(mask).squeeze(1)
            return None if found.numel() == total else found.to(device)

        groups = [(raw, positions(ids)) for raw, ids in const_ids.items()]
        dynamic_positions = dynamic_prior = dynamic_rows = None
        if dynamic_ids:
            dynamic_positions = positions(list(dynamic_ids))
            dyn_flat = flat if dynamic_positions is None else flat[dynamic_positions.cpu()]
            if any(prior is not None for prior in dynamic_ids.values()):
                dynamic_prior = torch.ones(dyn_flat.numel(), num_experts, dtype=torch.float32)
                for route_id, prior in dynamic_ids.items():
                    if prior is not None:
                        dynamic_prior[dyn_flat == route_id] = torch.tensor(prior, dtype=torch.float32)
                dynamic_prior = dynamic_prior.to(device)
            all_positions = torch.arange(total) if dynamic_positions is None else dynamic_positions.cpu()
            dynamic_rows = (all_positions // num_tokens).to(device)
        plan = _TokenPlan(groups, bool(dynamic_ids), dynamic_positions, dynamic_prior, dynamic_rows)
        self._plans[key] = plan
        return plan

    def expanded(self, factor: int, site: str = "") -> RoutingContext:
        """This context for ``factor × B`` rows, each row standing for ``factor`` consecutive rows (the
        ``(b nh nw)`` order HyperTile uses when it moves attention tiles into the batch). Rows keep their
        region, uncond flag and sigma. A per-token region map cannot follow tiles of unknown layout:
        that raises a ValueError naming the patch kinds that do this."""
        if self.region_map is not None:
            raise ValueError(
                f"{site or 'MoE site'}: input batch {factor * self.batch_size} for a routing context of "
                f"{self.batch_size} rows: a model patch moved attention tokens into the batch (HyperTile or "
                "another tiled-attention patch). Routing tokens by region cannot follow those tiles; remove "
                "HyperTile / tiled attention from this model, or sample it without regions (gate routing "
                "and region windows work with it)")
        if factor in self._expanded:
            return self._expanded[factor]
        out = copy.copy(self)

        def repeat(t):
            return None if t is None else t.repeat_interleave(factor, dim=0)

        out.batch_size = self.batch_size * factor
        out.row_region, out.is_uncond, out.sigma = repeat(self.row_region), repeat(self.is_uncond), repeat(self.sigma)
        out._row_ids = repeat(self._row_ids)
        out._token_ids_cache, out._plans, out._sigma_on, out._expanded = {}, {}, {}, {}
        self._expanded[factor] = out
        return out

    def sigma_on(self, device: torch.device) -> torch.Tensor:
        if self.sigma is None:
            raise RuntimeError("the gate takes the noise level as input; pass RoutingContext(sigma=...) for this call")
        device = torch.device(device)
        if device not in self._sigma_on:
            self._sigma_on[device] = self.sigma.to(device)
        return self._sigma_on[device]


# --------------------------------------------------------------------------------------------------
# Runtime: the active context and the merge cache

# runtime id -> its active context; replaced (never mutated) on every activate().
_ACTIVE_CONTEXTS: contextvars.ContextVar[dict[int, RoutingContext] | None] = contextvars.ContextVar(
    "mepg_active_routing_contexts", default=None
)


class MergedWeightCache:
    """LRU cache of merged weights ``Σ_i w_i W_i`` within a byte budget (``0`` disables it)."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.max_bytes <= 0:
            self.misses += 1
            return build()
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        tensor = build()
        if tensor.nbytes <= self.max_bytes:
            self._entries[key] = tensor
            self.bytes += tensor.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
        return tensor

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class MoERuntime:
    """Shared by the site modules of one patched model: options, active context, merge cache, and two
    training hooks: ε-greedy :attr:`exploration` (see :meth:`exploring`) and routing observers (see
    :meth:`observing`). Both are off unless set; inference never sets them."""

    def __init__(self, options: GateOptions | None = None, merge_cache_bytes: int = 0):
        self.options = options or GateOptions()
        self.merge_cache = MergedWeightCache(merge_cache_bytes)
        self.exploration: Exploration | None = None
        self.observers: list[Callable[[_GatedSite, torch.Tensor], None]] = []

    @contextlib.contextmanager
    def exploring(self, exploration: Exploration | None) -> Iterator[Exploration | None]:
        """Route with ε-greedy ``exploration`` inside the block (all modules of this runtime)."""
        previous, self.exploration = self.exploration, exploration
        try:
            yield exploration
        finally:
            self.exploration = previous

    @contextlib.contextmanager
    def observing(self, observer: Callable[[_GatedSite, torch.Tensor], None]) -> Iterator[None]:
        """Call ``observer(module, weights)`` from every site's forward inside the block, with the mixing
        weights ``[B, T, E]`` (float32) that call used (part of the autograd graph when the gate is
        token-dependent: an auxiliary routing loss can be built from them)."""
        self.observers.append(observer)
        try:
            yield
        finally:
            self.observers.remove(observer)

    def current(self) -> RoutingContext | None:
        return (_ACTIVE_CONTEXTS.get() or {}).get(id(self))

    @contextlib.contextmanager
    def activate(self, context: RoutingContext | None) -> Iterator[RoutingContext | None]:
        """Make ``context`` visible to this runtime's modules for the duration of the ``with`` block."""
        token = _ACTIVE_CONTEXTS.set({**(_ACTIVE_CONTEXTS.get() or {}), id(self): context})
        try:
            yield context
        finally:
            _ACTIVE_CONTEXTS.reset(token)


# --------------------------------------------------------------------------------------------------
# Modules


def _on(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    # ComfyUI-style cast: weights follow the input's device and dtype (no copy when they already match).
    if tensor is None:
        return None
    tensor = tensor.to(device=like.device, dtype=like.dtype)
    if like.requires_grad and tensor.is_inference():
        # Weights made under torch.inference_mode (ComfyUI runs nodes in it) cannot be saved for backward;
        # when a gradient flows through this call (gate training), use a normal copy for this call only.
        tensor = tensor.clone()
    return tensor


class _GatedSite(nn.Module):
    """Shared routing for :class:`GatedLinear` and :class:`GatedFeedForward`."""

    out_features: int

    def __init__(self, num_experts: int, runtime: MoERuntime | None, input_kind: str, path: str):
        # Subclasses register their expert weights after this, then call set_gate().
        super().__init__()
        if input_kind not in ("spatial", "context"):
            raise ValueError(f"input_kind must be 'spatial' or 'context', got '{input_kind}'")
        self.num_experts = num_experts
        self.runtime = runtime or MoERuntime()
        self.input_kind = input_kind
        self.path = path

    # -- gate
    def set_gate(self, gate: SiteGate) -> None:
        """Replace this site's gate (mode and parameters)."""
        if gate.num_experts != self.num_experts:
            raise ValueError(f"{self.path}: gate for {gate.num_experts} experts, site has {self.num_experts}")
        self.gate_mode = gate.mode
        self.forced_expert = gate.forced_expert
        device = self.expert_device
        for name, value in (
            ("gate_weight", gate.weight),
            ("gate_bias", gate.bias),
            ("gate_sigma_weight", gate.sigma_weight),
        ):
            if value is None:
                self.register_parameter(name, None)
            else:
                self.register_parameter(name, nn.Parameter(value.detach().to(device, torch.float32).clone()))
        if self.gate_weight is not None and self.gate_weight.shape[1] != self.in_features:
            raise ValueError(f"{self.path}: gate takes {self.gate_weight.shape[1]} inputs, site has {self.in_features}")

    def site_gate(self) -> SiteGate:
        """The current gate as a :class:`SiteGate` (tensors detached, on the CPU)."""

        def cpu(t):
            return None if t is None else t.detach().to("cpu").clone()

        return SiteGate(
            self.gate_mode,
            self.num_experts,
            self.forced_expert,
            cpu(self.gate_weight),
            cpu(self.gate_bias),
            cpu(self.gate_sigma_weight),
        )

    def _gate_raw_constant(self) -> tuple[float, ...] | None:
        if self.gate_mode == "uniform":
            return (0.5,) * self.num_experts
        if self.gate_mode == "forced":
            return tuple(1.0 if i == self.forced_expert else 0.0 for i in range(self.num_experts))
        return None

    # -- routing
    def _options(self, context: RoutingContext | None) -> GateOptions:
        return context.options if context is not None and context.options is not None else self.runtime.options

    def _context_for_batch(self, context: RoutingContext | None, batch: int) -> RoutingContext | None:
        """The active context for an input of ``batch`` rows. A batch that is a whole multiple of the
        context's comes from a patch that moved attention tiles into the batch (HyperTile): each context
        row then stands for that many consecutive rows (see :meth:`RoutingContext.expanded`)."""
        if context is None or context.batch_size == batch:
            return context
        if batch > context.batch_size and batch % context.batch_size == 0:
            return context.expanded(batch // context.batch_size, self.path)
        raise ValueError(f"{self.path}: input batch {batch}, routing context batch {context.batch_size}")

    def _plan(self, context: RoutingContext | None, batch: int, tokens: int, device: torch.device) -> _TokenPlan:
        gate_raw = self._gate_raw_constant()
        if context is None:
            if gate_raw is not None:
                return _TokenPlan([(gate_raw, None)], False, None, None, None)
            return _TokenPlan([], True, None, None, None)
        return context.plan(tokens, self.input_kind, self.num_experts, gate_raw, device)

    def _dynamic_weights(
        self, x: torch.Tensor, plan: _TokenPlan, context: RoutingContext | None, options: GateOptions
    ) -> torch.Tensor:
        """Gate weights ``[N, E]`` float32 for tokens ``x: [N, in]``."""
        x_float = x.float()
        if x_float.is_inference() and self.gate_weight.requires_grad and torch.is_grad_enabled():
            x_float = x_float.clone()  # saved for the gate's gradient; inference tensors cannot be
        logits = F.linear(x_float, _on(self.gate_weight, x_float), _on(self.gate_bias, x_float))
        if self.gate_sigma_weight is not None:
            if context is None:
                raise RuntimeError(f"{self.path}: the gate takes the noise level; activate a RoutingContext with sigma")
            embedding = sigma_embedding(context.sigma_on(x.device), self.gate_sigma_weight.shape[1])
            logits = logits + F.linear(embedding, _on(self.gate_sigma_weight, embedding))[plan.dynamic_rows]
        raw = torch.sigmoid(logits / options.temperature)
        if plan.dynamic_prior is not None:
            raw = raw * plan.dynamic_prior
        return mix_weights(
            raw, options.effective_top_k(self.num_experts), options.normalise, self.runtime.exploration
        )

    def _final(self, raw: tuple[float, ...], options: GateOptions) -> tuple[float, ...]:
        return _final_constant_weights(raw, options.effective_top_k(self.num_experts), options.normalise)

    def _as_tokens(self, x: torch.Tensor, context: RoutingContext | None) -> torch.Tensor:
        if x.dim() == 3:
            return x
        if context is not None:
            raise ValueError(f"{self.path}: routed input must be [B, T, C], got {tuple(x.shape)}")
        return x.reshape(1, -1, x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, T, in]`` → ``[B, T, out]`` (other shapes only without a routing context)."""
        context = self.runtime.current()
        options = self._options(context)
        tokens3 = self._as_tokens(x, context)
        batch, tokens, channels = tokens3.shape
        context = self._context_for_batch(context, batch)
        if context is not None and context.recorder is not None:
            context.recorder.add(self.path, tokens3, context.is_uncond)
        plan = self._plan(context, batch, tokens, x.device)
        flat = tokens3.reshape(batch * tokens, channels)
        groups = plan.constant_groups
        dynamic = None
        if not plan.has_dynamic and len(groups) == 1 and groups[0][1] is None:
            out = self._run_constant(flat, self._final(groups[0][0], options))
        elif plan.has_dynamic and not groups and plan.dynamic_positions is None:
            dynamic = self._dynamic_weights(flat, plan, context, options)
            out = self._run_dynamic(flat, dynamic, plan, options)
        else:
            out = flat.new_empty(flat.shape[0], self.out_features)
            for raw, positions in groups:
                out.index_copy_(
                    0, positions, self._run_constant(flat.index_select(0, positions), self._final(raw, options))
                )
            if plan.has_dynamic:
                positions = plan.dynamic_positions
                selected = flat.index_select(0, positions)
                dynamic = self._dynamic_weights(selected, plan, context, options)
                out.index_copy_(0, positions, self._run_dynamic(selected, dynamic, plan, options))
        if self.runtime.observers:
            used = self._assemble_weights(plan, dynamic, options, flat.shape[0], x.device)
            used = used.reshape(batch, tokens, self.num_experts)
            for observer in list(self.runtime.observers):
                observer(self, used)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _assemble_weights(
        self, plan: _TokenPlan, dynamic: torch.Tensor | None, options: GateOptions, count: int, device
    ) -> torch.Tensor:
        """All ``count`` tokens' weights ``[N, E]`` float32 from the plan's constant groups and the dynamic
        tokens' weights ``dynamic`` (``[N_dyn, E]``, in plan order)."""
        if dynamic is not None and plan.dynamic_positions is None:
            return dynamic
        weights = torch.empty(count, self.num_experts, dtype=torch.float32, device=device)
        for raw, positions in plan.constant_groups:
            vector = torch.tensor(self._final(raw, options), dtype=torch.float32, device=device)
            if positions is None:
                weights[:] = vector
            else:
                weights[positions] = vector
        if dynamic is not None:
            weights = weights.index_copy(0, plan.dynamic_positions, dynamic)
        return weights

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing weights ``[B, T, E]`` (float32) that :meth:`forward` uses for ``x: [B, T, in]``
        under the active context (for tests, visualisation and gate-training losses)."""
        context = self.runtime.current()
        options = self._options(context)
        tokens3 = self._as_tokens(x, context)
        batch, tokens, channels = tokens3.shape
        context = self._context_for_batch(context, batch)
        plan = self._plan(context, batch, tokens, x.device)
        flat = tokens3.reshape(batch * tokens, channels)
        dynamic = None
        if plan.has_dynamic:
            positions = plan.dynamic_positions
            selected = flat if positions is None else flat.index_select(0, positions)
            dynamic = self._dynamic_weights(selected, plan, context, options)
        weights = self._assemble_weights(plan, dynamic, options, flat.shape[0], x.device)
        return weights.reshape(batch, tokens, self.num_experts)

    def _run_dynamic(
        self, x: torch.Tensor, weights: torch.Tensor, plan: _TokenPlan, options: GateOptions
    ) -> torch.Tensor:
        """``Σ_e weights[:, e] · Expert_e(x)`` for ``x: [N, in]``; experts only see tokens they got."""
        count = x.shape[0]
        # Without top-k or priors sigmoid weights are > 0 everywhere: every expert sees every token.
        sparse = options.effective_top_k(self.num_experts) is not None or plan.dynamic_prior is not None
        out = None
        for expert in range(self.num_experts):
            column = weights[:, expert]
            index = None
            if sparse:
                index = torch.nonzero(column > 0).squeeze(1)
                if index.numel() == 0:
                    continue
                if index.numel() == count:
                    index = None
            if index is None:
                contribution = self._run_expert(expert, x) * column.to(x.dtype)[:, None]
                out = contribution if out is None else out + contribution
            else:
                contribution = (
                    self._run_expert(expert, x.index_select(0, index))
                    * column.index_select(0, index).to(x.dtype)[:, None]
                )
                if out is None:
                    out = x.new_zeros(count, self.out_features)
                out = out.index_add(0, index, contribution)
        return out if out is not None else x.new_zeros(count, self.out_features)

    # -- per subclass
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def expert_device(self) -> torch.device:
        raise NotImplementedError

    def _run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run_constant(self, x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
        raise NotImplementedError


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)


class GatedLinear(_GatedSite):
    """MoE replacement for an ``nn.Linear``: ``forward(x: [B, T, in]) -> [B, T, out]``.

    Args:
        expert_weight: ``[E, out, in]`` (shared, not copied; frozen).
        expert_bias: ``[E, out]`` or ``None``.
        gate: this site's :class:`SiteGate`.
        runtime: the shared :class:`MoERuntime` (a private one if ``None``).
        input_kind: ``"spatial"`` or ``"context"`` (attn2 ``to_k``/``to_v``).
        path: the site path, used in messages, the merge cache and the recorder.
    """

    def __init__(
        self,
        expert_weight: torch.Tensor,
        expert_bias: torch.Tensor | None,
        gate: SiteGate,
        runtime: MoERuntime | None = None,
        input_kind: str = "spatial",
        path: str = "",
    ):
        if expert_weight.dim() != 3:
            raise ValueError(f"expert_weight must be [E, out, in], got {tuple(expert_weight.shape)}")
        if expert_bias is not None and tuple(expert_bias.shape) != tuple(expert_weight.shape[:2]):
            raise ValueError(
                f"expert_bias must be [E, out] = {tuple(expert_weight.shape[:2])}, got {tuple(expert_bias.shape)}"
            )
        super().__init__(expert_weight.shape[0], runtime, input_kind, path)
        self.expert_weight = _frozen(expert_weight)
        self.expert_bias = _frozen(expert_bias)
        self.set_gate(gate)

    @property
    def in_features(self) -> int:
        return self.expert_weight.shape[2]

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.expert_weight.shape[1]

    @property
    def expert_device(self) -> torch.device:
        return self.expert_weight.device

    def _run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.expert_bias is None else self.expert_bias[expert]
        return F.linear(x, _on(self.expert_weight[expert], x), _on(bias, x))

    def merged_weight(self, weights: tuple[float, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(Σ_i w_i W_i [out, in], Σ_i w_i b_i [out] | None)``, summed in float32, cast like ``like``."""

        def build() -> torch.Tensor:
            weight = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=like.device)
            bias = (
                None
                if self.expert_bias is None
                else torch.zeros(self.out_features, dtype=torch.float32, device=like.device)
            )
            for expert, w in enumerate(weights):
                if w != 0.0:
                    # Cast before mixing: storage dtypes such as float8 do not promote in add_.
                    weight.add_(self.expert_weight[expert].to(like.device, torch.float32), alpha=w)
                    if bias is not None:
                        bias.add_(self.expert_bias[expert].to(like.device, torch.float32), alpha=w)
            # Weight and bias travel as one tensor so the cache holds a single entry per key.
            return weight.to(like.dtype) if bias is None else torch.cat([weight, bias[:, None]], dim=1).to(like.dtype)

        # The expert tensors' identity is part of the key: ComfyUI patches them (LoRAs, merges) by replacing
        # the parameters, so a merge of the old weights is never reused. (Whoever rewrites them in place, as
        # hook patching does, clears the cache.)
        tensors = tuple(id(t) for t in (self.expert_weight, self.expert_bias) if t is not None)
        key = (id(self), self.path, weights, like.dtype, like.device, tensors)
        merged = self.runtime.merge_cache.get(key, build)
        if self.expert_bias is None:
            return merged, None
        return merged[:, : self.in_features], merged[:, self.in_features]

    def _run_constant(self, x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
        active = [(e, w) for e, w in enumerate(weights) if w != 0.0]
        if len(active) == 1:  # one expert: its own weights, no merge (exact)
            expert, w = active[0]
            out = self._run_expert(expert, x)
            return out if w == 1.0 else out * w
        weight, bias = self.merged_weight(weights, x)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        sizes = f"in={self.in_features}, out={self.out_features}"
        return f"{self.path or 'site'}: experts={self.num_experts}, {sizes}, gate={self.gate_mode}"


class GatedFeedForward(_GatedSite):
    """MoE replacement for a transformer block's ``ff`` (``FeedForward`` with GEGLU):
    ``forward(x: [B, T, dim]) -> [B, T, dim_out]``, ``FF_i(x) = (a ⊙ gelu(g)) @ W2_i.T + b2_i`` with
    ``[a, g] = chunk(x @ W1_i.T + b1_i, 2)``.

    Args:
        proj_weight ``[E, 2·inner, dim]``, proj_bias ``[E, 2·inner]`` (``ff.net.0.proj``),
        out_weight ``[E, dim_out, inner]``, out_bias ``[E, dim_out]`` (``ff.net.2``); the rest as
        :class:`GatedLinear` (``input_kind`` is always ``"spatial"``).
    """

    def __init__(
        self,
        proj_weight: torch.Tensor,
        proj_bias: torch.Tensor | None,
        out_weight: torch.Tensor,
        out_bias: torch.Tensor | None,
        gate: SiteGate,
        runtime: MoERuntime | None = None,
        path: str = "",
    ):
        if proj_weight.dim() != 3 or out_weight.dim() != 3 or proj_weight.shape[0] != out_weight.shape[0]:
            raise ValueError("proj_weight and out_weight must be [E, out, in] with the same E")
        if proj_weight.shape[1] != 2 * out_weight.shape[2]:
            raise ValueError(
                f"GEGLU needs proj out = 2 × inner: proj {tuple(proj_weight.shape)}, out {tuple(out_weight.shape)}"
            )
        super().__init__(proj_weight.shape[0], runtime, "spatial", path)
        self.proj_weight = _frozen(proj_weight)
        self.proj_bias = _frozen(proj_bias)
        self.out_weight = _frozen(out_weight)
        self.out_bias = _frozen(out_bias)
        self.set_gate(gate)

    @property
    def in_features(self) -> int:
        return self.proj_weight.shape[2]

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.out_weight.shape[1]

    @property
    def expert_device(self) -> torch.device:
        return self.proj_weight.device

    def _run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        proj_bias = None if self.proj_bias is None else self.proj_bias[expert]
        out_bias = None if self.out_bias is None else self.out_bias[expert]
        hidden = F.linear(x, _on(self.proj_weight[expert], x), _on(proj_bias, x))
        value, gate = hidden.chunk(2, dim=-1)
        return F.linear(value * F.gelu(gate), _on(self.out_weight[expert], x), _on(out_bias, x))

    def _run_constant(self, x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
        out = None
        for expert, w in enumerate(weights):
            if w == 0.0:
                continue
            contribution = self._run_expert(expert, x)
            if w != 1.0:
                contribution = contribution * w
            out = contribution if out is None else out + contribution
        return out

    def extra_repr(self) -> str:
        return f"{self.path or 'ff'}: experts={self.num_experts}, dim={self.in_features}, gate={self.gate_mode}"


def _module_key(path: str) -> str:
    return path.replace(".", "__")  # nn.ModuleDict keys cannot contain dots


class MoEModules(nn.Module):
    """All gated modules for one stack, sharing one :class:`MoERuntime`.

    ``targets`` maps each :class:`MoETarget` path (relative to the diffusion model) to its module; in
    ComfyUI: ``model.add_object_patch("diffusion_model." + path, module)`` for each. Holding them in one
    ``nn.Module`` lets the caller move them, count their memory (``state_dict`` holds expert weights and
    gates) or wrap them for a memory manager.
    """

    def __init__(self, stack: ExpertStack, gates: GateSet, runtime: MoERuntime):
        super().__init__()
        if gates.num_experts != stack.num_experts:
            raise ValueError(f"gate set is for {gates.num_experts} experts, the stack has {stack.num_experts}")
        self.runtime = runtime
        self.stack_identity = stack.identity()
        self.target_infos = moe_targets(stack)
        self.gated = nn.ModuleDict()
        for target in self.target_infos:
            gate = gates.site_gate(target)
            if target.kind == "linear":
                (site,) = target.sites
                module: _GatedSite = GatedLinear(
                    stack.weights[site], stack.biases[site], gate, runtime, target.input_kind, target.path
                )
            else:
                proj, out = target.sites
                module = GatedFeedForward(
                    stack.weights[proj],
                    stack.biases[proj],
                    stack.weights[out],
                    stack.biases[out],
                    gate,
                    runtime,
                    target.path,
                )
            self.gated[_module_key(target.path)] = module

    @property
    def targets(self) -> dict[str, _GatedSite]:
        return {t.path: self.gated[_module_key(t.path)] for t in self.target_infos}

    def object_patches(self, prefix: str = "diffusion_model.") -> list[tuple[str, nn.Module]]:
        """``[(prefix + path, module)]`` ready for ``ModelPatcher.add_object_patch``."""
        return [(prefix + path, module) for path, module in self.targets.items()]

    def gate_set(self) -> GateSet:
        """The current gates (e.g. after training) as a :class:`GateSet`."""
        modules = list(self.targets.items())
        first = modules[0][1]
        if first.gate_mode != "linear":
            return GateSet(first.gate_mode, first.num_experts, first.forced_expert)
        params = {}
        sigma_features = 0
        for path, module in modules:
            gate = module.site_gate()
            params[path] = (gate.weight, gate.bias, gate.sigma_weight)
            sigma_features = gate.sigma_features
        return GateSet("linear", first.num_experts, sigma_features=sigma_features, params=params)

    def set_gates(self, gates: GateSet) -> None:
        for target in self.target_infos:
            self.gated[_module_key(target.path)].set_gate(gates.site_gate(target))

    def gate_parameters(self) -> list[nn.Parameter]:
        """Trainable gate parameters (expert weights are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]


def build_moe_modules(
    stack: ExpertStack,
    gates: GateSet | None = None,
    runtime: MoERuntime | None = None,
    options: GateOptions | None = None,
) -> MoEModules:
    """Gated modules for every target of ``stack`` (uniform gates unless ``gates`` is given).

    ``runtime`` defaults to ``MoERuntime(options)``; pass one to share it or to set a merge-cache budget.
    """
    if runtime is None:
        runtime = MoERuntime(options)
    elif options is not None:
        runtime.options = options
    return MoEModules(stack, gates or GateSet.uniform(stack.num_experts), runtime)


__all__ = [
    "GATE_MODES",
    "Exploration",
    "GateOptions",
    "GateSet",
    "GatedFeedForward",
    "GatedLinear",
    "InputMeanRecorder",
    "MergedWeightCache",
    "MoEModules",
    "MoERuntime",
    "MoETarget",
    "RegionRoute",
    "RoutingContext",
    "build_moe_modules",
    "centroid_gate_params",
    "mix_weights",
    "moe_targets",
    "sigma_embedding",
]
