"""Score layouts for natural, complex prompts against hand annotations (the pack's natural-prompt scorer).

usage: python -m mepg_core.planner.natural_scoring [SET.jsonl] LAYOUTS.jsonl [--show N]
       python -m mepg_core.planner.natural_scoring [SET.jsonl] --plan ENGINE [--show N]   plan, then score
       python -m mepg_core.planner.natural_scoring --check-set SET.jsonl
SET defaults to the shipped dev set (data/natural/dev.jsonl); --plan rules|english plans every prompt with
the offline planner first. The last line printed is JSON.

SET lines: {"id", "source", "prompt", "objects": [{"name", "aliases", "count", "attrs", "place", "style",
"main"}], "optional": [...], "relations": [[subject, rel, object], ...]}. LAYOUTS: one layout per non-blank
line, in the order of SET's non-blank lines; a line that is {"error": ...} (or not a layout, or missing)
scores 0 on every check of its prompt. Boxes are [x1, y1, x2, y2] on the 0..1000 frame, origin top-left;
areas below are fractions of the 1000 x 1000 frame.

Matching. Labels, names, aliases and optional words are lower-cased, '_' read as a space, a leading
article dropped. A word's forms are itself, an irregular singular (men, women, people, children, mice,
geese, teeth, feet, leaves, knives, wolves, shelves, elves, loaves, cacti, ...), -ies -> -y, -es dropped
after s/x/z/ch/sh/o (buses, boxes, benches, tomatoes), -s dropped unless -ss; a phrase's forms vary its
last word. A region matches an object when some trailing part of its label (the whole label, its last
word, or its last k words: "white marble kitchen island" ends in "kitchen island") shares a form with the
object's name or one of its aliases. A region may match several objects. Optional words match the same
way. Regions whose box is not four numbers with x1 < x2, y1 < y2 (clamped to 0..1000) match nothing.
Shared aliases: when a region's label matches several objects of a prompt (the annotation gave them a
common alias on purpose: "bin" for a trash, a compost and a recycling bin; "person" for a man and a
woman), the region goes to those of them whose name, unshared alias or attr occurs in its label or prompt
("bin" + "a brown trash bin" -> trash bin); if none does, it matches all of them.

Checks (each 0 or 1 unless stated; a prompt's score is the mean of its checks):
  count     per object: matched regions == count; count null means >= 2.
  attr      per (object, attr): the attr appears, case-insensitive, on word boundaries (a plural -s/-es
            either side is tolerated: "raincoats" ~ "raincoat"), in the prompt text of every matched region;
            for an object with count >= 2 or null, in at least one. No matched region: 0.
  place     per object with a place; (cx, cy) = mean of the matched regions' box centres:
            left cx < 400; right cx > 600; top / sky cy < 400; bottom / foreground cy > 550;
            center |cx-500| < 200 and |cy-500| < 200; background: largest matched box area <= 0.30 or
            cy < 550. No matched region: 0.
  style     per object with a style list: every matched region's "style" (when it is a non-empty
            string; else its prompt) contains one of the accepted spellings (case-insensitive substring).
  main      per main object: the largest matched box covers >= 4% of the frame.
  relation  per [a, rel, b], on the union box of each side's matched regions (either side unmatched: 0).
            With centres (cx, cy) and sizes (w, h) on the 0..1 frame (GenEval's offset reduced by 0.1 x the
            summed sizes on that axis, tested on that axis only, without GenEval's normalisation by the
            offset's length):
              left of   (cx_b - cx_a) - 0.1 * (w_a + w_b) > 0      right of  (cx_a - cx_b) - 0.1 * (w_a + w_b) > 0
              above     (cy_b - cy_a) - 0.1 * (h_a + h_b) > 0      below     (cy_a - cy_b) - 0.1 * (h_a + h_b) > 0
            and on the 0..1000 frame:
              on          b.y1 - 0.15 * h_b <= a.y2 <= b.y1 + 0.5 * h_b, and the x-ranges overlap (> 0)
              in          >= 70% of a's area lies inside b
              next to     |cy_a - cy_b| < 0.5 * max(h_a, h_b) and IoU(a, b) < 0.5
              in front of a.y2 >= b.y2 - 50 and the x-ranges overlap
              behind      b in front of a: b.y2 >= a.y2 - 50 and the x-ranges overlap
              holding     a and b intersect (positive area)
            A rel written with alternatives ("on|in", "in|on", "on|above") passes when any of them holds
            (supports and containers a layout may draw from the side or from above). ("wearing" is not
            scored: clothing is annotated as attrs.)
  precision one per prompt, fractional: 1 - spurious / regions, spurious = regions matching no object and
            no optional word (invalid boxes included); no regions at all: 0.

Reported: mean prompt score per source, mean of each check type over all its checks, the share of prompts
scoring >= 0.9 ("perfect_rate"), and a last line {"overall", "perfect_rate", "by_check", "by_source", "n"}.
--show N prints the N lowest-scoring prompts with their labels and failing checks.

Annotation conventions (dev.jsonl and any set scored with this file): "her left" / "to their left"
are read in the picture's frame (viewer's left); things on supports that a layout may draw from the side
or from above (tables, desks, counters, beds, seats) may be annotated "on|in", contents of open
containers "in|on", a thing on a thin support (cup on saucer, bird on branch) "on|above"; a coreferent
repetition ("the tub" for the bathtub) is an alias, so a planner that boxes it twice fails the count;
body parts, clothing and abstractions are never optional.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

FRAME = 1000.0
MAIN_MIN_AREA = 0.04
PERFECT = 0.9
PLACES = ("left", "right", "top", "sky", "bottom", "foreground", "center", "background")
RELATIONS = ("left of", "right of", "above", "below", "on", "in", "next to", "in front of", "behind",
             "holding", "wearing")
CHECK_TYPES = ("count", "attr", "place", "style", "main", "relation", "precision")
ARTICLES = ("a ", "an ", "the ")
IRREGULAR = {
    "men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "leaves": "leaf", "knives": "knife",
    "wolves": "wolf", "shelves": "shelf", "elves": "elf", "loaves": "loaf", "halves": "half",
    "calves": "calf", "scarves": "scarf", "hooves": "hoof", "thieves": "thief", "wives": "wife",
    "lives": "life", "cacti": "cactus", "fungi": "fungus", "oxen": "ox", "dice": "die",
    "firemen": "fireman", "policemen": "policeman", "fishermen": "fisherman", "businessmen": "businessman",
    "snowmen": "snowman", "gentlemen": "gentleman", "ladies": "lady", "sheep": "sheep", "deer": "deer",
    "fish": "fish", "moose": "moose", "aircraft": "aircraft", "series": "series", "species": "species",
}


# ----------------------------------------------------------------------------------------------- words

def norm_text(text) -> str:
    s = str(text or "").lower().replace("_", " ")
    s = re.sub(r"[^\w\s'\-&]", " ", s)
    s = " ".join(s.split())
    for art in ARTICLES:
        if s.startswith(art):
            s = s[len(art):]
            break
    return s


def word_forms(word: str) -> set[str]:
    w = word
    forms = {w}
    if w in IRREGULAR:
        forms.add(IRREGULAR[w])
    if len(w) > 4 and w.endswith("ies"):
        forms.add(w[:-3] + "y")
    if len(w) > 3 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(w[:-2])
    if len(w) > 2 and w.endswith("s") and not w.endswith("ss"):
        forms.add(w[:-1])
    return forms


def phrase_forms(phrase: str) -> set[str]:
    words = norm_text(phrase).split()
    if not words:
        return set()
    head = " ".join(words[:-1])
    return {(head + " " + f).strip() for f in word_forms(words[-1])}


def label_keys(label) -> set[str]:
    """Forms of every trailing part of the label: 'white marble kitchen island' -> ..., 'kitchen island', 'island'."""
    words = norm_text(label).split()
    keys: set[str] = set()
    for k in range(len(words)):
        keys |= phrase_forms(" ".join(words[k:]))
    return keys


def object_keys(obj: dict) -> set[str]:
    keys = phrase_forms(obj["name"])
    for alias in obj.get("aliases") or []:
        keys |= phrase_forms(alias)
    return keys


def _tokens(text) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]+", str(text or "").lower())


def has_word(text: str, word: str) -> bool:
    """Does ``word`` (a word or phrase) occur in ``text`` on word boundaries, up to a plural?

    True when the text holds the word, or the word plus -s/-es, on word boundaries ("raincoats" for
    "raincoat", "cream" in "cream-colored"), or when the text's words, split at anything but letters and
    digits, hold the phrase with its last word in another form ("children" for "child", "2girls" for "girl").
    """
    low = str(text or "").lower()
    for form in phrase_forms(word) | {norm_text(word)}:
        if form and re.search(r"(?<![a-z0-9])" + re.escape(form) + r"(?:e?s)?(?![a-z0-9])", low):
            return True
    target = _tokens(word)
    if not target:
        return False
    toks = _tokens(low)
    want = word_forms(target[-1])
    k = len(target)
    for i in range(len(toks) - k + 1):
        if toks[i:i + k - 1] == target[:-1] and word_forms(toks[i + k - 1]) & want:
            return True
    return False


# ----------------------------------------------------------------------------------------------- boxes

def parse_box(box):
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(np.isfinite([x1, y1, x2, y2])):
        return None
    x1, x2 = (min(max(v, 0.0), FRAME) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), FRAME) for v in (y1, y2))
    if x1 >= x2 or y1 >= y2:
        return None
    return np.array([x1, y1, x2, y2])


def area(b) -> float:
    return float((b[2] - b[0]) * (b[3] - b[1]))


def inter_area(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return float(w * h) if w > 0 and h > 0 else 0.0


def x_overlap(a, b) -> float:
    return float(min(a[2], b[2]) - max(a[0], b[0]))


def union_box(boxes):
    arr = np.array(boxes)
    return np.array([arr[:, 0].min(), arr[:, 1].min(), arr[:, 2].max(), arr[:, 3].max()])


def relation_holds(rel: str, a, b) -> bool:
    na, nb = a / FRAME, b / FRAME
    cxa, cya = (na[0] + na[2]) / 2, (na[1] + na[3]) / 2
    cxb, cyb = (nb[0] + nb[2]) / 2, (nb[1] + nb[3]) / 2
    wa, ha, wb, hb = na[2] - na[0], na[3] - na[1], nb[2] - nb[0], nb[3] - nb[1]
    if rel == "left of":
        return (cxb - cxa) - 0.1 * (wa + wb) > 0
    if rel == "right of":
        return (cxa - cxb) - 0.1 * (wa + wb) > 0
    if rel == "above":
        return (cyb - cya) - 0.1 * (ha + hb) > 0
    if rel == "below":
        return (cya - cyb) - 0.1 * (ha + hb) > 0
    h_b = b[3] - b[1]
    if rel == "on":
        return b[1] - 0.15 * h_b <= a[3] <= b[1] + 0.5 * h_b and x_overlap(a, b) > 0
    if rel == "in":
        return inter_area(a, b) >= 0.7 * area(a)
    if rel == "next to":
        inter = inter_area(a, b)
        iou = inter / (area(a) + area(b) - inter)
        return abs((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) < 0.5 * max(a[3] - a[1], h_b) and iou < 0.5
    if rel == "in front of":
        return a[3] >= b[3] - 50 and x_overlap(a, b) > 0
    if rel == "behind":
        return b[3] >= a[3] - 50 and x_overlap(a, b) > 0
    if rel == "holding":
        return inter_area(a, b) > 0
    raise ValueError(f"unknown relation {rel!r}")


def place_holds(place: str, boxes) -> tuple[bool, str]:
    cx = float(np.mean([(b[0] + b[2]) / 2 for b in boxes]))
    cy = float(np.mean([(b[1] + b[3]) / 2 for b in boxes]))
    where = f"centre ({cx:.0f}, {cy:.0f})"
    if place == "left":
        return cx < 400, where
    if place == "right":
        return cx > 600, where
    if place in ("top", "sky"):
        return cy < 400, where
    if place in ("bottom", "foreground"):
        return cy > 550, where
    if place == "center":
        return abs(cx - 500) < 200 and abs(cy - 500) < 200, where
    if place == "background":
        biggest = max(area(b) for b in boxes) / FRAME ** 2
        return biggest <= 0.30 or cy < 550, f"{where}, largest area {biggest:.0%}"
    raise ValueError(f"unknown place {place!r}")


# ----------------------------------------------------------------------------------------------- scoring

def planned_checks(item: dict) -> list[tuple[str, str]]:
    """The (type, name) of every check a prompt gets, in order."""
    out = []
    for o in item["objects"]:
        out.append(("count", o["name"]))
        out += [("attr", f"{o['name']}:{a}") for a in o.get("attrs") or []]
        if o.get("place"):
            out.append(("place", f"{o['name']}:{o['place']}"))
        if o.get("style"):
            out.append(("style", f"{o['name']}:{'/'.join(o['style'])}"))
        if o.get("main"):
            out.append(("main", o["name"]))
    out += [("relation", " ".join(r)) for r in item.get("relations") or [] if r[1] != "wearing"]
    out.append(("precision", "regions"))
    return out


def match_regions(objects: list[dict], parsed: list, keys: list[set]) -> dict[str, list[int]]:
    """Object name -> indices of the regions matching it (see the module doc on shared aliases)."""
    okeys = {o["name"]: object_keys(o) for o in objects}
    seen: dict[str, int] = defaultdict(int)
    for ks in okeys.values():
        for k in ks:
            seen[k] += 1
    shared = {k for k, c in seen.items() if c > 1}
    matched: dict[str, list[int]] = {o["name"]: [] for o in objects}
    for i, k in enumerate(keys):
        cands = [o for o in objects if k & okeys[o["name"]]]
        if len(cands) > 1:
            text = parsed[i][0] + " " + parsed[i][1]
            named = [o for o in cands
                     if any(has_word(text, w) for w in [o["name"]] + [a for a in o.get("aliases") or []
                                                                       if not phrase_forms(a) & shared])
                     or any(has_word(text, a) for a in o.get("attrs") or [])]
            if named:
                cands = named
        for o in cands:
            matched[o["name"]].append(i)
    return matched


def score_item(item: dict, layout) -> dict:
    """{"score", "checks": [(type, name, value, detail)], "labels"} for one prompt and its layout."""
    planned = planned_checks(item)
    if not isinstance(layout, dict) or "error" in layout or not isinstance(layout.get("regions", []), list):
        why = layout.get("error") if isinstance(layout, dict) and "error" in layout else "not a layout"
        checks = [(t, n, 0.0, f"error: {str(why)[:120]}") for t, n in planned]
        return {"score": 0.0, "checks": checks, "labels": []}
    regions = [r for r in layout.get("regions") or []]
    parsed = []  # (label, prompt, style, box or None)
    for r in regions:
        if not isinstance(r, dict):
            parsed.append(("?", "", None, None))
            continue
        parsed.append((str(r.get("label") or ""), str(r.get("prompt") or ""), r.get("style"),
                       parse_box(r.get("box"))))
    keys = [label_keys(p[0]) if p[3] is not None else set() for p in parsed]
    objects = item["objects"]
    matched = match_regions(objects, parsed, keys)
    optional_keys = set()
    for w in item.get("optional") or []:
        optional_keys |= phrase_forms(w)

    checks = []
    for o in objects:
        name, idx = o["name"], matched[o["name"]]
        count = o.get("count")
        n = len(idx)
        ok = n == count if isinstance(count, int) else n >= 2
        checks.append(("count", name, float(ok), f"want {count if count is not None else '>=2'} got {n}"))
        multi = count is None or count >= 2
        for a in o.get("attrs") or []:
            hits = [has_word(parsed[i][1], a) for i in idx]
            ok = bool(hits) and (any(hits) if multi else all(hits))
            detail = "no region" if not idx else " | ".join(parsed[i][1][:60] for i in idx[:3])
            checks.append(("attr", f"{name}:{a}", float(ok), detail))
        if o.get("place"):
            if idx:
                ok, where = place_holds(o["place"], [parsed[i][3] for i in idx])
            else:
                ok, where = False, "no region"
            checks.append(("place", f"{name}:{o['place']}", float(ok), where))
        if o.get("style"):
            spellings = [s.lower() for s in o["style"]]
            texts = []
            for i in idx:
                st = parsed[i][2]
                texts.append((st if isinstance(st, str) and st.strip() else parsed[i][1]).lower())
            ok = bool(texts) and all(any(s in t for s in spellings) for t in texts)
            detail = "no region" if not idx else " | ".join(
                f"style={parsed[i][2]!r}" for i in idx[:3])
            checks.append(("style", f"{name}:{'/'.join(o['style'])}", float(ok), detail))
        if o.get("main"):
            big = max((area(parsed[i][3]) for i in idx), default=0.0) / FRAME ** 2
            checks.append(("main", name, float(big >= MAIN_MIN_AREA), f"largest area {big:.1%}"))
    for rel in item.get("relations") or []:
        a, r, b = rel
        if r == "wearing":
            continue
        ia, ib = matched.get(a, []), matched.get(b, [])
        if not ia or not ib:
            checks.append(("relation", " ".join(rel), 0.0, "side without region"))
            continue
        ua = union_box([parsed[i][3] for i in ia])
        ub = union_box([parsed[i][3] for i in ib])
        ok = any(relation_holds(alt, ua, ub) for alt in r.split("|"))
        checks.append(("relation", " ".join(rel), float(ok),
                       f"{a} {ua.astype(int).tolist()} vs {b} {ub.astype(int).tolist()}"))
    spurious = [parsed[i][0] for i, k in enumerate(keys)
                if not k or (not any(i in matched[o["name"]] for o in objects) and not (k & optional_keys))]
    prec = 1.0 - len(spurious) / len(parsed) if parsed else 0.0
    checks.append(("precision", "regions", prec,
                   f"{len(spurious)}/{len(parsed)} spurious: {', '.join(spurious[:8])}" if parsed else "no regions"))
    score = float(np.mean([c[2] for c in checks]))
    return {"score": score, "checks": checks, "labels": [p[0] for p in parsed]}


# ----------------------------------------------------------------------------------------------- lint

def check_set(items: list[dict]) -> tuple[list[str], list[str]]:
    """(problems, notes) found in the annotations."""
    problems, notes = [], []
    ids = set()
    for item in items:
        iid = item.get("id")
        where = f"{iid}"
        if iid in ids:
            problems.append(f"{where}: duplicate id")
        ids.add(iid)
        if item.get("source") not in ("dpg", "user"):
            problems.append(f"{where}: source {item.get('source')!r}")
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: no prompt")
            continue
        objects = item.get("objects") or []
        if not objects:
            problems.append(f"{where}: no objects")
        names = [o.get("name") for o in objects]
        if len(set(names)) != len(names):
            problems.append(f"{where}: duplicate object names {names}")
        if not any(o.get("main") for o in objects):
            problems.append(f"{where}: no main object")
        keysets = {}
        for o in objects:
            n = o.get("name")
            if not isinstance(n, str) or not n:
                problems.append(f"{where}: object without name")
                continue
            c = o.get("count")
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
                problems.append(f"{where}: {n}: count {c!r}")
            if o.get("place") is not None and o["place"] not in PLACES:
                problems.append(f"{where}: {n}: place {o['place']!r}")
            if o.get("style") is not None and (not isinstance(o["style"], list) or not o["style"]):
                problems.append(f"{where}: {n}: style must be a non-empty list or null")
            if not isinstance(o.get("main"), bool):
                problems.append(f"{where}: {n}: main must be true/false")
            for a in o.get("attrs") or []:
                if not has_word(prompt, a):
                    problems.append(f"{where}: {n}: attr {a!r} is not a word of the prompt")
            if not any(has_word(prompt, w) for w in [n] + list(o.get("aliases") or [])):
                notes.append(f"note {where}: {n}: neither the name nor an alias occurs in the prompt (implied?)")
            keysets[n] = object_keys(o)
        for i, n1 in enumerate(keysets):
            for n2 in list(keysets)[i + 1:]:
                shared = keysets[n1] & keysets[n2]
                if shared:
                    notes.append(f"note {where}: {n1} and {n2} share {sorted(shared)} (settled by region prompt)")
        opt = set()
        for w in item.get("optional") or []:
            opt |= phrase_forms(w)
        for n, ks in keysets.items():
            if ks & opt:
                problems.append(f"{where}: optional words {sorted(ks & opt)} also name {n}")
        for rel in item.get("relations") or []:
            if not (isinstance(rel, list) and len(rel) == 3):
                problems.append(f"{where}: relation {rel!r}")
                continue
            if not all(alt in RELATIONS for alt in str(rel[1]).split("|")):
                problems.append(f"{where}: relation type {rel[1]!r}")
            for side in (rel[0], rel[2]):
                if side not in keysets:
                    problems.append(f"{where}: relation side {side!r} is not an object name")
    return problems, notes


# ----------------------------------------------------------------------------------------------- main

def read_jsonl(path: str) -> list:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                out.append({"error": f"unreadable line: {exc}"})
    return out


DEV_SET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "natural", "dev.jsonl")


def plan_set(items: list, engine: str) -> list:
    """Layouts (as dicts) of the offline planner for every prompt; {"error": ...} where it refuses."""
    from .offline import plan_offline

    out = []
    for it in items:
        try:
            out.append(plan_offline(str(it.get("prompt", "")), engine=engine).to_dict())
        except (ValueError, TypeError) as exc:
            out.append({"error": str(exc)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="[SET.jsonl] LAYOUTS.jsonl (SET defaults to the shipped dev set)")
    ap.add_argument("--plan", choices=("rules", "english"), help="plan the set with the offline planner first")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print the N worst prompts")
    ap.add_argument("--check-set", action="store_true", help="lint the annotations and exit")
    args = ap.parse_args(argv)
    paths = list(args.paths)
    if args.check_set or args.plan:
        args.set = paths[0] if paths else DEV_SET
        args.layouts = None
    elif len(paths) == 1:
        args.set, args.layouts = DEV_SET, paths[0]
    elif len(paths) == 2:
        args.set, args.layouts = paths
    else:
        ap.error("give LAYOUTS, SET LAYOUTS, or --plan ENGINE")
    items = read_jsonl(args.set)
    if args.check_set:
        problems, notes = check_set(items)
        for p in notes + problems:
            print(p)
        print(f"{len(items)} prompts, {len(problems)} problems")
        return 1 if problems else 0
    layouts = plan_set(items, args.plan) if args.plan else read_jsonl(args.layouts)
    if len(layouts) != len(items):
        print(f"warning: {len(layouts)} layouts for {len(items)} prompts; missing ones score 0, extra ones "
              f"are ignored", file=sys.stderr)
    layouts = (layouts + [{"error": "missing layout"}] * len(items))[: len(items)]

    results = [score_item(it, lay) for it, lay in zip(items, layouts)]
    by_source = defaultdict(list)
    by_check = defaultdict(list)
    for it, res in zip(items, results):
        by_source[it["source"]].append(res["score"])
        for t, _, v, _ in res["checks"]:
            by_check[t].append(v)
    scores = [r["score"] for r in results]
    overall = float(np.mean(scores)) if scores else 0.0
    perfect = float(np.mean([s >= PERFECT for s in scores])) if scores else 0.0

    if args.show:
        order = sorted(range(len(items)), key=lambda i: (results[i]["score"], items[i]["id"]))
        for i in order[: args.show]:
            it, res = items[i], results[i]
            print(f"--- {it['id']} ({it['source']}) score {res['score']:.3f}: {it['prompt'][:140]}")
            print(f"    labels: {', '.join(res['labels']) or '(none)'}")
            for t, name, v, detail in res["checks"]:
                if v < 1.0:
                    print(f"    FAIL {t:9s} {name}: {detail}" + (f" [{v:.2f}]" if t == "precision" else ""))
        print()
    for src in sorted(by_source):
        v = by_source[src]
        print(f"source {src:6s} {np.mean(v):.3f}  (n={len(v)})")
    for t in CHECK_TYPES:
        if t in by_check:
            print(f"check  {t:9s} {np.mean(by_check[t]):.3f}  (n={len(by_check[t])})")
    print(f"prompts scoring >= {PERFECT}: {sum(s >= PERFECT for s in scores)}/{len(scores)} ({perfect:.1%}); "
          f"all checks passed: {sum(s >= 1.0 for s in scores)}")
    summary = {
        "overall": round(overall, 4),
        "perfect_rate": round(perfect, 4),
        "by_check": {t: round(float(np.mean(by_check[t])), 4) for t in CHECK_TYPES if t in by_check},
        "by_source": {s: round(float(np.mean(v)), 4) for s, v in sorted(by_source.items())},
        "n": len(items),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
