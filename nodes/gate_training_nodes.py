"""TrainMoEGate and SaveMoEGate: gate training (stage 2) inside ComfyUI, on a Gated MoE Patch's model.

Glue only: the loop, the objective and the data handling are :mod:`mepg_core.gate_training`; this file
turns ComfyUI's LATENT/CONDITIONING into training samples and runs the patched UNet as the core's
``denoise_fn``:

- clean latents are ``model.process_latent_in(samples)``; the core draws ``t ~ U{0…999}``, takes
  ``σ = model_sampling.sigmas[t]`` and feeds ``x = x0 + σ·ε`` (``model_sampling.noise_scaling``) to
  ``BaseModel.apply_model`` with the model's own wrappers and conditioning (``extra_conds``: cross-attention
  and SDXL's ADM vector), as ComfyUI's samplers call it; its ``x̂0`` is turned back into the model's
  prediction (ε or v, from the model's ``model_sampling`` type) and compared with the true ε or v.
- the model is a clone of the input with *new* gate modules (sharing the frozen expert weights), so the
  input model's gates never change; base-model weights are frozen (``requires_grad_(False)``, as ComfyUI's
  own LoRA trainer does) and, when ComfyUI created them in inference mode, read through per-call copies
  (identity weight wrappers on a training-only clone) so gradients can pass through them.
"""

from __future__ import annotations

import logging
import math
import os
import uuid

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..mepg_core.gate_files import load_gate_file, save_gate_file
from ..mepg_core.gate_training import (
    GateTrainer,
    GateTrainingConfig,
    GateTrainingError,
    LatentDataset,
    TrainingProgress,
    TrainingResult,
    initial_gates,
    prediction_from_denoised,
)
from ..mepg_core.gating import GateSet, MoERuntime, build_moe_modules
from ..mepg_core.moe_routing import MoERouting
from . import moe_composition
from .expert_nodes import (
    ATTACHMENT,
    GATE_FOLDER,
    MoEAttachment,
    release_shared_weights,
    safetensors_files,
)
from .types import CATEGORY

log = logging.getLogger("mepg")

TRAINING_INFO = "mepg_gate_training"  # attachment on a trained model: what SaveMoEGate writes as metadata
SIGMA_FEATURES = 8
_UNSUPPORTED_COND_KEYS = ("area", "mask", "control", "gligen", "hooks")


def moe_attachment(model, who: str) -> MoEAttachment:
    attachment = model.get_attachment(ATTACHMENT)
    if attachment is None:
        raise ValueError(f"{who}: this model is not MoE-patched; connect the MODEL output of a "
                         "'Gated MoE Patch (MEPG)' node")
    return attachment


def prediction_type_of(model) -> str:
    """``"eps"`` or ``"v"`` from the model's ``model_sampling``; other objectives are refused."""
    ms = comfy.model_sampling
    sampling = model.get_model_object("model_sampling")
    # The x0 formula must be exactly EPS's or V_PREDICTION's (subclasses such as LCM, EDM or X0 change it):
    # prediction_from_denoised inverts those two.
    formula = getattr(type(sampling), "calculate_denoised", None)
    kinds = {ms.EPS.calculate_denoised: "eps", ms.V_PREDICTION.calculate_denoised: "v"}
    if not isinstance(sampling, ms.ModelSamplingDiscrete) or formula not in kinds:
        raise ValueError(f"gate training supports SDXL-style discrete ε- or v-prediction models; this model samples "
                         f"with {type(sampling).__name__}")
    if float(getattr(sampling, "sigma_data", 1.0)) != 1.0:
        raise ValueError("gate training assumes sigma_data = 1")
    return kinds[formula]


def with_gates(model, gates: GateSet):
    """A clone of the MoE-patched ``model`` whose sites run *new* gated modules with ``gates`` (the expert
    weights are shared, frozen); routing options and region settings carry over. Returns the clone."""
    old = moe_attachment(model, "MEPG")
    stack = old.stack
    runtime = MoERuntime(old.runtime.options, old.runtime.merge_cache.max_bytes)
    with torch.inference_mode(False):  # gate parameters must be normal (trainable) tensors
        modules = build_moe_modules(stack, gates, runtime)
    routing = MoERouting(stack, global_region_bias=old.routing.global_region_bias,
                         uncond_policy=old.routing.uncond_policy, uses_sigma=gates.sigma_features > 0)
    patched = model.clone()
    source = "the gates being trained (save them with Save MoE Gate, then load them with gate_mode 'trained')"
    experts = moe_composition.install(patched, modules, runtime, routing, source)
    patched.set_attachments(ATTACHMENT, MoEAttachment(routing, runtime, modules, stack, experts, source))
    return patched


def _identity(weight):
    return weight


def training_clone(model):
    """A clone for running training passes: base weights created in inference mode are read through
    identity weight wrappers (ComfyUI then hands each layer a normal copy per call)."""
    trainer = model.clone()
    diffusion = model.get_model_object("diffusion_model")
    if any(p.is_inference() for p in diffusion.parameters()):
        for name, module in diffusion.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for kind in ("weight", "bias"):
                if getattr(module, kind, None) is not None:
                    trainer.add_weight_wrapper(f"diffusion_model.{name}.{kind}", _identity)
    return trainer


def split_latents(latents) -> list[torch.Tensor]:
    """LATENT dicts (one or a list, each ``samples: [b, C, H, W]``) → per-sample ``[C, H, W]``."""
    latents = latents if isinstance(latents, (list, tuple)) else [latents]
    out = []
    for latent in latents:
        samples = latent["samples"]
        if samples.dim() != 4:
            raise ValueError(f"latents must be image latents [B, C, H, W], got {tuple(samples.shape)}")
        out.extend(s.detach().clone() for s in samples.unbind(0))
    return out


def conditioning_entries(conditionings, count: int, who: str) -> list[list]:
    """CONDITIONING (one or a list) → one single-entry CONDITIONING per sample: the entries of all inputs
    in order, one per latent, or a single entry for all (the convention of ComfyUI's LoRA trainer)."""
    conditionings = conditionings if isinstance(conditionings, (list, tuple)) else [conditionings]
    entries = [entry for cond in conditionings for entry in cond]
    if len(entries) == 1:
        entries = entries * count
    if len(entries) != count:
        raise ValueError(f"{who}: {len(entries)} conditioning entries for {count} latents; give one per latent "
                         "(in order) or a single one for all")
    for entry in entries:
        bad = [k for k in _UNSUPPORTED_COND_KEYS if k in entry[1]]
        if bad:
            raise ValueError(f"{who}: conditioning with {', '.join(bad)} is not supported for gate training; "
                             "use plain prompt conditioning (one per latent)")
    return [[entry] for entry in entries]


def _clone_tree(value):
    # Normal (not inference-mode) tensors without autograd history: they are reused at every step.
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_tree(v) for v in value)
    return value


class ComfyDenoiser:
    """``denoise_fn`` for the core: runs ``patcher``'s model on a batch (see the module docstring)."""

    def __init__(self, patcher, prediction_type: str):
        self.patcher = patcher
        self.prediction_type = prediction_type
        self.model = patcher.model
        # What ComfyUI's samplers put in transformer_options: the model options' own entries plus the
        # patcher's wrappers and callbacks (the MoE routing wrapper among them).
        options = dict(patcher.model_options.get("transformer_options", {}))
        for name, registered in (("wrappers", patcher.wrappers), ("callbacks", patcher.callbacks)):
            options[name] = comfy.patcher_extension.merge_nested_dicts(options.get(name, {}), registered)
        self.transformer_options = options

    def prepare(self, conditioning: list, latent: torch.Tensor, seed: int = 0) -> dict:
        """One sample's model conditioning (``{name: CONDRegular}`` for batch 1) from a single-entry
        CONDITIONING and the sample's model-space latent ``[C, H, W]``."""
        entry = comfy.sampler_helpers.convert_cond(_clone_tree(conditioning))
        noise = latent[None]
        encoded = comfy.samplers.encode_model_conds(self.model.extra_conds, entry, noise, torch.device("cpu"),
                                                    "positive", latent_image=noise, seed=seed)
        return {name: cond.process_cond(batch_size=1, area=None) for name, cond in encoded[0]["model_conds"].items()}

    def __call__(self, x_noisy: torch.Tensor, sigma: torch.Tensor, conds: list[dict]) -> torch.Tensor:
        kwargs = comfy.samplers.cond_cat(conds)
        options = dict(self.transformer_options)
        options["cond_or_uncond"] = [0]
        options["uuids"] = [uuid.uuid4()]
        options["sigmas"] = sigma
        kwargs["transformer_options"] = options
        denoised = self.model.apply_model(x_noisy, sigma, **kwargs)
        return prediction_from_denoised(x_noisy, sigma, denoised.float(), self.prediction_type)


def train_moe_gates(
    model,
    latents: list[torch.Tensor],
    conditionings: list[list],
    config: GateTrainingConfig,
    gates: GateSet | None = None,
    sigma_features: int = SIGMA_FEATURES,
    progress=None,
    styles: list[str | None] | None = None,
    fixed_noise: list[torch.Tensor] | None = None,
    fixed_sigmas: list[float] | None = None,
    resume: str | None = None,
    model_space: bool = False,
    should_stop=None,
    runner=None,
    data_factory=None,
) -> tuple[object, TrainingResult]:
    """Train gates on a MoE-patched ``model``; returns ``(trained clone, result)``.

    ``latents``: raw VAE latents ``[C, H, W]`` (LATENT ``samples`` rows); ``conditionings``: one
    single-entry CONDITIONING per latent. ``gates``: where to start (default: the model's own linear gates,
    else :func:`~mepg_core.gate_training.initial_gates` with ``sigma_features``). ``fixed_noise`` /
    ``fixed_sigmas``: pre-noised pairs (ε per latent in model space, σ per latent) instead of random draws.
    ``resume``: a state file or checkpoint directory of an earlier run (``config.checkpoint_dir``).
    ``model_space``: the latents are already scaled for the model (``process_latent_in`` applied).
    ``progress`` / ``should_stop``: passed to :meth:`~mepg_core.gate_training.GateTrainer.train`.
    ``runner``: this process of a distributed run (:mod:`mepg_core.training.distributed`; default: one
    process). ``data_factory(denoiser, base_model) -> data set``: builds the data instead of ``latents`` /
    ``conditionings`` (e.g. a :class:`~mepg_core.training.streaming.StreamingLatentData` that turns its
    cached encodings into model conditioning with ``denoiser.prepare``).
    """
    attachment = moe_attachment(model, "MEPG Train MoE Gate")
    stack = attachment.stack
    if gates is None:
        current = attachment.modules.gate_set()
        gates = current if current.mode == "linear" else initial_gates(stack, sigma_features, seed=config.seed)
    trained = with_gates(model, gates)
    trainer_model = training_clone(trained)
    modules = trained.get_attachment(ATTACHMENT).modules
    with torch.inference_mode(False):
        base = trainer_model.model
        base.requires_grad_(False)
        moe_composition.load_moe_models(trainer_model, force_full_load=True)
        trainer_model.pre_run()
        try:
            denoiser = ComfyDenoiser(trainer_model, config.prediction_type)
            if data_factory is not None:
                dataset = data_factory(denoiser, base)
            else:
                scaled = [latent.detach().float().clone() if model_space else
                          base.process_latent_in(latent.detach()[None].float())[0] for latent in latents]
                conds = [denoiser.prepare(c, x, config.seed) for c, x in zip(conditionings, scaled)]
                dataset = LatentDataset(scaled, conds, styles=styles, noise=fixed_noise, sigmas=fixed_sigmas)
            sampling = trainer_model.get_model_object("model_sampling")
            trainer = GateTrainer(modules, denoiser, dataset, config, stack=stack,
                                  sigmas=sampling.sigmas.detach().float().cpu(), frozen=[base.diffusion_model],
                                  runner=runner)
            if resume:
                trainer.resume(resume)
            result = trainer.train(progress=progress, should_stop=should_stop)
        finally:
            trainer_model.cleanup()
            release_shared_weights(trained)  # unpatch the training clone (its weight wrappers) now
    trained.set_attachments(TRAINING_INFO, {
        "steps": result.steps, "loss_first": result.loss_history[0] if result.loss_history else None,
        "loss_last": result.loss_history[-1] if result.loss_history else None,
        "learning_rate": config.learning_rate, "epsilon": config.epsilon, "samples": len(dataset),
    })
    return trained, result


def comfy_progress(total: int):
    """A progress callback: ComfyUI's progress bar plus the cancel check."""
    bar = comfy.utils.ProgressBar(total)

    def update(p: TrainingProgress) -> None:
        bar.update_absolute(p.step, p.total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return update


class TrainMoEGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_TrainMoEGate",
            display_name="Train MoE Gate (MEPG)",
            category=f"{CATEGORY}/experts",
            description=(
                "Stage 2 of MEPG: trains only the gates of a Gated MoE Patch's model (experts and base stay "
                "frozen) with the model's own denoising loss on your latents and prompts. Outputs a new patched "
                "model with the trained gates (the input model is unchanged) and a loss history for "
                "'Plot Loss Graph'. Save the gates with 'Save MoE Gate (MEPG)'."
            ),
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="A model from 'Gated MoE Patch (MEPG)' (its experts, top-k and "
                                                "temperature are used as they are)."),
                io.Latent.Input("latents", tooltip="Training latents (VAE-encoded images); a batch or a list, "
                                                   "e.g. from 'Make Training Dataset'. Sizes may differ."),
                io.Conditioning.Input("positive", tooltip="The prompt of each latent, in order (a list, or one "
                                                          "conditioning for all)."),
                io.Int.Input("steps", default=500, min=1, max=1000000, tooltip="Optimiser steps."),
                io.Float.Input("learning_rate", default=0.01, min=0.000001, max=1.0, step=0.00001,
                               tooltip="Peak AdamW learning rate (linear warm-up, then cosine decay)."),
                io.Int.Input("batch_size", default=1, min=1, max=1024,
                             tooltip="Latents per micro-batch (latents of different sizes never share one)."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimiser step."),
                io.Int.Input("warmup_steps", default=20, min=0, max=100000,
                             tooltip="Steps of linear learning-rate warm-up."),
                io.Float.Input("epsilon", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="ε-greedy exploration: with top-k routing, this share of tokens tries "
                                       "random experts during training (no effect with dense routing)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seeds the gate start, the noise, the timesteps and the data order."),
                io.Boolean.Input("timestep_input", default=True,
                                 tooltip="New gates also see the noise level (ignored when continuing gates)."),
                io.Combo.Input("resume_gate_file", options=["none", *safetensors_files(GATE_FOLDER)],
                               tooltip="Start from these gates (models/mepg_gates; must belong to this expert "
                                       "stack) instead of the model's own or fresh ones."),
            ],
            outputs=[
                io.Model.Output("trained_model", display_name="model",
                                tooltip="A patched clone with the trained gates."),
                io.Custom("LOSS_MAP").Output("loss_map", display_name="loss_map",
                                             tooltip="Loss per step, for 'Plot Loss Graph'."),
                io.Int.Output("total_steps", display_name="steps", tooltip="Optimiser steps trained."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, batch_size, grad_accumulation, warmup_steps,
                epsilon, seed, timestep_input, resume_gate_file) -> io.NodeOutput:
        who = "MEPG Train MoE Gate"
        model, steps, learning_rate, batch_size = model[0], steps[0], learning_rate[0], batch_size[0]
        grad_accumulation, warmup_steps, epsilon, seed = grad_accumulation[0], warmup_steps[0], epsilon[0], seed[0]
        timestep_input, resume_gate_file = timestep_input[0], resume_gate_file[0]
        attachment = moe_attachment(model, who)
        samples = split_latents(latents)
        conds = conditioning_entries(positive, len(samples), who)
        try:
            config = GateTrainingConfig(
                steps=int(steps), learning_rate=float(learning_rate), batch_size=int(batch_size),
                grad_accumulation=int(grad_accumulation), warmup_steps=min(int(warmup_steps), max(0, int(steps) - 1)),
                epsilon=float(epsilon), seed=int(seed) % (2**63), prediction_type=prediction_type_of(model))
            gates = None
            if resume_gate_file != "none":
                path = folder_paths.get_full_path_or_raise(GATE_FOLDER, resume_gate_file)
                gates = load_gate_file(path, attachment.stack).gates
            trained, result = train_moe_gates(model, samples, conds, config, gates=gates,
                                              sigma_features=SIGMA_FEATURES if timestep_input else 0,
                                              progress=comfy_progress(int(steps)))
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{who}: {exc}") from None
        except GateTrainingError as exc:
            raise GateTrainingError(f"{who}: {exc}") from None
        log.info("MEPG: trained gates for %d steps on %d latents: loss %.5g -> %.5g", result.steps, len(samples),
                 result.loss_history[0], result.loss_history[-1])
        return io.NodeOutput(trained, {"loss": list(result.loss_history)}, int(result.steps))


_BAD_NAME = ("/", "\\", "..", ":", "\0")


def gate_file_path(name: str) -> tuple[str, str]:
    """``(file name, full path)`` in models/mepg_gates for a user-given ``name`` (no folders allowed)."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or any(bad in name for bad in _BAD_NAME) or name.startswith("."):
        raise ValueError(f"gate name {name!r} must be a plain file name (no folders, '..' or leading dot)")
    file_name = name + ".safetensors"
    folder = folder_paths.get_folder_paths(GATE_FOLDER)[0]
    return file_name, os.path.join(folder, file_name)


class SaveMoEGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MEPG_SaveMoEGate",
            display_name="Save MoE Gate (MEPG)",
            category=f"{CATEGORY}/experts",
            description=(
                "Saves the gates of a MoE-patched model (e.g. from 'Train MoE Gate (MEPG)') to "
                "models/mepg_gates/<name>.safetensors, with the expert stack (names and content hashes) and "
                "sites they belong to. 'Gated MoE Patch (MEPG)' lists them under gate_file."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="A MoE-patched model with trained (linear) gates."),
                io.String.Input("name", default="mepg_gates", tooltip="File name (no folders); "
                                                                       ".safetensors is added."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output("gate_file", display_name="gate_file",
                                      tooltip="The saved file's name as Gated MoE Patch lists it.")],
        )

    @classmethod
    def execute(cls, model, name, overwrite) -> io.NodeOutput:
        who = "MEPG Save MoE Gate"
        attachment = moe_attachment(model, who)
        gates = attachment.modules.gate_set()
        if gates.mode != "linear":
            raise ValueError(f"{who}: this model's gates are '{gates.mode}' and have nothing to save; train them "
                             "first (Train MoE Gate) or patch with gate_mode 'trained'")
        try:
            file_name, path = gate_file_path(name)
        except ValueError as exc:
            raise ValueError(f"{who}: {exc}") from None
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{who}: {file_name} already exists in models/{GATE_FOLDER}; choose another name or "
                             "enable overwrite")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = model.get_attachment(TRAINING_INFO) or {}
        extra = {k: str(v) for k, v in info.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        partial = path[: -len(".safetensors")] + ".partial.safetensors"
        save_gate_file(partial, gates, attachment.stack, attachment.runtime.options, extra)
        os.replace(partial, path)
        folder_paths.filename_list_cache.pop(GATE_FOLDER, None)
        experts = ", ".join(e.name for e in attachment.stack.experts)
        return io.NodeOutput(file_name, ui=ui.PreviewText(f"saved {file_name} (experts: {experts})"))
