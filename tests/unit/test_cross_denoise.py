"""The cross-denoise schedule and fusion, checked against direct computations with fake denoisers."""

from __future__ import annotations

import pytest
import torch

from mepg_core import cross_denoise as cd
from mepg_core.layout import Layout, Region
from mepg_core.regions import build_region_set


def settings(**kw):
    return cd.CrossDenoiseSettings(**{"p1": 0.7, "interleave": 0, **kw})


def test_stage_follows_the_papers_rule():
    plan = cd.stage_plan(50, settings())
    assert plan[:35] == ["local"] * 35 and plan[35:] == ["global"] * 15
    assert cd.stage_plan(10, settings(p1=0.5)) == ["local"] * 5 + ["global"] * 5
    assert cd.stage_plan(7, settings(p1=0.0)) == ["global"] * 7
    assert cd.stage_plan(7, settings(p1=1.0)) == ["local"] * 7


def test_interleave_inserts_global_steps_in_the_local_phase():
    plan = cd.stage_plan(12, settings(p1=0.75, interleave=3))
    assert plan == ["local", "local", "global"] * 3 + ["global"] * 3


def test_alpha_ramps_linearly_over_local_steps():
    s = settings(p1=0.5, alpha_start=1.0, alpha_end=0.5)
    alphas = [cd.local_alpha(i, 10, s) for i in range(5)]
    assert alphas == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])


@pytest.mark.parametrize("bad", [dict(p1=1.5), dict(interleave=-1), dict(alpha_start=2.0), dict(align=0)])
def test_bad_settings(bad):
    with pytest.raises(ValueError, match="cross-denoise settings"):
        cd.CrossDenoiseSettings(**bad).validate()


def test_step_index_maps_intermediate_sigmas_to_their_step():
    sigmas = [10.0, 5.0, 2.0, 0.5, 0.0]
    got = [cd.step_index(s, sigmas) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.1)]
    assert got == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("box,size,expected", [
    ((10, 10, 20, 20), (125, 75), (0, 0, 32, 32)),
    ((0, 0, 125, 75), (125, 75), (0, 0, 125, 75)),
    ((100, 60, 125, 75), (125, 75), (85, 51, 125, 75)),
    ((40, 30, 50, 40), (128, 128), (29, 19, 61, 51)),
])
def test_windows_grow_by_margin_and_align(box, size, expected):
    win = cd.window_for_box(box, size[0], size[1], margin=8, align=8)
    assert win == expected
    x1, y1, x2, y2 = win
    assert x1 <= box[0] and y1 <= box[1] and x2 >= box[2] and y2 >= box[3]


def region_set(feather=0.0, size=(256, 192)):
    layout = Layout("g", (Region("a", "a", (50, 100, 450, 900)), Region("b", "b", (400, 50, 950, 500))))
    return build_region_set(layout, *size, feather_px=feather)


def test_plan_windows_contain_feathered_masks_and_visibility_isolates_regions():
    rs = region_set(feather=24.0)
    plan = cd.make_local_plan(rs.latent_masks(), [r.latent_box for r in rs.regions], settings(context_margin=1), 10)
    for i, (x1, y1, x2, y2) in enumerate(plan.windows):
        outside = plan.masks[i].clone()
        outside[y1:y2, x1:x2] = 0
        assert outside.sum() == 0
        assert torch.equal(plan.masks[i], rs.latent_masks()[i])  # window grew to hold the whole feather
    # each pass sees the latent only where no other region has weight
    support = plan.masks > 0
    assert not (plan.visible[0] & support[1]).any() and not (plan.visible[1] & support[0]).any()
    assert torch.equal(plan.visible[2], ~support.any(0))


def test_fusion_weights_sum_to_one_and_follow_alpha():
    rs = region_set(feather=16.0)
    plan = cd.make_local_plan(rs.latent_masks(), [r.latent_box for r in rs.regions], settings(), 10)
    for alpha in (1.0, 0.6):
        w, bg = cd.fusion_weights(plan, alpha)
        assert torch.allclose(w.sum(0) + bg, torch.ones_like(bg), atol=1e-6)
        assert torch.allclose(w, plan.masks * alpha, atol=1e-6)  # no overlap above 1 here


def test_fusion_renormalises_overlapping_regions():
    masks = torch.ones(2, 8, 8)
    plan = cd.make_local_plan(masks, [(0, 0, 8, 8)] * 2, settings(), 4)
    w, bg = cd.fusion_weights(plan, 1.0)
    assert torch.allclose(w, torch.full_like(w, 0.5)) and bg.abs().max() == 0


def test_local_step_fuses_window_predictions_exactly():
    rs = region_set(feather=16.0)
    plan = cd.make_local_plan(rs.latent_masks(), [r.latent_box for r in rs.regions], settings(), 10)
    x = torch.randn(2, 4, 24, 32)
    x_ref = torch.randn(2, 4, 24, 32)
    seen = {}

    def denoise(i, x_in):
        seen[i] = x_in.clone()
        return torch.full_like(x_in, float(i + 1))  # region a -> 1, region b -> 2, background -> 3

    out = cd.local_step(x, x_ref, plan, 0.8, denoise)
    w, bg = cd.fusion_weights(plan, 0.8)
    expected = (w[0] * 1 + w[1] * 2 + bg * 3).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-6)
    # each pass got its window crop, showing x where visible and the reference elsewhere
    for i, (x1, y1, x2, y2) in enumerate(plan.windows):
        composed = torch.where(plan.visible[i], x, x_ref)[..., y1:y2, x1:x2]
        assert torch.equal(seen[i], composed)
    bx1, by1, bx2, by2 = cd.background_window(bg, plan.settings.context_margin, plan.settings.align)
    assert torch.equal(seen[2], torch.where(plan.visible[2], x, x_ref)[..., by1:by2, bx1:bx2])


def test_background_pass_runs_on_the_window_around_its_weight():
    # one region fills the left half: the background needs the right half plus its context margin
    masks = torch.zeros(1, 16, 32)
    masks[0, :, :16] = 1.0
    plan = cd.make_local_plan(masks, [(0, 0, 16, 16)], settings(context_margin=2, align=4), 4)
    x, x_ref = torch.randn(1, 4, 16, 32), torch.randn(1, 4, 16, 32)
    shapes = {}

    def denoise(i, x_in):
        shapes[i] = tuple(x_in.shape[-2:])
        return torch.full_like(x_in, float(i + 1))

    out = cd.local_step(x, x_ref, plan, 1.0, denoise)
    _, bg = cd.fusion_weights(plan, 1.0)
    assert cd.background_window(bg, 2, 4) == (12, 0, 32, 16)
    assert shapes[1] == (16, 20)  # 16 cells of background + 2 of margin, aligned up to 20
    assert torch.equal(out[..., :16], torch.ones_like(out[..., :16]))
    assert torch.equal(out[..., 16:], torch.full_like(out[..., 16:], 2.0))
    # with alpha < 1 the background weighs everywhere, so its window is the whole latent
    cd.local_step(x, x_ref, plan, 0.5, denoise)
    assert shapes[1] == (16, 32)
    assert cd.background_window(torch.zeros(4, 4), 1, 1) is None


def test_local_step_skips_passes_without_weight():
    masks = torch.ones(1, 8, 8)
    plan = cd.make_local_plan(masks, [(0, 0, 8, 8)], settings(), 4)
    calls = []
    cd.local_step(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), plan, 1.0,
                  lambda i, x: calls.append(i) or x)
    assert calls == [0]  # the background has no weight anywhere


# ---------------------------------------------------------------------------------------------- region weight


def test_region_weight_scales_its_share_and_overlaps_split_by_weight():
    rs = region_set(feather=16.0)
    boxes = [r.latent_box for r in rs.regions]
    plan = cd.make_local_plan(rs.latent_masks(), boxes, settings(), 10, region_weights=[0.5, 2.0])
    w, bg = cd.fusion_weights(plan, 0.8)
    assert torch.allclose(w.sum(0) + bg, torch.ones_like(bg), atol=1e-6)
    raw = plan.masks * 0.8 * torch.tensor([0.5, 2.0])[:, None, None]
    capped = raw.sum(0) > 1
    assert capped.any() and (~capped).any()
    assert torch.allclose(w[:, ~capped], raw[:, ~capped], atol=1e-6)  # weight x alpha x mask
    assert torch.allclose(w[:, capped], raw[:, capped] / raw.sum(0)[capped], atol=1e-6)  # shares by weight
    # fully overlapping regions of weight 3 and 1 share 3 : 1
    masks = torch.ones(2, 8, 8)
    w, bg = cd.fusion_weights(cd.make_local_plan(masks, [(0, 0, 8, 8)] * 2, settings(), 4, [3.0, 1.0]), 1.0)
    assert torch.allclose(w[0], torch.full_like(w[0], 0.75)) and torch.allclose(w[1], torch.full_like(w[1], 0.25))
    assert bg.abs().max() == 0


def test_a_region_of_weight_zero_is_as_if_it_were_not_there():
    rs = region_set(feather=8.0)
    boxes = [r.latent_box for r in rs.regions]
    masks = rs.latent_masks()
    with_zero = cd.make_local_plan(masks, boxes, settings(), 10, region_weights=[0.0, 1.0])
    without = cd.make_local_plan(masks[1:], boxes[1:], settings(), 10)
    x, x_ref = torch.randn(1, 4, 24, 32), torch.randn(1, 4, 24, 32)

    def denoiser(names: dict[int, str], ran: list[str]):
        def run(i, x_in):
            ran.append(names[i])
            # the answer depends on what the pass sees, so a planted isolation bug changes the output
            return x_in * {"a": 3.0, "b": 1.5, "bg": 0.5}[names[i]] + {"a": 7.0, "b": 1.0, "bg": -1.0}[names[i]]
        return run

    ran_zero, ran_without = [], []
    out_zero = cd.local_step(x, x_ref, with_zero, 0.9, denoiser({0: "a", 1: "b", 2: "bg"}, ran_zero))
    out_without = cd.local_step(x, x_ref, without, 0.9, denoiser({0: "b", 1: "bg"}, ran_without))
    assert ran_zero == ran_without == ["b", "bg"]
    assert torch.allclose(out_zero, out_without, atol=1e-6)
    default = cd.local_step(x, x_ref, cd.make_local_plan(masks, boxes, settings(), 10), 0.9,
                            denoiser({0: "a", 1: "b", 2: "bg"}, []))
    assert (default - out_zero).abs().max() > 0.1  # weight 1 (the default) does use region a


@pytest.mark.parametrize("weights", [[1.0], [float("nan"), 1.0], [-1.0, 1.0]])
def test_region_weights_are_checked(weights):
    rs = region_set()
    with pytest.raises(ValueError, match="region weights must be 2 finite numbers >= 0"):
        cd.make_local_plan(rs.latent_masks(), [r.latent_box for r in rs.regions], settings(), 10, weights)


# ---------------------------------------------------------------------------------------------- global phase


def test_global_alpha_falls_over_the_global_phase_and_is_zero_in_bias_mode():
    s = settings(p1=0.5, interleave=2, global_alpha_start=0.4, global_alpha_end=0.0)
    alphas = [cd.global_alpha(i, 10, s) for i in range(10)]
    # steps 0-4 are the local phase (interleaved global steps there use the start value), 5-9 the global phase
    assert alphas == pytest.approx([0.4] * 6 + [0.3, 0.2, 0.1, 0.0])
    assert cd.global_alpha(9, 10, settings(global_mode="bias", global_alpha_start=0.4)) == 0.0
    with pytest.raises(ValueError, match="global_mode must be one of"):
        settings(global_mode="blend").validate()
    with pytest.raises(ValueError, match="global_alpha_end must be in"):
        settings(global_alpha_end=1.5).validate()


def test_global_step_fuses_the_global_pass_with_region_windows():
    """Region ``i`` weighs ``alpha * m_i`` inside its window, the global pass the rest; every pass sees the
    current latent (no isolation). Planted bugs this kills: alpha ignored, the global pass dropped or
    given full weight inside regions, region passes fed the reference latent or the whole canvas."""
    rs = region_set(feather=16.0)
    plan = cd.make_local_plan(rs.latent_masks(), [r.latent_box for r in rs.regions], settings(), 10)
    x = torch.randn(2, 4, 24, 32)
    seen = {}

    def denoise(i, x_in):
        seen[i] = x_in.clone()
        return x_in * (i + 2.0) - i  # depends on what the pass sees

    out = cd.global_step(x, plan, 0.3, denoise)
    w, g = cd.fusion_weights(plan, 0.3)
    expected = g * (x * 4.0 - 2)
    for i, (x1, y1, x2, y2) in enumerate(plan.windows):
        assert torch.equal(seen[i], x[..., y1:y2, x1:x2])
        full = torch.zeros_like(x)
        full[..., y1:y2, x1:x2] = x[..., y1:y2, x1:x2] * (i + 2.0) - i
        expected = expected + w[i] * full
    assert torch.equal(seen[2], x)
    assert torch.allclose(out, expected, atol=1e-5)
    calls = []
    plain = cd.global_step(x, plan, 0.0, lambda i, x_in: calls.append(i) or x_in * 4.0 - 2)
    assert calls == [2] and torch.allclose(plain, x * 4.0 - 2)  # alpha 0: one plain global pass
