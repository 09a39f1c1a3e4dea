"""The core pieces the composition with other ComfyUI nodes rests on: window boxes, storage dtypes,
batch-expanding attention patches, and routing rows that ComfyUI cropped to an area."""

from __future__ import annotations

import pytest
import torch
from mepg_expert_testing import unet_tensors

from mepg_core import window_crop as wc
from mepg_core.experts import ExpertSpec, load_expert_stack
from mepg_core.gating import (
    GatedFeedForward,
    GatedLinear,
    GateOptions,
    MoERuntime,
    RegionRoute,
    RoutingContext,
    SiteGate,
)
from mepg_core.moe_routing import CallFrame, MoERouting, rows_region_map

E, IN, OUT, DIM, INNER = 3, 6, 5, 4, 8


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- window boxes --------------------------------------------------------------------------------------------

def test_areas_are_clipped_like_comfyui_and_meet_windows():
    assert wc.clip_area((20, 20, 10, 4), (16, 16)) == (6, 12, 10, 4)
    assert wc.frame_of(None, (16, 24)) == (16, 24, 0, 0)
    frame = wc.frame_of((16, 8, 0, 8), (16, 16))  # columns 8-15
    assert wc.intersect(frame, (0, 0, 12, 16)) == (16, 4, 0, 8)  # the window holds columns 0-11
    assert wc.intersect(frame, (0, 0, 8, 16)) is None
    assert wc.relative_to((16, 4, 0, 8), (4, 0, 16, 16)) == (16, 4, 0, 4)


def test_gligen_boxes_follow_the_window():
    frame = (16, 16, 0, 0)
    part = wc.intersect(frame, (4, 4, 12, 12))  # an 8x8 window at (4, 4)
    boxes = [(4, 4, 0, 0), (4, 4, 6, 6), (2, 2, 14, 14)]  # (h, w, y, x) from the frame's origin
    assert wc.crop_boxes(boxes, frame, part) == [(1, (4, 4, 2, 2))]
    assert wc.crop_boxes([(8, 8, 2, 2)], frame, part) == [(0, (6, 6, 0, 0))]  # cut at the window's edge


# -- storage dtypes ------------------------------------------------------------------------------------------

FP8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("gate", ["uniform", "forced", "linear", "linear_top1"])
def test_float8_expert_weights_with_every_gate_kind(dtype, gate):
    """Expert weights stored in float8 are cast before any mixing: every gate kind gives what the same
    module gives with the float8-rounded weights in float32."""
    weight, bias = rand(E, OUT, IN, seed=1), rand(E, OUT, seed=2)
    ff = [rand(E, 2 * INNER, DIM, seed=3), rand(E, 2 * INNER, seed=4), rand(E, DIM, INNER, seed=5),
          rand(E, DIM, seed=6)]
    kind = "linear" if gate.startswith("linear") else gate
    options = GateOptions(top_k=1 if gate == "linear_top1" else None)

    def site_gate(in_features):
        if kind == "linear":
            return SiteGate("linear", E, weight=rand(E, in_features, seed=7), bias=rand(E, seed=8))
        return SiteGate(kind, E, forced_expert=1 if kind == "forced" else None)

    def modules(cast):
        runtime = MoERuntime(options)
        lin = GatedLinear(cast(weight), cast(bias), site_gate(IN), runtime, "spatial", "site")
        feed = GatedFeedForward(*[cast(t) for t in ff], site_gate(DIM), runtime, "ff")
        return runtime, lin, feed

    stored = modules(lambda t: t.to(dtype))
    reference = modules(lambda t: t.to(dtype).float())
    x_lin, x_ff = rand(2, 5, IN, seed=9), rand(2, 5, DIM, seed=10)
    contexts = [None, RoutingContext(2, routes=[RegionRoute.fixed([1.0, 2.0, 0.0])], row_region=[0, -1])]
    for ctx in contexts:
        outs = []
        for runtime, lin, feed in (stored, reference):
            with runtime.activate(ctx):
                outs.append((lin(x_lin), feed(x_ff)))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_a_stack_loads_in_float8_and_keeps_its_identity():
    tensors = unet_tensors(1)
    full = load_expert_stack([ExpertSpec.from_tensors("a", tensors)])
    fp8 = load_expert_stack([ExpertSpec.from_tensors("a", tensors)], dtype=FP8[0])
    assert fp8.dtype == FP8[0] and fp8.nbytes * 4 == full.nbytes
    assert fp8.experts[0].content_hash == full.experts[0].content_hash


def test_a_replaced_expert_tensor_is_never_served_from_the_merge_cache():
    weight, bias = rand(E, OUT, IN, seed=1), rand(E, OUT, seed=2)
    runtime = MoERuntime(merge_cache_bytes=1 << 20)
    module = GatedLinear(weight, bias, SiteGate("uniform", E), runtime, "spatial", "site")
    x = rand(1, 4, IN, seed=3)
    first = module(x)
    module.expert_weight = torch.nn.Parameter(weight * 2, requires_grad=False)  # as ComfyUI patches weights
    second = module(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, x @ (2 * weight).mean(0).T + bias.mean(0), rtol=1e-5, atol=1e-5)


# -- batch-expanding attention patches (HyperTile) -----------------------------------------------------------

def hypertile_rows(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """``[B, T, C]`` -> ``[B * tiles, T / tiles, C]`` in HyperTile's ``(b nh nw)`` row order."""
    b, t, c = x.shape
    return x.reshape(b, tiles, t // tiles, c).reshape(b * tiles, t // tiles, c)


def test_row_routing_follows_tiles_moved_into_the_batch():
    weight, bias = rand(E, OUT, IN, seed=1), rand(E, OUT, seed=2)
    gate = SiteGate("linear", E, weight=rand(E, IN, seed=3), bias=rand(E, seed=4))
    module = GatedLinear(weight, bias, gate, MoERuntime(), "spatial", "attn1.to_q")
    x = rand(2, 16, IN, seed=5)
    for ctx in (RoutingContext(2, routes=[RegionRoute.forced(2), RegionRoute.gate()], row_region=[0, 1]),
                RoutingContext.gate_only(2, is_uncond=[False, True], uncond_policy="forced", uncond_expert=1)):
        with module.runtime.activate(ctx):
            whole = module(x)
            tiled = module(hypertile_rows(x, 4))
        torch.testing.assert_close(tiled.reshape(2, 16, OUT), whole, rtol=1e-6, atol=1e-6)


def test_token_routing_by_region_refuses_tiles_and_names_the_patch():
    weight, bias = rand(E, OUT, IN, seed=1), rand(E, OUT, seed=2)
    module = GatedLinear(weight, bias, SiteGate("uniform", E), MoERuntime(), "spatial", "attn1.to_q")
    region_map = torch.tensor([[0, 0, 1, 1]] * 4)
    ctx = RoutingContext(2, routes=[RegionRoute.forced(0), RegionRoute.forced(1)], region_map=region_map)
    with module.runtime.activate(ctx), pytest.raises(ValueError, match="HyperTile"):
        module(hypertile_rows(rand(2, 16, IN), 4))
    with module.runtime.activate(ctx), pytest.raises(ValueError, match="routing context batch 2"):
        module(rand(3, 16, IN))  # not a whole multiple: a plain mismatch


# -- rows cropped to an area condition -----------------------------------------------------------------------

def test_rows_of_an_area_chunk_get_their_crop_of_the_region_map():
    region_map = torch.arange(16 * 16).reshape(16, 16)
    frame = CallFrame((16, 16), ((16, 8, 0, 8), None))  # chunk 0 ran on columns 8-15, chunk 1 on the canvas
    with pytest.raises(ValueError, match="area"):
        rows_region_map(region_map, 4, (16, 8), frame)  # chunks of one call share one input size
    maps = rows_region_map(region_map, 2, (16, 8), CallFrame((16, 16), ((16, 8, 0, 8), (16, 8, 0, 0))))
    assert torch.equal(maps[0], region_map[:, 8:]) and torch.equal(maps[1], region_map[:, :8])
    assert rows_region_map(region_map, 2, (16, 16), CallFrame((16, 16), (None, None))) is region_map
    with pytest.raises(ValueError, match="tile"):
        rows_region_map(region_map, 2, (8, 8), None)  # a tiling sampler: an 8x8 model call, regions on 16x16
    with pytest.raises(ValueError, match="tile"):
        rows_region_map(region_map, 2, (12, 12), CallFrame((12, 12), (None,)))


class _Region:
    def __init__(self, expert=None, style=None):
        self.expert, self.style = expert, style


def test_region_routes_own_and_favour():
    stack = load_expert_stack([ExpertSpec.from_tensors(n, unet_tensors(s), tags=[n])
                               for n, s in (("photo", 1), ("anime", 2))])
    routing = MoERouting(stack, global_region_bias=0.25)
    regions = [_Region(expert="anime"), _Region(style="photo"), _Region()]
    own = routing.region_routes(regions, "own")
    assert [r.kind for r in own] == ["forced", "prior", "gate"] and own[0].expert == 1
    assert own[1] == RegionRoute.prior([1.0, 0.0])  # a style is a prior on the gate, even with one expert
    favour = routing.region_routes(regions, "favour")
    assert favour[0] == RegionRoute.prior([0.75, 1.0]) and favour[2].kind == "gate"
    with pytest.raises(ValueError, match="'own' or 'favour'"):
        routing.region_routes(regions, "strong")
    with pytest.raises(ValueError, match="unicorn"):
        routing.region_routes([_Region(expert="unicorn")], "own")


def test_a_style_is_a_prior_on_the_gate_and_a_forced_expert_stays_forced():
    """Inside a styled region the weights are ``style_prior × sigmoid(G(x))`` normalised: a trained gate
    still decides among the style's experts, experts outside the style get nothing, and a region's forced
    expert is one-hot whatever the gate says.

    Planted bugs this kills: the style replacing the gate (equal fixed weights over the style's experts:
    the two gates below would give the same weights); the prior dropped (the non-style expert gets weight);
    a forced expert turned into a prior (the gate's preference would leak into it)."""
    experts = (("photo", 1, "photo"), ("anime_a", 2, "anime"), ("anime_b", 3, "anime"))
    stack = load_expert_stack([ExpertSpec.from_tensors(n, unet_tensors(s), tags=[t]) for n, s, t in experts])
    routing = MoERouting(stack)
    weight, bias = rand(E, OUT, IN, seed=1), rand(E, OUT, seed=2)
    x = rand(1, 6, IN, seed=3)
    styled, forced = _Region(style="anime"), _Region(expert="anime_b", style="anime")
    for favoured in (1, 2):  # two gates that prefer different anime experts
        gate_bias = torch.full((E,), -1.0)
        gate_bias[favoured] = 2.0
        gate = SiteGate("linear", E, weight=rand(E, IN, seed=4) * 0.1, bias=gate_bias)
        module = GatedLinear(weight, bias, gate, MoERuntime(GateOptions()), "spatial", "site")
        raw = torch.sigmoid(x @ gate.weight.T + gate.bias) * torch.tensor([0.0, 1.0, 1.0])
        want = raw / raw.sum(-1, keepdim=True)
        with routing.enter("local", 0, [styled], None):
            ctx = routing.context_for(1, [0], None, (2, 3))
        with module.runtime.activate(ctx):
            got = module.routing_weights(x)
            out = module(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert bool((got[..., favoured] > 0.65).all()) and bool((got[..., 0] == 0).all())
        mixed = sum(want[..., e:e + 1] * (x @ weight[e].T + bias[e]) for e in range(E))
        torch.testing.assert_close(out, mixed, rtol=1e-5, atol=1e-5)
        with routing.enter("local", 0, [forced], None):
            ctx = routing.context_for(1, [0], None, (2, 3))
        with module.runtime.activate(ctx):
            assert torch.equal(module.routing_weights(x), torch.tensor([0.0, 0.0, 1.0]).expand(1, 6, E))
