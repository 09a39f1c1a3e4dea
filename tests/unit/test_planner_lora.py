"""Planner LoRA training: data format, grounded-caption conversion, offline bootstrapping, training on the tiny
random Qwen2 (the loss falls), and the trained adapter in TransformersBackend (on for step 0 only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mepg_planner_testing import build_tiny_qwen2, one_torch_thread

from mepg_core.layout import Layout, Region
from mepg_core.planner import lora_training
from mepg_core.planner.backends import ADAPTER_SIDECAR, AdapterMismatchError, TransformersBackend
from mepg_core.planner.chain import PATH_OFFLINE_FALLBACK, plan_with_backend, step0_messages, validate_step0
from mepg_core.planner.lora_training import (
    TrainConfig,
    bootstrap_from_offline,
    convert_grounded,
    convert_grounded_lines,
    label_from_phrase,
    load_examples,
    read_prompts,
    record_from_layout,
    train_lora,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with one_torch_thread():
        yield


def stub_offline(prompt, *, max_regions=16, width=1024, height=1024, seed=0):
    words = prompt.split()
    return Layout(global_prompt=prompt, regions=(Region(words[-1], prompt, (100, 200, 500, 700)),
                                                 Region("ground", "the ground", (0, 700, 1000, 1000))))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.getbasetemp() / "tiny_qwen2")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory):
    """Another architecture (hidden 48): an adapter of the first must not load on it."""
    return build_tiny_qwen2(tmp_path_factory.getbasetemp() / "tiny_qwen2_h48", hidden_size=48, seed=1)


@pytest.fixture(scope="session")
def trained(tiny_qwen2, tmp_path_factory):
    records = [record_from_layout("a cat left of a dog", Layout(regions=(
        Region("cat", "a cat", (50, 300, 450, 700)), Region("dog", "a dog", (550, 300, 950, 700))))),
        record_from_layout("a red ball", Layout(regions=(Region("ball", "a red ball", (300, 300, 700, 700)),)))]
    seen = []
    with one_torch_thread():
        result = train_lora(tiny_qwen2, records, tmp_path_factory.mktemp("adapter") / "planner-lora",
                            config=TrainConfig(max_steps=16, learning_rate=5e-2, rank=8, alpha=16,
                                               target_modules="all-linear", max_regions=8),
                            device="cpu", progress=lambda step, total, loss: seen.append((step, total)))
    result.progress_seen = seen
    return result


# --------------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("phrase, label", [
    ("a man in a red hat", "man"), ("two small dogs", "dog"), ("the wine glasses on a table", "glasses"),
    ("three mice", "mouse"), ("some berries", "berry"), ("a red bus", "bus"), ("boxes", "box"),
    ("people holding umbrellas", "person"), ("A Tall Giraffe.", "giraffe"),
])
def test_label_from_phrase(phrase, label):
    assert label_from_phrase(phrase) == label


def test_convert_grounded_pixels_and_unit_boxes():
    record = convert_grounded({"caption": "a man in a red hat walks a dog", "width": 1000, "height": 500,
                               "elements": [{"phrase": "a man in a red hat", "box": [100, 50, 400, 450]},
                                            {"phrase": "a dog", "box": [0.5, 0.6, 0.8, 0.9]}]})
    target = record["target"]
    assert record["prompt"] == "a man in a red hat walks a dog"
    assert [(r["label"], r["box"], r["prompt"]) for r in target["layout"]] == [
        ("man", [100, 100, 400, 900], "a man in a red hat"), ("dog", [500, 600, 800, 900], "a dog")]
    assert {e["name"]: e["count"] for e in target["elements"]} == {"man": 1, "dog": 1}
    assert "man" in target["analysis"]
    clean, layout, problems, _ = validate_step0(target, prompt=record["prompt"])
    assert problems == [] and len(layout.regions) == 2


def test_convert_grounded_drops_bad_elements_and_caps_regions():
    notes = []
    elements = [{"phrase": f"bird {i}", "box": [i * 10, 0, i * 10 + 5 + i, 50]} for i in range(20)]
    elements += [{"phrase": "nothing", "box": [5, 5, 5, 9]}, {"phrase": "cloud", "box": [1, 2]}, "junk"]
    record = convert_grounded({"caption": "birds", "width": 1000, "height": 100, "elements": elements},
                              max_regions=4, warnings=notes)
    assert len(record["target"]["layout"]) == 4
    assert [r["prompt"] for r in record["target"]["layout"]] == ["bird 16", "bird 17", "bird 18", "bird 19"]
    assert any("zero area" in n for n in notes) and any("not an object" in n for n in notes)
    assert any("kept the 4 largest" in n for n in notes)


@pytest.mark.parametrize("annotation, match", [
    ({"elements": [{"phrase": "a", "box": [0.1, 0.1, 0.5, 0.5]}]}, "caption"),
    ({"caption": "x", "elements": []}, "elements"),
    ({"caption": "x", "elements": [{"phrase": "cat", "box": [10, 10, 50, 50]}]}, "no element with a usable box"),
])
def test_convert_grounded_errors(annotation, match):
    with pytest.raises(ValueError, match=match):
        convert_grounded(annotation)


def test_convert_grounded_lines_reports_skips():
    problems = []
    lines = ['{"caption": "a cat", "elements": [{"phrase": "a cat", "box": [0.1, 0.1, 0.6, 0.9]}]}', "",
             "not json", '{"caption": "x", "elements": []}']
    records = convert_grounded_lines(lines, problems=problems)
    assert len(records) == 1
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4"]


def test_load_examples_accepts_target_or_layout_and_reports_bad_lines(tmp_path):
    layout = {"version": 1, "canvas": {"width": 1024, "height": 1024}, "global_prompt": "a cat",
              "regions": [{"label": "cat", "prompt": "a cat", "box": [100, 100, 500, 500]}]}
    lines = [
        json.dumps({"prompt": "a cat", "layout": layout}),
        json.dumps({"prompt": "a cat", "target": {"layout": [{"label": "cat", "box": [100, 100, 500, 500]}]}}),
        json.dumps(record_from_layout("a dog", Layout(regions=(Region("dog", "a dog", (0, 0, 500, 500)),)))),
        json.dumps({"prompt": "", "layout": layout}),
        json.dumps({"prompt": "a cat", "target": {"layout": [{"label": "cat", "box": [1, 2, 3]}]}}),
        json.dumps({"prompt": "a cat"}),
        "{not json",
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = []
    examples = load_examples(path, problems=problems)
    assert len(examples) == 3
    assert examples[1].target["elements"] == [{"name": "cat", "count": 1, "size": "medium", "place": "upper left"}]
    assert [p.split(":")[1] for p in problems] == ["4", "5", "6", "7"]  # file order, with the line numbers
    with pytest.raises(FileNotFoundError, match="training data not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_bootstrap_from_offline_and_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red apple\n\n  a blue car  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a green tree", "tag": "x"}\n')
    prompts = read_prompts(tmp_path / "p.txt") + read_prompts(tmp_path / "p.jsonl")
    assert prompts == ["a red apple", "a blue car", "a green tree"]
    problems = []

    def planner(prompt, **kwargs):
        if "car" in prompt:
            raise ValueError("no rule")
        return stub_offline(prompt, **kwargs)

    ticks = []
    records = bootstrap_from_offline(prompts, planner=planner, problems=problems,
                                     progress=lambda done, total: ticks.append((done, total)))
    assert [r["prompt"] for r in records] == ["a red apple", "a green tree"]
    assert problems and "no rule" in problems[0]
    assert ticks[-1] == (3, 3)
    assert len(load_examples(records)) == 2


def test_bootstrap_with_the_real_offline_planner_when_present():
    try:
        from mepg_core.planner.offline import plan_offline
    except ImportError:
        pytest.skip("mepg_core.planner.offline is not written yet")
    records = bootstrap_from_offline(["two cats on a sofa", "a red apple left of a green pear"],
                                     planner=plan_offline)
    assert len(load_examples(records)) == 2


# --------------------------------------------------------------------------------------------------
# Training and the trained adapter


@pytest.mark.slow
def test_training_lowers_the_loss_and_saves_a_safetensors_adapter(trained, tiny_qwen2):
    losses = trained.losses
    assert trained.steps == 16 and len(losses) == 16 and trained.examples == 2
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert trained.progress_seen[-1] == (16, 16)
    folder = Path(trained.adapter_dir)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    assert not list(folder.glob("*.bin"))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_qwen2).resolve())
    sidecar = json.loads((folder / ADAPTER_SIDECAR).read_text())
    assert sidecar["base_fingerprint"]["hidden_size"] == 32 and sidecar["final_loss"] == losses[-1]


@pytest.mark.slow
def test_trained_adapter_is_on_for_step0_only(trained, tiny_qwen2):
    backend = TransformersBackend(tiny_qwen2, adapter_path=trained.adapter_dir, device="cpu")
    assert backend.has_adapter and backend.adapter_path.endswith("planner-lora")
    messages = step0_messages("a cat left of a dog", 8)
    on = backend.next_token_logits(messages, use_adapter=True)
    off = backend.next_token_logits(messages, use_adapter=False)
    assert (on - off).abs().max() > 1e-3  # the adapter changes the model ...
    plain = TransformersBackend(tiny_qwen2, device="cpu")
    assert (plain.next_token_logits(messages) - off).abs().max() < 1e-5  # ... and off is the base model exactly

    # Watch a LoRA layer during a whole planning run: active in step 0's calls, disabled in all others.
    lora_layer = next(m for name, m in backend.model.named_modules() if name.endswith("q_proj")
                      and hasattr(m, "lora_A"))
    states: list[bool] = []
    handle = lora_layer.register_forward_hook(lambda module, args, out: states.append(not module.disable_adapters))
    calls = []
    real_generate = backend.generate

    def recording_generate(messages, **options):
        start = len(states)
        text = real_generate(messages, **options)
        calls.append((options["tag"], options["use_adapter"], set(states[start:])))
        return text

    backend.generate = recording_generate
    try:
        result = plan_with_backend("a cat left of a dog", backend, max_new_tokens=8, repair_rounds=0,
                                   max_regions=8, offline_planner=stub_offline)
    finally:
        handle.remove()
        del backend.generate  # back to the class's method
    assert result.path == PATH_OFFLINE_FALLBACK  # a tiny random model does not learn JSON in 16 steps
    assert calls[0] == ("step0", True, {True})
    assert calls[1:] and all(use is False and seen == {False} for _tag, use, seen in calls[1:])
    # Greedy answers differ with the adapter on and off.
    assert backend.generate(messages, max_new_tokens=12, use_adapter=True) != \
        backend.generate(messages, max_new_tokens=12, use_adapter=False)


@pytest.mark.slow
def test_adapter_for_another_base_is_a_clear_error(trained, other_base, tiny_qwen2, tmp_path):
    with pytest.raises(AdapterMismatchError) as info:
        TransformersBackend(other_base, adapter_path=trained.adapter_dir, device="cpu")
    message = str(info.value)
    assert str(Path(tiny_qwen2).resolve()) in message and str(Path(other_base).resolve()) in message
    assert "hidden 32" in message and "hidden 48" in message
    # Without our sidecar (an adapter from elsewhere) the shape check still catches it.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((Path(trained.adapter_dir) / name).read_bytes())
    with pytest.raises(AdapterMismatchError, match="adapter input 32 vs model 48"):
        TransformersBackend(other_base, adapter_path=bare, device="cpu")


@pytest.mark.slow
def test_adapter_on_same_architecture_other_weights_warns(trained, tmp_path_factory):
    sibling = build_tiny_qwen2(tmp_path_factory.getbasetemp() / "tiny_qwen2_seed7", seed=7)
    backend = TransformersBackend(sibling, adapter_path=trained.adapter_dir, device="cpu")
    assert backend.has_adapter
    assert any("weights differ" in w for w in backend.warnings)


def test_training_refuses_empty_data(tiny_qwen2, tmp_path):
    with pytest.raises(ValueError, match="no usable training example"):
        train_lora(tiny_qwen2, [{"prompt": "x"}], tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_convert_and_bootstrap(tmp_path, monkeypatch, capsys):
    grounded = tmp_path / "grounded.jsonl"
    grounded.write_text(json.dumps({"caption": "a cat on a mat", "width": 100, "height": 100,
                                    "elements": [{"phrase": "a cat", "box": [10, 10, 60, 60]},
                                                 {"phrase": "a mat", "box": [0, 50, 100, 100]}]}) + "\n")
    out = tmp_path / "train.jsonl"
    assert lora_training.main(["convert", "--in", str(grounded), "--out", str(out)]) == 0
    assert "wrote 1 examples" in capsys.readouterr().out
    assert len(load_examples(out)) == 1

    import mepg_core.planner as planner_pkg

    try:
        import mepg_core.planner.offline  # noqa: F401
    except ImportError:  # until the offline planner lands, bootstrap with a stand-in module
        fake = type(sys)("mepg_core.planner.offline")
        fake.plan_offline = stub_offline
        monkeypatch.setitem(sys.modules, "mepg_core.planner.offline", fake)
        monkeypatch.setattr(planner_pkg, "offline", fake, raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n")
    assert lora_training.main(["bootstrap", "--prompts", str(prompts), "--out", str(out)]) == 0
    assert len(load_examples(out)) == 2


@pytest.mark.slow
def test_cli_train(tiny_qwen2, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    lora_training.write_jsonl([record_from_layout("a red ball", Layout(regions=(
        Region("ball", "a red ball", (300, 300, 700, 700)),)))], data)
    out = tmp_path / "adapter"
    code = lora_training.main(["train", "--base", str(tiny_qwen2), "--data", str(data), "--out", str(out),
                               "--max-steps", "2", "--lr", "1e-2", "--device", "cpu"])
    assert code == 0
    assert "trained 2 steps on 1 examples" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mepg_core.planner.lora_training", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "convert" in out.stdout and "bootstrap" in out.stdout and "train" in out.stdout


# --------------------------------------------------------------------------------------------------
# Streamed data, resume, several processes


def lora_data(path: Path) -> Path:
    records = [record_from_layout(f"a {c} ball next to a {d} box", Layout(regions=(
        Region("ball", f"a {c} ball", (50, 300, 450, 700)), Region("box", f"a {d} box", (550, 300, 950, 700)))))
        for c, d in (("red", "blue"), ("green", "grey"), ("white", "black"), ("pink", "brown"), ("gold", "tan"))]
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:2] + ["{not json", ""] + lines[2:]) + "\n")  # a bad line, a blank one
    return path


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_streamed_jsonl_and_a_resumed_run_match_the_straight_one(tiny_qwen2, tmp_path):
    """Dropout on (each rank's generator is part of the checkpoint): 2 steps, then a second call resumes
    to 4; the adapter equals that of 4 straight steps bit for bit, and the JSONL is read lazily."""
    data = lora_data(tmp_path / "train.jsonl")
    config = dict(learning_rate=1e-2, rank=4, alpha=8, target_modules="all-linear", max_regions=8, dropout=0.1,
                  grad_accum=2, seed=3)
    straight = train_lora(tiny_qwen2, data, tmp_path / "straight", device="cpu",
                          config=TrainConfig(max_steps=4, **config))
    assert straight.examples == 5 and any("train.jsonl:3: not JSON" in s for s in straight.skipped)
    first = train_lora(tiny_qwen2, data, tmp_path / "resumed", device="cpu", config=TrainConfig(max_steps=2, **config))
    assert (tmp_path / "resumed" / "checkpoints" / "lora-state-step0000002.safetensors").is_file()
    resumed = train_lora(tiny_qwen2, data, tmp_path / "resumed", device="cpu", resume=True,
                         config=TrainConfig(max_steps=4, **config))
    assert first.losses == straight.losses[:2] and resumed.losses == straight.losses
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="global batch of 2 .* this one has 1"):
        train_lora(tiny_qwen2, data, tmp_path / "resumed", device="cpu", resume=True,
                   config=TrainConfig(max_steps=6, **{**config, "grad_accum": 1}))


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one_with_twice_the_accumulation(tiny_qwen2, tmp_path):
    import os
    import socket

    data = lora_data(tmp_path / "train.jsonl")
    args = ["train", "--base", str(tiny_qwen2), "--data", str(data), "--max-steps", "3", "--lr", "1e-2", "--rank",
            "4", "--targets", "all-linear", "--max-regions", "8", "--device", "cpu"]
    assert lora_training.main([*args, "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "mepg_core.planner.lora_training", *args,
                           "--grad-accum", "1", "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "train-log.jsonl").read_text().splitlines()]
    one_log = [json.loads(line) for line in (tmp_path / "one" / "train-log.jsonl").read_text().splitlines()]
    # rank 0 logs each step once; 5 examples, global batch 2: the epoch's last step has 1 (rank 1 pads)
    assert [(r["step"], r["samples"]) for r in log] == [(1, 2), (2, 2), (3, 1)]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5)
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
