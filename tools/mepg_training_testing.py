"""Gate training without ComfyUI, for the unit and multi-process tests and the bench (pure torch).

A toy denoiser runs one block of a tiny random expert stack (its gated q projection and FF); data come
from an image folder through fake but deterministic encoders (:func:`fake_encoders`), streamed with
:class:`mepg_core.training.streaming.StreamingLatentData`. As a script it is one training process, so
``torchrun --nproc_per_node 2 tools/mepg_training_testing.py ...`` is a distributed run (gloo on CPUs);
rank 0 writes the gates and the loss history to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "tools")) if p not in sys.path]

import torch  # noqa: E402
from mepg_expert_testing import unet_tensors  # noqa: E402

from mepg_core.experts import ExpertSpec, load_expert_stack  # noqa: E402
from mepg_core.gate_training import GateTrainer, GateTrainingConfig, initial_gates  # noqa: E402
from mepg_core.gating import GateOptions, RoutingContext, build_moe_modules  # noqa: E402

BLOCK = "input_blocks.4.1.transformer_blocks.0"  # width 8
NAMES = ("base", "photo", "anime", "paint")
CONTEXT = (77, 8)  # the fake text encoder's context [T, D]


def make_stack():
    specs = [ExpertSpec.from_tensors(name, unet_tensors(seed)) for seed, name in enumerate(NAMES, start=11)]
    specs[2].tags = ["anime"]
    return load_expert_stack(specs)


def make_moe(stack, options=None, seed=0, sigma_features=4):
    return build_moe_modules(stack, initial_gates(stack, sigma_features=sigma_features, seed=seed),
                             options=options or GateOptions())


class ToyDenoiser(torch.nn.Module):
    """A stand-in for the host's UNet: ``x [B, 4, H, W]`` → tokens → one block's gated q and FF → ε̂.

    Routing context per call carries σ (the gates take the noise level), as ComfyUI's wrapper does.
    """

    def __init__(self, moe, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.moe = moe
        self.proj_in = torch.nn.Parameter(torch.randn(8, 4, generator=g) / 2, requires_grad=False)
        self.proj_out = torch.nn.Parameter(torch.randn(4, 8, generator=g) / math.sqrt(8), requires_grad=False)
        self.q = moe.targets[f"{BLOCK}.attn1.to_q"]
        self.ff = moe.targets[f"{BLOCK}.ff"]
        self.calls = 0

    def forward(self, x, sigma, conds):
        self.calls += 1
        b, c, h, w = x.shape
        x_in = x / torch.sqrt(1 + sigma.reshape(-1, 1, 1, 1) ** 2)
        tokens = x_in.permute(0, 2, 3, 1).reshape(b, h * w, c) @ self.proj_in.T
        with self.moe.runtime.activate(RoutingContext.gate_only(b, sigma=sigma)):
            tokens = tokens + self.q(tokens)
            tokens = tokens + self.ff(tokens)
        return (tokens @ self.proj_out.T).reshape(b, h, w, c).permute(0, 3, 1, 2)


class FakeEncoders:
    """Deterministic stand-ins for the VAE and the text encoders, counting their calls.

    ``image(pixels [B, H, W, 3]) -> [B, 4, H/8, W/8]`` (8×8 mean pooling and a fixed 3→4 mixing);
    ``text(caption) -> (context [77, 8], pooled [8])`` seeded by the caption."""

    def __init__(self):
        self.mix = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
        self.image_calls = 0
        self.text_calls = 0

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        pooled = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8)
        return torch.einsum("oc,bchw->bohw", self.mix, pooled * 2 - 1)

    def text(self, caption: str):
        self.text_calls += 1
        g = torch.Generator().manual_seed(zlib.crc32(caption.encode()))
        return torch.randn(*CONTEXT, generator=g), torch.randn(CONTEXT[1], generator=g)


def write_image_folder(folder: Path, count: int, sizes=((64, 64),), styles=None, seed: int = 0) -> Path:
    """``count`` random PNGs (cycling through ``sizes``) with captions (and ``styles`` labels, cycled)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{i:05d}.png")
        (folder / f"img{i:05d}.txt").write_text(f"picture {i} of a random scene", encoding="utf-8")
        if styles:
            (folder / f"img{i:05d}.style").write_text(styles[i % len(styles)], encoding="utf-8")
    return folder


def streaming_data(source_path, cache_dir, runner, encoders=None, resolution=64, **kwargs):
    from mepg_core.training.buckets import Sizing
    from mepg_core.training.streaming import StreamingLatentData, open_source

    encoders = encoders or FakeEncoders()
    data = StreamingLatentData(open_source(source_path), Sizing(resolution), str(cache_dir), encoders.image,
                               encoders.text, runner=runner, encoder="fake", **kwargs)
    return data, encoders


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--result", required=True, help="rank 0 writes gates + history here (.safetensors)")
    ap.add_argument("--out-dir", default=None, help="checkpoint directory")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accumulation", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--epsilon", type=float, default=0.0)
    ap.add_argument("--stop-at", type=int, default=0, help="stop after this step (an interrupted run)")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--style-loss-weight", type=float, default=0.0)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    from mepg_core.training.distributed import make_runner

    torch.set_num_threads(1)
    runner = make_runner(cpu=True)
    stack = make_stack()
    moe = make_moe(stack, GateOptions(top_k=args.top_k) if args.top_k else GateOptions())
    model = ToyDenoiser(moe)
    data, encoders = streaming_data(args.data, args.cache_dir, runner, resolution=args.resolution, shard_mb=0.05)
    config = GateTrainingConfig(steps=args.steps, learning_rate=0.05, batch_size=args.batch_size,
                                grad_accumulation=args.grad_accumulation, warmup_steps=1, epsilon=args.epsilon,
                                seed=3, style_loss_weight=args.style_loss_weight, checkpoint_dir=args.out_dir,
                                checkpoint_every=args.checkpoint_every)
    trainer = GateTrainer(moe, model, data, config, stack=stack, frozen=[model], runner=runner)
    if args.resume:
        trainer.resume(args.out_dir)
    result = trainer.train(should_stop=(lambda: trainer.step >= args.stop_at) if args.stop_at else None)
    if runner.is_main:
        tensors = {f"{path}.{i}": t.contiguous() for path, ts in result.gates.params.items()
                   for i, t in enumerate(ts)}
        save_file(tensors, args.result, metadata={
            "loss_history": json.dumps(result.loss_history), "aux_history": json.dumps(result.aux_history),
            "steps": str(result.steps), "explored": json.dumps(result.explored_fraction)})
    counts = runner.gather_objects((encoders.image_calls, data.encoded_images, os.getpid()))
    if runner.is_main:
        Path(args.result + ".json").write_text(json.dumps({"encoder_calls": counts}))
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
