"""What a training run shows and records, on rank 0 only: a progress bar, a JSONL log, optional hooks.

- The bar: ``tqdm`` on a terminal (step, loss, learning rate, samples/s, time left); without a terminal
  (or without tqdm) one line every ``log_every`` steps with the same figures.
- The JSONL log: one object per optimiser step, ``{"step", "loss", "lr", "samples", "samples_per_s",
  "elapsed_s", ...extra}`` appended to ``jsonl_path`` (a resumed run continues the same file).
- ``report_to``: ``"tensorboard"`` (``torch.utils.tensorboard``; needs the ``tensorboard`` package) and/or
  ``"wandb"`` (needs ``wandb``, logged in). Neither is ever required; asking for one that is not
  installed is an error at the start, naming what to install.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

REPORTERS = ("tensorboard", "wandb")


class TrainingLog:
    """Progress and logs of one run; every method is a no-op on ranks other than 0 (``is_main=False``)."""

    def __init__(self, total: int, *, is_main: bool = True, jsonl_path: str | None = None,
                 report_to: Sequence[str] = (), run_dir: str | None = None, config: dict | None = None,
                 desc: str = "training", log_every: int = 10, initial: int = 0, stream: TextIO | None = None,
                 project: str = "mepg"):
        unknown = [r for r in report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"unknown report target {unknown[0]!r}; choose from {', '.join(REPORTERS)}")
        self.is_main, self.total, self.desc = is_main, int(total), desc
        self.log_every = max(1, int(log_every))
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self._last_time, self._last_step = self.started, int(initial)
        self._rate: float | None = None
        self._first: int | None = None  # steps done before this run (a resumed one)
        self._bar = self._jsonl = self._tensorboard = self._wandb = None
        if not is_main:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--report-to tensorboard needs the 'tensorboard' package: pip install "
                                   "tensorboard") from None
            self._tensorboard = SummaryWriter(log_dir=os.path.join(run_dir or ".", "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--report-to wandb needs the 'wandb' package: pip install wandb") from None
            self._wandb = wandb.init(project=project, config=config or {}, dir=run_dir, resume="allow")
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None and getattr(self.stream, "isatty", lambda: False)():
            self._bar = tqdm(total=self.total, initial=int(initial), desc=desc, unit="step", file=self.stream,
                             dynamic_ncols=True)

    def set_total(self, total: int, done: int = 0) -> None:
        """The run's step count once known (and the steps a resumed run had already done)."""
        self.total, self._last_step = int(total), int(done)
        if self._bar is not None:
            self._bar.total, self._bar.n = self.total, int(done)
            self._bar.refresh()

    def update(self, step: int, loss: float, lr: float, samples: int = 0, **extra: Any) -> dict | None:
        """Record optimiser step ``step`` (1-based) with its mean loss, learning rate and the number of
        samples it used over all processes; returns the JSONL record (rank 0)."""
        if not self.is_main:
            return None
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        rate = samples * steps / max(now - self._last_time, 1e-9)
        self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate  # smoothed samples/s
        self._last_time, self._last_step = now, step
        record = {"step": step, "loss": loss, "lr": lr, "samples": samples, "samples_per_s": round(self._rate, 4),
                  "elapsed_s": round(now - self.started, 3), **extra}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tensorboard is not None:
            for key in ("loss", "lr", "samples_per_s", *extra):
                if isinstance(record[key], (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", record[key], step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        if self._first is None:
            self._first = step - 1
        left = (self.total - step) * (now - self.started) / max(1, step - self._first)
        info = f"loss {loss:.5f}  lr {lr:.2e}  {self._rate:.2f} samples/s"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(info, refresh=False)
            self._bar.refresh()
        elif step % self.log_every == 0 or step == self.total:
            print(f"{self.desc}: step {step}/{self.total}  {info}  eta {left:.0f}s", file=self.stream, flush=True)
        return record

    def message(self, text: str) -> None:
        """A line on rank 0 that does not break the bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._jsonl = self._tensorboard = self._wandb = None
