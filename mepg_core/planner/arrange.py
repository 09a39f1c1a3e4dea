"""Turn a parsed scene into boxes: a grid built from the relations, sized from typical object sizes.

1. Every object (mention) becomes a node; "between two dogs" splits the dogs into a left and a right
   node, "four chairs around a table" splits the chairs round the table. Objects inside or held by
   another ("fish in a bowl", "a child holding a kite") are placed in their holder's box later.
2. Relations become order constraints on columns (left/right) and rows (above/below); the two objects
   of a horizontal relation share a row, of a vertical one a column, unless that contradicts an earlier
   constraint (then they sit diagonally, which satisfies both). Contradictions are dropped in order:
   written relations first, then "beside"/"in front of", then absolute places ("on the left"), then
   weak defaults (the moon is high).
3. Each connected group of nodes gets a grid (columns = longest chain of left-of, rows = of above);
   groups are packed on shelves. Column widths and row heights follow the objects' typical sizes, so
   a car gets more room than a cup; several instances of one object share their node's cell in a
   sub-grid, so they never overlap.
4. Contact ("on", "under", "in front of", "behind") moves boxes together, then every written relation
   is checked with GenEval's rule and repaired if needed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from . import lexicon as lx
from .relations import relative_position
from .scene import Mention, Relation

MARGIN = 30          # layout units kept free at the canvas edge
FILL = 0.84          # share of a sub-cell an instance's box fills
SIZE_EXPONENT = 0.4  # compress real sizes: a bus is ~100x a cup, on the canvas ~6x
MIN_SIDE = 24        # smallest box side in layout units
SAFETY_MARGIN = 0.05  # relations are planned to hold beyond GenEval's 0.5 by this much

_AXIS_OF = {"left": "x", "right": "x", "above": "y", "below": "y", "on": "y", "under": "y"}
_CHECK_NAME = {"left": "left of", "right": "right of", "above": "above", "below": "below",
               "on": "above", "under": "below"}


@dataclass
class Node:
    mention: int
    count: int
    w: float
    h: float
    hint_x: int | None = None
    hint_y: int | None = None
    weak_y: int | None = None
    depth: int | None = None
    arrangement: str | None = None
    parent: int | None = None       # attached to this node ("inside" or "holding")
    attach: str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    has_vertical: bool = False


class _Grid:
    """Order constraints between nodes with row/column alignment, kept free of contradictions."""

    def __init__(self, n: int):
        self.n = n
        self.col = list(range(n))
        self.row = list(range(n))
        self.xedges: list[tuple[int, int]] = []
        self.yedges: list[tuple[int, int]] = []

    @staticmethod
    def _find(parent: list[int], i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def col_of(self, i: int) -> int:
        return self._find(self.col, i)

    def row_of(self, i: int) -> int:
        return self._find(self.row, i)

    def try_add(self, axis: str, a: int, b: int, align: bool) -> bool:
        saved = (list(self.col), list(self.row), len(self.xedges), len(self.yedges))
        if axis == "x":
            self.xedges.append((a, b))
            if align:
                self.row[self._find(self.row, a)] = self._find(self.row, b)
        else:
            self.yedges.append((a, b))
            if align:
                self.col[self._find(self.col, a)] = self._find(self.col, b)
        if self._consistent():
            return True
        self.col, self.row = saved[0], saved[1]
        del self.xedges[saved[2]:]
        del self.yedges[saved[3]:]
        return False

    def _consistent(self) -> bool:
        return (_acyclic([(self.col_of(a), self.col_of(b)) for a, b in self.xedges])
                and _acyclic([(self.row_of(a), self.row_of(b)) for a, b in self.yedges]))

    def ranks(self, axis: str) -> dict[int, int]:
        """Longest-path rank of every class on ``axis`` (class id -> rank)."""
        cls = self.col_of if axis == "x" else self.row_of
        edges = self.xedges if axis == "x" else self.yedges
        classes = sorted({cls(i) for i in range(self.n)})
        succ: dict[int, list[int]] = {c: [] for c in classes}
        indeg = {c: 0 for c in classes}
        for a, b in edges:
            ca, cb = cls(a), cls(b)
            succ[ca].append(cb)
            indeg[cb] += 1
        rank = {c: 0 for c in classes}
        queue = [c for c in classes if indeg[c] == 0]
        while queue:
            c = queue.pop(0)
            for d in succ[c]:
                rank[d] = max(rank[d], rank[c] + 1)
                indeg[d] -= 1
                if indeg[d] == 0:
                    queue.append(d)
        return rank


def _acyclic(edges: list[tuple[int, int]]) -> bool:
    succ: dict[int, list[int]] = {}
    indeg: dict[int, int] = {}
    for a, b in edges:
        if a == b:
            return False
        succ.setdefault(a, []).append(b)
        indeg[b] = indeg.get(b, 0) + 1
        indeg.setdefault(a, 0)
    queue = [v for v, d in indeg.items() if d == 0]
    seen = 0
    while queue:
        v = queue.pop()
        seen += 1
        for w in succ.get(v, ()):
            indeg[w] -= 1
            if indeg[w] == 0:
                queue.append(w)
    return seen == len(indeg)


def base_dims(label: str, size_mult: float, width: int, height: int) -> tuple[float, float]:
    """An instance's width and height in scene units, corrected for the canvas aspect."""
    size, aspect = lx.noun_shape(label)
    length = (size ** SIZE_EXPONENT) * size_mult
    if aspect >= 1:
        w, h = length, length / aspect
    else:
        w, h = length * aspect, length
    # Layout units stretch with the canvas: a pixel-square object is wider in units on a tall canvas.
    return w * height / width, h


def arrange(mentions: list[Mention], relations: list[Relation], width: int, height: int,
            rng: random.Random | None = None) -> dict[int, list[tuple[int, int, int, int]]]:
    """Boxes for every instance of every mention: ``{mention index: [box, ...]}`` in layout units."""
    nodes: list[Node] = []
    of_mention: dict[int, list[int]] = {}
    for m in mentions:
        if m.count <= 0:
            continue
        w, h = base_dims(m.label, m.size_mult, width, height)
        depth_scale = {0: 0.8, 2: 1.15}.get(m.depth, 1.0)
        node = Node(m.index, m.count, w * depth_scale, h * depth_scale, m.hint_x, m.hint_y,
                    depth=m.depth, arrangement=m.arrangement)
        if node.hint_y is None and m.depth is not None:
            node.hint_y = 0 if m.depth == 0 else 2
        if m.label in lx.SKY_NOUNS:
            node.weak_y = 0
        of_mention[m.index] = [len(nodes)]
        nodes.append(node)
    relations = [r for r in relations if r.subject in of_mention and all(t in of_mention for t in r.targets)]

    checks: list[tuple[str, int, int]] = []   # (GenEval relation, subject node, target node)
    hard: list[tuple[str, int, int]] = []     # (kind, a, b) placed as written
    soft: list[tuple[str, int, int]] = []
    contacts: list[tuple[str, int, int]] = []

    def split(node_id: int, parts: int) -> list[int]:
        node = nodes[node_id]
        parts = max(1, min(parts, node.count))
        counts = [node.count // parts + (1 if k < node.count % parts else 0) for k in range(parts)]
        node.count = counts[0]
        ids = [node_id]
        for c in counts[1:]:
            clone = Node(node.mention, c, node.w, node.h, node.hint_x, node.hint_y, node.weak_y,
                         node.depth, node.arrangement)
            ids.append(len(nodes))
            nodes.append(clone)
        of_mention[node.mention] = ids
        return ids

    busy = {n for r in relations if r.kind not in ("inside", "holding") and r.explicit
            for n in (r.subject, *r.targets)}
    for r in relations:
        subj_nodes = of_mention[r.subject]
        if r.kind == "between":
            if len(r.targets) == 1:
                tgt = of_mention[r.targets[0]]
                if len(tgt) == 1 and nodes[tgt[0]].count >= 2:
                    tgt = split(tgt[0], 2)
                lefts, rights = tgt[:1], tgt[1:2] or tgt[:1]
            else:
                lefts, rights = of_mention[r.targets[0]], of_mention[r.targets[1]]
            for s in subj_nodes:
                for t in lefts:
                    hard.append(("right", s, t))
                for t in rights:
                    hard.append(("left", s, t))
            continue
        if r.kind == "around":
            parts = split(subj_nodes[0], 4) if len(subj_nodes) == 1 else subj_nodes
            sides = ("left", "right", "above", "below")
            for k, s in enumerate(parts):
                for t in of_mention[r.targets[0]]:
                    hard.append((sides[k % 4], s, t))
            continue
        if r.kind in ("inside", "holding"):
            child_m, parent_m = (r.subject, r.targets[0]) if r.kind == "inside" else (r.targets[0], r.subject)
            parent = of_mention[parent_m][0]
            if child_m not in busy and nodes[parent].parent is None and \
                    all(nodes[c].parent is None for c in of_mention[child_m]) and \
                    not any(nodes[p].parent is not None for p in of_mention[parent_m]):
                attached_to_child = any(nodes[k].parent in of_mention[child_m] for k in range(len(nodes)))
                if not attached_to_child:
                    for c in of_mention[child_m]:
                        nodes[c].parent, nodes[c].attach = parent, r.kind
                    continue
            for s in of_mention[r.subject]:
                for t in of_mention[r.targets[0]]:
                    soft.append(("beside", s, t))
            continue
        for t_m in r.targets:
            for s in subj_nodes:
                for t in of_mention[t_m]:
                    if r.kind in _AXIS_OF and r.explicit:
                        hard.append((r.kind, s, t))
                        if r.kind in ("on", "under"):
                            contacts.append((r.kind, s, t))
                    elif r.kind in ("on", "under"):
                        # Inferred ("a table with cups"): placed if nothing written contradicts it.
                        soft.append((r.kind, s, t))
                        contacts.append((r.kind, s, t))
                    elif r.kind in ("front", "behind"):
                        soft.append((r.kind, s, t))
                        contacts.append((r.kind, s, t))
                    else:
                        soft.append(("beside", s, t))

    grid_ids = [i for i, nd in enumerate(nodes) if nd.parent is None]
    index = {nid: k for k, nid in enumerate(grid_ids)}
    grid = _Grid(len(grid_ids))

    def add(axis: str, a: int, b: int, options: tuple[bool, ...] = (True, False)) -> bool:
        if a not in index or b not in index or a == b:
            return False
        return any(grid.try_add(axis, index[a], index[b], align) for align in options)

    for kind, a, b in hard:
        axis = _AXIS_OF[kind]
        first, second = (a, b) if kind in ("left", "above", "on") else (b, a)
        if add(axis, first, second):
            checks.append((_CHECK_NAME[kind], a, b))
            if axis == "y":
                nodes[a].has_vertical = nodes[b].has_vertical = True
    for kind, a, b in soft:
        if kind == "beside":
            add("x", a, b) or add("x", b, a)
        elif kind in ("on", "under"):
            first, second = (a, b) if kind == "on" else (b, a)
            add("y", first, second)
        elif kind == "front":
            add("y", b, a, (True,)) or add("y", b, a, (False,))
        elif kind == "behind":
            add("y", a, b, (True,)) or add("y", a, b, (False,))
    for attr, axis in (("hint_x", "x"), ("hint_y", "y"), ("weak_y", "y")):
        for p in grid_ids:
            for q in grid_ids:
                lp, lq = getattr(nodes[p], attr), getattr(nodes[q], attr)
                if p == q or (lp is None and lq is None):
                    continue
                if (1 if lp is None else lp) < (1 if lq is None else lq):
                    # A place on the canvas orders objects; it does not line them up.
                    placed = add(axis, p, q, (False, True))
                    if placed and attr != "weak_y" and lp is not None and lq is not None:
                        # "on the left ... on the right": as binding as a written relation.
                        checks.append(("left of" if axis == "x" else "above", p, q))

    _place_grid(nodes, grid_ids, grid, rng)
    for kind, a, b in contacts:
        _contact(nodes, kind, a, b, checks, width, height)
    _repair(nodes, checks, width, height)
    _place_attached(nodes, rng)  # last, so held and contained objects follow their holder's final box

    out: dict[int, list[tuple[int, int, int, int]]] = {}
    for m_idx, ids in of_mention.items():
        boxes = [b for nid in ids for b in nodes[nid].boxes]
        out[m_idx] = [_to_int_box(b) for b in boxes]
    return out


# --------------------------------------------------------------------------------------------------
# Grid placement


ROW_PENALTY = 0.6    # instances prefer to stand side by side: each extra row must buy a bigger scale
SHELF_PENALTY = 0.6   # the same for separate objects stacked on shelves
SCALE_SPREAD = 1.4    # an object may be drawn at most this much larger (per metre) than the tightest one


def _subgrid(n: int, cw: float, ch: float, w: float, h: float, arrangement: str | None) -> tuple[int, int, float]:
    """Rows and columns for ``n`` instances of a w x h object in a cw x ch cell, and the fitting scale."""
    best = (1, n, 0.0)
    best_score = -1.0
    rows_options = range(1, n + 1)
    if arrangement == "row":
        rows_options = range(1, 2)
    elif arrangement == "column":
        rows_options = range(n, n + 1)
    for rows in rows_options:
        cols = math.ceil(n / rows)
        if rows > 1 and cols * (rows - 1) >= n:
            continue  # a last row left empty
        scale = min(cw / (cols * w), ch / (rows * h))
        score = scale * (ROW_PENALTY ** (rows - 1) if arrangement is None else 1.0)
        if score > best_score * 1.02:
            best, best_score = (rows, cols, scale), score
    return best


def _fit_score(n: int, cw: float, ch: float, w: float, h: float, arrangement: str | None) -> float:
    rows, _, scale = _subgrid(n, cw, ch, w, h, arrangement)
    return scale * (ROW_PENALTY ** (rows - 1) if arrangement is None else 1.0)


def _demand(node: Node) -> tuple[float, float]:
    rows, cols, _ = _subgrid(node.count, 1.0, 1.0, node.w, node.h, node.arrangement)
    # Cells a little larger than the objects leave air between neighbours.
    return cols * node.w * 1.25, rows * node.h * 1.25


def _place_grid(nodes: list[Node], grid_ids: list[int], grid: _Grid, rng: random.Random | None) -> None:
    if not grid_ids:
        return
    n = len(grid_ids)
    col_rank, row_rank = grid.ranks("x"), grid.ranks("y")
    # Connected groups: nodes linked by any constraint or alignment.
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in grid.xedges + grid.yedges:
        parent[find(a)] = find(b)
    for i in range(n):
        parent[find(i)] = find(grid.col_of(i))
        parent[find(i)] = find(grid.row_of(i))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: min(g))

    comps = []
    for members in ordered:
        cols = sorted({col_rank[grid.col_of(i)] for i in members})
        rows = sorted({row_rank[grid.row_of(i)] for i in members})
        cmap = {c: k for k, c in enumerate(cols)}
        rmap = {r: k for k, r in enumerate(rows)}
        cells: dict[tuple[int, int], list[int]] = {}
        for i in members:
            key = (cmap[col_rank[grid.col_of(i)]], rmap[row_rank[grid.row_of(i)]])
            cells.setdefault(key, []).append(grid_ids[i])
        colw = [0.0] * len(cols)
        rowh = [0.0] * len(rows)
        split_x: dict[tuple[int, int], bool] = {}
        for key, ids in cells.items():
            demands = [_demand(nodes[i]) for i in ids]
            along_x = any(nodes[i].has_vertical for i in ids) or len(ids) == 1
            split_x[key] = along_x
            if along_x:
                dw, dh = sum(d[0] for d in demands), max(d[1] for d in demands)
            else:
                dw, dh = max(d[0] for d in demands), sum(d[1] for d in demands)
            colw[key[0]] = max(colw[key[0]], dw)
            rowh[key[1]] = max(rowh[key[1]], dh)
        colw = [max(c, 0.45 * max(colw)) for c in colw]
        rowh = [max(r, 0.45 * max(rowh)) for r in rowh]
        comps.append({"cells": cells, "colw": colw, "rowh": rowh, "split_x": split_x,
                      "W": sum(colw), "H": sum(rowh)})

    # Groups go side by side on shelves; try several shelf widths and keep the packing in which the
    # most squeezed object is drawn largest (ties: the wider shelves, the reading order).
    most = max(len(c["colw"]) for c in comps)
    best_cells: list[tuple[int, tuple[float, float, float, float]]] = []
    best_score = -1.0
    limit = max(1, min(8, sum(len(c["colw"]) for c in comps)))
    for max_cols in range(limit, 0, -1):
        if max_cols < most and max_cols != limit:
            continue
        cells = _pack(comps, max(max_cols, most))
        score = min(_fit_score(nodes[i].count, r[2] - r[0], r[3] - r[1], nodes[i].w, nodes[i].h,
                               nodes[i].arrangement) for i, r in cells)
        # Separate objects read best side by side; stacking groups must buy clearly larger objects.
        score *= SHELF_PENALTY ** (_shelf_count(comps, max(max_cols, most)) - 1)
        if score > best_score * 1.05:
            best_cells, best_score = cells, score
    # One scale for the scene, within limits: an object alone in a roomy cell may grow a little, not
    # so much that an armchair ends up bigger than the sofa beside it.
    fits = [_subgrid(nodes[i].count, r[2] - r[0], r[3] - r[1], nodes[i].w, nodes[i].h, nodes[i].arrangement)[2]
            for i, r in best_cells]
    cap = min(fits) * SCALE_SPREAD
    for i, rect in best_cells:
        _fill_cell(nodes[i], rect, rng, cap)


def _shelf_count(comps: list[dict], max_cols: int) -> int:
    shelves, used = 0, 0
    for comp in comps:
        ncols = len(comp["colw"])
        if shelves and used + ncols <= max_cols:
            used += ncols
        else:
            shelves, used = shelves + 1, ncols
    return shelves


Rect = tuple[float, float, float, float]


def _pack(comps: list[dict], max_cols: int) -> list[tuple[int, Rect]]:
    """Cells (node id, rectangle) for the groups packed on shelves of at most ``max_cols`` columns."""
    shelves: list[list[dict]] = []
    used = 0
    for comp in comps:
        ncols = len(comp["colw"])
        if shelves and used + ncols <= max_cols:
            shelves[-1].append(comp)
            used += ncols
        else:
            shelves.append([comp])
            used = ncols
    shelf_h = [max(c["H"] for c in s) for s in shelves]
    shelf_h = [max(h, 0.5 * max(shelf_h)) for h in shelf_h]
    span = 1000 - 2 * MARGIN
    y = float(MARGIN)
    out: list[tuple[int, Rect]] = []
    for shelf, sh in zip(shelves, shelf_h):
        hgt = span * sh / sum(shelf_h)
        widths = [c["W"] for c in shelf]
        widths = [max(w, 0.5 * max(widths)) for w in widths]
        x = float(MARGIN)
        for comp, cw in zip(shelf, widths):
            wid = span * cw / sum(widths)
            out.extend(_comp_cells(comp, x, y, wid, hgt))
            x += wid
        y += hgt
    return out


def _comp_cells(comp: dict, x0: float, y0: float, wid: float, hgt: float) -> list[tuple[int, Rect]]:
    colw, rowh = comp["colw"], comp["rowh"]
    xs = [x0]
    for c in colw:
        xs.append(xs[-1] + wid * c / sum(colw))
    ys = [y0]
    for r in rowh:
        ys.append(ys[-1] + hgt * r / sum(rowh))
    out = []
    for (c, r), ids in sorted(comp["cells"].items()):
        cx1, cx2, cy1, cy2 = xs[c], xs[c + 1], ys[r], ys[r + 1]
        k = len(ids)
        for j, node_id in enumerate(ids):
            if comp["split_x"][(c, r)]:
                sx1 = cx1 + (cx2 - cx1) * j / k
                out.append((node_id, (sx1, cy1, sx1 + (cx2 - cx1) / k, cy2)))
            else:
                sy1 = cy1 + (cy2 - cy1) * j / k
                out.append((node_id, (cx1, sy1, cx2, sy1 + (cy2 - cy1) / k)))
    return out


def _fill_cell(node: Node, cell: tuple[float, float, float, float], rng: random.Random | None,
               max_scale: float = math.inf) -> None:
    """Boxes for a node's instances inside ``cell``: a sub-grid, rows centred, boxes centred in sub-cells."""
    x1, y1, x2, y2 = cell
    cw, ch = x2 - x1, y2 - y1
    n = node.count
    rows, cols, scale = _subgrid(n, cw, ch, node.w, node.h, node.arrangement)
    scale = min(scale, max_scale)
    fill = FILL if n > 1 else 0.9
    bw, bh = node.w * scale * fill, node.h * scale * fill
    per_row = [n // rows + (1 if r < n % rows else 0) for r in range(rows)]
    sub_w, sub_h = cw / cols, ch / rows
    node.boxes = []
    for r, count in enumerate(per_row):
        row_x = x1 + (cw - count * sub_w) / 2
        for k in range(count):
            cx = row_x + (k + 0.5) * sub_w
            cy = y1 + (r + 0.5) * sub_h
            w, h = bw, bh
            if rng is not None:
                # Jitter stays small next to the box itself, so a seed varies a layout, not its plan.
                shrink = rng.uniform(0.88, 1.0)
                w, h = w * shrink, h * shrink
                cx += rng.uniform(-0.5, 0.5) * min(sub_w - w, 0.5 * w)
                cy += rng.uniform(-0.5, 0.5) * min(sub_h - h, 0.5 * h)
            node.boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


# --------------------------------------------------------------------------------------------------
# Contact, attached objects, repair


def _violations(nodes: list[Node], checks: list[tuple[str, int, int]], width: int, height: int,
                only: set[int] | None = None) -> list[tuple[str, int, int]]:
    bad = []
    for rel, a, b in checks:
        if only is not None and a not in only and b not in only:
            continue
        if any(rel not in relative_position(ba, bb, width, height, margin=SAFETY_MARGIN)
               for ba in nodes[a].boxes for bb in nodes[b].boxes):
            bad.append((rel, a, b))
    return bad


def _shift(node: Node, dx: float, dy: float) -> None:
    for box in node.boxes:
        box[0] += dx
        box[2] += dx
        box[1] += dy
        box[3] += dy


def _contact(nodes: list[Node], kind: str, a: int, b: int, checks: list[tuple[str, int, int]],
             width: int, height: int) -> None:
    """Move ``a`` against ``b`` ("on": resting on top, "under", "front"/"behind": overlapping)."""
    na, nb = nodes[a], nodes[b]
    if not na.boxes or not nb.boxes or na.parent is not None or nb.parent is not None:
        return
    a_top, a_bot = min(bx[1] for bx in na.boxes), max(bx[3] for bx in na.boxes)
    b_top, b_bot = min(bx[1] for bx in nb.boxes), max(bx[3] for bx in nb.boxes)
    a_h = sum(bx[3] - bx[1] for bx in na.boxes) / len(na.boxes)
    b_h = sum(bx[3] - bx[1] for bx in nb.boxes) / len(nb.boxes)
    if kind == "on":
        dy = (b_top + 0.12 * a_h) - a_bot
        if dy <= 0:
            return
    elif kind == "under":
        dy = (b_bot - 0.1 * a_h) - a_top
        if dy >= 0:
            return
    elif kind == "front":
        dy = (b_bot - 0.3 * b_h) - a_top
        if dy >= 0:
            return
    else:  # behind
        dy = (b_top + 0.3 * a_h) - a_bot
        if dy <= 0:
            return
    if not _overlap_x(na, nb):
        return
    before = len(_violations(nodes, checks, width, height, {a}))
    for frac in (1.0, 0.75, 0.5, 0.25):
        _shift(na, 0.0, dy * frac)
        if len(_violations(nodes, checks, width, height, {a})) <= before and _inside_canvas(na):
            return
        _shift(na, 0.0, -dy * frac)


def _overlap_x(na: Node, nb: Node) -> bool:
    a1, a2 = min(b[0] for b in na.boxes), max(b[2] for b in na.boxes)
    b1, b2 = min(b[0] for b in nb.boxes), max(b[2] for b in nb.boxes)
    return min(a2, b2) - max(a1, b1) > 0.3 * min(a2 - a1, b2 - b1)


def _inside_canvas(node: Node) -> bool:
    return all(b[0] >= 0 and b[1] >= 0 and b[2] <= 1000 and b[3] <= 1000 for b in node.boxes)


def _place_attached(nodes: list[Node], rng: random.Random | None) -> None:
    holders: dict[int, list[int]] = {}
    for i, nd in enumerate(nodes):
        if nd.parent is not None:
            holders.setdefault(nd.parent, []).append(i)
    for p, children in holders.items():
        parent = nodes[p]
        if not parent.boxes:
            continue
        for c in children:
            child = nodes[c]
            pboxes = parent.boxes
            # Spread the children over the holder's instances ("two cacti in three pots").
            per = [child.count // len(pboxes) + (1 if k < child.count % len(pboxes) else 0)
                   for k in range(len(pboxes))]
            child.boxes = []
            for pb, cnt in zip(pboxes, per):
                if cnt == 0:
                    continue
                pw, ph = pb[2] - pb[0], pb[3] - pb[1]
                if child.attach == "inside":
                    inner = (pb[0] + 0.12 * pw, pb[1] + 0.12 * ph, pb[2] - 0.12 * pw, pb[3] - 0.12 * ph)
                    tmp = Node(child.mention, cnt, child.w, child.h, arrangement=child.arrangement)
                    _fill_cell(tmp, inner, rng)
                    child.boxes.extend(tmp.boxes)
                else:  # held: at the holder's side, at most about half its size
                    unit = ph / parent.h if parent.h else 1.0
                    w = min(child.w * unit, 0.6 * pw)
                    h = min(child.h * unit, 0.6 * ph)
                    ratio = min(w / (child.w * unit), h / (child.h * unit))
                    w, h = child.w * unit * ratio, child.h * unit * ratio
                    for k in range(cnt):
                        cx = pb[2] - 0.1 * pw + k * 0.3 * w
                        cy = pb[1] + 0.45 * ph
                        cx = min(max(cx, w / 2 + 1), 1000 - w / 2 - 1)
                        cy = min(max(cy, h / 2 + 1), 1000 - h / 2 - 1)
                        child.boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _repair(nodes: list[Node], checks: list[tuple[str, int, int]], width: int, height: int) -> None:
    """Nudge boxes until every written relation holds under GenEval's rule (bounded passes).

    First the two objects are pushed apart along the relation's axis (while the canvas has room), then
    the subject's instances are drawn together across that axis towards the target (a row of ten stars
    above a castle gets narrower), and last both are shrunk, which lowers GenEval's size allowance.
    """
    for step in range(14):
        bad = _violations(nodes, checks, width, height)
        if not bad:
            return
        for rel, a, b in bad:
            na, nb = nodes[a], nodes[b]
            vertical = rel in ("above", "below")
            axis = 1 if vertical else 0
            if step < 3:
                sign = -1.0 if rel in ("left of", "above") else 1.0
                d = 40.0 * sign
                da, db = _clamp_shift(na, d, axis), _clamp_shift(nb, -d, axis)
                _shift(na, da if not vertical else 0.0, da if vertical else 0.0)
                _shift(nb, db if not vertical else 0.0, db if vertical else 0.0)
            elif step < 9:
                # Both groups close in on the line between them (every instance must pass).
                meet = (_centre(na)[1 - axis] + _centre(nb)[1 - axis]) / 2
                for box in na.boxes + nb.boxes:
                    lo, hi = box[1 - axis], box[3 - axis]
                    mid = meet + ((lo + hi) / 2 - meet) * 0.7
                    half = (hi - lo) / 2 * 0.9
                    box[1 - axis], box[3 - axis] = mid - half, mid + half
            else:
                for nd in (na, nb):
                    for box in nd.boxes:
                        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                        w, h = (box[2] - box[0]) * 0.85, (box[3] - box[1]) * 0.85
                        box[:] = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _clamp_shift(node: Node, d: float, axis: int) -> float:
    lo = min(b[axis] for b in node.boxes)
    hi = max(b[axis + 2] for b in node.boxes)
    if d < 0:
        return max(d, -lo)
    return min(d, 1000 - hi)


def _centre(node: Node) -> tuple[float, float]:
    n = len(node.boxes)
    return (sum((b[0] + b[2]) / 2 for b in node.boxes) / n, sum((b[1] + b[3]) / 2 for b in node.boxes) / n)


def _to_int_box(box: list[float]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = max(0, min(x1, 1000)), max(0, min(x2, 1000))
    y1, y2 = max(0, min(y1, 1000)), max(0, min(y2, 1000))
    if x2 - x1 < MIN_SIDE:
        cx = (x1 + x2) // 2
        x1, x2 = max(0, cx - MIN_SIDE // 2), min(1000, max(0, cx - MIN_SIDE // 2) + MIN_SIDE)
    if y2 - y1 < MIN_SIDE:
        cy = (y1 + y2) // 2
        y1, y2 = max(0, cy - MIN_SIDE // 2), min(1000, max(0, cy - MIN_SIDE // 2) + MIN_SIDE)
    return x1, y1, x2, y2
