"""Training infrastructure shared by gate training and planner-LoRA training (pure torch, no ComfyUI).

- :mod:`.distributed`: one process among several (``accelerate launch`` / ``torchrun``): rank facts, DDP
  over exactly the parameters that train, collectives; a plain single process needs no extra package.
- :mod:`.streaming`: image + caption sources read lazily (a folder, a JSONL of paths, WebDataset-style tar
  shards), latents and text embeddings cached to sharded ``.safetensors`` files, bounded prefetch.
- :mod:`.logs`: the rank-0 progress bar, the JSONL log and the optional TensorBoard / W&B hooks.
"""
