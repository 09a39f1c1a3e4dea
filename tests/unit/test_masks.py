"""Region masks: exact boxes at any size, overlap policies, feathering that keeps a partition of unity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mepg_core.layout import Layout, Region, box_to_grid, parse_layout
from mepg_core.masks import region_masks
from mepg_core.preview import draw_layout, region_colour
from mepg_core.regions import build_region_set

SIZES = [(1024, 1024), (832, 1216), (1000, 600), (104, 152), (125, 75)]


def make_layout(*boxes, styles=None) -> Layout:
    regions = [{"label": f"r{i}", "prompt": f"region {i}", "box": list(b),
                "style": (styles or [None] * len(boxes))[i]} for i, b in enumerate(boxes)]
    return parse_layout({"version": 1, "global_prompt": "g", "regions": regions})[0]


SOFA_CAT = make_layout((0, 300, 1000, 1000), (100, 400, 400, 700))


@pytest.mark.parametrize("w,h", SIZES)
def test_hard_masks_are_exactly_the_boxes(w, h):
    layout = make_layout((123, 77, 456, 999), (600, 10, 990, 400))
    m = region_masks(layout, w, h, overlap="overlap")
    for i, region in enumerate(layout.regions):
        x1, y1, x2, y2 = box_to_grid(region.box, w, h)
        expected = torch.zeros(h, w)
        expected[y1:y2, x1:x2] = 1
        assert torch.equal(m.regions[i], expected)
    assert torch.equal(m.background, 1 - (m.regions.sum(0) > 0).float())


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("policy", ["smaller_on_top", "later_on_top"])
def test_exclusive_policies_partition_the_canvas(w, h, policy):
    m = region_masks(SOFA_CAT, w, h, overlap=policy)
    total = m.regions.sum(0) + m.background
    assert torch.equal(total, torch.ones(h, w))


def test_smaller_on_top_gives_the_overlap_to_the_small_box():
    m = region_masks(SOFA_CAT, 1000, 1000, overlap="smaller_on_top")
    assert m.regions[1, 500, 200] == 1 and m.regions[0, 500, 200] == 0
    assert m.regions[1].sum() == 300 * 300
    assert m.regions[0].sum() == 1000 * 700 - 300 * 300


def test_later_on_top_follows_list_order():
    flipped = SOFA_CAT.with_regions(reversed(SOFA_CAT.regions))  # cat first, sofa last
    m = region_masks(flipped, 1000, 1000, overlap="later_on_top")
    assert m.regions[0].sum() == 0  # the sofa, painted last, hides the cat entirely
    assert m.regions[1, 500, 200] == 1


def test_overlap_policy_keeps_both():
    m = region_masks(SOFA_CAT, 1000, 1000, overlap="overlap")
    assert m.regions[0, 500, 200] == 1 and m.regions[1, 500, 200] == 1


@pytest.mark.parametrize("w,h", [(1000, 600), (832, 1216)])
def test_feathering_keeps_sum_one_and_softens_edges(w, h):
    m = region_masks(SOFA_CAT, w, h, overlap="smaller_on_top", feather=6)
    total = m.regions.sum(0) + m.background
    assert torch.allclose(total, torch.ones(h, w), atol=1e-5)
    x1, y1, x2, y2 = box_to_grid(SOFA_CAT.regions[1].box, w, h)
    assert m.regions[1, (y1 + y2) // 2, (x1 + x2) // 2] == pytest.approx(1.0)
    edge = m.regions[1, (y1 + y2) // 2, x1]
    assert 0.2 < edge < 0.8
    assert m.regions[1, (y1 + y2) // 2, x1 - 7] == 0  # nothing beyond the feather radius


def test_feathering_does_not_fade_at_the_canvas_border():
    layout = make_layout((0, 0, 1000, 1000))
    m = region_masks(layout, 64, 48, feather=5)
    assert torch.allclose(m.regions[0], torch.ones(48, 64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        region_masks(SOFA_CAT, 64, 64, overlap="max")
    with pytest.raises(ValueError, match="positive"):
        region_masks(SOFA_CAT, 0, 64)


@pytest.mark.parametrize("w,h", [(832, 1216), (1000, 600), (1024, 1024)])
def test_region_set_latent_masks_are_exact_on_the_latent_grid(w, h):
    rs = build_region_set(SOFA_CAT, w, h, overlap="overlap")
    assert rs.latent_masks().shape == (2, h // 8, w // 8)
    for spec in rs.regions:
        x1, y1, x2, y2 = spec.latent_box
        assert spec.latent_mask.sum() == (x2 - x1) * (y2 - y1)
        assert spec.latent_mask[y1:y2, x1:x2].min() == 1
        px1, py1, px2, py2 = spec.pixel_box
        assert spec.mask.sum() == (px2 - px1) * (py2 - py1)
        # The latent box is the pixel box on the latent grid, within one cell.
        assert all(abs(a * 8 - b) <= 8 for a, b in zip(spec.latent_box, spec.pixel_box))


def test_region_set_carries_region_facts():
    layout = make_layout((0, 0, 500, 500), styles=["anime"])
    rs = build_region_set(layout, 512, 512)
    spec = rs.regions[0]
    facts = (spec.label, spec.style, spec.pixel_box, spec.latent_box)
    assert facts == ("r0", "anime", (0, 0, 256, 256), (0, 0, 32, 32))
    assert rs.background.shape == (512, 512) and rs.latent_background.shape == (64, 64)


def test_preview_draws_each_box_in_its_colour():
    layout = Layout("g", (Region("cat", "a cat", (100, 100, 500, 500), "photo"),
                          Region("dog", "a dog", (600, 600, 900, 900))))
    img = draw_layout(layout, 200, 100)
    assert img.shape == (100, 200, 3) and img.dtype == np.float32
    # The outline's left edge of region 0 is at x = 20, in the middle of the box height.
    px = (img[30, 20] * 255).round()
    assert np.allclose(px, region_colour(0), atol=2)
    bg = np.zeros((50, 50, 3), np.float32) + 0.5
    over = draw_layout(layout, 200, 100, background=bg)
    assert np.allclose(over[5, 5], 0.5, atol=0.01)  # outside every box the image shows through
