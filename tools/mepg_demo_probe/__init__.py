"""Demo-only ComfyUI nodes: watch which experts the Gated MoE model actually used, region by region.

Mounted into ``custom_nodes`` by ``scripts/demo.py`` only (never by users or the shipped workflows). They
read, and change nothing:

- ``MEPGDemo_RoutingObserver`` (MODEL -> the same MODEL): puts an observer on the patched model's MoE runtime
  (``MoERuntime.observers``, the hook gate training uses). Every gated site then reports the mixing
  weights ``[B, T, E]`` it used; the observer adds them up per pass, using the pass the sampler announced
  (``MoERouting.current_pass()``: a region's local window, the background, or a global step) and, in
  global steps, each token's region (the same token -> region map the gated sites route by).
- ``MEPGDemo_RoutingReport`` (MODEL, the sampler's LATENT, REGIONS -> a text output): runs after the
  sampler (it takes its latent), removes the observer and returns the mean weight of each expert per
  region as JSON.

Only spatial sites count (self-attention q/k/v, cross-attention q, feed-forward); cross-attention keys and
values see text tokens, which belong to no region.
"""

from __future__ import annotations

import json
import threading

import torch

ATTACHMENT = "mepg_moe"
_LOCK = threading.Lock()
_RECORDERS: dict[int, RoutingRecorder] = {}


class RoutingRecorder:
    def __init__(self, attachment):
        self.routing = attachment.routing
        self.runtime = attachment.runtime
        self.names = [e.name for e in attachment.stack.experts]
        self.sums: dict[tuple, torch.Tensor] = {}
        self.tokens: dict[tuple, int] = {}
        self.calls = 0

    def _add(self, key: tuple, weights: torch.Tensor) -> None:
        if weights.numel() == 0:
            return
        total = weights.sum(dim=0, dtype=torch.float64)
        self.sums[key] = self.sums.get(key, torch.zeros_like(total)) + total
        self.tokens[key] = self.tokens.get(key, 0) + int(weights.shape[0])

    def __call__(self, module, weights: torch.Tensor) -> None:
        if getattr(module, "input_kind", "spatial") != "spatial":
            return
        self.calls += 1
        batch, tokens, experts = weights.shape
        flat = weights.detach().to("cpu", torch.float32).reshape(-1, experts)
        info = self.routing.current_pass()
        if info is None:
            self._add(("unannounced",), flat)
        elif info.kind == "local":
            self._add(("local", info.region_index), flat)
        elif info.kind == "background":
            self._add(("background",), flat)
        else:
            context = self.runtime.current()
            if context is None or context.region_map is None:
                self._add(("global", -1), flat)
                return
            ids = context.token_route_ids(tokens, "spatial").reshape(-1)
            n_regions = len(info.routes)
            for region in torch.unique(ids).tolist():
                key = ("global", region if region < n_regions else "mixed")
                self._add(key, flat[ids == region])

    def mean(self, key: tuple) -> dict[str, float] | None:
        if key not in self.sums:
            return None
        mean = self.sums[key] / max(self.tokens[key], 1)
        return {name: round(float(w), 4) for name, w in zip(self.names, mean)}

    def report(self, regions) -> dict:
        out = {"experts": self.names, "site_calls_observed": self.calls, "regions": []}
        for spec in regions.regions:
            local, inside = self.mean(("local", spec.index)), self.mean(("global", spec.index))
            out["regions"].append({
                "index": spec.index, "label": spec.label, "style": spec.style, "expert": spec.expert,
                "local_steps": local, "global_steps_inside_region": inside,
                "tokens": {"local": self.tokens.get(("local", spec.index), 0),
                           "global": self.tokens.get(("global", spec.index), 0)},
                "top_experts_local": [k for k, v in local.items() if v == max(local.values())] if local else [],
            })
        out["background_local_steps"] = self.mean(("background",))
        out["global_steps_outside_regions"] = self.mean(("global", -1))
        if ("unannounced",) in self.sums:
            out["unannounced_calls"] = self.mean(("unannounced",))
        return out


class RoutingObserver:
    CATEGORY = "MEPG/demo"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "observe"
    DESCRIPTION = "Demo only: records the expert weights the Gated MoE model uses (changes nothing)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def observe(self, model):
        attachment = model.get_attachment(ATTACHMENT)
        if attachment is None:
            raise ValueError("MEPGDemo_RoutingObserver: connect the MODEL of a Gated MoE Patch")
        recorder = RoutingRecorder(attachment)
        with _LOCK:
            old = _RECORDERS.pop(id(attachment.runtime), None)
            if old is not None and old in attachment.runtime.observers:
                attachment.runtime.observers.remove(old)
            _RECORDERS[id(attachment.runtime)] = recorder
        attachment.runtime.observers.append(recorder)
        return (model,)


class RoutingReport:
    CATEGORY = "MEPG/demo"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    DESCRIPTION = "Demo only: the mean expert weights per region that the sampler's run used, as JSON."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",), "regions": ("MEPG_REGIONS",)}}

    def report(self, model, samples, regions):
        attachment = model.get_attachment(ATTACHMENT)
        with _LOCK:
            recorder = _RECORDERS.pop(id(attachment.runtime), None) if attachment is not None else None
        if recorder is None:
            raise ValueError("MEPGDemo_RoutingReport: no observer on this model (connect RoutingObserver's MODEL)")
        if recorder in attachment.runtime.observers:
            attachment.runtime.observers.remove(recorder)
        return {"ui": {"text": (json.dumps(recorder.report(regions)),)}}


NODE_CLASS_MAPPINGS = {"MEPGDemo_RoutingObserver": RoutingObserver, "MEPGDemo_RoutingReport": RoutingReport}
NODE_DISPLAY_NAME_MAPPINGS = {"MEPGDemo_RoutingObserver": "Routing Observer (MEPG demo)",
                              "MEPGDemo_RoutingReport": "Routing Report (MEPG demo)"}
