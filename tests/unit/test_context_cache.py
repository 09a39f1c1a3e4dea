"""The cross-attention key/value cache (mepg_core.context_cache): exact hits, misses on any change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mepg_core.context_cache import ContextProjectionCache, cross_attention_projections, install
from mepg_core.gating import GatedLinear, GateOptions, MoERuntime, RegionRoute, RoutingContext, SiteGate


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Attention(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.to_q = nn.Linear(dim, 8, bias=False)
        self.to_k = nn.Linear(context_dim, 8, bias=False)
        self.to_v = nn.Linear(context_dim, 8, bias=False)


class Block(nn.Module):
    """The shape of ComfyUI's BasicTransformerBlock as far as the cache cares: attn1 and attn2."""

    def __init__(self, dim=4, context_dim=6):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)

    def forward(self, context):
        return self.attn2.to_k(context), self.attn2.to_v(context)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, context):
        return [t for b in self.blocks for t in b(context)]


def test_finds_only_cross_attention_key_and_value_projections():
    """Kills: wrapping attn1 (self-attention: its keys depend on the latent) or attn2.to_q."""
    paths = [p for p, _ in cross_attention_projections(Net())]
    assert paths == ["blocks.0.attn2.to_k", "blocks.0.attn2.to_v", "blocks.1.attn2.to_k", "blocks.1.attn2.to_v"]


def test_hits_equal_recomputation_and_equal_contexts_are_pooled():
    """Kills: a cache keyed by tensor identity only (ComfyUI builds a new cond batch tensor every call:
    no hits), or by shape only (a second prompt would get the first one's keys)."""
    net, cache = Net(), ContextProjectionCache()
    a, b = rand(2, 7, 6, seed=1), rand(2, 7, 6, seed=2)
    with torch.no_grad():
        want_a, want_b = net(a), net(b)
        with install(net, cache) as count:
            assert count == 4
            first = net(a.clone())
            again = net(a.clone())  # equal, not the same tensor
            other = net(b)
    assert cache.report()["misses"] == 8 and cache.report()["hits"] == 4 and cache.report()["contexts"] == 2
    for got, want in zip(first + again, want_a + want_a):
        assert torch.equal(got, want)
    for got, want in zip(other, want_b):
        assert torch.equal(got, want)


def test_a_changed_weight_is_a_miss_and_the_wrappers_go_away():
    """Kills: a key without the weight's identity / in-place version (a LoRA patched in place or by
    replacing the parameter would keep the old keys), and wrappers left behind after the block."""
    net, cache = Net(), ContextProjectionCache()
    a = rand(2, 7, 6, seed=1)
    k = net.blocks[0].attn2.to_k
    with torch.no_grad(), install(net, cache):
        before = net(a)[0]
        k.weight.add_(1.0)  # in place: same tensor, new version
        in_place = net(a)[0]
        assert torch.equal(in_place, nn.Linear.forward(k, a))
        k.weight = nn.Parameter(k.weight + 1.0)  # replaced
        replaced = net(a)[0]
        assert torch.equal(replaced, nn.Linear.forward(k, a)) and not torch.equal(replaced, in_place)
    assert not torch.equal(before, in_place)
    assert all("forward" not in m.__dict__ for _, m in cross_attention_projections(net))


def test_a_foreign_forward_is_not_cached_and_is_restored():
    """Kills: caching a layer another patch rewired (what its output depends on is unknown)."""
    net, cache = Net(), ContextProjectionCache()
    k = net.blocks[0].attn2.to_k
    calls = []

    def other_patch(x):
        calls.append(1)
        return x.sum(-1, keepdim=True).expand(*x.shape[:-1], 8)

    k.forward = other_patch
    a = rand(1, 3, 6, seed=4)
    with torch.no_grad(), install(net, cache):
        net(a), net(a)
    assert len(calls) == 2 and cache.report()["bypassed"] == 2
    assert k.forward is other_patch


def test_memory_stays_within_the_budget():
    """Kills: an unbounded cache (each entry here is 2 x 7 x 8 floats; the budget holds a few)."""
    net = Net()
    one_entry = 2 * 7 * 8 * 4
    cache = ContextProjectionCache(max_bytes=3 * one_entry + 2 * 2 * 7 * 6 * 4)
    with torch.no_grad(), install(net, cache):
        for seed in range(6):
            context = rand(2, 7, 6, seed=seed)
            assert all(torch.equal(g, w) for g, w in zip(net(context), net.__class__.forward(net, context)))
            assert cache.memory_bytes() <= cache.max_bytes
    assert cache.report()["entries"] <= 3


def test_cached_outputs_cannot_be_changed_by_the_caller():
    """Kills: returning the stored tensor itself (attention code writing into its keys would poison it)."""
    net, cache = Net(), ContextProjectionCache()
    a = rand(1, 3, 6, seed=5)
    with torch.no_grad(), install(net, cache):
        net(a)[0].mul_(0)
        assert not torch.equal(net(a)[0], torch.zeros(1, 3, 8))


def moe_context_site():
    weight, bias = rand(3, 8, 6, seed=10), rand(3, 8, seed=11)
    runtime = MoERuntime(GateOptions())
    return GatedLinear(weight, bias, SiteGate("uniform", 3), runtime, "context", "site"), runtime


@pytest.mark.parametrize("gate", ["uniform", "linear"])
def test_moe_site_key_follows_the_routing_of_the_pass(gate):
    """Kills: a MoE key without the mixing weights (a pass forced to another expert, or a gate that
    weighs the same text differently, would reuse the previous pass's keys)."""
    linear, runtime = moe_context_site()
    if gate == "linear":
        linear.set_gate(SiteGate("linear", 3, weight=rand(3, 6, seed=12), bias=rand(3, seed=13)))
    layer = nn.Linear(6, 8)
    layer.forward = linear.forward  # how the Gated MoE Patch installs a site
    holder = nn.Module()
    holder.attn2 = nn.Module()
    holder.attn2.to_k = layer
    cache = ContextProjectionCache()
    text = rand(2, 5, 6, seed=14)
    contexts = [RoutingContext(2, routes=[RegionRoute.forced(e)], row_region=[0, 0]) for e in (0, 2, 0)]
    contexts.append(None)  # gate alone
    with torch.no_grad():
        want = []
        for ctx in contexts:
            with runtime.activate(ctx):
                want.append(linear(text))
        got = []
        with install(holder, cache):
            for ctx in contexts:
                with runtime.activate(ctx):
                    got.append(holder.attn2.to_k(text.clone()))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not torch.equal(want[0], want[1])
    assert cache.report()["hits"] == 1 and cache.report()["misses"] == 3


def test_moe_site_is_not_cached_while_observed():
    """Kills: caching while gate training observes routing (the observer must see every call)."""
    linear, runtime = moe_context_site()
    layer = nn.Linear(6, 8)
    layer.forward = linear.forward
    holder = nn.Module()
    holder.attn2 = nn.Module()
    holder.attn2.to_v = layer
    seen = []
    cache = ContextProjectionCache()
    text = rand(1, 5, 6, seed=15)
    with torch.no_grad(), install(holder, cache), runtime.observing(lambda m, w: seen.append(w)):
        holder.attn2.to_v(text), holder.attn2.to_v(text)
    assert len(seen) == 2 and cache.report()["bypassed"] == 2
