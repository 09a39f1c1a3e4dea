"""Gate training core (pure torch): objective, schedule, ε-greedy, checkpoints, failures, data."""

from __future__ import annotations

import math
import os

import pytest
import torch
from mepg_expert_testing import unet_tensors
from mepg_training_testing import BLOCK, ToyDenoiser, make_moe, make_stack
from PIL import Image

from mepg_core.experts import ExpertSpec, load_expert_stack
from mepg_core.gate_files import load_gate_file
from mepg_core.gate_training import (
    GateTrainer,
    GateTrainingConfig,
    GateTrainingError,
    ImageCaptionFolder,
    LatentDataset,
    aspect_buckets,
    check_only_gates_trainable,
    checkpoint_steps,
    encode_folder,
    learning_rate_at,
    load_latent_dataset,
    main,
    mean_routing,
    noisy_latent,
    prediction_from_denoised,
    prediction_target,
    read_training_state,
    routing_recorder,
    save_latent_dataset,
    sdxl_sigmas,
)
from mepg_core.gating import (
    Exploration,
    GatedLinear,
    GateOptions,
    GateSet,
    RoutingContext,
    SiteGate,
    build_moe_modules,
    mix_weights,
)

TEACHER = 2


@pytest.fixture(scope="module")
def stack():
    return make_stack()


def latents(count, size=8, seed=1):
    return torch.randn(count, 4, size, size, generator=torch.Generator().manual_seed(seed))


def make_trainer(stack, moe=None, steps=6, dataset=None, denoise=None, **config):
    moe = moe or make_moe(stack)
    model = denoise or ToyDenoiser(moe)
    dataset = dataset or LatentDataset(latents(6), [None])
    cfg = GateTrainingConfig(steps=steps, learning_rate=config.pop("learning_rate", 0.05), **config)
    return GateTrainer(moe, model, dataset, cfg, stack=stack, frozen=[model] if denoise is None else []), model


# ---------------------------------------------------------------------------------------------- objective


def test_sdxl_schedule_and_prediction_targets():
    sigmas = sdxl_sigmas()
    assert sigmas.shape == (1000,) and bool((sigmas[1:] > sigmas[:-1]).all())
    assert sigmas[0].item() == pytest.approx(0.02916, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)
    x0, noise = latents(3, seed=2), latents(3, seed=3)
    sigma = torch.tensor([0.1, 1.0, 9.0])
    x = noisy_latent(x0, noise, sigma)
    assert torch.allclose(x, x0 + sigma[:, None, None, None] * noise)
    # A perfect denoiser's x0 maps back to each parameterisation's target (ComfyUI's EPS / V_PREDICTION).
    for kind in ("eps", "v"):
        target = prediction_target(x0, noise, sigma, kind)
        assert torch.allclose(prediction_from_denoised(x, sigma, x0, kind), target, atol=1e-4)
    s = sigma[:, None, None, None]
    v = prediction_target(x0, noise, sigma, "v")
    alpha, sd = 1 / torch.sqrt(1 + s**2), s / torch.sqrt(1 + s**2)
    assert torch.allclose(v, alpha * noise - sd * x0, atol=1e-6)
    # ComfyUI's V_PREDICTION.calculate_denoised, written out: x/(σ²+1) - v·σ/√(σ²+1) = x0
    assert torch.allclose(x / (s**2 + 1) - v * s / torch.sqrt(s**2 + 1), x0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(x0, noise, sigma, "x0")


def test_warmup_then_cosine_learning_rate():
    lr = [learning_rate_at(s, 110, 1.0, warmup_steps=10) for s in range(110)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.5)  # half-way through the cosine
    assert lr[109] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert learning_rate_at(200, 110, 1.0, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert learning_rate_at(0, 5, 2.0) == pytest.approx(2.0)  # no warm-up: starts at the peak


# ---------------------------------------------------------------------------------------------- what trains


def test_only_gate_parameters_train(stack):
    moe = make_moe(stack)
    trainer, model = make_trainer(stack, moe=moe, steps=3)
    gate_names = {name for name, _ in trainer.named_params}
    assert gate_names and all(name.rsplit(".", 1)[-1].startswith("gate_") for name in gate_names)
    experts_before = {k: v.clone() for k, v in moe.state_dict().items() if "gate_" not in k}
    base_before = [model.proj_in.clone(), model.proj_out.clone()]
    gates_before = {k: v.clone() for k, v in moe.state_dict().items() if "gate_" in k}
    result = trainer.train()
    assert result.steps == 3 and len(result.loss_history) == 3
    after = moe.state_dict()
    assert all(torch.equal(after[k], v) for k, v in experts_before.items())
    assert torch.equal(model.proj_in, base_before[0]) and torch.equal(model.proj_out, base_before[1])
    q_bias = f"gated.{BLOCK.replace('.', '__')}__attn1__to_q.gate_bias"
    assert not torch.equal(after[q_bias], gates_before[q_bias])  # the gates the toy runs did move
    assert all(p.grad is None for p in moe.parameters())

    with pytest.raises(ValueError, match="base model requires a gradient"):
        check_only_gates_trainable(moe, [torch.nn.Linear(2, 2)])
    uniform = build_moe_modules(stack)
    with pytest.raises(ValueError, match="'uniform'"):
        check_only_gates_trainable(uniform)
    leaky = make_moe(stack)
    next(p for n, p in leaky.named_parameters() if "expert_weight" in n).requires_grad_(True)
    with pytest.raises(ValueError, match="expert weights must stay frozen"):
        check_only_gates_trainable(leaky)
    # A denoise function that never runs the gated modules: no gradient reaches the gates.
    trainer, _ = make_trainer(stack, steps=2, denoise=lambda x, s, c: x * torch.ones((), requires_grad=True))
    with pytest.raises(GateTrainingError, match="no gradient reached the gates"):
        trainer.train()


# ---------------------------------------------------------------------------------------------- ε-greedy


def kept_sets(weights):
    return weights > 0


def test_epsilon_greedy_redraws_top_k_sets_at_the_right_rate():
    n, e, k, eps = 40_000, 4, 2, 0.05
    raw = torch.rand(n, e, generator=torch.Generator().manual_seed(5))
    greedy = mix_weights(raw, k, True)
    exploration = Exploration(eps, torch.Generator().manual_seed(6))
    explored = mix_weights(raw, k, True, exploration)
    changed = (kept_sets(greedy) != kept_sets(explored)).any(-1).float().mean().item()
    expected = eps * (1 - 1 / math.comb(e, k))  # a random set equals the greedy one 1 time in C(4, 2)
    assert changed == pytest.approx(expected, abs=0.006)
    assert exploration.tokens == n and exploration.explored / n == pytest.approx(eps, abs=0.006)
    assert bool((kept_sets(explored).sum(-1) == k).all())
    assert torch.allclose(explored.sum(-1), torch.ones(n))
    # ε = 0 and dense routing leave the greedy weights alone.
    assert torch.equal(mix_weights(raw, k, True, Exploration(0.0)), greedy)
    assert torch.equal(mix_weights(raw, None, True, Exploration(0.5)), mix_weights(raw, None, True))
    with pytest.raises(ValueError, match="epsilon"):
        Exploration(1.5)


def test_exploration_through_the_runtime_of_a_gated_site():
    e, d = 4, 6
    g = torch.Generator().manual_seed(3)
    gate = SiteGate("linear", e, weight=torch.randn(e, d, generator=g), bias=torch.zeros(e))
    site = GatedLinear(torch.randn(e, 5, d, generator=g), None, gate, input_kind="spatial", path="toy")
    site.runtime.options = GateOptions(top_k=1)
    x = torch.randn(1, 20_000, d, generator=torch.Generator().manual_seed(7))
    seen = []
    with site.runtime.observing(lambda module, w: seen.append(w)):
        greedy_out = site(x)
        with site.runtime.exploring(Exploration(0.05, torch.Generator().manual_seed(8))):
            explored_out = site(x)
        assert site.runtime.exploration is None
    greedy, explored = seen
    assert torch.equal(greedy, site.routing_weights(x))  # the observer sees what forward used
    changed = (kept_sets(greedy) != kept_sets(explored)).any(-1).float().mean().item()
    assert changed == pytest.approx(0.05 * 3 / 4, abs=0.006)
    rows = (kept_sets(greedy) == kept_sets(explored)).all(-1)[0]
    # tokens whose expert set did not change give the same output (up to the rounding of another
    # mixing order; a changed expert would differ by O(1))
    torch.testing.assert_close(greedy_out[0, rows], explored_out[0, rows], rtol=0, atol=1e-5)
    assert (greedy_out[0, ~rows] - explored_out[0, ~rows]).abs().amax(-1).min() > 1e-3
    assert not site.runtime.observers


def test_trainer_explores_only_with_top_k(stack):
    trainer, _ = make_trainer(stack, moe=make_moe(stack, GateOptions(top_k=2)), steps=2, epsilon=0.05, batch_size=6)
    result = trainer.train()
    # 1536 token-site draws; a redrawn set equals the greedy one with probability 1 / C(4, 2)
    assert trainer.exploring and result.explored_fraction == pytest.approx(0.05 * (1 - 1 / 6), abs=0.015)
    dense, _ = make_trainer(stack, steps=1, epsilon=0.05)
    assert not dense.exploring and dense.train().explored_fraction is None
    with pytest.raises(ValueError, match="top-1 routing"):
        make_trainer(stack, moe=make_moe(stack, GateOptions(top_k=1)), steps=1)


def test_routing_context_tiles_the_sigmas_of_one_chunk():
    # ComfyUI batches cond and uncond chunks of the same latents and passes the sigmas of one chunk.
    ctx = RoutingContext(4, sigma=[1.0, 2.0])
    assert ctx.sigma.tolist() == [1.0, 2.0, 1.0, 2.0]
    assert RoutingContext(3, sigma=[5.0]).sigma.tolist() == [5.0] * 3
    with pytest.raises(ValueError, match="sigma has 2 rows, the batch has 3"):
        RoutingContext(3, sigma=[1.0, 2.0])


def test_inference_mode_expert_weights_can_be_trained_through():
    # ComfyUI creates weights under torch.inference_mode; a gradient through them needs a per-call copy.
    e, d = 3, 4
    with torch.inference_mode():
        weights = torch.randn(e, 5, d)
    site = GatedLinear(weights, None, SiteGate("linear", e, weight=torch.zeros(e, d), bias=torch.zeros(e)))
    for p in site.parameters():
        p.requires_grad_(p is site.gate_weight or p is site.gate_bias)
    x = torch.randn(1, 7, d, requires_grad=True)
    site(x).square().sum().backward()
    assert site.gate_bias.grad is not None and x.grad is not None


# ---------------------------------------------------------------------------------------------- learning


def teacher_dataset(stack, count, seed, size=8):
    """Pre-noised pairs whose ε target is the teacher's own prediction: routing to it is the minimiser."""
    moe = build_moe_modules(stack, GateSet.forced(stack.num_experts, TEACHER))
    teacher = ToyDenoiser(moe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, size, size, generator=g) * 2
    sigma = sdxl_sigmas()[torch.randint(0, 1000, (count,), generator=g)]
    with torch.no_grad():
        eps = teacher(x, sigma, [None] * count)
    x0 = x - sigma[:, None, None, None] * eps
    return LatentDataset(x0, [None], noise=eps, sigmas=sigma)


def test_gate_learns_to_route_to_the_teacher(stack):
    train, held_out = teacher_dataset(stack, 16, seed=1), teacher_dataset(stack, 8, seed=2)
    moe = make_moe(stack)
    trainer, model = make_trainer(stack, moe=moe, steps=200, dataset=train, learning_rate=0.3, batch_size=4,
                                  warmup_steps=10)
    result = trainer.train()
    first, last = sum(result.loss_history[:5]) / 5, sum(result.loss_history[-5:]) / 5
    assert last < 0.01 * first, (first, last)
    batch = held_out.batch(range(len(held_out)))
    with torch.no_grad(), routing_recorder(moe) as record:
        model(noisy_latent(batch["x0"], batch["noise"], batch["sigma"]), batch["sigma"], batch["conds"])
    overall, per_site = mean_routing(record)
    assert overall[TEACHER] >= 0.9, overall
    assert set(per_site) == {f"{BLOCK}.attn1.to_q", f"{BLOCK}.ff"}


def test_style_labels_pull_routing_to_the_tagged_expert(stack):
    data = LatentDataset(latents(4), [None], styles=["anime"] * 4)
    moe = make_moe(stack)
    trainer, model = make_trainer(stack, moe=moe, steps=30, dataset=data, style_loss_weight=1.0,
                                  learning_rate=0.1)
    result = trainer.train()
    assert result.aux_history[-1] < result.aux_history[0]
    with torch.no_grad(), routing_recorder(moe) as record:
        model(latents(2, seed=9), torch.tensor([1.0, 5.0]), [None, None])
    assert mean_routing(record)[0].argmax().item() == stack.expert_index("anime")


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(stack, tmp_path):
    options = GateOptions(top_k=2)  # with ε-greedy exploration on: its draws must resume too
    settings = dict(steps=6, batch_size=2, grad_accumulation=2, warmup_steps=2, epsilon=0.2)
    straight, _ = make_trainer(stack, moe=make_moe(stack, options), **settings)
    reference = straight.train()

    run_dir = tmp_path / "run"
    first, _ = make_trainer(stack, moe=make_moe(stack, options), checkpoint_dir=str(run_dir), checkpoint_every=2,
                            **settings)
    partial = first.train(should_stop=lambda: first.step >= 3)
    assert partial.stopped and partial.steps == 3
    assert checkpoint_steps(str(run_dir)) == [2, 3]
    info = read_training_state(run_dir / "state-step0000003.safetensors")
    assert info["step"] == 3 and info["micro_step"] == 6 and len(info["loss_history"]) == 3

    second, _ = make_trainer(stack, moe=make_moe(stack, options, seed=99), checkpoint_dir=str(run_dir),
                             checkpoint_every=2, **settings)
    assert second.resume(str(run_dir)) == 3
    resumed = second.train()
    assert resumed.loss_history == reference.loss_history
    for path, (w, b, s) in reference.gates.params.items():
        rw, rb, rs = resumed.gates.params[path]
        assert torch.equal(w, rw) and torch.equal(b, rb) and torch.equal(s, rs)
    assert checkpoint_steps(str(run_dir)) == [3, 4, 6]  # keep_checkpoints = 3: step 2 was pruned
    # The exported gate file loads for the same stack, with the run's routing options.
    loaded = load_gate_file(run_dir / "gates-step0000006.safetensors", stack)
    assert loaded.options == options and torch.equal(loaded.gates.params[f"{BLOCK}.ff"][1],
                                                      resumed.gates.params[f"{BLOCK}.ff"][1])
    assert main(["show", str(run_dir)]) == 0


def test_resume_refuses_another_stack(stack, tmp_path):
    trainer, _ = make_trainer(stack, steps=1, checkpoint_dir=str(tmp_path))
    trainer.train()
    other = load_expert_stack([ExpertSpec.from_tensors(n, unet_tensors(s)) for s, n in ((11, "base"), (40, "x"),
                                                                                        (13, "anime"), (14, "p"))])
    stranger, _ = make_trainer(other, steps=2)
    with pytest.raises(ValueError, match=r"another expert stack.*'x'"):
        stranger.resume(str(tmp_path))
    with pytest.raises(ValueError, match="no gate-training checkpoint"):
        stranger.resume(str(tmp_path / "empty"))  # not a directory with checkpoints either
    with pytest.raises(ValueError, match="not a gate-training state file"):
        stranger.resume(str(tmp_path / "gates-step0000001.safetensors"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(stack, tmp_path):
    moe = make_moe(stack)
    toy = ToyDenoiser(moe)

    def flaky(x, sigma, conds):
        out = toy(x, sigma, conds)
        return out * float("nan") if toy.calls > 4 else out

    trainer, _ = make_trainer(stack, moe=moe, steps=10, denoise=flaky, checkpoint_dir=str(tmp_path),
                              checkpoint_every=2)
    with pytest.raises(GateTrainingError, match=r"step 5: the loss is nan.*state-step0000004\.safetensors"):
        trainer.train()
    assert trainer.step == 4 and trainer.micro_step == 4 and len(trainer.loss_history) == 4
    assert checkpoint_steps(str(tmp_path)) == [2, 4]
    good = load_gate_file(tmp_path / "gates-step0000004.safetensors", stack).gates
    now = moe.gate_set()
    assert all(torch.equal(good.params[p][0], now.params[p][0]) for p in now.params)  # no update applied
    assert all(torch.isfinite(w).all() for w, _, _ in now.params.values())
    assert not any(name.endswith(".partial.safetensors") for name in os.listdir(tmp_path))


# ---------------------------------------------------------------------------------------------- data


def write_image(path, size, color):
    Image.new("RGB", size, color).save(path)


def test_empty_or_missing_data_folders_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no training images"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no training images"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        ImageCaptionFolder(tmp_path / "nowhere")
    write_image(tmp_path / "a.png", (32, 32), "red")
    with pytest.raises(ValueError, match=r"'a\.png' has no caption file 'a\.txt'"):
        ImageCaptionFolder(tmp_path)
    assert ImageCaptionFolder(tmp_path, allow_missing_captions=True).items[0].caption == ""
    with pytest.raises(ValueError, match="empty"):
        LatentDataset([], [None])
    with pytest.raises(ValueError, match="3 conditionings for 2 latents"):
        LatentDataset(latents(2), [1, 2, 3])


def test_mixed_image_sizes_are_bucketed_or_center_cropped(tmp_path, stack):
    sizes = {"wide": (200, 100), "tall": (90, 180), "square": (70, 70), "wide2": (160, 90), "odd.JPG": (33, 61)}
    for name, size in sizes.items():
        file = name if "." in name else name + ".png"
        write_image(tmp_path / file, size, (200, 30, 30))
        (tmp_path / (os.path.splitext(file)[0] + ".txt")).write_text(f"a {name} picture\n")
    (tmp_path / "square.style").write_text("anime")
    buckets = aspect_buckets(64, 16)
    assert (64, 64) in buckets and (48, 80) in buckets and (80, 48) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 and max(w / h, h / w) <= 4 for w, h in buckets)
    folder = ImageCaptionFolder(tmp_path, resolution=64, mode="bucket", bucket_step=16)
    assert [os.path.basename(i.image_path) for i in folder.items] == ["odd.JPG", "square.png", "tall.png",
                                                                      "wide.png", "wide2.png"]
    assert folder.items[1].caption == "a square picture" and folder.items[1].style == "anime"
    shapes = {}
    for i, item in enumerate(folder.items):
        image, caption, _ = folder.load(i)
        h, w, c = image.shape
        assert c == 3 and w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64
        source = sizes[os.path.basename(item.image_path).replace(".png", "")]
        assert abs(math.log(w / h) - math.log(source[0] / source[1])) < 0.5  # nearest aspect, not squashed
        assert 0.75 < image[..., 0].mean().item() < 0.8  # the colour survives resizing (200/255)
        shapes[os.path.basename(item.image_path)] = (w, h)
    assert shapes["square.png"] == (64, 64) and shapes["wide.png"][0] > shapes["wide.png"][1]
    assert shapes["tall.png"][1] > shapes["tall.png"][0]
    assert folder.sizes() == {wh: list(shapes.values()).count(wh) for wh in set(shapes.values())}

    cropped = ImageCaptionFolder(tmp_path, resolution=64, mode="center_crop")
    assert {tuple(cropped.load(i)[0].shape) for i in range(len(cropped))} == {(64, 64, 3)}

    # Encoded with a stand-in VAE (8× average pooling): batches never mix sizes.
    def encode_image(image):
        pooled = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)

    data = encode_folder(folder, encode_image, lambda caption: caption)
    assert len(data.buckets()) == len(set(shapes.values())) and data.styles[1] == "anime"
    trainer, _ = make_trainer(stack, dataset=data, batch_size=2, steps=1)
    for step in range(12):
        batch = data.batch(trainer.batch_indices(step))
        assert batch["x0"].dim() == 4 and len(batch["conds"]) == batch["x0"].shape[0]
    first_epoch = [i for s in range(trainer._batches_per_epoch) for i in trainer.batch_indices(s)]
    assert sorted(first_epoch) == list(range(len(data)))  # each sample once per epoch
    with pytest.raises(ValueError, match="resize mode"):
        ImageCaptionFolder(tmp_path, mode="stretch")
    assert main(["check-folder", str(tmp_path), "--resolution", "64", "--resize", "center_crop"]) == 0


def test_latent_data_set_file_round_trip(tmp_path):
    path = tmp_path / "data.safetensors"
    lat = [torch.randn(4, 8, 8), torch.randn(4, 8, 12)]
    ctx = [torch.randn(77, 32), torch.randn(154, 32)]
    save_latent_dataset(path, lat, ctx, pooled=[torch.randn(16), torch.randn(16)], captions=["a", "b"],
                        styles=[None, "anime"])
    data, space = load_latent_dataset(path)
    assert space == "raw" and len(data) == 2 and data.styles == [None, "anime"]
    assert torch.equal(data.latents[1], lat[1]) and torch.equal(data.conds[1]["context"], ctx[1])
    assert data.conds[0]["caption"] == "a" and data.conds[0]["pooled"].shape == (16,)
    assert len(data.buckets()) == 2 and data.noise is None
    assert main(["check-data", str(path)]) == 0
    with pytest.raises(ValueError, match="not an MEPG latent data set"):
        save_file_plain = tmp_path / "plain.safetensors"
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(save_file_plain))
        load_latent_dataset(save_file_plain)
