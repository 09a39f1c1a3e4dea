"""How a Gated MoE model composes with what ComfyUI does to models: LoRAs, merges, hooks, saves, areas.

The MoE sites' forwards are replaced by gated modules whose expert weights live in a ModelPatcher of
their own (see :class:`ExpertWeights`). Everything ComfyUI does to the base model's weights therefore
has to be carried to the experts explicitly, or refused:

- **Weight patches** (LoRAs applied before or after the patch, ``ModelMergeSimple`` and friends with
  the MoE model as ``model1``): every patch on a site key is mirrored onto every expert's slice of the
  stacked expert tensors, and ComfyUI's own ``calculate_weight`` applies it there exactly as it does to
  the base (so expert j + LoRA equals checkpoint j + LoRA). Mirrors are made when sampling starts.
- **Hooks** (``CreateHookLora`` + ``SetClipHooks``, ``Cond Set Props``): while the sampler applies a
  hook group to the base, the same hook patches are applied to the experts.
- **Merges with the MoE model as** ``model2`` would drop the experts: refused with a clear error.
- **Saves** (``CheckpointSave``, ``ModelSave``, LoRA extraction) would write the plain base: refused
  with an error that says what to keep instead (the workflow and the gate file).
- **Area conditions** run the model on a crop; a ``CALC_COND_BATCH`` wrapper records where each
  condition's rows lie, so region routing lands on the right cells (:class:`CallFrame`).
- **Regional routing outside the MEPG samplers** (node *Regional MoE Routing*): a
  :class:`RegionalRouting` in the model options routes every call no MEPG pass announced.
"""

from __future__ import annotations

import contextvars
import logging
from collections import OrderedDict

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import comfy.weight_adapter
import torch

from ..mepg_core import window_crop as wc
from ..mepg_core.moe_routing import CallFrame, MoERouting
from ..mepg_core.regions import RegionSet, build_region_set

log = logging.getLogger("mepg")

KEY = "mepg_moe_routing"  # wrapper and callback key
ADDITIONAL_MODELS_KEY = "mepg_experts"
REGIONAL_KEY = "mepg_regional_routing"  # transformer_options entry of a Regional MoE Routing model
MAX_MIRRORS = 4
_FRAME: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("mepg_call_frame", default=None)


# --------------------------------------------------------------------------------------------------
# Expert weights and the base model's weight patches


class ExpertSlicePatch(comfy.weight_adapter.WeightAdapterBase):
    """Applies a list of the base model's patches for one site key to one expert's slice ``[1, out, in]``
    of a stacked expert tensor (added with offset ``(0, expert, 1)``), through ComfyUI's own
    ``calculate_weight`` on the 2-D view, so every patch type behaves as it does on the base."""

    name = "mepg_expert_slice"

    def __init__(self, site_key: str, patches: list, original_weight: torch.Tensor | None = None):
        self.site_key = site_key
        self.patches = list(patches)
        self.original_weight = original_weight  # the base's unpatched weight, for "model_as_lora" patches
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        view = weight[0]
        patches = self.patches
        if strength != 1.0:  # a hook's strength scales the patches it holds
            patches = [(p[0] * strength,) + tuple(p[1:]) for p in patches]
        originals = None
        if self.original_weight is not None:
            originals = {self.site_key: [(self.original_weight, lambda a, **kwargs: a)]}
        out = comfy.lora.calculate_weight(patches, view, self.site_key, intermediate_dtype=intermediate_dtype,
                                          original_weights=originals)
        if out is not view:
            if tuple(out.shape) != tuple(view.shape):
                raise ValueError(f"MEPG: a patch changes the shape of '{self.site_key}' ({tuple(view.shape)} -> "
                                 f"{tuple(out.shape)}); it cannot be applied to the experts")
            view.copy_(out)
        return weight


def site_key_map(modules) -> dict[str, str]:
    """``{"diffusion_model.<site>.weight|bias": "gated.<module>.<expert parameter>"}`` for every site."""
    out = {}
    for name, module in modules.gated.named_children():
        if hasattr(module, "expert_weight"):  # a linear site
            pairs = {f"{module.path}.weight": "expert_weight", f"{module.path}.bias": "expert_bias"}
        else:  # a feed-forward: <block>.ff with net.0.proj and net.2
            block = module.path[: -len(".ff")]
            pairs = {f"{block}.ff.net.0.proj.weight": "proj_weight", f"{block}.ff.net.0.proj.bias": "proj_bias",
                     f"{block}.ff.net.2.weight": "out_weight", f"{block}.ff.net.2.bias": "out_bias"}
        for site_key, param in pairs.items():
            if getattr(module, param, None) is not None:
                out[f"diffusion_model.{site_key}"] = f"gated.{name}.{param}"
    return out


def _patch_signature(patches: dict[str, list]) -> tuple:
    return tuple((key, tuple((p[0], id(p[1]), p[2], p[3], id(p[4])) for p in plist))
                 for key, plist in sorted(patches.items()))


def _original_weight(main, key: str) -> torch.Tensor:
    """The base's weight before the patches being applied (as ComfyUI's ``get_key_patches`` finds it)."""
    weight = comfy.utils.get_attr(main.model, key)
    backup = main.backup.get(key)
    hook_backup = main.hook_backup.get(key)
    if backup is not None:
        weight = backup.weight
    if hook_backup is not None:
        weight = hook_backup[0]
    return weight


def _patch_left_behind(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
    """ON_LOAD of an expert patcher: a partial (low-VRAM) load leaves some gated modules where they are
    and unpatched; patch those in place so no LoRA or merge is lost there."""
    touched = {}
    for key in patcher.patches:
        path = key.rsplit(".", 1)[0]
        module = comfy.utils.get_attr(patcher.model, path)
        if not getattr(module, "comfy_patched_weights", False):
            patcher.patch_weight_to_device(key)
            touched[path] = module
    for module in touched.values():
        module.comfy_patched_weights = True


class ExpertWeights:
    """The expert modules as a ModelPatcher (``base``) and, per set of site patches on a base-model
    patcher, a clone carrying those patches mirrored onto every expert (kept for the last few sets)."""

    def __init__(self, modules, load_device, offload_device):
        self.modules = modules
        self.num_experts = next(iter(modules.targets.values())).num_experts
        self.base = comfy.model_patcher.ModelPatcher(modules, load_device=load_device, offload_device=offload_device)
        self.base.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, KEY, _patch_left_behind)
        self.key_map = site_key_map(modules)
        self._mirrors: OrderedDict[tuple, tuple] = OrderedDict()

    def site_patches(self, main) -> dict[str, list]:
        return {k: main.patches[k] for k in self.key_map if k in main.patches}

    def for_model(self, main):
        """The expert patcher to load with base-model patcher ``main``."""
        patches = self.site_patches(main)
        if not patches:
            return self.base
        signature = _patch_signature(patches)
        cached = self._mirrors.get(signature)
        if cached is not None:
            self._mirrors.move_to_end(signature)
            return cached[0]
        mirror = self.base.clone()
        for key, plist in patches.items():
            original = _original_weight(main, key)
            mirror.add_patches({(self.key_map[key], (0, i, 1)): ExpertSlicePatch(key, plist, original)
                                for i in range(self.num_experts)}, 1.0, 1.0)
        self._mirrors[signature] = (mirror, patches)  # the patch lists stay referenced: their ids stay valid
        while len(self._mirrors) > MAX_MIRRORS:
            self._mirrors.popitem(last=False)
        return mirror

    def attach(self, main):
        """Set the right expert patcher as ``main``'s additional model (before ComfyUI loads it)."""
        experts = self.for_model(main)
        main.set_additional_models(ADDITIONAL_MODELS_KEY, [experts])
        return experts

    def check_loaded(self, main) -> None:
        """Before a model call: raise when the experts loaded with ``main`` do not carry its site patches
        (the model was loaded by a path that skipped ComfyUI's sampling preparation): running on would
        silently lose them."""
        patches = self.site_patches(main)
        if not patches:
            return
        attached = main.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
        cached = self._mirrors.get(_patch_signature(patches))
        if not attached or cached is None or attached[0] is not cached[0] or \
                attached[0].model.current_weight_patches_uuid != attached[0].patches_uuid:
            raise RuntimeError(
                "MEPG: this Gated MoE model carries LoRA or merge patches that its experts were not loaded with "
                "(it was run without ComfyUI's sampling preparation). Sample it with a ComfyUI sampler node, or "
                "load it with nodes.moe_composition.load_moe_models")

    # -- hooks
    def sync_hooks(self, main) -> None:
        """Apply to the experts the hook group the sampler applied to the base (or none)."""
        attached = main.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
        if not attached:
            return
        experts = attached[0]
        hooks = main.current_hooks
        strengths = None if hooks is None else tuple((h.hook_ref, h.strength) for h in hooks.hooks)
        state = (id(hooks), strengths, id(main.hook_patches))
        if getattr(experts, "_mepg_hook_state", None) == state:
            return
        previous = getattr(experts, "_mepg_hook_state", None)
        if hooks is not None:
            experts.hook_patches = self._mirror_hook_patches(main)
            experts.hook_mode = main.hook_mode
            if previous is not None and previous[0] == id(hooks) and previous[1] != strengths:
                experts.cached_hook_patches.pop(hooks, None)  # a keyframe changed a hook's strength
        experts.patch_hooks(hooks)
        self.modules.runtime.merge_cache.clear()  # hook patching rewrites the expert tensors in place
        experts._mepg_hook_state = state

    def _mirror_hook_patches(self, main) -> dict:
        out = {}
        for hook_ref, by_key in main.hook_patches.items():
            mirrored = {}
            for key, plist in by_key.items():
                if key not in self.key_map:
                    continue
                original = _original_weight(main, key)
                mirrored[self.key_map[key]] = [(1.0, ExpertSlicePatch(key, plist, original), 1.0, (0, i, 1), None)
                                               for i in range(self.num_experts)]
            if mirrored:
                out[hook_ref] = mirrored
        return out

    def on_cleanup(self, main) -> None:
        for experts in main.get_additional_models_with_key(ADDITIONAL_MODELS_KEY):
            if experts.hook_backup or experts.current_hooks is not None:
                experts.clean_hooks()
                self.modules.runtime.merge_cache.clear()
            experts._mepg_hook_state = None


def load_moe_models(model, **kwargs) -> None:
    """``load_models_gpu`` for a Gated MoE model outside a sampler: the model and its experts, with the
    model's weight patches mirrored onto them."""
    attachment = model.get_attachment("mepg_moe")
    models = [model]
    if attachment is not None and getattr(attachment, "experts", None) is not None:
        models.append(attachment.experts.attach(model))
    comfy.model_management.load_models_gpu(models, **kwargs)


# --------------------------------------------------------------------------------------------------
# Merges and saves


MERGE_REFUSAL = (
    "MEPG: a Gated MoE model is the second model of a merge (ModelMergeSimple, ModelMergeBlocks, ModelAdd, "
    "ModelSubtract…); the merge reads only its base weights, so its experts and gates would be dropped. "
    "Connect the Gated MoE model as model1 instead (every expert is then merged the way the base is), or "
    "merge the checkpoints before the Gated MoE Patch")


class _MergeGuard:
    """Mixed into a patched model's ModelPatcher class: merge nodes read ``model2.get_key_patches(
    "diffusion_model.")``; for a Gated MoE model that would silently drop the experts. ComfyUI's own
    internal calls (hook patching) pass no prefix and are served as usual. Saving through the patcher
    (``state_dict_for_saving``, ComfyUI 0.33+) is refused like a save on older hosts."""

    def get_key_patches(self, filter_prefix=None):
        if filter_prefix is not None and self.get_attachment("mepg_moe") is not None:
            raise ValueError(MERGE_REFUSAL)
        return super().get_key_patches(filter_prefix)

    def state_dict_for_saving(self, *args, **kwargs):
        # ComfyUI 0.33+ saves through the patcher (without a force_patch_weights load, see make_save_guard).
        attachment = self.get_attachment("mepg_moe")
        if attachment is not None:
            raise ValueError(save_refusal(getattr(attachment, "gate_source", "the gate file")))
        return super().state_dict_for_saving(*args, **kwargs)


_GUARDED_CLASSES: dict[type, type] = {}


def guard_merges(patcher) -> None:
    """Give this patcher (and, through ``clone``, its clones) the merge guard; its own class is kept as
    the base, so patchers of other packs keep their behaviour."""
    cls = type(patcher)
    if issubclass(cls, _MergeGuard):
        return
    if cls not in _GUARDED_CLASSES:
        _GUARDED_CLASSES[cls] = type(f"MEPG{cls.__name__}", (_MergeGuard, cls), {})
    patcher.__class__ = _GUARDED_CLASSES[cls]


def save_refusal(gate_source: str) -> str:
    return (
        "MEPG: this is a Gated MoE model; a checkpoint holds one UNet, so saving it (CheckpointSave, ModelSave, "
        "LoRA extraction) would write the plain base and silently drop the experts and gates. Keep the workflow "
        f"instead (Expert Stack Loader → Gated MoE Patch) with its gates: {gate_source}. To keep one expert "
        "alone, its checkpoint already is that model (gate_mode 'forced' equals it); to bake a LoRA into an "
        "expert, save that expert's checkpoint with the LoRA before patching")


def make_save_guard(gate_source: str):
    """An ON_LOAD callback: ComfyUI loads with ``force_patch_weights`` only to write weights out."""

    def refuse_weight_export(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
        if force_patch_weights:
            raise ValueError(save_refusal(gate_source))

    return refuse_weight_export


# --------------------------------------------------------------------------------------------------
# Where a call's rows lie, and routing outside the MEPG samplers


def frame_wrapper(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    """CALC_COND_BATCH wrapper: remember the latent this condition batch runs on, each area condition's
    (clipped) area by uuid, and the patcher running the model, for the routing of the model calls inside.

    The patcher is the one ComfyUI samples with, which need not be the one the MoE patch was installed on:
    with hooked conditions, a dynamic-VRAM ``ModelPatcherDynamic`` (ComfyUI 0.33+ on CUDA) samples with a
    plain ``ModelPatcher`` delegate that has a model object of its own."""
    canvas = tuple(int(v) for v in x_in.shape[-2:])
    areas = {}
    for cond_list in conds:
        for cond in cond_list or ():
            area = cond.get("area")
            if area is not None and len(area) == 4:
                areas[cond["uuid"]] = wc.clip_area(tuple(area), canvas)
    token = _FRAME.set((canvas, areas, getattr(model, "current_patcher", None)))
    try:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    finally:
        _FRAME.reset(token)


def call_frame(transformer_options: dict) -> CallFrame | None:
    recorded = _FRAME.get()
    if recorded is None:
        return None
    canvas, areas, _ = recorded
    uuids = transformer_options.get("uuids") or ()
    return CallFrame(canvas, tuple(areas.get(u) for u in uuids))


class RegionalRouting:
    """What a *Regional MoE Routing* model routes by: its regions, their route mode and what to do with
    calls on a latent of another shape. Kept in ``transformer_options`` (survives clones unchanged)."""

    def __init__(self, region_set: RegionSet, mode: str, other_shapes: str):
        self.region_set = region_set
        self.mode = mode
        self.other_shapes = other_shapes
        self._maps: dict[tuple, torch.Tensor | None] = {}
        self._routes: dict[int, tuple] = {}

    def __deepcopy__(self, memo):
        return self  # immutable after creation; ComfyUI deep-copies model options on every clone

    def routes(self, routing: MoERouting) -> tuple:
        if id(routing) not in self._routes:
            self._routes[id(routing)] = routing.region_routes(self.region_set.regions, self.mode)
        return self._routes[id(routing)]

    def region_map(self, routing: MoERouting, canvas_hw: tuple[int, int]) -> torch.Tensor | None:
        """``[H, W]`` region map on a ``canvas_hw`` latent (the layout rescaled to it when it has the
        regions' shape); None to route the call by the gate. Other shapes raise or go to the gate."""
        key = (id(routing), tuple(canvas_hw))
        if key not in self._maps:
            self._maps[key] = self._build_map(routing, tuple(canvas_hw))
        return self._maps[key]

    def _build_map(self, routing: MoERouting, canvas_hw: tuple[int, int]) -> torch.Tensor | None:
        rs = self.region_set
        height, width = canvas_hw
        if (rs.latent_height, rs.latent_width) == (height, width):
            return routing.region_map(rs.latent_masks())
        if abs(height - rs.latent_height * width / rs.latent_width) <= 1.0:
            scaled = build_region_set(rs.layout, width * rs.factor, height * rs.factor, factor=rs.factor,
                                      feather_px=rs.feather_px, overlap=rs.overlap)
            return routing.region_map(scaled.latent_masks())
        if self.other_shapes == "gate":
            log.warning("MEPG Regional MoE Routing: a %dx%d latent is not the regions' shape (%dx%d); routed by "
                        "the gate", width, height, rs.latent_width, rs.latent_height)
            return None
        raise ValueError(
            f"MEPG Regional MoE Routing: the model was called on a {width}x{height} latent (cells), but the regions "
            f"are laid out on {rs.latent_width}x{rs.latent_height}, another shape: a detailer or tiled upscaler "
            "samples a crop, and where that crop lies in the picture is unknown. Give it regions made for the crop, "
            "or set other_shapes to 'gate' to route such calls by the gate")


def make_routing_wrapper(runtime, routing: MoERouting, base_model=None, experts: ExpertWeights | None = None):
    """The DIFFUSION_MODEL wrapper of a Gated MoE model (a plain closure: ComfyUI deep-copies model options
    on clone): routes the call, after bringing the experts' hook patches in line with the base's."""

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        recorded = _FRAME.get()
        main = recorded[2] if recorded is not None and recorded[2] is not None else None
        if main is None:
            main = getattr(base_model, "current_patcher", None)
        if main is not None and experts is not None:
            experts.check_loaded(main)
            experts.sync_hooks(main)
        frame = call_frame(transformer_options)
        args = (x.shape[0], transformer_options.get("cond_or_uncond"), transformer_options.get("sigmas"),
                tuple(x.shape[-2:]))
        regional = transformer_options.get(REGIONAL_KEY)
        region_map = None
        if regional is not None and MoERouting.current_pass() is None:
            canvas = frame.canvas_hw if frame is not None else tuple(x.shape[-2:])
            region_map = regional.region_map(routing, canvas)
        if region_map is not None:
            with routing.fixed_regions(region_map, regional.routes(routing)):
                ctx = routing.context_for(*args, frame=frame)
        else:
            ctx = routing.context_for(*args, frame=frame)
        with runtime.activate(ctx):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    return wrapper


def make_prepare_wrapper(experts: ExpertWeights):
    """PREPARE_SAMPLING wrapper: attach the experts carrying the sampled model's patches before loading."""

    # Arguments passed on as they come: ComfyUI adds some over time (0.33: force_full_load, force_offload).
    def wrapper(executor, model, noise_shape, conds, *args, **kwargs):
        experts.attach(model)
        return executor(model, noise_shape, conds, *args, **kwargs)

    return wrapper


def install(patched, modules, runtime, routing: MoERouting, gate_source: str) -> ExpertWeights:
    """Patch ``patched`` (a clone) with the gated ``modules``: site forwards, wrappers, callbacks, the
    experts as an additional model, the merge guard. Replaces an earlier installation on the clone."""
    wrappers = comfy.patcher_extension.WrappersMP
    callbacks = comfy.patcher_extension.CallbacksMP
    experts = ExpertWeights(modules, patched.load_device, patched.offload_device)
    # Patch each site's forward, not the module: the original modules stay in the tree, so ComfyUI's
    # weight patching and bookkeeping of the base (and of LoRAs applied to it) work as usual.
    for path, module in modules.object_patches():
        patched.add_object_patch(f"{path}.forward", module.forward)
    for kind, wrapper in ((wrappers.DIFFUSION_MODEL, make_routing_wrapper(runtime, routing, patched.model, experts)),
                          (wrappers.CALC_COND_BATCH, frame_wrapper),
                          (wrappers.PREPARE_SAMPLING, make_prepare_wrapper(experts))):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, wrapper)
    for kind, callback in ((callbacks.ON_LOAD, make_save_guard(gate_source)),
                           (callbacks.ON_CLEANUP, experts.on_cleanup)):
        patched.remove_callbacks_with_key(kind, KEY)
        patched.add_callback_with_key(kind, KEY, callback)
    # The expert weights are a model of their own for ComfyUI's memory manager (loaded and offloaded with
    # the patched model, counted in its memory plan).
    patched.set_additional_models(ADDITIONAL_MODELS_KEY, [experts.base])
    guard_merges(patched)
    return experts
