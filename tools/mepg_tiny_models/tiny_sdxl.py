"""A tiny SDXL-architecture model family for tests: same UNet layout, text encoders and key names as
SDXL, with very few channels and layers. Seeded random weights; nothing is downloaded or committed.

UNet: model_channels 32, channel_mult [1, 2], one res block per level, one transformer block at the
second level, in the middle and in the matching output blocks (2.4 M parameters). Text: CLIP-L
(width 768) and CLIP-G (width 1280) with one layer each, so the conditioning has SDXL's shapes
(context ``[B, 77, 2048]``, pooled ``[B, 1280]``). VAE: TAESD (4 latent channels).
"""

from __future__ import annotations

import comfy.supported_models
from comfy import sd1_clip, sdxl_clip, supported_models_base

TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "transformer_depth_output": [0, 0, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _text_config(hidden: int, heads: int, act: str, projection: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 49407, "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": heads,
        "num_hidden_layers": 1, "pad_token_id": 1, "projection_dim": projection, "vocab_size": 49408,
    }


TINY_CLIP_L = _text_config(768, 12, "quick_gelu", 768)
TINY_CLIP_G = _text_config(1280, 20, "gelu", 1280)


class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
    """SDXL's dual text encoder with one-layer CLIP-L and CLIP-G (penultimate = first hidden state)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super(sdxl_clip.SDXLClipModel, self).__init__()
        self.clip_l = sd1_clip.SDClipModel(
            layer="hidden", layer_idx=0, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=TINY_CLIP_L, model_options={**model_options, "model_name": "clip_l"})
        self.clip_g = sd1_clip.SDClipModel(
            layer="hidden", layer_idx=0, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=TINY_CLIP_G, special_tokens={"start": 49406, "end": 49407, "pad": 0},
            return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
        self.dtypes = {dtype}


class TinySDXL(comfy.supported_models.SDXL):
    unet_config = {
        "model_channels": 32,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 1],
        "context_dim": 2048,
        "adm_in_channels": 2816,
        "use_temporal_attention": False,
    }
    memory_usage_factor = 0.05

    def clip_target(self, state_dict={}):
        return supported_models_base.ClipTarget(sdxl_clip.SDXLTokenizer, TinySDXLClipModel)


def register() -> None:
    models = comfy.supported_models.models
    if not any(m is TinySDXL or getattr(m, "__name__", "") == "TinySDXL" for m in models):
        models.insert(0, TinySDXL)
