"""Resumable training state in one ``.safetensors`` file (used by planner-LoRA training).

``<folder>/<prefix>-state-step<N>.safetensors`` holds the trainable parameters (``param.<name>``), the
AdamW moments (``optim.<name>.exp_avg`` / ``.exp_avg_sq`` / ``.step``) and every rank's random generators
(``rng.<rank>.torch`` / ``.cuda``); its metadata: ``mepg.format`` = ``mepg-training-state``, the step,
the number of processes, the global batch, a key of the data (and base model), the Python generators per
rank, and the caller's JSON (``mepg.extra``). Only rank 0 writes (to a temporary name, renamed); every
rank waits until the file is complete. The data position is the step: trainers derive their data order
from the seed and the step, so restoring the step restores the position.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .distributed import LocalRunner, rng_state, set_rng_state

STATE_FORMAT = "mepg-training-state"
STATE_VERSION = "1"


class TrainingState:
    """Save / restore the state of a run whose trainable parameters are ``named`` (see module docstring)."""

    def __init__(self, folder: str | os.PathLike, prefix: str, runner: LocalRunner,
                 named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, global_batch: int,
                 data_key: str, keep: int = 3):
        self.folder, self.prefix, self.runner = Path(folder), prefix, runner
        self.named, self.optimizer = named, optimizer
        self.global_batch, self.data_key, self.keep = int(global_batch), data_key, max(1, int(keep))

    def path(self, step: int) -> Path:
        return self.folder / f"{self.prefix}-state-step{step:07d}.safetensors"

    def steps(self) -> list[int]:
        pattern = re.compile(rf"{re.escape(self.prefix)}-state-step(\d+)\.safetensors")
        found = [pattern.fullmatch(p.name) for p in self.folder.glob(f"{self.prefix}-state-step*.safetensors")]
        return sorted(int(m.group(1)) for m in found if m)

    def newest(self) -> Path | None:
        steps = self.steps() if self.folder.is_dir() else []
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, extra: dict[str, Any]) -> Path:
        path = self.path(step)
        rng = self.runner.gather_objects(rng_state())
        if self.runner.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            tensors: dict[str, torch.Tensor] = {}
            for name, param in self.named:
                tensors[f"param.{name}"] = param.detach().float().cpu().contiguous()
                moments = self.optimizer.state.get(param) or {}
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in moments:
                        tensors[f"optim.{name}.{key}"] = moments[key].detach().cpu().contiguous()
                if "step" in moments:
                    tensors[f"optim.{name}.step"] = torch.as_tensor(moments["step"]).float().cpu().reshape(1)
            for rank, (generators, _python) in enumerate(rng):
                tensors.update({f"rng.{rank}.{kind}": value for kind, value in generators.items()})
            metadata = {"mepg.format": STATE_FORMAT, "mepg.version": STATE_VERSION, "mepg.step": str(step),
                        "mepg.world_size": str(self.runner.world_size), "mepg.global_batch": str(self.global_batch),
                        "mepg.data": self.data_key, "mepg.rng_python": json.dumps([p for _, p in rng]),
                        "mepg.extra": json.dumps(extra)}
            partial = path.with_name(path.stem + ".partial.safetensors")
            save_file(tensors, str(partial), metadata=metadata)
            os.replace(partial, path)
            for old in self.steps()[: -self.keep]:
                with contextlib.suppress(FileNotFoundError):
                    self.path(old).unlink()
        self.runner.barrier()
        return path

    def load(self, path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
        """Restore ``path`` into the parameters, the optimiser and (same number of processes) this rank's
        generators; returns ``(step, extra)``. Raises ValueError naming what does not match."""
        path = Path(path)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("mepg.format") != STATE_FORMAT:
                raise ValueError(f"{path}: not a training state file (metadata 'mepg.format')")
            if int(metadata["mepg.global_batch"]) != self.global_batch:
                raise ValueError(f"{path}: the run had a global batch of {metadata['mepg.global_batch']} (per-process "
                                 f"batch × processes), this one has {self.global_batch}; the data order depends on "
                                 "it: resume with the same product")
            if metadata.get("mepg.data") != self.data_key:
                raise ValueError(f"{path}: the checkpoint was trained on other data or another base model")
            keys = set(handle.keys())
            state: dict[int, dict[str, torch.Tensor]] = {}
            for index, (name, param) in enumerate(self.named):
                if f"param.{name}" not in keys:
                    raise ValueError(f"{path}: no '{name}' (another adapter layout: rank or target modules)")
                value = handle.get_tensor(f"param.{name}")
                if value.shape != param.shape:
                    raise ValueError(f"{path}: '{name}' has shape {tuple(value.shape)}, this run {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(value.to(param.device, param.dtype))
                if f"optim.{name}.exp_avg" in keys:
                    state[index] = {"step": handle.get_tensor(f"optim.{name}.step").reshape(()),
                                    "exp_avg": handle.get_tensor(f"optim.{name}.exp_avg").to(param.device),
                                    "exp_avg_sq": handle.get_tensor(f"optim.{name}.exp_avg_sq").to(param.device)}
            rank = self.runner.rank
            if int(metadata["mepg.world_size"]) == self.runner.world_size and f"rng.{rank}.torch" in keys:
                set_rng_state({kind: handle.get_tensor(f"rng.{rank}.{kind}") for kind in ("torch", "cuda")
                               if f"rng.{rank}.{kind}" in keys}, json.loads(metadata["mepg.rng_python"])[rank])
        saved = self.optimizer.state_dict()
        saved["state"] = state
        self.optimizer.load_state_dict(saved)
        return int(metadata["mepg.step"]), json.loads(metadata.get("mepg.extra", "{}"))
