"""The offline planner's English engine (spaCy reading + composition arranger; the default) and the
natural-prompt scorer.

Figures asserted here are floors just under what the engine measures today (dev 0.817 overall, GenEval
1.0); the issue's targets (dev >= 0.93) are not met yet and are reported, not asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mepg_core.layout import parse_layout
from mepg_core.planner import natural_scoring as ns
from mepg_core.planner import plan_offline
from mepg_core.planner.contact_sheet import main as contact_sheet_main
from mepg_core.planner.scoring import load_metadata, score_layouts

ROOT = Path(__file__).resolve().parents[2]
SHARED_SCORER = ROOT.parent / "shared" / "benchmarks" / "natural" / "score_natural.py"


def english(prompt: str, **kw):
    return plan_offline(prompt, engine="english", **kw)


@pytest.fixture(scope="module")
def dev_items() -> list[dict]:
    return ns.read_jsonl(ns.DEV_SET)


@pytest.fixture(scope="module")
def dev_layouts(dev_items) -> list[dict]:
    return ns.plan_set(dev_items, "english")


def test_dev_set_floor_and_better_than_the_rules_engine(dev_items, dev_layouts):
    scores = [ns.score_item(it, lay)["score"] for it, lay in zip(dev_items, dev_layouts)]
    overall = sum(scores) / len(scores)
    rules = ns.plan_set(dev_items, "rules")
    rules_overall = sum(ns.score_item(it, lay)["score"] for it, lay in zip(dev_items, rules)) / len(rules)
    print(f"\nnatural dev: english {overall:.4f}, rules {rules_overall:.4f}")
    assert overall >= 0.80
    assert overall > rules_overall + 0.15


def test_geneval_stays_high_with_the_english_engine():
    metadata = load_metadata()
    report = score_layouts([english(m["prompt"]) for m in metadata], metadata)
    assert report.overall >= 0.98, report.summary()
    assert min(report.per_tag.values()) >= 0.95, report.summary()


@pytest.mark.skipif(not SHARED_SCORER.exists(), reason="../shared is not beside this checkout")
def test_project_scorer_agrees_with_the_shared_scorer(tmp_path, dev_items, dev_layouts):
    import importlib.util

    spec = importlib.util.spec_from_file_location("shared_score_natural", SHARED_SCORER)
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    for it, lay in zip(dev_items, dev_layouts):
        assert ns.score_item(it, lay)["score"] == pytest.approx(shared.score_item(it, lay)["score"], abs=1e-12)


def _item(**objects_and_relations) -> dict:
    return {"id": "t", "source": "user", "prompt": "p", "optional": ["sky"], **objects_and_relations}


def test_scorer_rules_fail_the_bugs_they_exist_for():
    obj = {"name": "cat", "aliases": ["cats"], "count": 2, "attrs": ["black"], "place": "left", "style": None,
           "main": True}
    item = _item(objects=[obj], relations=[])
    good = {"regions": [{"label": "cat", "prompt": "a black cat", "box": [0, 300, 300, 700]},
                        {"label": "cats", "prompt": "a cat", "box": [50, 400, 350, 700]}]}
    assert ns.score_item(item, good)["score"] == 1.0
    one = {"regions": good["regions"][:1]}
    assert dict((c[0], c[2]) for c in ns.score_item(item, one)["checks"])["count"] == 0.0
    right = {"regions": [{**r, "box": [700, 300, 990, 700]} for r in good["regions"]]}
    assert dict((c[0], c[2]) for c in ns.score_item(item, right)["checks"])["place"] == 0.0
    spurious = {"regions": good["regions"] + [{"label": "glow", "prompt": "glow", "box": [0, 0, 10, 10]}]}
    assert dict((c[0], c[2]) for c in ns.score_item(item, spurious)["checks"])["precision"] == pytest.approx(2 / 3)
    sky = {"regions": good["regions"] + [{"label": "sky", "prompt": "sky", "box": [0, 0, 1000, 200]}]}
    assert dict((c[0], c[2]) for c in ns.score_item(item, sky)["checks"])["precision"] == 1.0
    cup = {"name": "cup", "aliases": [], "count": 1, "attrs": [], "place": None, "style": None, "main": False}
    table = {"name": "table", "aliases": [], "count": 1, "attrs": [], "place": None, "style": None, "main": False}
    rel = _item(objects=[cup, table], relations=[["cup", "on", "table"]])
    on = {"regions": [{"label": "cup", "prompt": "a cup", "box": [450, 400, 550, 520]},
                      {"label": "table", "prompt": "a table", "box": [200, 500, 800, 900]}]}
    off = {"regions": [on["regions"][0] | {"box": [450, 50, 550, 150]}, on["regions"][1]]}
    assert ns.score_item(rel, on)["checks"][-2][2] == 1.0
    assert ns.score_item(rel, off)["checks"][-2][2] == 0.0


def test_cli_plans_and_scores_the_shipped_dev_set(capsys):
    assert ns.main(["--plan", "english"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 150 and summary["overall"] >= 0.80


@pytest.mark.parametrize("prompt,want", [
    ("A bright red lighter rests atop a polished wooden desk.", {"lighter", "desk"}),
    ("two children building a snowman in front of a cabin", {"child", "snowman", "cabin"}),
    ("An illuminated calculator sits flat on a wooden office table. The sun's fading light gently seeps "
     "through the window.", {"calculator", "table"}),
])
def test_verbs_adjectives_and_light_never_become_regions(prompt, want):
    labels = {r.label.split()[-1] for r in english(prompt).regions}
    assert want <= {w.split()[-1] for w in labels} | labels
    assert not labels & {"seep", "rest", "sit", "glow", "light", "build", "building", "sleek", "fading"}


def test_clothing_is_the_wearers_words_and_repeats_are_one_thing():
    layout = english("a girl in a yellow raincoat holding a red umbrella. The girl smiles.")
    labels = [r.label for r in layout.regions]
    assert labels.count("girl") == 1 and "raincoat" not in labels and "umbrella" in labels
    girl = next(r for r in layout.regions if r.label == "girl")
    assert "yellow raincoat" in girl.prompt and "red" not in girl.prompt.replace("raincoat", "")


def test_prompt_weights_and_quality_tags_are_read_not_boxed():
    layout = english("masterpiece, best quality, 8k, (red hat:1.3), 1girl, by greg rutkowski")
    labels = [r.label for r in layout.regions]
    assert labels == ["girl"] and "red hat" in layout.regions[0].prompt


def test_support_relations_are_physical():
    layout = english("a cup on a table")
    cup = next(r.box for r in layout.regions if r.label == "cup")
    table = next(r.box for r in layout.regions if r.label == "table")
    h = table[3] - table[1]
    assert table[1] - 0.15 * h <= cup[3] <= table[1] + 0.5 * h
    assert min(cup[2], table[2]) > max(cup[0], table[0])


@pytest.mark.parametrize("prompt", ["...!!!???", "🐱🐶🌈", "一只红色的猫坐在桌子上", "x" * 100_000,
                                    ("a red apple and two blue cups next to a sleeping cat. " * 2000)[:100_000]])
def test_bad_input_gives_a_valid_layout(prompt):
    layout = english(prompt)
    parse_layout(layout.to_dict())
    assert 1 <= len(layout.regions) <= 16


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="empty prompt"):
        english("   ")


def test_contact_sheet_writes_pages(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("a cat on a sofa\na dog left of a tree\n\nthree apples in a bowl\n", encoding="utf-8")
    assert contact_sheet_main([str(src), str(tmp_path / "out"), "--per-page", "2"]) == 0
    pages = sorted((tmp_path / "out").glob("sheet-*.png"))
    assert len(pages) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n", encoding="utf-8")
    assert contact_sheet_main([str(bad), str(tmp_path / "o2")]) == 2
