"""scripts/train_gates.py unchanged under torchrun: 2 CPU processes (gloo), real ComfyUI in each, tiny models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from mepg_testing import ROOT
from mepg_training_testing import write_image_folder
from safetensors import safe_open


def test_train_gates_under_torchrun_streams_caches_and_checkpoints_once(tiny_checkpoints, tmp_path):
    images = write_image_folder(tmp_path / "images", 6, sizes=((64, 64), (80, 64)))
    out = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(ROOT / "scripts" / "train_gates.py"),
               "--base", str(tiny_checkpoints["base"]), "--experts", str(tiny_checkpoints["photo"]),
               str(tiny_checkpoints["anime"]), "--data-source", str(images), "--resolution", "64",
               "--out-dir", str(out), "--steps", "4", "--batch-size", "1", "--warmup", "1", "--checkpoint-every",
               "2", "--top-k", "2", "--with-tiny-models", "--cpu"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "rank 0 of 2 on cpu" in done.stdout and "(gloo)" in done.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gates-step0000002.safetensors", "gates-step0000004.safetensors", "latent-cache",
                     "state-step0000002.safetensors", "state-step0000004.safetensors", "train-log.jsonl"]
    log = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["samples"] == 2 for r in log)  # global batch 2
    # 6 images, global batch 2: epoch 1 is steps 1-3, in which rank 0 encodes its 3 images; step 4 (epoch 2)
    # reads the cache: the VAE is not called again.
    assert [r["epoch"] for r in log] == [0, 0, 0, 1]
    assert [r["encoded_rank0"] for r in log] == [1, 2, 3, 3]
    ids = []
    for shard in (out / "latent-cache").glob("cache-*.safetensors"):  # written by both ranks (checkpoint, epoch end)
        with safe_open(str(shard), framework="pt") as handle:
            ids += json.loads(handle.metadata()["mepg.ids"])
    assert sorted(ids) == list(range(6))  # every image encoded once, by one rank
    with safe_open(str(out / "state-step0000004.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["mepg.world_size"] == "2" and meta["mepg.global_batch"] == "2"
