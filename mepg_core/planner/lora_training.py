"""Planner LoRA training (the method's stage 1): teach a causal LM the planner's step 0.

Step 0 of the chain (:mod:`.chain`) asks the LoRA-assisted model for an analysis and a rough layout. This
module fine-tunes a PEFT LoRA adapter on pairs *prompt -> step-0 answer*, using exactly the step-0
messages the chain sends (:func:`.chain.step0_messages`), so what is learnt is what is asked at planning
time. The adapter is saved as ``adapter_model.safetensors`` + ``adapter_config.json`` (plus
``mepg_adapter.json``, which records the base model) and loads in :class:`.backends.TransformersBackend`.

Training data: JSON Lines, one example per line::

    {"prompt": "two cats on a red sofa",
     "target": {"analysis": "Two cats sit on a sofa ...",
                "elements": [{"name": "cat", "count": 2, "size": "medium", "place": "centre"},
                             {"name": "sofa", "count": 1, "size": "large", "place": "bottom"}],
                "layout": [{"label": "cat", "box": [220, 300, 480, 620], "prompt": "a grey cat", "style": null},
                           {"label": "cat", "box": [520, 310, 780, 630], "prompt": "a white cat", "style": null},
                           {"label": "sofa", "box": [80, 420, 920, 900], "prompt": "a red sofa", "style": null}]}}

* ``prompt``: the description (1..2000 characters).
* ``target``: the step-0 answer. ``layout`` is required (one entry per object instance; ``box`` is
  ``[x1, y1, x2, y2]`` in layout units 0..1000, origin top-left); ``analysis`` and ``elements`` are
  optional and derived from the layout when missing (see :func:`.chain.step0_target_from_layout`).
* Instead of ``target``, a line may carry ``"layout"``: a layout object (schema v1, see
  ``layout-schema.md``); the target is derived from it.

Every target is checked with the chain's own step-0 validator, so the model learns only answers the
chain accepts; lines that fail are skipped and reported.

Where examples come from:

* :func:`convert_grounded` - grounded-caption annotations, one JSON object per line::

      {"caption": "a man in a red hat walks a dog", "width": 1024, "height": 768,
       "elements": [{"phrase": "a man in a red hat", "box": [100, 80, 420, 760]},
                    {"phrase": "a dog", "box": [480, 500, 760, 740]}]}

  ``box`` is ``[x1, y1, x2, y2]`` in pixels of ``width`` x ``height``, or in 0..1 (then the size may be
  omitted). The label is the phrase's head noun ("a man in a red hat" -> "man"), the region prompt the
  phrase itself.
* :func:`bootstrap_from_offline` - prompts planned by the offline rule-based planner.

Command line::

    python -m mepg_core.planner.lora_training convert --in grounded.jsonl --out train.jsonl
    python -m mepg_core.planner.lora_training bootstrap --prompts prompts.txt --out train.jsonl
    python -m mepg_core.planner.lora_training train --base MODEL_DIR_OR_GGUF --data train.jsonl --out ADAPTER_DIR

torch, transformers and peft are imported only by :func:`train_lora`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..layout import COORD_MAX, Canvas, Layout, LayoutError, Region, parse_layout
from .backends import ADAPTER_SIDECAR, _resolve_device, load_causal_lm, model_fingerprint
from .chain import (
    CHAIN_VERSION,
    DEFAULT_MAX_REGIONS,
    MAX_PROMPT_CHARS,
    singular_noun,
    step0_messages,
    step0_target_from_layout,
    validate_step0,
)

__all__ = [
    "Example",
    "TrainConfig",
    "TrainResult",
    "bootstrap_from_offline",
    "convert_grounded",
    "convert_grounded_lines",
    "label_from_phrase",
    "load_examples",
    "read_prompts",
    "record_from_layout",
    "train_lora",
    "write_jsonl",
]

logger = logging.getLogger("mepg.planner.lora")

ProgressCallback = Callable[[int, int, float], None]  # (step, total_steps, loss)


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class Example:
    """One validated training pair."""

    prompt: str
    target: dict[str, Any]

    def to_record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "target": self.target}


def record_from_layout(prompt: str, layout: Layout | dict[str, Any]) -> dict[str, Any]:
    """A training line from a prompt and its layout."""
    if not isinstance(layout, Layout):
        layout, _warnings = parse_layout(layout)
    return {"prompt": " ".join(prompt.split()), "target": step0_target_from_layout(layout)}


def _example_from_record(record: Any, *, max_regions: int) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: missing or empty")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt: {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    if "target" in record:
        target = record["target"]
        if isinstance(target, dict) and "layout" in target and not target.get("elements"):
            # Only a rough layout given: derive the analysis and elements from it.
            layout = _target_layout(target, prompt, max_regions)
            derived = step0_target_from_layout(layout)
            if isinstance(target.get("analysis"), str) and target["analysis"].strip():
                derived["analysis"] = " ".join(target["analysis"].split())
            target = derived
    elif "layout" in record:
        layout, _warnings = parse_layout(record["layout"], max_regions=max_regions)
        target = step0_target_from_layout(layout)
    else:
        raise ValueError("needs 'target' (a step-0 answer) or 'layout' (a layout object)")
    clean, _layout, problems, _warnings = validate_step0(target, prompt=prompt, max_regions=max_regions)
    if clean is None:
        raise ValueError("target: " + "; ".join(problems[:5]))
    return Example(prompt, clean)


def _target_layout(target: dict[str, Any], prompt: str, max_regions: int) -> Layout:
    _clean, layout, problems, _w = validate_step0({"layout": target["layout"]}, prompt=prompt,
                                                  max_regions=max_regions)
    if layout is None:
        raise ValueError("target.layout: " + "; ".join(problems[:5]))
    return layout


def load_examples(source: str | Path | Iterable[dict[str, Any]], *, max_regions: int = DEFAULT_MAX_REGIONS,
                  problems: list[str] | None = None) -> list[Example]:
    """Validated examples from a JSONL file or from records; bad lines are skipped and listed in ``problems``."""
    problems = problems if problems is not None else []
    examples: list[Example] = []
    for where, record in _records(source, problems):
        try:
            examples.append(_example_from_record(record, max_regions=max_regions))
        except (ValueError, LayoutError) as exc:
            problems.append(f"{where}: {exc}")
    for p in problems:
        logger.warning("training data: %s", p)
    return examples


def _records(source: str | Path | Iterable[dict[str, Any]], problems: list[str]) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"training data not found: {path}")
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name}:{n}", json.loads(line)
                except ValueError as exc:
                    problems.append(f"{path.name}:{n}: not JSON ({exc})")
    else:
        for n, record in enumerate(source):
            yield f"record {n}", record


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            count += 1
    return count


# --------------------------------------------------------------------------------------------------
# Grounded captions -> records

_CUT_WORDS = {"in", "on", "with", "of", "at", "near", "under", "behind", "beside", "above", "below", "by",
              "wearing", "holding", "that", "which", "who", "from", "into", "onto", "over", "next", "and",
              "while", "sitting", "standing", "lying", "for"}


def label_from_phrase(phrase: str) -> str:
    """The head noun of an English noun phrase, singular: ``"two men in red hats"`` -> ``"man"``."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", phrase.lower())
    head: list[str] = []
    for w in words:
        if w in _CUT_WORDS and head:
            break
        head.append(w)
    if not head:
        return " ".join(phrase.split()[:3]).lower() or "object"
    return singular_noun(head[-1])


def _box_to_layout_units(box: Any, width: Any, height: Any) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"box must be [x1, y1, x2, y2], got {box!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError(f"box must hold 4 finite numbers, got {box!r}")
    if max(box) <= 1.0 and min(box) >= 0.0:
        return [v * COORD_MAX for v in box]
    if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
        raise ValueError(f"box {box!r} is in pixels but the annotation has no positive width/height")
    return [box[0] / width * COORD_MAX, box[1] / height * COORD_MAX, box[2] / width * COORD_MAX,
            box[3] / height * COORD_MAX]


def convert_grounded(annotation: dict[str, Any], *, max_regions: int = DEFAULT_MAX_REGIONS,
                     warnings: list[str] | None = None) -> dict[str, Any]:
    """A training record from one grounded-caption annotation (format in the module docstring).

    Elements with unusable boxes are dropped (listed in ``warnings``); when more than ``max_regions``
    remain, the largest are kept. Raises ``ValueError`` when nothing usable is left.
    """
    warnings = warnings if warnings is not None else []
    if not isinstance(annotation, dict):
        raise ValueError(f"expected a JSON object, got {type(annotation).__name__}")
    caption = annotation.get("caption", annotation.get("prompt"))
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("caption: missing or empty")
    elements = annotation.get("elements")
    if not isinstance(elements, list) or not elements:
        raise ValueError("elements: missing or empty; expected [{phrase, box}, ...]")
    width, height = annotation.get("width"), annotation.get("height")
    regions: list[Region] = []
    for i, el in enumerate(elements):
        if not isinstance(el, dict):
            warnings.append(f"elements[{i}]: not an object; dropped")
            continue
        phrase = el.get("phrase", el.get("label"))
        if not isinstance(phrase, str) or not phrase.strip():
            warnings.append(f"elements[{i}].phrase: missing; dropped")
            continue
        try:
            x1, y1, x2, y2 = (round(min(COORD_MAX, max(0.0, v)))
                              for v in _box_to_layout_units(el.get("box"), width, height))
        except ValueError as exc:
            warnings.append(f"elements[{i}].box: {exc}; dropped")
            continue
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        if x2 - x1 < 1 or y2 - y1 < 1:
            warnings.append(f"elements[{i}].box: zero area; dropped")
            continue
        phrase = " ".join(phrase.split())
        regions.append(Region(label=label_from_phrase(phrase), prompt=phrase, box=(x1, y1, x2, y2)))
    if not regions:
        raise ValueError("no element with a usable box")
    if len(regions) > max_regions:
        warnings.append(f"{len(regions)} elements; kept the {max_regions} largest")
        keep = sorted(range(len(regions)), key=lambda k: -regions[k].area)[:max_regions]
        regions = [regions[k] for k in sorted(keep)]
    layout = Layout(global_prompt=" ".join(caption.split())[:MAX_PROMPT_CHARS], regions=tuple(regions),
                    canvas=Canvas())
    return record_from_layout(caption[:MAX_PROMPT_CHARS], layout)


def convert_grounded_lines(lines: Iterable[str], *, max_regions: int = DEFAULT_MAX_REGIONS,
                           problems: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`convert_grounded` over JSON lines; unusable lines are skipped and listed in ``problems``."""
    problems = problems if problems is not None else []
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            notes: list[str] = []
            out.append(convert_grounded(json.loads(line), max_regions=max_regions, warnings=notes))
            problems.extend(f"line {n}: {w}" for w in notes)
        except ValueError as exc:
            problems.append(f"line {n}: skipped: {exc}")
    return out


# --------------------------------------------------------------------------------------------------
# Bootstrapping from the offline planner


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSON Lines (``{"prompt": ...}`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path.name}:{n}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path.name}:{n}: a JSON line needs a 'prompt' string")
            line = obj["prompt"]
        prompts.append(line)
    return prompts


def bootstrap_from_offline(prompts: Iterable[str], *, max_regions: int = DEFAULT_MAX_REGIONS, width: int = 1024,
                           height: int = 1024, seed: int = 0, planner: Callable[..., Layout] | None = None,
                           problems: list[str] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Training records for ``prompts``, planned by the offline planner (or ``planner``, same signature)."""
    if planner is None:
        from .offline import plan_offline as planner
    problems = problems if problems is not None else []
    prompts = list(prompts)
    records = []
    for i, prompt in enumerate(prompts):
        try:
            layout = planner(prompt, max_regions=max_regions, width=width, height=height, seed=seed)
            records.append(record_from_layout(prompt, layout))
        except Exception as exc:  # noqa: BLE001 - one bad prompt must not stop a data set
            problems.append(f"prompt {i} ({prompt[:40]!r}): {type(exc).__name__}: {exc}")
        if progress is not None:
            progress(i + 1, len(prompts))
    return records


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """LoRA and optimisation settings. ``target_modules=None`` picks the attention projections.

    ``grad_accum``: examples per process per optimiser step (one forward each); a step's global batch is
    ``grad_accum`` × processes. ``checkpoint_every``: write a resumable checkpoint every N steps (0: at the
    end only)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_length: int = 2048
    max_regions: int = DEFAULT_MAX_REGIONS  # the cap written into the step-0 prompt during training
    seed: int = 0
    checkpoint_every: int = 0


@dataclass
class TrainResult:
    adapter_dir: str
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _default_targets(model: Any) -> list[str] | str:
    names = {name.rsplit(".", 1)[-1] for name, _m in model.named_modules()}
    attention = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if n in names]
    return attention or "all-linear"


def _tokenize_example(tokenizer: Any, example: Example, max_regions: int) -> tuple[list[int], int]:
    """``(token ids of prompt + answer, number of prompt tokens)``, formatted as the chain asks."""
    messages = step0_messages(example.prompt, max_regions)
    answer = json.dumps(example.target, ensure_ascii=False, separators=(", ", ": "))
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"])
        full_ids = list(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                                      tokenize=True, return_dict=True)["input_ids"])
        if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return full_ids, len(prompt_ids)
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        prompt_ids = list(tokenizer(text)["input_ids"])
    # The template re-renders earlier turns differently once an answer follows: append the answer ourselves.
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids + answer_ids + eos, len(prompt_ids)


class _Examples:
    """The usable training examples. From a JSONL file they are streamed: a first pass (split over the
    processes) keeps only the byte offsets of lines that validate and fit ``max_length``; a line is read,
    validated and tokenised again when a step needs it. Records given in memory stay in memory."""

    def __init__(self, data: str | Path | Iterable[dict[str, Any]], tokenizer: Any, cfg: TrainConfig, runner,
                 skipped: list[str]):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.path: Path | None = None
        if isinstance(data, (str, Path)):
            self.path = Path(data)
            if not self.path.is_file():
                raise FileNotFoundError(f"training data not found: {self.path}")
            offsets, numbers = [], []
            position = 0
            with self.path.open("rb") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        offsets.append(position)
                        numbers.append(number)
                    position += len(line)
            mine = range(runner.rank, len(offsets), runner.world_size)
            kept, notes = [], []
            for index in mine:
                problem = self._check(self._line(offsets[index]), f"{self.path.name}:{numbers[index]}")
                (notes.append(problem) if problem else kept.append(index))
            parts = runner.gather_objects((kept, notes))
            keep = sorted(i for part, _ in parts for i in part)
            self.offsets = [offsets[i] for i in keep]
            skipped.extend(sorted((n for _, part in parts for n in part), key=_line_order))
            st = self.path.stat()
            self.fingerprint = f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{len(self.offsets)}"
        else:
            self.encoded = []
            for ex in load_examples(data, max_regions=cfg.max_regions, problems=skipped):
                ids, n_prompt = _tokenize_example(tokenizer, ex, cfg.max_regions)
                if len(ids) > cfg.max_length:
                    skipped.append(f"{ex.prompt[:40]!r}: {len(ids)} tokens; max_length is {cfg.max_length}")
                else:
                    self.encoded.append((ids, n_prompt))
            self.fingerprint = f"records:{len(self.encoded)}"

    def _line(self, offset: int) -> bytes:
        with self.path.open("rb") as handle:
            handle.seek(offset)
            return handle.readline()

    def _encode(self, line: bytes, where: str) -> tuple[list[int], int]:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        example = _example_from_record(record, max_regions=self.cfg.max_regions)
        return _tokenize_example(self.tokenizer, example, self.cfg.max_regions)

    def _check(self, line: bytes, where: str) -> str | None:
        try:
            ids, _n = self._encode(line, where)
        except (ValueError, LayoutError) as exc:
            return f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)
        if len(ids) > self.cfg.max_length:
            return f"{where}: {len(ids)} tokens; max_length is {self.cfg.max_length}"
        return None

    def __len__(self) -> int:
        return len(self.offsets) if self.path is not None else len(self.encoded)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        if self.path is None:
            return self.encoded[index]
        return self._encode(self._line(self.offsets[index]), f"{self.path.name} example {index}")


def _line_order(note: str) -> tuple[int, str]:
    match = re.match(r"[^:]*:(\d+):", note)
    return (int(match.group(1)) if match else 0, note)


def train_lora(base_model: str | Path, data: str | Path | Iterable[dict[str, Any]], output_dir: str | Path, *,
               gguf_file: str | None = None, cache_dir: str | Path | None = None,
               config: TrainConfig | None = None, device: str = "auto",
               progress: ProgressCallback | None = None, runner: Any = None, resume: bool = False,
               log: Any = None) -> TrainResult:
    """Fine-tune a LoRA adapter for step 0 and save it (safetensors) into ``output_dir``.

    ``base_model``: a model folder, a folder with one GGUF, or a GGUF file (as for TransformersBackend).
    ``data``: a JSONL path (streamed) or records (format in the module docstring). ``progress(step, total,
    loss)`` is called after every optimiser step. ``runner``: this process of a distributed run
    (:mod:`mepg_core.training.distributed`; default one process, on ``device``); only the LoRA weights are
    all-reduced, each process takes its slice of every step's examples, and only rank 0 writes.
    ``resume``: continue from the newest checkpoint in ``output_dir/checkpoints`` (weights, optimiser, step,
    data position, random state). ``log``: a :class:`~mepg_core.training.logs.TrainingLog`.
    Returns the per-step losses.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from ..training.checkpoints import TrainingState
    from ..training.distributed import LocalRunner, ParameterHolder, rank_positions

    cfg = config or TrainConfig()
    runner = runner or LocalRunner(_resolve_device(device))
    started = time.perf_counter()
    skipped: list[str] = []
    loaded = load_causal_lm(base_model, gguf_file=gguf_file, cache_dir=cache_dir, device=str(runner.device),
                            dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    base_fp = model_fingerprint(model)
    examples = _Examples(data, tokenizer, cfg, runner, skipped)
    for p in skipped:
        logger.warning("training data: %s", p)
    if not len(examples):
        raise ValueError("no usable training example" + (f": {skipped[0]}" if skipped else ""))

    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices (alike on every rank)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=cfg.target_modules or _default_targets(model), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question about gradient checkpointing; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimiser = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    runner.wrap(ParameterHolder(named))  # DDP over the LoRA weights only (the base is never broadcast)
    torch.manual_seed(cfg.seed + 1 + runner.rank)  # dropout: each rank its own draws

    per_rank = max(1, cfg.grad_accum)
    global_batch = per_rank * runner.world_size
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * max(1, cfg.epochs)
    out = Path(output_dir)
    state = TrainingState(out / "checkpoints", "lora", runner, named, optimiser, global_batch,
                          f"{base_fp}|{examples.fingerprint}")
    losses: list[float] = []
    step = 0
    if resume and state.newest() is not None:
        step, extra = state.load(state.newest())
        losses = list(extra["losses"])
    if log is not None:
        log.set_total(total, done=step)
    orders: dict[int, list[int]] = {}
    dev = runner.device
    while step < total:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(len(examples), generator=g).tolist()
        batch = orders[epoch][position * global_batch:(position + 1) * global_batch]
        positions = rank_positions(len(batch), runner.rank, runner.world_size)
        optimiser.zero_grad(set_to_none=True)
        local = 0.0
        for j, pos in enumerate(positions):
            ids, n_prompt = examples[batch[max(pos, 0)]]
            weight = 0.0 if pos < 0 else runner.world_size / len(batch)
            input_ids = torch.tensor([ids], device=dev)
            keep = len(ids) - n_prompt + 1
            seen: list[float] = []

            def example_loss(input_ids=input_ids, keep=keep, n_prompt=n_prompt, weight=weight, seen=seen):
                # Logits only where the answer is predicted: the prompt is most of the sequence and the
                # vocabulary is large, so this saves most of the memory.
                logits = model(input_ids=input_ids, logits_to_keep=keep).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, input_ids[0, n_prompt:])
                seen.append(float(loss.detach()))
                return loss * weight

            with runner.sync(j == len(positions) - 1):
                runner.forward(example_loss).backward()
            local += seen[0] if pos >= 0 else 0.0
        step_loss = float(runner.all_sum(torch.tensor([local], dtype=torch.float64))[0]) / len(batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        step += 1
        losses.append(step_loss)
        if progress is not None:
            progress(step, total, step_loss)
        if log is not None:
            log.update(step, step_loss, cfg.learning_rate, len(batch), epoch=epoch)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            state.save(step, {"losses": losses, "config": asdict(cfg)})

    if runner.is_main:
        out.mkdir(parents=True, exist_ok=True)
        model.peft_config["default"].base_model_name_or_path = loaded.base_id
        model.save_pretrained(str(out), safe_serialization=True)
        sidecar = {"format": 1, "base_model": loaded.base_id, "base_fingerprint": base_fp,
                   "chain_version": CHAIN_VERSION, "max_regions": cfg.max_regions, "examples": len(examples),
                   "steps": step, "first_loss": losses[0], "final_loss": losses[-1], "config": asdict(cfg),
                   "processes": runner.world_size}
        (out / ADAPTER_SIDECAR).write_text(json.dumps(sidecar, indent=2))
        if not (out / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"peft did not write adapter_model.safetensors into {out}")
    state.save(step, {"losses": losses, "config": asdict(cfg)})
    return TrainResult(str(out), losses, step, len(examples), skipped, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# Command line


class _Bar:
    """tqdm when installed, else one line per 10 % on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self._last = total, desc, -1
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit="step")
        except ImportError:
            self._tqdm = None

    def update(self, done: int, info: str = "") -> None:
        if self._tqdm is not None:
            self._tqdm.n = done
            if info:
                self._tqdm.set_postfix_str(info, refresh=False)
            self._tqdm.refresh()
            return
        tenth = done * 10 // max(1, self.total)
        if tenth != self._last:
            self._last = tenth
            print(f"{self.desc}: {done}/{self.total} {info}", file=sys.stderr)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mepg_core.planner.lora_training",
                                description="Planner LoRA: make training data and fine-tune step 0.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="grounded-caption annotations (JSONL) -> training JSONL")
    c.add_argument("--in", dest="inp", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--max-regions", type=int, default=DEFAULT_MAX_REGIONS)

    b = sub.add_parser("bootstrap", help="prompts planned by the offline planner -> training JSONL")
    b.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL with 'prompt'")
    b.add_argument("--out", required=True)
    b.add_argument("--max-regions", type=int, default=DEFAULT_MAX_REGIONS)
    b.add_argument("--width", type=int, default=1024)
    b.add_argument("--height", type=int, default=1024)
    b.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="fine-tune a LoRA adapter on training JSONL")
    t.add_argument("--base", required=True, help="model folder, folder with one .gguf, or a .gguf file")
    t.add_argument("--gguf-file", default=None)
    t.add_argument("--cache-dir", default=None, help="where a dequantised GGUF is kept")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="adapter folder to write")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=int, default=16)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--targets", default=None, help="comma-separated module names, or all-linear")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=2048)
    t.add_argument("--max-regions", type=int, default=DEFAULT_MAX_REGIONS)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (each process of a distributed run takes "
                                                    "its own GPU)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="resumable checkpoint every N steps "
                                                                  "(OUT/checkpoints; one is always written at the end)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    t.add_argument("--report-to", nargs="*", default=[], choices=("tensorboard", "wandb"),
                   help="also log to TensorBoard (OUT/tensorboard) and/or Weights & Biases, if installed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    problems: list[str] = []
    if args.command == "convert":
        with open(args.inp, encoding="utf-8") as fh:
            records = convert_grounded_lines(fh, max_regions=args.max_regions, problems=problems)
        n = write_jsonl(records, args.out)
        for p in problems:
            print(f"note: {p}", file=sys.stderr)
        print(f"wrote {n} examples to {args.out}")
        return 0 if n else 1
    if args.command == "bootstrap":
        prompts = read_prompts(args.prompts)
        bar = _Bar(len(prompts), "planning")
        records = bootstrap_from_offline(prompts, max_regions=args.max_regions, width=args.width,
                                         height=args.height, seed=args.seed, problems=problems,
                                         progress=lambda done, total: bar.update(done))
        bar.close()
        n = write_jsonl(records, args.out)
        for p in problems:
            print(f"note: {p}", file=sys.stderr)
        print(f"wrote {n} examples to {args.out}")
        return 0 if n else 1
    targets: list[str] | str | None = None
    if args.targets:
        targets = "all-linear" if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
                      epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
                      grad_accum=args.grad_accum, max_length=args.max_length, max_regions=args.max_regions,
                      seed=args.seed, checkpoint_every=args.checkpoint_every)
    from ..training.distributed import make_runner
    from ..training.logs import TrainingLog

    runner = make_runner(cpu=args.device == "cpu")  # one process, or this rank of accelerate launch / torchrun
    log = TrainingLog(args.max_steps or 0, is_main=runner.is_main, jsonl_path=str(Path(args.out) / "train-log.jsonl"),
                      report_to=args.report_to, run_dir=args.out, config=vars(args), desc="planner LoRA",
                      project="mepg-planner-lora")
    try:
        result = train_lora(args.base, args.data, args.out, gguf_file=args.gguf_file, cache_dir=args.cache_dir,
                            config=cfg, device=args.device, runner=runner, resume=args.resume,
                            log=log)
    finally:
        log.close()
    runner.close()
    if not runner.is_main:
        return 0
    for p in result.skipped:
        print(f"note: skipped {p}", file=sys.stderr)
    print(f"trained {result.steps} steps on {result.examples} examples in {result.seconds:.1f} s: loss "
          f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; adapter in {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
