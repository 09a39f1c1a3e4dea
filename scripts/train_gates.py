"""Train MEPG gates (stage 2) from the command line — for long runs on one GPU or many.

    .venv/bin/python scripts/train_gates.py --base sd_xl_base_1.0.safetensors \\
        --experts realvis.safetensors animagine.safetensors --out-dir runs/gates \\
        (--data-source images/ | --data-source data.jsonl | --data-source 'shards/{00000..00099}.tar' \\
         | --data encoded.safetensors) [--resolution 1024 --resize bucket] \\
        [--steps 2000 --lr 1e-2 --batch-size 4 --grad-accumulation 2 --top-k 2 --epsilon 0.05 --resume]

    accelerate launch --num_processes 8 scripts/train_gates.py ...      (the same arguments; or torchrun)

What it does: loads the base checkpoint with ComfyUI (this checkout's, in-process, like the tests), stacks
the experts exactly as the ``Gated MoE Patch (MEPG)`` node does (the base's own weights are expert 0 unless
``--no-include-base``) and runs :class:`mepg_core.gate_training.GateTrainer` through the same glue as the
``Train MoE Gate (MEPG)`` node. Checkpoints go to ``--out-dir`` (``gates-step<N>.safetensors`` for
ComfyUI's ``models/mepg_gates``, ``state-step<N>.safetensors`` to resume); ``--resume`` continues from the
newest one exactly (gates, optimiser, step, data position, random state); Ctrl-C stops after the current
step and writes a checkpoint. ``--export`` copies the final gates to a path of your choice (e.g.
``ComfyUI/models/mepg_gates/my_gates.safetensors``). The log of every step goes to
``--out-dir/train-log.jsonl`` (``--report-to tensorboard|wandb`` adds those when installed).

Data (``--data-source``, streamed, never all in memory; see ``mepg_core.training.streaming``): a folder of
images (``.png .jpg .jpeg .webp .bmp``) with same-named ``.txt`` captions and optional ``.style`` labels; a
``.jsonl`` of ``{"image": path, "caption": text, "style": label}``; or WebDataset-style ``.tar`` shards.
Images of mixed sizes go to SDXL aspect buckets of ``--resolution`` (or ``--resize center_crop``). The
first epoch encodes each sample with the base's VAE and text encoders and caches the result in
``--cache-dir`` (sharded ``.safetensors``); later epochs and later runs read the cache instead.
``--data FILE`` reads an encoded set made by ``mepg_core.gate_training.save_latent_dataset`` (held in memory).

Distributed (``accelerate launch`` / ``torchrun``): every process loads the frozen base and experts once on
its own GPU; only the gate parameters are wrapped in DDP; each process trains on its slice of every global
batch (``--batch-size`` per process); rank 0 writes checkpoints and logs. ``--out-dir`` and ``--cache-dir``
must be on storage every process sees.

Runs on the GPU when there is one (``--cpu`` forces the CPU, with the gloo backend when distributed). Only
``.safetensors`` files are read.
"""

from __future__ import annotations

import argparse
import collections
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
    data.add_argument("--data-source", help="streamed data: an image folder, a .jsonl of image paths, or .tar "
                                            "shards (a file, a folder of them, a glob or a {000..099} range)")
    data.add_argument("--data-folder", help="an image folder with .txt captions (same as --data-source FOLDER)")
    data.add_argument("--data", help="an encoded data set (.safetensors, see save_latent_dataset; held in memory)")
    ap.add_argument("--resolution", type=int, default=1024, help="bucket resolution in pixels (default 1024)")
    ap.add_argument("--resize", choices=("bucket", "center_crop"), default="bucket")
    ap.add_argument("--allow-missing-captions", action="store_true")
    ap.add_argument("--cache-dir", help="latent cache of the streamed data (default: OUT_DIR/latent-cache)")
    ap.add_argument("--cache-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--cache-shard-mb", type=float, default=256.0, help="size of one cache shard file")
    ap.add_argument("--workers", type=int, default=2, help="data reading threads per process")
    ap.add_argument("--prefetch", type=int, default=4, help="micro-batches read ahead per process")
    ap.add_argument("--save-data", help=argparse.SUPPRESS)
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
    ap.add_argument("--log-every", type=int, default=10, help="log line every N steps (without a terminal)")
    ap.add_argument("--report-to", nargs="*", default=[], choices=("tensorboard", "wandb"),
                    help="also log to TensorBoard (OUT_DIR/tensorboard) and/or Weights & Biases, if installed")
    ap.add_argument("--wandb-project", default="mepg-gates")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")
    ap.add_argument("--base-dir", default=str(ROOT / ".host" / "train-base"), help="ComfyUI base directory to use")
    ap.add_argument("--with-tiny-models", action="store_true", help="register the tiny test model family (tests)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.save_data:
        raise SystemExit("--save-data is gone: streamed data are cached (encoded once) in --cache-dir, and later runs "
                         "with the same --cache-dir skip encoding")
    for path in [a.base, *a.experts] + ([a.data] if a.data else []) + ([a.init_gates] if a.init_gates else []):
        if not path.lower().endswith(".safetensors"):
            raise SystemExit(f"{path}: only .safetensors files are read")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: file not found")
    if a.names is not None and len(a.names) != len(a.experts):
        raise SystemExit(f"--names gives {len(a.names)} names for {len(a.experts)} experts")

    from mepg_core.training.distributed import main_first, make_runner

    runner = make_runner(cpu=a.cpu)  # before ComfyUI: on GPUs it makes cuda:LOCAL_RANK this rank's device
    import comfy_env

    with main_first(runner):  # rank 0 lays out the ComfyUI base directory, the others then find it ready
        comfy_env.activate(Path(a.base_dir))
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = runner.device.type == "cpu"
        import inprocess

        inprocess.load_pack(Path(a.base_dir), with_tiny_models=a.with_tiny_models)
    import comfy.sd
    import folder_paths

    gt = inprocess.pack_module("nodes.gate_training_nodes")
    expert_nodes = inprocess.pack_module("nodes.expert_nodes")
    core = inprocess.pack_module("mepg_core.gate_training")
    gate_files = inprocess.pack_module("mepg_core.gate_files")
    streaming = inprocess.pack_module("mepg_core.training.streaming")
    buckets = inprocess.pack_module("mepg_core.training.buckets")
    logs = inprocess.pack_module("mepg_core.training.logs")
    log = logging.getLogger("train_gates")  # its own handler: ComfyUI configured the root logger for warnings
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if runner.is_main else logging.WARNING)
    log.propagate = False
    log.info("%s", runner.describe())

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

    gates = None
    if a.init_gates:
        gates = gate_files.load_gate_file(a.init_gates, stack).gates
    config = core.GateTrainingConfig(
        steps=a.steps, learning_rate=a.lr, batch_size=a.batch_size, grad_accumulation=a.grad_accumulation,
        warmup_steps=a.warmup, min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, epsilon=a.epsilon,
        prediction_type=gt.prediction_type_of(patched), seed=a.seed, style_loss_weight=a.style_loss_weight,
        checkpoint_dir=a.out_dir, checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep)

    latents, conditionings, styles, fixed_noise, fixed_sigmas, model_space, data_factory = [], [], None, None, None, \
        False, None
    source_spec = a.data_source or a.data_folder
    streamed: list = []  # the streamed data set, once built (its encoder counts go to the log)
    if source_spec:
        try:
            source = streaming.open_source(source_spec, a.allow_missing_captions, workers=max(1, a.workers))
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        sizing = buckets.Sizing(a.resolution, a.resize)
        cache_dir = a.cache_dir or os.path.join(a.out_dir, "latent-cache")
        log.info("%s: %d samples (%s); latent cache %s", source_spec, len(source), source.kind, cache_dir)

        def encode_image(pixels):
            return vae.encode(pixels)

        def encode_text(caption):
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
            return cond[0][0][0], cond[0][1].get("pooled_output", [None])[0]

        def scanned(done, total):
            log.info("reading image sizes: %d/%d (this process)", done, total)

        def data_factory(denoiser, base):
            def make_cond(context, pooled, latent):
                extra = {} if pooled is None else {"pooled_output": pooled[None]}
                return denoiser.prepare([[context[None], extra]], latent, config.seed)

            data = streaming.StreamingLatentData(
                source, sizing, cache_dir, encode_image, encode_text, latent_in=base.process_latent_in,
                make_cond=make_cond, runner=runner, encoder=f"{os.path.basename(a.base)}:{os.path.getsize(a.base)}:"
                f"{stack.experts[0].content_hash if not a.no_include_base else ''}", cache_dtype=a.cache_dtype,
                shard_mb=a.cache_shard_mb, workers=a.workers, prefetch=a.prefetch, progress=scanned)
            sizes = collections.Counter(data.manifest.sizes[int(b)] for b in data.manifest.bucket_of)
            log.info("%d samples in %d size buckets %s; %d still to encode (cached: %d)", len(data), len(sizes),
                     dict(sizes), data.cache.missing(), len(data) - data.cache.missing())
            streamed.append(data)
            return data
    else:
        dataset, space = core.load_latent_dataset(a.data)
        latents, styles, model_space = dataset.latents, dataset.styles, space == "model"
        for cond in dataset.conds:
            extra = {} if cond["pooled"] is None else {"pooled_output": cond["pooled"][None]}
            conditionings.append([[cond["context"][None], extra]])
        fixed_noise = dataset.noise
        fixed_sigmas = None if dataset.sigmas is None else dataset.sigmas.tolist()
        if dataset.noise is not None:
            log.info("note: the data set's fixed noise/sigma pairs are used as they are")
        log.info("%d training samples in %d size buckets", len(latents), len({tuple(x.shape) for x in latents}))

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
        log.warning("stopping after this step (Ctrl-C again to abort without a checkpoint)")

    signal.signal(signal.SIGINT, on_sigint)
    started = time.perf_counter()
    tracker = logs.TrainingLog(
        a.steps, is_main=runner.is_main, jsonl_path=os.path.join(a.out_dir, "train-log.jsonl"),
        report_to=a.report_to, run_dir=a.out_dir, config={**vars(a), "processes": runner.world_size},
        desc="gates", log_every=a.log_every, project=a.wandb_project, stream=sys.stdout)

    def progress(p):
        encoded = {"encoded_rank0": streamed[0].encoded_images} if streamed else {}
        tracker.update(p.step, p.loss, p.learning_rate, p.samples, epoch=p.epoch, style_loss=p.aux, **encoded)

    try:
        trained, result = gt.train_moe_gates(
            patched, latents, conditionings, config, gates=gates, sigma_features=a.sigma_features,
            progress=progress, styles=styles, fixed_noise=fixed_noise, fixed_sigmas=fixed_sigmas, resume=resume,
            model_space=model_space, should_stop=lambda: stop["requested"], runner=runner,
            data_factory=data_factory)
    finally:
        tracker.close()
    log.info("done: %d steps in %.0fs (this run), loss %.5f -> %.5f%s", result.steps,
             time.perf_counter() - started, result.loss_history[0], result.loss_history[-1],
             "" if result.explored_fraction is None else f", explored {result.explored_fraction:.3f} of tokens")
    final = os.path.join(a.out_dir, f"gates-step{result.steps:07d}.safetensors")
    log.info("gates: %s", final)
    if runner.is_main and a.export and os.path.exists(final):
        os.makedirs(os.path.dirname(os.path.abspath(a.export)), exist_ok=True)
        shutil.copyfile(final, a.export)
        log.info("exported to %s", a.export)
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
