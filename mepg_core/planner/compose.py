"""Composition: boxes for a scene the way an illustrator would lay it out, not a grid.

1. **Sizes** follow real-world sizes, compressed (a bus is ~100x a cup, on the canvas a few times), and
   main subjects are prominent; background things are smaller, foreground ones larger.
2. **A tree of relations.** Each thing hangs from at most one other by its first stated relation:
   resting on its top ("on"), inside it, held at its side, in front of it (lower, overlapping), behind
   it (higher, smaller, overlapping), beside it, left/right of it, above or below it.
3. **Roots stand on a ground line** (lower for the foreground, higher for the background; sky things
   high), spread left to right in the prompt's order, "on the left/right" honoured, a lone main subject
   in the middle.
4. The whole is fitted to the canvas and every relation is checked; "between" and "around" go to the
   constraint grid of :mod:`.arrange`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import lexicon as lx
from .arrange import arrange as grid_arrange
from .scene import Mention, Relation

FRAME = 1000.0
EDGE = 24.0             # layout units kept free at the canvas edge
SIZE_EXPONENT = 0.6     # compress real sizes (a cup beside a bus stays visible; a ball stays small by a dog)
GROUND = 880.0          # bottom of things standing in the middle distance
GROUND_NEAR = 960.0     # foreground
GROUND_FAR = 620.0      # background
SKY_Y = 190.0           # centre height of sky things
MAIN_MIN_LONG = 360.0   # a main subject's long side, at least
MIN_LONG = 70.0
GAP = 36.0
_PARENT_KINDS = ("on", "inside", "holding", "under", "front", "behind", "above", "below", "left", "right",
                 "beside")


@dataclass
class Group:
    """All instances of one mention, laid out together."""

    mention: Mention
    w: float                     # one instance
    h: float
    parent: int | None = None    # mention index
    how: str | None = None
    children: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)

    def block(self) -> tuple[float, float, int, int]:
        """(width, height, columns, rows) of the instances side by side (rows of at most 4)."""
        n = max(1, self.mention.count)
        cols = n if n <= 4 else min(5, -(-n // 2)) if n <= 10 else -(-n // 3)
        rows = -(-n // cols)
        pad = 0.06 if self.how == "on" else 0.12
        return self.w * (cols + pad * (cols - 1)), self.h * (rows + pad * (rows - 1)), cols, rows


def compose(mentions: list[Mention], relations: list[Relation], width: int, height: int,
            rng: random.Random | None = None) -> dict[int, list[tuple[int, int, int, int]]]:
    """Boxes for every instance of every mention: ``{mention index: [box, ...]}`` in layout units."""
    counts = {m.index: m.count for m in mentions}
    if any(r.kind == "around" or r.kind == "between" and len(set(r.targets)) == 1 and counts.get(r.targets[0]) == 2
           for r in relations):
        return grid_arrange(mentions, relations, width, height, rng)   # "a vase between two candles"
    relations = _between_as_a_row(relations)
    groups = {m.index: Group(m, 0.0, 0.0) for m in mentions if m.count > 0}
    _link(groups, relations)
    _size(groups, width, height, rng)
    roots = [i for i, g in groups.items() if g.parent is None]
    _place_roots(groups, roots, rng)
    for i in roots:
        _place_children(groups, i)
    _fit(groups)
    _honour_places(groups)
    _prominent(groups)
    return {i: [_int_box(b) for b in g.boxes] for i, g in groups.items()}


# --------------------------------------------------------------------------------------------------
# Relations -> a tree


def _link(groups: dict[int, Group], relations: list[Relation]) -> None:
    order = sorted(range(len(relations)), key=lambda n: _link_rank(relations[n], n))
    for r in (relations[n] for n in order):
        if r.kind not in _PARENT_KINDS or not r.targets:
            continue
        child, parent = r.subject, r.targets[0]
        how = r.kind
        if r.kind == "holding":
            child, parent = r.targets[0], r.subject
        if child not in groups or parent not in groups or child == parent:
            continue
        free = groups[parent].mention
        if groups[child].parent is not None and how in _MIRROR and groups[parent].parent is None and \
                free.hint_x is None and free.hint_y is None and free.depth is None and not free.main and \
                not _is_ancestor(groups, parent, child):
            # "a laptop on a table next to a mug": the laptop already rests on the table, so the mug
            # hangs from the laptop instead, on the mirrored side
            child, parent, how = parent, child, _MIRROR[how]
        if groups[child].parent is not None or _is_ancestor(groups, child, parent):
            continue
        cm, pm = groups[child].mention, groups[parent].mention
        if how in ("beside", "left", "right") and (cm.hint_x is not None and pm.hint_x is not None):
            continue
        groups[child].parent, groups[child].how = parent, how
        groups[parent].children.append(child)


def _link_rank(r: Relation, n: int) -> tuple[bool, int, int]:
    """Which relation hangs a thing first: explicit before implied; supports and containers first, in the
    order stated ("oranges in a bowl at the centre of a table" rest in the bowl); the other kinds in their
    order."""
    if r.kind in ("on", "inside"):
        return not r.explicit, 0, n
    return not r.explicit, 1, _PARENT_KINDS.index(r.kind) if r.kind in _PARENT_KINDS else 99


_MIRROR = {"left": "right", "right": "left", "beside": "beside", "above": "below", "below": "above",
           "front": "behind", "behind": "front"}


def _between_as_a_row(relations: list[Relation]) -> list[Relation]:
    """"X between A and B": X right of A, and B right of X; between one thing (vague: "between the
    buildings", "between them") reads as beside it."""
    out = []
    for r in relations:
        if r.kind != "between":
            out.append(r)
        elif len(set(r.targets)) >= 2:
            a, b = r.targets[0], r.targets[1]
            out += [Relation("right", r.subject, (a,), r.explicit), Relation("right", b, (r.subject,), r.explicit)]
        elif r.targets:
            out.append(Relation("beside", r.subject, (r.targets[0],), False))
    return out


def _is_ancestor(groups: dict[int, Group], node: int, of: int) -> bool:
    seen = 0
    while of is not None and seen < 64:
        if of == node:
            return True
        of = groups[of].parent
        seen += 1
    return False


# --------------------------------------------------------------------------------------------------
# Sizes


def _size(groups: dict[int, Group], width: int, height: int, rng: random.Random | None = None) -> None:
    roots = [g for g in groups.values() if g.parent is None]
    long_max = {1: 640.0, 2: 520.0, 3: 420.0}.get(len(roots), 360.0)
    vis = {}
    for i, g in groups.items():
        size, _ = lx.noun_shape(g.mention.label, g.mention.kind)
        depth = {0: 0.6, 2: 1.15}.get(g.mention.depth, 1.0)
        vis[i] = (size ** SIZE_EXPONENT) * g.mention.size_mult * depth
    top = max(vis.values(), default=1.0)   # the biggest thing sets the scale, wherever it hangs in the tree
    for i, g in groups.items():
        m = g.mention
        _, aspect = lx.noun_shape(m.label, m.kind)
        aspect = aspect * height / width   # layout units stretch with the canvas
        long = max(MIN_LONG, long_max * min(1.0, vis[i] / top))
        if m.main:
            first = m.index == min(groups)
            long = max(long, MAIN_MIN_LONG * (0.8 if len(roots) > 2 else 1.0) * (1.0 if first else 0.6))
        if rng is not None:
            long *= rng.uniform(0.9, 1.1)   # another seed, another take on the same composition
        n = max(1, m.count)
        if n > 1:
            long *= max(0.32, 1.25 / (n ** 0.5))
        w, h = (long, long / aspect) if aspect >= 1 else (long * aspect, long)
        g.w, g.h = w, h
    # A main subject resting on or held in something makes its support big enough to show it.
    for g in groups.values():
        if g.parent is None or not g.mention.main or g.how not in ("on", "inside"):
            continue
        p = groups[g.parent]
        bw, _, _, _ = g.block()
        need = bw / (0.45 if g.how == "on" else 0.62)
        if p.w < need:
            grow = min(need / p.w, 0.92 * FRAME / p.w, 0.92 * FRAME / p.h)
            p.w, p.h = p.w * max(1.0, grow), p.h * max(1.0, grow)
    # Children keep to their parent's scale.
    for g in groups.values():
        if g.parent is None:
            continue
        p = groups[g.parent]
        limit = {"inside": 0.62, "on": 0.8, "holding": 0.55, "under": 0.4, "front": 0.9, "behind": 1.0,
                 "above": 0.9, "below": 0.9}.get(g.how)
        if limit is not None and not (g.mention.main and g.how in ("front", "behind")):
            bw, bh, _, _ = g.block()
            shrink = min(1.0, limit * p.w / bw, (limit * p.h / bh) if g.how in ("inside", "under", "holding")
                         else 1.0)
            if g.how == "on":
                shrink = min(shrink, 0.9 * p.h / bh * 1.4, (0.45 if g.mention.count == 1 else 0.35) * p.w / bw)
            g.w, g.h = g.w * shrink, g.h * shrink


# --------------------------------------------------------------------------------------------------
# Placement


def _is_sky(m: Mention) -> bool:
    return m.hint_y == 0 or (m.label in lx.SKY_NOUNS and m.hint_y is None)


def _ground(m: Mention) -> float:
    if m.hint_y == 2 or m.depth == 2:
        return GROUND_NEAR
    if m.depth == 0:
        return GROUND_FAR
    return GROUND


def _extent(groups: dict[int, Group], i: int) -> float:
    """Width a root needs with what stands beside, left or right of it."""
    g = groups[i]
    bw, _, _, _ = g.block()
    extra = 0.0
    for c in g.children:
        if groups[c].how in ("beside", "left", "right"):
            extra += groups[c].block()[0] + GAP
        elif groups[c].how in ("front", "behind"):
            extra += 0.3 * groups[c].block()[0]
    return bw + extra


def _place_roots(groups: dict[int, Group], roots: list[int], rng: random.Random | None) -> None:
    def key(i: int) -> tuple[int, int]:
        hx = groups[i].mention.hint_x
        return (1 if hx is None else hx, 0)
    order = sorted(roots, key=lambda i: (key(i), roots.index(i)))
    unhinted = [i for i in order if groups[i].mention.hint_x is None]
    mains = [i for i in unhinted if groups[i].mention.main]
    if len(unhinted) >= 3 and mains and unhinted.index(mains[0]) == 0:
        # the main subject stands in the middle of the others
        order.remove(mains[0])
        mid = len(order) // 2
        order.insert(mid, mains[0])
    ground_roots = [i for i in order if not _is_sky(groups[i].mention)]
    sky_roots = [i for i in order if _is_sky(groups[i].mention)]
    for row, y_of in ((ground_roots, None), (sky_roots, SKY_Y)):
        if not row:
            continue
        widths = [_extent(groups, i) for i in row]
        total = sum(widths) + GAP * (len(row) - 1)
        x = (FRAME - total) / 2
        for i, w in zip(row, widths):
            g = groups[i]
            bw, bh, _, _ = g.block()
            hx = g.mention.hint_x
            cx = x + bw / 2
            if len(row) == 1 and hx is not None:
                cx = {0: 250.0, 1: 500.0, 2: 750.0}[hx]
            if y_of is None:
                bottom = _ground(g.mention)
                top = bottom - bh
            else:
                top = y_of - bh / 2
            if rng is not None:
                cx += rng.uniform(-0.04, 0.04) * FRAME
            _fill(g, cx - bw / 2, top)
            x += w + GAP


def _fill(g: Group, x0: float, y0: float) -> None:
    """Instance boxes in a block whose top-left corner is (x0, y0)."""
    _, _, cols, rows = g.block()
    n = max(1, g.mention.count)
    g.boxes = []
    for k in range(n):
        r, c = divmod(k, cols)
        step = 1.06 if g.how == "on" else 1.12
        x = x0 + c * g.w * step
        y = y0 + r * g.h * step
        g.boxes.append([x, y, x + g.w, y + g.h])


def _union(boxes: list[list[float]]) -> list[float]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def _place_children(groups: dict[int, Group], i: int) -> None:
    parent = groups[i]
    pb = _union(parent.boxes)
    pw, ph = pb[2] - pb[0], pb[3] - pb[1]
    pcx = (pb[0] + pb[2]) / 2
    side = {"beside": 1, "front": 1, "behind": -1}
    on_slot = 0
    on_kids = [c for c in parent.children if groups[c].how in ("on", "inside")]
    right_edge, left_edge = pb[2], pb[0]
    for c in parent.children:
        g = groups[c]
        bw, bh, _, _ = g.block()
        how = g.how
        if how in ("on", "inside"):
            n_slots = len(on_kids)
            # side by side near the middle of the support, so each stays clearly on (above) it
            cx = pcx + (on_slot - (n_slots - 1) / 2) * (0.22 * pw / max(1, n_slots - 1))
            on_slot += 1
            if how == "on":
                # resting on the top surface, drawn a little over its edge
                flat = parent.mention.label in ("plate", "tray", "rug", "carpet", "towel", "mat", "blanket")
                bottom = pb[1] + (0.45 if flat else 0.1) * ph
                top = bottom - bh
            else:
                top = pb[1] + (ph - bh) * 0.55
            x0 = min(max(cx - bw / 2, pb[0] - 0.05 * bw), pb[2] - 0.95 * bw)
        elif how == "under":
            x0, top = pcx - bw / 2, pb[3] + 0.05 * ph - bh   # low under it, so its centre is clearly below
        elif how == "holding":
            x0, top = pb[2] - 0.55 * bw, pb[1] + 0.45 * ph - bh / 2
        elif how in ("front", "behind"):
            s = side[how]
            side[how] = -s
            cx = pcx + s * 0.3 * pw
            bottom = min(pb[3] + 0.07 * FRAME, FRAME - EDGE) if how == "front" else pb[3] - max(70.0, 0.18 * ph)
            if how == "front" and bottom - pb[3] < 40:
                bottom = pb[3] + 40
            x0, top = cx - bw / 2, bottom - bh
        elif how in ("beside", "right"):
            x0, top = right_edge + GAP, pb[3] - bh
            right_edge = x0 + bw
        elif how == "left":
            x0, top = left_edge - GAP - bw, pb[3] - bh
            left_edge = x0
        elif how == "above":
            x0, top = pcx - bw / 2, pb[1] - GAP - bh - 0.1 * (bh + ph)
        else:  # below
            x0, top = pcx - bw / 2, pb[3] + GAP + 0.1 * (bh + ph)
        _fill(g, x0, top)
        _place_children(groups, c)


def _fit(groups: dict[int, Group]) -> None:
    """Scale and move everything into the canvas (keeping relations), then clamp each box."""
    boxes = [b for g in groups.values() for b in g.boxes]
    if not boxes:
        return
    u = _union(boxes)
    lo, hi = EDGE, FRAME - EDGE
    # each axis on its own: squeezing a wide row must not shrink the picture's depth
    sx = min(1.0, (hi - lo) / max(1.0, u[2] - u[0]))
    sy = min(1.0, (hi - lo) / max(1.0, u[3] - u[1]))
    cx, cy = (u[0] + u[2]) / 2, (u[1] + u[3]) / 2
    for b in boxes:
        b[0], b[2] = cx + (b[0] - cx) * sx, cx + (b[2] - cx) * sx
        b[1], b[3] = cy + (b[1] - cy) * sy, cy + (b[3] - cy) * sy
    u = _union(boxes)
    dx = (lo - u[0]) if u[0] < lo else (hi - u[2]) if u[2] > hi else 0.0
    dy = (lo - u[1]) if u[1] < lo else (hi - u[3]) if u[3] > hi else 0.0
    for b in boxes:
        b[0] += dx
        b[2] += dx
        b[1] += dy
        b[3] += dy


_X_TARGET = {0: 210.0, 1: 500.0, 2: 790.0}


def _subtree(groups: dict[int, Group], i: int) -> list[list[float]]:
    out = list(groups[i].boxes)
    for c in groups[i].children:
        out += _subtree(groups, c)
    return out


def _shift_boxes(boxes: list[list[float]], dx: float, dy: float) -> None:
    u = _union(boxes)
    dx = min(max(dx, EDGE - u[0]), FRAME - EDGE - u[2])
    dy = min(max(dy, EDGE - u[1]), FRAME - EDGE - u[3])
    for b in boxes:
        b[0] += dx
        b[2] += dx
        b[1] += dy
        b[3] += dy


def _honour_places(groups: dict[int, Group]) -> None:
    """"On the left", "in the sky", "in the foreground": an absolute place the layout missed moves the
    thing (with what rests on it) there; it outranks a relation to its neighbours."""
    for i, g in groups.items():
        m = g.mention
        if not g.boxes or (m.hint_x is None and m.hint_y is None and m.depth is None):
            continue
        boxes = _subtree(groups, i)
        own = g.boxes
        cx = sum((b[0] + b[2]) / 2 for b in own) / len(own)
        cy = sum((b[1] + b[3]) / 2 for b in own) / len(own)
        dx = dy = 0.0
        if m.hint_x == 0 and cx > 360 or m.hint_x == 2 and cx < 640 or m.hint_x == 1 and abs(cx - 500) > 150:
            dx = _X_TARGET[m.hint_x] - cx
        if m.hint_y == 0 and cy > 360:
            dy = 220.0 - cy
        elif (m.hint_y == 2 or m.depth == 2) and cy < 590:
            dy = 760.0 - cy
        elif m.hint_y == 1 and abs(cy - 500) > 150:
            dy = 500.0 - cy
        if dx or dy:
            _shift_boxes(boxes, dx, dy)
        if m.depth == 0:
            big = max((b[2] - b[0]) * (b[3] - b[1]) for b in own)
            if big > 0.28 * FRAME * FRAME and cy >= 540:
                _shift_boxes(boxes, 0.0, 500.0 - cy)


MAIN_MIN_AREA = 0.06 * FRAME * FRAME
OTHER_MAIN_MIN_AREA = 0.06 * FRAME * FRAME
SEEN_MIN_AREA = 0.0   # other things keep their real-world size


def _depth(groups: dict[int, Group], g: Group) -> int:
    d, p = 0, g.parent
    while p is not None and d < 64:
        d, p = d + 1, groups[p].parent
    return d


def _min_area(g: Group, first: int, few: bool) -> float:
    if g.mention.main:
        return MAIN_MIN_AREA if g.mention.index == first else OTHER_MAIN_MIN_AREA
    return SEEN_MIN_AREA if few else 0.0


def _prominent(groups: dict[int, Group]) -> None:
    """A main subject (or, in a scene of a few things, anything) squeezed below its minimum area grows:
    one instance about its centre (resting things about their base), several as a block about the
    block's centre, so instances never come to overlap."""
    few = len(groups) <= 6
    first = min(groups) if groups else 0
    for g in sorted(groups.values(), key=lambda g: _depth(groups, g)):   # supports before what rests on them
        if g.boxes and g.how != "inside":
            _grow_stage(groups, g.mention.index, first, few)
        if not g.boxes or g.how == "inside":
            continue   # a contained thing must stay in its container
        want = _min_area(g, first, few)
        big = max((b[2] - b[0]) * (b[3] - b[1]) for b in g.boxes)
        if big >= want:
            continue
        f = min(2.5, (want / max(big, 1.0)) ** 0.5)
        u = _union(g.boxes)
        cx, cy = (u[0] + u[2]) / 2, (u[1] + u[3]) / 2
        if g.how in ("on", "above", "below") and g.parent is not None and groups[g.parent].boxes:
            # stay over (or under) the thing it relates to: no wider than most of it
            if g.how == "on":
                cy = u[3]
            pu = _union(groups[g.parent].boxes)
            share = 0.95 if g.mention.main and len(g.boxes) == 1 else 0.5
            f = min(f, share * (pu[2] - pu[0]) / max(1.0, u[2] - u[0]))
            cx = min(max(cx, pu[0] + (u[2] - u[0]) * f / 2), pu[2] - (u[2] - u[0]) * f / 2)
        f = min(f, (FRAME - 2 * EDGE) / max(1.0, u[2] - u[0]), (FRAME - 2 * EDGE) / max(1.0, u[3] - u[1]))
        for b in g.boxes:
            b[:] = [cx + (b[0] - cx) * f, cy + (b[1] - cy) * f, cx + (b[2] - cx) * f, cy + (b[3] - cy) * f]
        _shift_boxes(g.boxes, 0.0, 0.0)   # back inside the canvas
        nu = _union(g.boxes)
        for c in g.children:   # what rests on it or hangs from it moves with it
            kid = groups[c]
            dy = nu[1] - u[1] if kid.how == "on" else ((nu[1] + nu[3]) - (u[1] + u[3])) / 2
            _shift_boxes(_subtree(groups, c), ((nu[0] + nu[2]) - (u[0] + u[2])) / 2, dy)


def _staged(groups: dict[int, Group], i: int) -> list[int]:
    """The groups resting on or inside group ``i``, at any depth."""
    out = []
    for c in groups[i].children:
        if groups[c].how in ("on", "inside"):
            out += [c, *_staged(groups, c)]
    return out


def _grow_stage(groups: dict[int, Group], i: int, first: int, few: bool) -> None:
    """Main things resting on a support or inside a container ("three eggplants on a table", "butterflies
    atop a tangerine") too small to be seen: the support and everything on it grow together about the
    support's base, so every on / inside relation holds as before."""
    need = 1.0
    for c in _staged(groups, i):
        kid = groups[c]
        if kid.mention.main and kid.boxes:
            big = max((b[2] - b[0]) * (b[3] - b[1]) for b in kid.boxes)
            need = max(need, (_min_area(kid, first, few) / max(big, 1.0)) ** 0.5)
    if need <= 1.0:
        return
    stage = _subtree(groups, i)
    u = _union(stage)
    base = _union(groups[i].boxes)
    cx, cy = (base[0] + base[2]) / 2, base[3]
    f = min(need, 2.5, (FRAME - 2 * EDGE) / max(1.0, u[2] - u[0]), (FRAME - 2 * EDGE) / max(1.0, u[3] - u[1]))
    if f <= 1.0:
        return
    for b in stage:
        b[:] = [cx + (b[0] - cx) * f, cy + (b[1] - cy) * f, cx + (b[2] - cx) * f, cy + (b[3] - cy) * f]
    _shift_boxes(stage, 0.0, 0.0)   # back inside the canvas


def _int_box(b: list[float]) -> tuple[int, int, int, int]:
    x1, y1 = max(0, min(999, round(b[0]))), max(0, min(999, round(b[1])))
    x2, y2 = max(x1 + 1, min(1000, round(b[2]))), max(y1 + 1, min(1000, round(b[3])))
    return x1, y1, x2, y2
