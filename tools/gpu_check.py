"""The pack on this host's GPU path, at SDXL size: random-weight SDXL UNets loaded by the host's own loader
(on ComfyUI 0.33+ with CUDA: a dynamic-VRAM ``ModelPatcherDynamic``), the Gated MoE patch with two
experts, KSampler timings and checks. Run by ``scripts/gpu_check.sh`` (which also runs the contract tests on
the GPU); prints one JSON object and writes it to ``--out``.

    MEPG_DEVICE=cuda [MEPG_COMFYUI_DIR=...] python tools/gpu_check.py --out DIR [--size 1024] [--steps 8]

Checks (each a key of the result, and the exit status 1 when one fails):
- ``patcher``: the class the base model loaded as, and whether the MoE clone keeps it (plus the merge guard);
- ``forced_equals_expert``: gate_mode 'forced' on an expert vs that expert's file loaded alone (relative
  max difference, fp16 on the GPU);
- ``experts_loaded`` / ``experts_offloaded``: the expert weights sit on the GPU while sampling and leave it
  when ComfyUI unloads the models (``unload_all_models``, what *Unload models* does);
- timings: seconds per sampling run of the plain base and of the uniform two-expert mixture.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "scripts")]

import comfy_env  # noqa: E402
import inprocess  # noqa: E402


def write_random_unet(path: Path, seed: int, base: dict | None = None, tiny: bool = False) -> dict:
    """A random-weight SDXL UNet state dict (fp16, bare keys) written to ``path``; an expert copies ``base``
    except at the MoE sites (like a fine-tune of one base). ``tiny``: the test fixtures' 2.4 M-parameter
    SDXL layout instead of SDXL's own (a CPU smoke run of this script)."""
    import re

    import comfy.supported_models
    import torch
    from bench import SDXL_UNET
    from safetensors.torch import save_file

    site = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.to_[qkv]\.weight|ff\.net\.(0\.proj|2)\.(weight|bias))$")
    if base is None:
        if tiny:
            from mepg_tiny_models.tiny_sdxl import TINY_UNET_CONFIG, TinySDXL

            model = TinySDXL(dict(TINY_UNET_CONFIG)).get_model({})
        else:
            model = comfy.supported_models.SDXL(dict(SDXL_UNET)).get_model({})
        sd = {k: v.to(torch.float16) for k, v in model.diffusion_model.state_dict().items()}
        del model
    else:
        sd = dict(base)
    g = torch.Generator().manual_seed(seed)
    for key, value in sd.items():
        if base is None or site.search(key):
            sd[key] = (torch.randn(value.shape, generator=g) * 0.02).to(torch.float16)
    save_file(sd, str(path))
    return sd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny fixture UNet, any device: a smoke run of this script")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mepg-gpu-check-"))
    nodes = inprocess.load_pack(comfy_env.WORK_DIR / "gpu-check-base", with_tiny_models=a.tiny)
    import comfy.model_management as mm
    import comfy_compat
    import folder_paths
    import torch

    folder_paths.add_model_folder_path("diffusion_models", str(work))
    folder_paths.add_model_folder_path("checkpoints", str(work))
    result: dict = {"host": ".".join(map(str, comfy_compat.host_version())), "device": str(mm.get_torch_device()),
                    "size_px": a.size, "steps": a.steps}
    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        print(json.dumps({**result, "error": "no CUDA device"}))
        return 2
    result["gpu"] = torch.cuda.get_device_name() if cuda else None
    result["unet"] = "tiny" if a.tiny else "sdxl"
    started = time.perf_counter()
    base_sd = write_random_unet(work / "sdxl_base.safetensors", 0, tiny=a.tiny)
    for i, name in enumerate(("photo", "anime")):
        write_random_unet(work / f"sdxl_{name}.safetensors", i + 1, base=base_sd, tiny=a.tiny)
    del base_sd
    result["write_s"] = round(time.perf_counter() - started, 1)
    folder_paths.filename_list_cache.clear()

    m = nodes.NODE_CLASS_MAPPINGS
    unet = m["UNETLoader"]().load_unet("sdxl_base.safetensors", "default")[0]
    stack = None
    for name in ("photo", "anime"):
        stack = m["MEPG_ExpertStackLoader"].execute(f"sdxl_{name}.safetensors", name, name, expert_stack=stack).args[0]

    def patch(mode: str, forced: str = ""):
        return m["MEPG_GatedMoEPatch"].execute(unet, stack, False, mode, "none", forced, 0, True, 1.0, 0.5).args[0]

    uniform, forced = patch("uniform"), patch("forced", "anime")
    anime = m["UNETLoader"]().load_unet("sdxl_anime.safetensors", "default")[0]
    def dynamic(patcher) -> bool:
        return bool(patcher.is_dynamic()) if hasattr(patcher, "is_dynamic") else False

    result["patcher"] = {"base": type(unet).__name__, "base_is_dynamic": dynamic(unet),
                         "moe": type(uniform).__name__, "moe_is_dynamic": dynamic(uniform),
                         "moe_keeps_class": isinstance(uniform, type(unet))}
    g = torch.Generator().manual_seed(7)
    cond = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    neg = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    latent = {"samples": torch.zeros(1, 4, a.size // 8, a.size // 8)}
    ksampler = m["KSampler"]()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def sample(model):
        sync()
        t = time.perf_counter()
        x = ksampler.sample(model, 1, a.steps, 5.0, "euler", "normal", cond, neg, latent, 1.0)[0]["samples"]
        sync()
        return x, time.perf_counter() - t

    times: dict[str, list[float]] = {"plain": [], "uniform_2_experts": []}
    for _ in range(a.repeats):
        times["plain"].append(sample(unet)[1])
        x_uniform, s = sample(uniform)
        times["uniform_2_experts"].append(s)
    attachment = uniform.get_attachment("mepg_moe")
    def devices(module) -> set[str]:
        return {str(t.device) for t in [*module.parameters(), *module.buffers()]}

    experts_device = devices(attachment.modules)
    result["experts_loaded"] = {"devices": sorted(experts_device), "ok": experts_device == {str(mm.get_torch_device())}}
    x_forced, _ = sample(forced)
    x_anime, _ = sample(anime)
    err = float((x_forced - x_anime).abs().max() / x_anime.abs().max().clamp_min(1e-12))
    result["forced_equals_expert"] = {"rel_max_diff": err, "bound": 2e-2, "ok": err <= 2e-2}
    result["uniform_finite"] = bool(torch.isfinite(x_uniform).all())
    mm.unload_all_models()
    mm.soft_empty_cache()
    off = devices(attachment.modules)
    offload = str(mm.unet_offload_device())
    result["experts_offloaded"] = {"devices": sorted(off), "ok": off == {offload}}
    result["seconds"] = {k: [round(v, 3) for v in vs] for k, vs in times.items()}
    best = {k: min(vs) for k, vs in times.items()}
    result["ratio_uniform_vs_plain"] = round(best["uniform_2_experts"] / best["plain"], 3)
    if cuda:
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    ok = all(result[k]["ok"] for k in ("experts_loaded", "forced_equals_expert", "experts_offloaded")) and \
        result["uniform_finite"] and result["patcher"]["moe_keeps_class"]
    result["ok"] = ok
    text = json.dumps(result, indent=2)
    (a.out / f"gpu_check_{result['host']}{'_tiny' if a.tiny else ''}.json").write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
