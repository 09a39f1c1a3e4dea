"""ExpertStackLoader, LoRAExpertLoader and GatedMoEPatch: SDXL experts behind sigmoid gates.

The stack nodes only record which files make the portfolio (cheap, chainable); GatedMoEPatch reads the
MoE-site weights, checks them against the incoming model and patches a clone of it. The incoming
model is never modified: every change is an object patch or wrapper on the clone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ..mepg_core.experts import ExpertSpec, default_style_tags, discover_sites, load_expert_stack
from ..mepg_core.gate_files import load_gate_file
from ..mepg_core.gating import GateOptions, GateSet, InputMeanRecorder, MoERuntime, RoutingContext, build_moe_modules
from ..mepg_core.moe_routing import MoERouting
from . import moe_composition
from .checks import check_number
from .types import CATEGORY, ExpertStackType

log = logging.getLogger("mepg")

GATE_FOLDER = "mepg_gates"
ATTACHMENT = "mepg_moe"
WRAPPER_KEY = moe_composition.KEY
ADDITIONAL_MODELS_KEY = moe_composition.ADDITIONAL_MODELS_KEY
GATE_MODES = ("uniform", "forced", "trained", "style_centroid")
CALIBRATION_SIZE = 64  # latent cells per side of the calibration input (512 px)


def register_gate_folder() -> None:
    """Trained gates live in ``models/mepg_gates`` (``.safetensors`` only)."""
    folder_paths.add_model_folder_path(GATE_FOLDER, os.path.join(folder_paths.models_dir, GATE_FOLDER))
    paths, _ = folder_paths.folder_names_and_paths[GATE_FOLDER]
    folder_paths.folder_names_and_paths[GATE_FOLDER] = (paths, {".safetensors"})


register_gate_folder()


@dataclass(frozen=True)
class PortfolioEntry:
    kind: str  # "checkpoint" | "lora"
    path: str
    name: str
    tags: tuple[str, ...]
    strength: float = 1.0


@dataclass(frozen=True)
class Portfolio:
    """The experts a user stacked, in order (the incoming model's own weights may be prepended)."""

    entries: tuple[PortfolioEntry, ...] = ()

    def add(self, entry: PortfolioEntry) -> Portfolio:
        names = [e.name.lower() for e in self.entries]
        if entry.name.lower() in names or entry.name.lower() == "base":
            raise ValueError(f"an expert named {entry.name!r} is already in the stack (names must be unique; "
                             "'base' is reserved for the model's own weights)")
        return replace(self, entries=self.entries + (entry,))

    def specs(self, base: ExpertSpec) -> list[ExpertSpec]:
        out = []
        for e in self.entries:
            if e.kind == "checkpoint":
                out.append(ExpertSpec.checkpoint(e.path, name=e.name, tags=list(e.tags)))
            else:
                out.append(ExpertSpec.lora(e.path, base, strength=e.strength, name=e.name, tags=list(e.tags)))
        return out


def parse_tags(text: str, file_name: str) -> tuple[str, ...]:
    tags = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    return tags or tuple(default_style_tags(file_name))


def expert_name(name: str, file_name: str) -> str:
    name = name.strip()
    return name or os.path.splitext(os.path.basename(file_name))[0]


def safetensors_files(folder: str) -> list[str]:
    return [f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(".safetensors")]


class ExpertStackLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_ExpertStackLoader",
            display_name="Expert Stack Loader (MEPG)",
            category=f"{CATEGORY}/experts",
            description=(
                "Adds an SDXL checkpoint to the expert portfolio. Only its attention q/k/v and feed-forward "
                "weights are used (read when the Gated MoE Patch runs); chain several loaders to stack any "
                "number of experts. Style tags let regions with that style pick this expert."
            ),
            inputs=[
                io.Combo.Input("ckpt_name", options=safetensors_files("checkpoints"),
                               tooltip="An SDXL checkpoint (.safetensors) from models/checkpoints."),
                io.String.Input("name", default="", tooltip="The expert's name (default: the file name). "
                                                            "Layouts force an expert by this name."),
                io.String.Input("style_tags", default="",
                                tooltip="Comma-separated styles this expert is good at (e.g. 'anime, cartoon'); "
                                        "default: guessed from the file name."),
                ExpertStackType.Input("expert_stack", optional=True, tooltip="Experts stacked so far."),
            ],
            outputs=[ExpertStackType.Output("stack", display_name="expert_stack",
                                            tooltip="The portfolio with this expert appended.")],
        )

    @classmethod
    def execute(cls, ckpt_name: str, name: str, style_tags: str, expert_stack=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        entry = PortfolioEntry("checkpoint", path, expert_name(name, ckpt_name), parse_tags(style_tags, ckpt_name))
        return io.NodeOutput((expert_stack or Portfolio()).add(entry))


class LoRAExpertLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_LoRAExpertLoader",
            display_name="LoRA Expert Loader (MEPG)",
            category=f"{CATEGORY}/experts",
            description=(
                "Adds an expert made of the patched model's own weights plus a LoRA (a style LoRA is a cheap "
                "expert). Sites the LoRA does not touch equal the base."
            ),
            inputs=[
                io.Combo.Input("lora_name", options=safetensors_files("loras"),
                               tooltip="A LoRA for the SDXL base (.safetensors) from models/loras."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="LoRA strength in this expert."),
                io.String.Input("name", default="", tooltip="The expert's name (default: the file name)."),
                io.String.Input("style_tags", default="", tooltip="Comma-separated styles (default: from the name)."),
                ExpertStackType.Input("expert_stack", optional=True, tooltip="Experts stacked so far."),
            ],
            outputs=[ExpertStackType.Output("stack", display_name="expert_stack",
                                            tooltip="The portfolio with this expert appended.")],
        )

    @classmethod
    def execute(cls, lora_name: str, strength: float, name: str, style_tags: str, expert_stack=None
                ) -> io.NodeOutput:
        strength = check_number("MEPG LoRA Expert Loader", "strength", strength)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        entry = PortfolioEntry("lora", path, expert_name(name, lora_name), parse_tags(style_tags, lora_name),
                               strength)
        return io.NodeOutput((expert_stack or Portfolio()).add(entry))


def release_shared_weights(model) -> None:
    """Unload every loaded patcher that shares ``model``'s weights, so the module tree and weights are the
    originals again (ComfyUI applies object and weight patches in place while a clone is loaded)."""
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        patcher = loaded[i].model
        if patcher is not None and patcher.model is model.model:
            loaded[i].model_unload()
            loaded.pop(i)


def original_site_weights(model, keys: list[str]) -> dict[str, torch.Tensor]:
    """The model's own weights at ``keys`` (``diffusion_model.*``), without its weight patches: LoRAs and
    merges on the model (applied before or after the MoE patch) are applied to every expert alike when
    sampling (see ``moe_composition``). Call :func:`release_shared_weights` first."""
    state = model.model.state_dict()
    return {key: state[key].detach().to("cpu", torch.float32).clone() for key in keys}


@dataclass
class MoEAttachment:
    """What a patched model carries for the sampler (routing) and for tools (the stack, its modules, the
    experts' ModelPatcher and where its gates come from, for messages)."""

    routing: MoERouting
    runtime: MoERuntime
    modules: torch.nn.Module
    stack: object
    experts: object = None
    gate_source: str = "uniform gates (no gate file)"

    def on_model_patcher_clone(self):
        return self


class GatedMoEPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_GatedMoEPatch",
            display_name="Gated MoE Patch (MEPG)",
            category=f"{CATEGORY}/experts",
            description=(
                "Replaces every attention q/k/v projection and feed-forward block of the SDXL UNet (on a clone) "
                "by a mixture of the same modules from each expert, weighted by sigmoid gates: "
                "y = sum_i w_i * Expert_i(x). Other weights stay the model's own; the input model is unchanged."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SDXL model to patch. LoRAs applied to it before or after the "
                                                "patch change every expert the way they change the base."),
                ExpertStackType.Input("expert_stack", tooltip="The expert portfolio."),
                io.Boolean.Input("include_base", default=True,
                                 tooltip="Use the model's own weights as expert 0, named 'base'."),
                io.Combo.Input("gate_mode", options=list(GATE_MODES), default="uniform",
                               tooltip="uniform: every expert weighted equally (training-free); forced: one "
                                       "expert everywhere; trained: gates from a gate file; style_centroid: "
                                       "training-free gates that send tokens to the expert whose own style "
                                       "prompt produces the most similar features (needs a CLIP). Regions with a "
                                       "style or a forced expert are routed on top of this by the MEPG sampler."),
                io.Combo.Input("gate_file", options=["none", *safetensors_files(GATE_FOLDER)],
                               tooltip="Trained gates (models/mepg_gates) for gate_mode 'trained'; must have "
                                       "been trained for this exact expert stack."),
                io.String.Input("forced_expert", default="",
                                tooltip="For gate_mode 'forced': the expert's name (or a style tag it alone has)."),
                io.Int.Input("top_k", default=0, min=0, max=64,
                             tooltip="Keep only the k strongest experts per token (0 = all). Fewer active "
                                     "experts cost less for the feed-forward blocks."),
                io.Boolean.Input("normalise", default=True,
                                 tooltip="Divide the sigmoid weights by their sum, so the mixture is an average."),
                io.Float.Input("temperature", default=1.0, min=0.05, max=20.0, step=0.05,
                               tooltip="Gate temperature: below 1 sharpens, above 1 softens the routing."),
                io.Float.Input("global_region_bias", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="In global steps, how strongly a region's own expert is favoured "
                                       "for the tokens inside it (0 = the gate alone)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="For gate_mode 'style_centroid': encodes each expert's style prompt "
                                      "('<style tags> style')."),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model",
                                     tooltip="A patched clone; use it with the Cross-Denoise KSampler.")],
        )

    @classmethod
    def execute(cls, model, expert_stack, include_base, gate_mode, gate_file, forced_expert, top_k, normalise,
                temperature, global_region_bias, clip=None) -> io.NodeOutput:
        if model.get_attachment(ATTACHMENT) is not None:
            raise ValueError("MEPG Gated MoE Patch: this model is already MoE-patched; connect the model from "
                             "before the first Gated MoE Patch")
        release_shared_weights(model)
        diffusion = model.get_model_object("diffusion_model")
        reference = {k: v.shape for k, v in diffusion.state_dict().items()}
        dtype = model.model_dtype()

        specs = []
        portfolio: Portfolio = expert_stack or Portfolio()
        base_tensors = None
        if include_base or any(e.kind == "lora" for e in portfolio.entries):
            site_keys = [f"diffusion_model.{k}" for k in _site_keys(reference)]
            base_tensors = original_site_weights(model, site_keys)
        base_spec = ExpertSpec.from_tensors("base", base_tensors, tags=["base"]) if base_tensors else None
        if include_base:
            specs.append(base_spec)
        specs += portfolio.specs(base_spec)
        if not specs:
            raise ValueError("MEPG Gated MoE Patch: the expert stack is empty (add an expert or enable include_base)")
        if gate_mode == "style_centroid" and clip is None:
            raise ValueError("MEPG Gated MoE Patch: gate_mode 'style_centroid' needs a CLIP connected")
        try:
            stack = load_expert_stack(specs, dtype=dtype, reference=reference)
            options = GateOptions(temperature=float(temperature), top_k=int(top_k) or None, normalise=bool(normalise))
            gates = GateSet.uniform(stack.num_experts) if gate_mode == "style_centroid" else cls.gates(
                gate_mode, gate_file, forced_expert, stack)
        except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
            raise ValueError(f"MEPG Gated MoE Patch: {exc}") from None

        runtime = MoERuntime(options)
        modules = build_moe_modules(stack, gates, runtime)
        routing = MoERouting(stack, global_region_bias=float(global_region_bias),
                             uses_sigma=getattr(gates, "sigma_features", 0) > 0)

        patched = model.clone()
        source = gate_source(gate_mode, gate_file, forced_expert)
        experts = moe_composition.install(patched, modules, runtime, routing, source)
        patched.set_attachments(ATTACHMENT, MoEAttachment(routing, runtime, modules, stack, experts, source))
        if gate_mode == "style_centroid":
            modules.set_gates(style_centroid_gates(patched, clip, stack, runtime))
        log.info("MEPG: patched %d MoE sites with %d experts (%s), %.1f MB of expert weights",
                 len(stack.sites), stack.num_experts, ", ".join(e.name for e in stack.experts), stack.nbytes / 2**20)
        return io.NodeOutput(patched)

    @staticmethod
    def gates(mode: str, gate_file: str, forced_expert: str, stack) -> GateSet:
        n = stack.num_experts
        if mode == "uniform":
            return GateSet.uniform(n)
        if mode == "forced":
            if not forced_expert.strip():
                raise ValueError("gate_mode 'forced' needs forced_expert (an expert name)")
            return GateSet.forced(n, stack.expert_index(forced_expert.strip()))
        if mode == "trained":
            if gate_file == "none":
                raise ValueError("gate_mode 'trained' needs a gate_file")
            return load_gate_file(folder_paths.get_full_path_or_raise(GATE_FOLDER, gate_file), stack).gates
        raise ValueError(f"unknown gate_mode {mode!r}; choose one of {', '.join(GATE_MODES)}")


def gate_source(gate_mode: str, gate_file: str, forced_expert: str) -> str:
    """Where a patch's gates come from, in words (for messages that tell users what to keep)."""
    if gate_mode == "trained":
        return f"the gate file models/{GATE_FOLDER}/{gate_file} (gate_mode 'trained')"
    if gate_mode == "forced":
        return f"gate_mode 'forced' on expert {forced_expert.strip()!r} (no gate file)"
    if gate_mode == "style_centroid":
        return "gate_mode 'style_centroid' (made from the CLIP; no gate file)"
    return f"gate_mode {gate_mode!r} (no gate file)"


def style_centroid_gates(patched, clip, stack, runtime: MoERuntime, sharpness: float = 4.0) -> GateSet:
    """Training-free gates: run the patched model once per expert, forced to that expert, on its style
    prompt; each site's gate rows come from the experts' mean inputs there (``GateSet.from_centroids``).
    The input is a fixed-seed noise latent at a middle noise level, so the result is deterministic."""
    moe_composition.load_moe_models(patched)
    inner = patched.model
    device = patched.load_device
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 4, CALIBRATION_SIZE, CALIBRATION_SIZE), generator=generator)
    sigma = inner.model_sampling.sigma(torch.tensor([500.0])).to(device)
    x = inner.model_sampling.calculate_input(sigma, noise.to(device) * sigma)
    timestep = inner.model_sampling.timestep(sigma).float()
    recorder = InputMeanRecorder(stack.num_experts)
    # The compute dtype, as BaseModel.apply_model picks it (float8 storage computes in a cast dtype).
    dtype = inner.manual_cast_dtype or inner.get_dtype()
    for index, expert in enumerate(stack.experts):
        tags = [t for t in expert.tags if t != "base"] or [expert.name]
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(f"{', '.join(tags)} style"))[0]
        y = inner.encode_adm(pooled_output=cond[1]["pooled_output"], width=1024, height=1024)
        recorder.expert = index
        context = RoutingContext.forced(1, index, recorder=recorder)
        with torch.no_grad(), runtime.activate(context):
            inner.diffusion_model(x.to(dtype), timestep, context=cond[0].to(device, dtype),
                                  y=None if y is None else y.to(device, dtype))
    return GateSet.from_centroids(stack, recorder.means(), sharpness=sharpness)


def _site_keys(reference) -> list[str]:
    keys = []
    for site in discover_sites(reference):
        keys.append(f"{site.path}.weight")
        if site.has_bias:
            keys.append(f"{site.path}.bias")
    return keys


