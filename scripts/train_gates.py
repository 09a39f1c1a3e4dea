"""Train MEPG gates (stage 2) from the command line — for long runs on a GPU.

    .venv/bin/python scripts/train_gates.py --base sd_xl_base_1.0.safetensors \\
        --experts realvis.safetensors animagine.safetensors --out-dir runs/gates \\
        (--data-folder images/ [--resolution 1024 --resize bucket] | --data encoded.safetensors) \\
        [--steps 2000 --lr 1e-2 --batch-size 4 --grad-accumulation 2 --top-k 2 --epsilon 0.05 --resume]

What it does: loads the base checkpoint with ComfyUI (this checkout's, in-process, like the tests), stacks
the experts exactly as the ``Gated MoE Patch (MEPG)`` node does (the base's own weights are expert 0 unless
``--no-include-base``), encodes the data with the base's VAE and text encoders (or reads an encoded data
set), and runs :class:`mepg_core.gate_training.GateTrainer` through the same glue as the
``Train MoE Gate (MEPG)`` node. Checkpoints go to ``--out-dir`` (``gates-step<N>.safetensors`` for
ComfyUI's ``models/mepg_gates``, ``state-step<N>.safetensors`` to resume); ``--resume`` continues from the
newest one; Ctrl-C stops after the current step and writes a checkpoint. ``--export`` copies the final
gates to a path of your choice (e.g. ``ComfyUI/models/mepg_gates/my_gates.safetensors``).

Data: ``--data-folder``: images (``.png .jpg .jpeg .webp .bmp``) with a same-named ``.txt`` caption and an
optional ``.style`` label; images of mixed sizes go to SDXL aspect buckets of ``--resolution`` (or are
centre-cropped to a square, ``--resize center_crop``). ``--save-data FILE`` stores the encoded set (format:
``mepg_core.gate_training.save_latent_dataset``) so later runs can skip encoding with ``--data FILE``.

Runs on the GPU when there is one (``--cpu`` forces the CPU). Only ``.safetensors`` files are read.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="SDXL checkpoint (.safetensors): model, VAE and text encoders")
    ap.add_argument("--experts", nargs="*", default=[], help="expert checkpoints (.safetensors), in stack order")
    ap.add_argument("--names", nargs="*", default=None, help="expert names (default: file names)")
    ap.add_argument("--no-include-base", action="store_true", help="do not use the base's weights as expert 0")
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-folder", help="images with .txt captions (and optional .style labels)")
    data.add_argument("--data", help="an encoded data set (.safetensors, see --save-data)")
    ap.add_argument("--resolution", type=int, default=1024, help="bucket resolution in pixels (default 1024)")
    ap.add_argument("--resize", choices=("bucket", "center_crop"), default="bucket")
    ap.add_argument("--allow-missing-captions", action="store_true")
    ap.add_argument("--save-data", help="write the encoded data set here (.safetensors)")
    ap.add_argument("--out-dir", required=True, help="checkpoint directory")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (biases; weights get lr/fan_in)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accumulation", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--epsilon", type=float, default=0.05, help="ε-greedy exploration (with --top-k)")
    ap.add_argument("--top-k", type=int, default=0, help="route each token to its k best experts (0 = all)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--no-normalise", action="store_true")
    ap.add_argument("--sigma-features", type=int, default=8, help="noise-level features of new gates (0 = none)")
    ap.add_argument("--style-loss-weight", type=float, default=0.0, help="weight of the style-label routing loss")
    ap.add_argument("--init-gates", help="start from this gate file (must belong to the same stack)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    ap.add_argument("--export", help="also write the final gates to this .safetensors path")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")
    ap.add_argument("--base-dir", default=str(ROOT / ".host" / "train-base"), help="ComfyUI base directory to use")
    ap.add_argument("--with-tiny-models", action="store_true", help="register the tiny test model family (tests)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    for path in [a.base, *a.experts] + ([a.data] if a.data else []) + ([a.init_gates] if a.init_gates else []):
        if not path.lower().endswith(".safetensors"):
            raise SystemExit(f"{path}: only .safetensors files are read")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: file not found")
    if a.names is not None and len(a.names) != len(a.experts):
        raise SystemExit(f"--names gives {len(a.names)} names for {len(a.experts)} experts")

    import comfy_env

    comfy_env.activate(Path(a.base_dir))
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = a.cpu or not torch.cuda.is_available()
    import inprocess

    inprocess.load_pack(Path(a.base_dir), with_tiny_models=a.with_tiny_models)
    import comfy.sd
    import folder_paths

    gt = inprocess.pack_module("nodes.gate_training_nodes")
    expert_nodes = inprocess.pack_module("nodes.expert_nodes")
    core = inprocess.pack_module("mepg_core.gate_training")
    gate_files = inprocess.pack_module("mepg_core.gate_files")
    log = logging.getLogger("train_gates")  # its own handler: ComfyUI configured the root logger for warnings
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    log.info("loading %s", a.base)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        a.base, output_vae=True, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
    portfolio = expert_nodes.Portfolio()
    for i, path in enumerate(a.experts):
        name = a.names[i] if a.names else expert_nodes.expert_name("", path)
        portfolio = portfolio.add(expert_nodes.PortfolioEntry("checkpoint", os.path.abspath(path), name,
                                                              expert_nodes.parse_tags("", path)))
    patched = expert_nodes.GatedMoEPatch.execute(
        model, portfolio, not a.no_include_base, "uniform", "none", "", a.top_k, not a.no_normalise,
        a.temperature, 0.5).args[0]
    stack = patched.get_attachment(expert_nodes.ATTACHMENT).stack
    log.info("expert stack:\n%s", stack.describe())

    styles = None
    model_space = False
    if a.data_folder:
        folder = core.ImageCaptionFolder(a.data_folder, a.resolution, a.resize, a.allow_missing_captions)
        log.info("%s: %d images; buckets %s", a.data_folder, len(folder), folder.sizes())

        def encode_image(image):
            with torch.no_grad():
                return vae.encode(image)

        def encode_text(caption):
            with torch.no_grad():
                return clip.encode_from_tokens_scheduled(clip.tokenize(caption))

        def encoded(done, total):
            if done % 50 == 0 or done == total:
                log.info("encoded %d/%d", done, total)

        dataset = core.encode_folder(folder, encode_image, encode_text, encoded)
        latents, conditionings, styles = dataset.latents, [[c[0]] for c in dataset.conds], dataset.styles
        if a.save_data:
            core.save_latent_dataset(a.save_data, latents, [c[0][0][0] for c in conditionings],
                                     [c[0][1]["pooled_output"][0] for c in conditionings],
                                     captions=dataset.captions, styles=styles, latent_space="raw")
            log.info("wrote %s", a.save_data)
    else:
        dataset, space = core.load_latent_dataset(a.data)
        latents, styles, model_space = dataset.latents, dataset.styles, space == "model"
        conditionings = []
        for cond in dataset.conds:
            extra = {} if cond["pooled"] is None else {"pooled_output": cond["pooled"][None]}
            conditionings.append([[cond["context"][None], extra]])
        if dataset.noise is not None:
            log.info("note: the data set's fixed noise/sigma pairs are used as they are")
    log.info("%d training samples in %d size buckets", len(latents),
             len({tuple(x.shape) for x in latents}))

    gates = None
    if a.init_gates:
        gates = gate_files.load_gate_file(a.init_gates, stack).gates
    config = core.GateTrainingConfig(
        steps=a.steps, learning_rate=a.lr, batch_size=a.batch_size, grad_accumulation=a.grad_accumulation,
        warmup_steps=a.warmup, min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, epsilon=a.epsilon,
        prediction_type=gt.prediction_type_of(patched), seed=a.seed, style_loss_weight=a.style_loss_weight,
        checkpoint_dir=a.out_dir, checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep)
    resume = None
    if a.resume:
        if core.checkpoint_steps(a.out_dir):
            resume = a.out_dir
        else:
            log.info("no checkpoint in %s yet: starting fresh", a.out_dir)

    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log.info("stopping after this step (Ctrl-C again to abort without a checkpoint)")

    signal.signal(signal.SIGINT, on_sigint)
    started = time.perf_counter()

    first_step: list[int] = []

    def progress(p):
        if not first_step:
            first_step.append(p.step - 1)  # steps done before this run (resume)
        if p.step % a.log_every == 0 or p.step == p.total:
            rate = p.seconds / max(1, p.step - first_step[0])
            log.info("step %d/%d  loss %.5f  lr %.2e  %.2fs/step  eta %.0fs", p.step, p.total, p.loss,
                     p.learning_rate, rate, rate * (p.total - p.step))

    trained, result = gt.train_moe_gates(
        patched, latents, conditionings, config, gates=gates, sigma_features=a.sigma_features, progress=progress,
        styles=styles, fixed_noise=dataset.noise, fixed_sigmas=None if dataset.sigmas is None else
        dataset.sigmas.tolist(), resume=resume, model_space=model_space, should_stop=lambda: stop["requested"])
    log.info("done: %d steps in %.0fs (this run), loss %.5f -> %.5f%s", result.steps,
             time.perf_counter() - started, result.loss_history[0], result.loss_history[-1],
             "" if result.explored_fraction is None else f", explored {result.explored_fraction:.3f} of tokens")
    final = os.path.join(a.out_dir, f"gates-step{result.steps:07d}.safetensors")
    log.info("gates: %s", final)
    if a.export and os.path.exists(final):
        os.makedirs(os.path.dirname(os.path.abspath(a.export)), exist_ok=True)
        shutil.copyfile(final, a.export)
        log.info("exported to %s", a.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
