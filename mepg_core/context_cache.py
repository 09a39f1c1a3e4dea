"""Cross-attention key/value projections cached per conditioning for one sampling run (pure torch).

A cross-attention layer projects the text context ``c: [B, 77, D]`` to keys ``c @ W_k.T`` and values
``c @ W_v.T`` in every model call, although neither depends on the latent: in a cross-denoise run the
same few contexts (global + negative, each region's prompt + negative) come back in every pass of every
step. :class:`ContextProjectionCache` keeps each projection's output per site and per distinct context,
so each is computed once per run.

Exactness: a cached output is returned only when everything the computation reads is the same:

- the context: the tensor itself (identity and in-place version) or one equal to it element for element
  (``torch.equal``, after shape / dtype / device). ComfyUI concatenates cond and uncond anew in every
  call, so equal contexts are pooled: each distinct context is stored once and compared once per call
  (a one-slot identity memo answers the other sites of the same call);
- the site's weights: identity and in-place ``_version`` of the weight and bias (ComfyUI's weight
  patches either replace a parameter or rewrite it in place, so any patch change is a miss) and the
  identity of ComfyUI's per-call ``weight_function`` / ``bias_function`` lists (low-VRAM LoRA patches);
- for a MoE site (a layer whose ``forward`` is bound to an object with ``projection_cache_key``, see
  :class:`~.gating.GatedLinear`): the mixing weights of that call (the routing constant of the pass, or
  the gate's output) and the computation path. A layer whose ``forward`` another patch replaced by
  something else is not cached (what it reads is unknown).

The same inputs through the same code give the same bits, so hits equal recomputation exactly. Callers
get a copy (attention code that writes into its keys cannot change the cache).
Entries are kept LRU within ``max_bytes`` (outputs plus pooled contexts); :meth:`report` gives the
memory, the number of distinct contexts and the bytes per context.

:func:`install` wraps the ``to_k`` / ``to_v`` of every ``attn2`` (cross-attention) under a root module
for the duration of a ``with`` block only, by an instance-level ``forward``; outside it the model is
untouched (plain sampling pays nothing).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import nn

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: SDXL float32 needs ~100 MB per cond+uncond context pair


class ContextProjectionCache:
    """LRU cache of context projections (see the module docstring); ``max_bytes <= 0`` disables it."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = int(max_bytes)
        self._contexts: list[torch.Tensor] = []  # pooled distinct contexts, index = context id
        self._context_refs: list[int] = []  # how many entries use each pooled context
        self._memo: tuple[torch.Tensor, int, int] | None = None  # (tensor, its _version, context id)
        # key -> list of (extra tensors, output); key = (site id, context id, hashable state)
        self._entries: OrderedDict[tuple, list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]] = OrderedDict()
        self.output_bytes = 0
        self.hits = 0
        self.misses = 0
        self.bypassed = 0

    # -- lookup
    def project(self, site: nn.Module, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        """``compute(x)`` for ``site``'s projection of the context ``x: [B, T, D]`` (``compute`` is the
        forward the layer would run), from the cache when the same context went through the same site
        in the same state."""
        state = None if self.max_bytes <= 0 or torch.is_grad_enabled() else site_state(site, x, compute)
        if state is None:
            self.bypassed += 1
            return compute(x)
        hashable, tensors = state
        context_id = self._context_id(x)
        key = (id(site), context_id, hashable)
        for stored_tensors, output in self._entries.get(key, ()):
            if all(_same(a, b) for a, b in zip(tensors, stored_tensors)):
                self.hits += 1
                self._entries.move_to_end(key)
                return output.clone()  # a caller writing into its keys must not change the cache
        self.misses += 1
        output = compute(x)
        self._store(key, tensors, output)
        return output.clone()

    def _context_id(self, x: torch.Tensor) -> int:
        memo = self._memo
        if memo is not None and memo[0] is x and memo[1] == x._version:
            return memo[2]
        found = next((i for i, pooled in enumerate(self._contexts) if pooled is not None and _same(x, pooled)), None)
        if found is None:
            found = len(self._contexts)
            self._contexts.append(x.detach())
            self._context_refs.append(0)
        self._memo = (x, x._version, found)
        return found

    def _store(self, key: tuple, tensors: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nbytes = output.nbytes + sum(t.nbytes for t in tensors)
        if nbytes + self._contexts[key[1]].nbytes > self.max_bytes:
            self._release_context(key[1], 0)  # too big to keep: do not hold its context either
            return
        self._entries.setdefault(key, []).append((tensors, output))
        self._entries.move_to_end(key)
        self._context_refs[key[1]] += 1
        self.output_bytes += nbytes
        while self.memory_bytes() > self.max_bytes and self._entries:
            old_key, items = self._entries.popitem(last=False)
            self.output_bytes -= sum(o.nbytes + sum(t.nbytes for t in ts) for ts, o in items)
            self._release_context(old_key[1], len(items))

    def _release_context(self, context_id: int, count: int) -> None:
        self._context_refs[context_id] -= count
        if self._context_refs[context_id] <= 0 and self._contexts[context_id] is not None:
            self._contexts[context_id] = None  # the id is not reused: entries never point at another context
            if self._memo is not None and self._memo[2] == context_id:
                self._memo = None

    # -- reporting
    def memory_bytes(self) -> int:
        """Bytes held: cached outputs (and MoE keys) plus the pooled contexts."""
        return self.output_bytes + sum(c.nbytes for c in self._contexts if c is not None)

    def report(self) -> dict:
        contexts = sum(c is not None for c in self._contexts)
        total = self.memory_bytes()
        return {"bytes": total, "contexts": contexts, "bytes_per_context": total // contexts if contexts else 0,
                "entries": sum(len(v) for v in self._entries.values()), "hits": self.hits,
                "misses": self.misses, "bypassed": self.bypassed, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        self._contexts.clear()
        self._context_refs.clear()
        self._entries.clear()
        self._memo = None
        self.output_bytes = 0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


def _tensor_state(t) -> tuple | None:
    return None if t is None else (id(t), t._version)


def site_state(site: nn.Module, x: torch.Tensor, forward=None) -> tuple[tuple, tuple[torch.Tensor, ...]] | None:
    """What ``site``'s output depends on besides ``x``: ``(hashable, tensors compared by value)``, or None
    when it cannot be cached. ``forward``: what the call runs (default ``site.forward``). A forward bound
    to an object with ``projection_cache_key(x)`` (a MoE site, which the Gated MoE Patch installs as the
    layer's ``forward``) answers for itself; the layer's own class forward is keyed by its weight and bias
    state and ComfyUI's per-call weight functions; any other forward (another pack's patch) is not cached."""
    forward = site.forward if forward is None else forward
    owner = getattr(forward, "__self__", None)
    if owner is not None and hasattr(owner, "projection_cache_key"):
        return owner.projection_cache_key(x)
    if owner is not site or getattr(forward, "__func__", None) is not type(site).forward:
        return None
    weight = getattr(site, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    functions = tuple(id(f) for name in ("weight_function", "bias_function") for f in getattr(site, name, ()))
    flags = (bool(getattr(site, "comfy_cast_weights", False)), site.training)
    return (_tensor_state(weight), _tensor_state(getattr(site, "bias", None)), functions, flags), ()


def cross_attention_projections(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the key and value projections of every cross-attention (``*.attn2``) under
    ``root`` whose input is the context (not a temporal self-attention: ``switch_temporal_ca_to_sa``)."""
    found = []
    for path, module in root.named_modules():
        attn2 = getattr(module, "attn2", None)
        if attn2 is None or getattr(module, "switch_temporal_ca_to_sa", False):
            continue
        for name in ("to_k", "to_v"):
            projection = getattr(attn2, name, None)
            if isinstance(projection, nn.Module):
                found.append((f"{path}.attn2.{name}" if path else f"attn2.{name}", projection))
    return found


_MISSING = object()


@contextlib.contextmanager
def install(root: nn.Module, cache: ContextProjectionCache) -> Iterator[int]:
    """Route the cross-attention key/value projections under ``root`` through ``cache`` inside the block;
    yields how many were wrapped. Every wrapped module gets its own ``forward`` back on exit."""
    wrapped: list[tuple[nn.Module, object]] = []
    try:
        for _, module in cross_attention_projections(root):
            previous = module.__dict__.get("forward", _MISSING)
            original = module.forward

            def cached_forward(x, *args, _module=module, _original=original, **kwargs):
                if args or kwargs or not isinstance(x, torch.Tensor):
                    return _original(x, *args, **kwargs)
                return cache.project(_module, x, _original)

            module.forward = cached_forward
            wrapped.append((module, previous))
        yield len(wrapped)
    finally:
        for module, previous in reversed(wrapped):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous
