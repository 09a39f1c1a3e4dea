"""Write tiny SDXL-architecture checkpoints with seeded random weights (test and demo fixtures).

    python tools/make_tiny_models.py --out DIR [--experts photo anime watercolor]

Writes ``tiny_sdxl_base.safetensors`` (UNet + one-layer CLIP-L/G + TAESD VAE) and one checkpoint per
expert name, ``tiny_sdxl_<name>.safetensors``. An expert equals the base everywhere except at the
MoE sites (attention q/k/v and feed-forward weights of every transformer block), which get their own
seed: like fine-tunes of one base, and so a one-hot gate on an expert reproduces its checkpoint.
Same arguments -> byte-identical files. The UNet/VAE are saved in float32, the text encoders in float16.
"""

from __future__ import annotations

import argparse
import re
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_env  # noqa: E402

comfy_env.activate()

import torch  # noqa: E402
from mepg_testing import FIXTURE_VERSION, fixture_is_current  # noqa: E402
from mepg_tiny_models.tiny_sdxl import TINY_UNET_CONFIG, TinySDXL, TinySDXLClipModel, register  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

DEFAULT_EXPERTS = ("photo", "anime", "watercolor")
# FIXTURE_VERSION (mepg_testing) is bumped when the files' content changes; older files are rewritten.
# 2: the TAESD's vae_scale is 1 (it was 0, so decoding ignored the latent and encoding gave inf).
MOE_SITE = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.to_[qkv]\.weight|ff\.net\.(0\.proj|2)\.(weight|bias))$")


def _generator(seed: int, key: str) -> torch.Generator:
    # One stream per tensor name: values never depend on the order modules are visited.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def _fill(state: dict[str, torch.Tensor], seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        name = prefix + key
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        g = _generator(seed, name)
        leaf = key.rsplit(".", 1)[-1]
        if t.ndim == 1 and ("norm" in key or "ln_" in key or "layer_norm" in key):
            out[name] = torch.ones_like(t) if leaf == "weight" else torch.zeros_like(t)
        elif t.ndim == 1:
            out[name] = torch.randn(t.shape, generator=g) * 0.02
        elif t.ndim == 0:
            out[name] = torch.zeros_like(t) if "logit" not in key else torch.tensor(4.6052)
        else:
            fan_in = t[0].numel()
            out[name] = torch.randn(t.shape, generator=g) / fan_in**0.5
    return out


def unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """UNet weights in checkpoint key layout (``model.diffusion_model.*``).

    The output convolution is rescaled so the predicted noise has unit standard deviation on a
    reference input: random weights otherwise predict almost nothing and sampling would not move.
    """
    unet = TinySDXL(dict(TINY_UNET_CONFIG)).get_model({}).diffusion_model
    sd = _fill(unet.state_dict(), seed)
    unet.load_state_dict(sd)
    g = _generator(seed, "reference-input")
    x, ctx, y = (torch.randn(s, generator=g) for s in ((1, 4, 32, 32), (1, 77, 2048), (1, 2816)))
    with torch.no_grad():
        std = unet(x, torch.tensor([500.0]), context=ctx, y=y).std().item()
    for key in ("out.2.weight", "out.2.bias"):
        sd[key] = sd[key] / std
    return {"model.diffusion_model." + k: v for k, v in sd.items()}


def expert_unet_state_dict(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The base with new weights at the MoE sites only."""
    out = dict(base)
    for key, t in base.items():
        if MOE_SITE.search(key):
            g = _generator(seed, key)
            if t.ndim == 1:
                out[key] = torch.randn(t.shape, generator=g) * 0.02
            else:
                out[key] = torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5
    return out


def clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    clip = TinySDXLClipModel(dtype=torch.float32)
    sd = _fill(clip.state_dict(), seed)
    sd = TinySDXL(dict(TINY_UNET_CONFIG)).process_clip_state_dict_for_saving(sd)
    return {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}


def vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = _fill(vae.state_dict(), seed, "first_stage_model.")
    # TAESD decodes (latent - shift) * scale and encodes encoder(x) / scale + shift: scale must not be 0.
    sd["first_stage_model.vae_scale"] = torch.tensor(1.0)
    return sd


def tiny_lora_state_dict(base: dict[str, torch.Tensor], seed: int, rank: int = 4, every: int = 2
                         ) -> dict[str, torch.Tensor]:
    """A LoRA on every ``every``-th MoE-site weight of ``base`` (keys ``diffusion_model.<path>.lora_up/
    lora_down.weight`` and ``.alpha``, which ComfyUI's LoRA loader reads)."""
    out = {}
    sites = [k for k in sorted(base) if MOE_SITE.search(k) and k.endswith(".weight") and base[k].ndim == 2]
    for key in sites[::every]:
        path = key[len("model."):-len(".weight")]
        out_f, in_f = base[key].shape
        out[f"{path}.lora_down.weight"] = torch.randn((rank, in_f), generator=_generator(seed, key + "down")) * 0.2
        out[f"{path}.lora_up.weight"] = torch.randn((out_f, rank), generator=_generator(seed, key + "up")) * 0.2
        out[f"{path}.alpha"] = torch.tensor(float(rank))
    return out


def sd15_like_unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A tiny SD1.x-shaped UNet (context 768, no ADM): not a valid SDXL expert."""
    config = {**TINY_UNET_CONFIG, "context_dim": 768, "adm_in_channels": None, "num_classes": None,
              "use_linear_in_transformer": False}
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    return _fill(unet.state_dict(), seed, "model.diffusion_model.")


def controlnet_state_dict(seed: int, residual_scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A ControlNet for the tiny SDXL UNet in the original (``control_model.*``) layout ComfyUI's
    ControlNetLoader detects: same blocks as the UNet's encoder, a 3-channel hint encoder, and zero convs
    that are *not* zero (a trained ControlNet's are not), scaled so a hint moves the output but does not
    swamp it."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in TINY_UNET_CONFIG.items() if k != "out_channels"}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config)
    sd = _fill(control.state_dict(), seed)
    for key in sd:
        if key.startswith(("zero_convs.", "middle_block_out.")):
            sd[key] = sd[key] * residual_scale
    return {"control_model." + k: v for k, v in sd.items()}


def write_extras(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Extra fixtures: a LoRA and a ControlNet for the tiny base, and an SD1.x-shaped checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"lora": out_dir / "tiny_sdxl_lora.safetensors", "sd15": out_dir / "tiny_sd15_like.safetensors",
             "controlnet": out_dir / "tiny_sdxl_controlnet.safetensors"}
    if not paths["lora"].exists():
        _save(tiny_lora_state_dict(unet_state_dict(seed), seed + 77), paths["lora"], {"mepg_fixture": "tiny-lora"})
    if not paths["sd15"].exists():
        _save(sd15_like_unet_state_dict(seed), paths["sd15"], {"mepg_fixture": "tiny-sd15-like"})
    if not paths["controlnet"].exists():
        _save(controlnet_state_dict(seed + 91), paths["controlnet"], {"mepg_fixture": "tiny-controlnet"})
    return paths


def write_portfolio(out_dir: Path, experts=DEFAULT_EXPERTS, seed: int = 0) -> list[Path]:
    """Write the base and expert checkpoints into ``out_dir``; skip files already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    register()
    paths = [out_dir / "tiny_sdxl_base.safetensors"] + [out_dir / f"tiny_sdxl_{n}.safetensors" for n in experts]
    if all(fixture_is_current(p) for p in paths):
        return paths
    base_unet = unet_state_dict(seed)
    vae = vae_state_dict(seed)
    meta = {"mepg_fixture": "tiny-sdxl", "note": "random weights for tests; not a real model",
            "mepg_fixture_version": FIXTURE_VERSION}
    if not fixture_is_current(paths[0]):
        _save({**base_unet, **vae, **clip_state_dict(seed)}, paths[0], meta)
    for i, (name, path) in enumerate(zip(experts, paths[1:]), start=1):
        if not fixture_is_current(path):
            _save({**expert_unet_state_dict(base_unet, seed + 1000 * i), **vae}, path, {**meta, "expert": name})
    return paths


def _save(sd: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the checkpoints into")
    ap.add_argument("--experts", nargs="*", default=list(DEFAULT_EXPERTS), help="expert names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extras", type=Path, help="also write the LoRA, ControlNet and SD1.x-shaped fixtures here")
    a = ap.parse_args()
    for p in write_portfolio(a.out, tuple(a.experts), a.seed):
        print(p)
    if a.extras:
        for p in write_extras(a.extras, a.seed).values():
            print(p)


if __name__ == "__main__":
    main()
