"""Tiny SDXL-layout UNet state dicts for the expert/gating unit tests (made at test time, never committed).

The layout follows SDXL's: three levels with two resnets each, downsamplers ``input_blocks.3`` and ``.6``,
transformers in ``input_blocks.4/5/7/8``, ``middle_block.1`` and ``output_blocks.0…5``; widths are tiny
(8 and 16 channels) and the depth is 1 (2 in ``input_blocks.7.1``). Besides the eight MoE sites each
transformer block carries a few non-site tensors, and the file holds non-UNet keys, so tests can check
that only site tensors are read.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."
SDXL_CONTEXT = 2048
SD15_CONTEXT = 768

# (container, width, depth)
TRANSFORMERS = [
    ("input_blocks.4.1", 8, 1),
    ("input_blocks.5.1", 8, 1),
    ("input_blocks.7.1", 16, 2),
    ("input_blocks.8.1", 16, 1),
    ("middle_block.1", 16, 1),
    ("output_blocks.0.1", 16, 1),
    ("output_blocks.1.1", 16, 1),
    ("output_blocks.2.1", 16, 1),
    ("output_blocks.3.1", 8, 1),
    ("output_blocks.4.1", 8, 1),
    ("output_blocks.5.1", 8, 1),
]


def block_paths() -> list[str]:
    return [f"{container}.transformer_blocks.{i}" for container, _, depth in TRANSFORMERS for i in range(depth)]


def unet_tensors(seed: int, context_dim: int = SDXL_CONTEXT, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Relative UNet keys → seeded random tensors (sites and some non-site tensors)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(dtype)

    out: dict[str, torch.Tensor] = {"input_blocks.0.0.weight": rand(8, 4, 3, 3)}
    for n in (1, 2, 4, 5, 7, 8):
        out[f"input_blocks.{n}.0.in_layers.0.weight"] = rand(4)
    for n in (3, 6):
        out[f"input_blocks.{n}.0.op.weight"] = rand(4, 4, 3, 3)
    out["middle_block.0.in_layers.0.weight"] = rand(4)
    for n in range(9):
        out[f"output_blocks.{n}.0.in_layers.0.weight"] = rand(4)
    out["output_blocks.2.2.conv.weight"] = rand(4, 4, 3, 3)
    out["output_blocks.5.2.conv.weight"] = rand(4, 4, 3, 3)
    out["out.2.weight"] = rand(4, 8, 3, 3)
    for container, width, depth in TRANSFORMERS:
        out[f"{container}.proj_in.weight"] = rand(width, width)
        for i in range(depth):
            b = f"{container}.transformer_blocks.{i}"
            for attn in ("attn1", "attn2"):
                in_kv = width if attn == "attn1" else context_dim
                out[f"{b}.{attn}.to_q.weight"] = rand(width, width)
                out[f"{b}.{attn}.to_k.weight"] = rand(width, in_kv)
                out[f"{b}.{attn}.to_v.weight"] = rand(width, in_kv)
                out[f"{b}.{attn}.to_out.0.weight"] = rand(width, width)
                out[f"{b}.{attn}.to_out.0.bias"] = rand(width)
            out[f"{b}.ff.net.0.proj.weight"] = rand(8 * width, width)
            out[f"{b}.ff.net.0.proj.bias"] = rand(8 * width)
            out[f"{b}.ff.net.2.weight"] = rand(width, 4 * width)
            out[f"{b}.ff.net.2.bias"] = rand(width)
            out[f"{b}.norm1.weight"] = rand(width)
    return out


def write_checkpoint(path, tensors: dict[str, torch.Tensor], prefix: str = PREFIX, extra_keys: bool = True) -> str:
    """Save relative UNet tensors as a checkpoint (UNet behind ``prefix``, plus VAE/CLIP-like keys)."""
    data = {prefix + k: v.contiguous() for k, v in tensors.items()}
    if extra_keys:
        data["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
        data["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(16, 8)
    save_file(data, str(path))
    return str(path)
