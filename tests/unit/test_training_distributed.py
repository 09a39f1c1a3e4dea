"""Distributed gate training on CPUs (gloo), launched for real with torchrun and accelerate launch.

The processes run ``tools/mepg_training_testing.py`` (a toy denoiser over a tiny expert stack, data
streamed from an image folder through deterministic fake encoders), so each launch costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mepg_training_testing
import pytest
import torch
from mepg_training_testing import ToyDenoiser, make_moe, make_stack, write_image_folder
from safetensors import safe_open

from mepg_core.gate_training import GateTrainer, GateTrainingConfig, LatentDataset, read_training_state
from mepg_core.gating import GateOptions
from mepg_core.training.distributed import LocalRunner

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tools" / "mepg_training_testing.py"
STYLES = ["anime", "", "photo"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int = 2, launcher: str = "torchrun") -> None:
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tools'}")
    done = subprocess.run(command + [str(HARNESS), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def result_of(path: Path) -> tuple[dict[str, torch.Tensor], list[float], dict]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        history = json.loads(handle.metadata()["loss_history"])
    return tensors, history, json.loads(Path(f"{path}.json").read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # 13 images in two buckets at 128 px (7 and 6): global batches of 4 leave last batches of 3 and 2,
    # which the processes split unevenly.
    return write_image_folder(tmp_path_factory.mktemp("dist-images"), 13, sizes=((64, 64), (128, 48)),
                              styles=STYLES)


COMMON = ["--resolution", "128", "--steps", "6", "--grad-accumulation", "2", "--style-loss-weight", "0.5"]


@pytest.fixture(scope="module")
def two_processes(images, tmp_path_factory):
    """One torchrun launch, 2 processes × batch 2, checkpoints at steps 3 and 6 (the reference run)."""
    out = tmp_path_factory.mktemp("two-processes")
    launch(["--data", str(images), *COMMON, "--batch-size", "2", "--cache-dir", str(out / "cache"),
            "--out-dir", str(out / "run"), "--checkpoint-every", "3", "--result", str(out / "two.safetensors")])
    return out


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(images, two_processes, tmp_path):
    threads = torch.get_num_threads()
    try:
        assert mepg_training_testing.main(["--data", str(images), *COMMON, "--batch-size", "4", "--cache-dir",
                                           str(tmp_path / "cache"), "--result", str(tmp_path / "one.safetensors")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, one_history, one_info = result_of(tmp_path / "one.safetensors")
    two, two_history, two_info = result_of(two_processes / "two.safetensors")
    # 12 micro-batches = 3 epochs of 4: every image was encoded exactly once, by one of the two ranks.
    assert [count for _calls, count, _pid in two_info["encoder_calls"]] == [7, 6]
    assert one_info["encoder_calls"][0][1] == 13
    assert len({pid for *_x, pid in two_info["encoder_calls"]}) == 2  # really two processes
    assert two_history == pytest.approx(one_history, rel=1e-6)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-6, worst  # float rounding of another summation order only
    start = make_gate_start()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e3 * max(worst, 1e-9)  # the gates did train


def make_gate_start() -> dict[str, torch.Tensor]:
    moe = make_moe(make_stack())
    return {f"{path}.{i}": t for path, ts in moe.gate_set().params.items() for i, t in enumerate(ts)}


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(images, two_processes, tmp_path):
    """The reference run (grad accumulation, uneven last batches, style loss) wrote checkpoints at steps 3
    and 6; a second launch — accelerate launch this time — resumes from a copy of its step-3 checkpoint
    and must end bit for bit where the reference ended."""
    run = two_processes / "run"
    # Only rank 0 wrote, atomically: the two checkpoint pairs and nothing else.
    assert sorted(p.name for p in run.iterdir()) == [
        "gates-step0000003.safetensors", "gates-step0000006.safetensors",
        "state-step0000003.safetensors", "state-step0000006.safetensors"]
    info = read_training_state(run / "state-step0000003.safetensors")
    assert info["world_size"] == 2 and info["global_batch"] == 4 and info["micro_step"] == 6
    assert len(info["rng_python"]) == 2
    with safe_open(str(run / "state-step0000003.safetensors"), framework="pt") as handle:
        assert {"rng.0.torch", "rng.1.torch"} <= set(handle.keys())

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("gates-step0000003.safetensors", "state-step0000003.safetensors"):
        shutil.copy(run / name, resumed / name)
    launch(["--data", str(images), *COMMON, "--batch-size", "2", "--cache-dir", str(two_processes / "cache"),
            "--out-dir", str(resumed), "--resume", "--result", str(tmp_path / "resumed.safetensors")],
           launcher="accelerate")
    straight, straight_history, _ = result_of(two_processes / "two.safetensors")
    again, again_history, again_info = result_of(tmp_path / "resumed.safetensors")
    assert again_history == straight_history
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert [count for _calls, count, _pid in again_info["encoder_calls"]] == [0, 0]  # all from the cache

    # Resuming with another global batch would change the data order: refused, naming both.
    stack = make_stack()
    moe = make_moe(stack)
    model = ToyDenoiser(moe)
    data = LatentDataset(torch.randn(4, 4, 8, 8), [None])
    trainer = GateTrainer(moe, model, data, GateTrainingConfig(steps=6, batch_size=3), stack=stack, frozen=[model])
    with pytest.raises(ValueError, match=r"global batch of 4 .* this one has 3 \(3 × 1\)"):
        trainer.resume(run)


class Rank(LocalRunner):
    """Rank ``rank`` of ``world`` without a process group (collectives are not used by these checks)."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world_size, self.is_main = rank, world, rank == 0


def test_each_rank_takes_its_slice_and_explores_with_its_own_generator():
    stack = make_stack()
    data = LatentDataset(torch.randn(7, 4, 8, 8, generator=torch.Generator().manual_seed(0)), [None])
    trainers = []
    for rank in (0, 1, 2, 0):
        moe = make_moe(stack, GateOptions(top_k=2))
        model = ToyDenoiser(moe)
        config = GateTrainingConfig(steps=1, batch_size=2, epsilon=0.5, seed=4)
        trainers.append(GateTrainer(moe, model, data, config, stack=stack, frozen=[model], runner=Rank(rank, 3)))
    first = trainers[0]
    assert first.global_batch == 6 and first._batches_per_epoch == 2  # batches of 6 and 1
    for micro in range(2):
        shares = [t.rank_share(micro) for t in trainers[:3]]
        real = [p for _ids, positions, _n in shares for p in positions if p >= 0]
        assert real == list(range(len(first.batch_indices(micro))))  # disjoint slices covering the batch
        ids = [i for ids, positions, _n in shares for i, p in zip(ids, positions) if p >= 0]
        assert ids == first.batch_indices(micro)
    single = next(m for m in range(2) if len(first.batch_indices(m)) == 1)
    assert [t.rank_share(single)[1] for t in trainers[:3]] == [[0], [-1], [-1]]  # padding, weight 0

    # The same samples under rank 0 and rank 1: other exploration draws, so other losses; rank 0 twice: equal.
    batch = data.batch([0, 1])
    with torch.no_grad():
        losses = [float(t._micro_loss(0, batch, [0, 1], 6, 0)) for t in trainers]
    assert losses[0] == losses[3] and losses[0] != losses[1] and losses[1] != losses[2]
