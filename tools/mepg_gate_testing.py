"""The synthetic teacher experiment for gate training (contract test and ``make bench``), in real ComfyUI.

For random noisy latents ``x_σ [B, 4, H, W]`` (σ uniform over the model's training schedule) and one
prompt each, the *teacher* — one expert of the stack, run by a MoE-patched model whose gate is forced to
it — predicts ``ε_T``. The training pair is ``x0 = x_σ - σ·ε_T`` with noise ``ε_T``: routing every token to
the teacher reproduces ``ε_T`` exactly (a one-hot gate equals that expert), so loss 0 — the global
minimum — is reached by the teacher and, for experts that differ, by nothing else. Held-out pairs use
other latents, noise levels and prompts. Needs ComfyUI loaded with the pack (``inprocess.load_pack``).
"""

from __future__ import annotations

import time

import torch


def pack(name: str):
    import inprocess

    return inprocess.pack_module(name)


def run_denoiser(model, x: torch.Tensor, sigma: torch.Tensor, conds: list, modules=None):
    """``(ε̂ [B, 4, H, W], routing record | None)`` of a MoE-patched ``model`` for model-space ``x`` at
    ``sigma [B]``, with one single-entry CONDITIONING per row, through the training node's glue."""
    import comfy.model_management as mm

    gt, core = pack("nodes.gate_training_nodes"), pack("mepg_core.gate_training")
    runner = gt.training_clone(model)
    mm.load_models_gpu([runner])
    runner.pre_run()
    try:
        denoiser = gt.ComfyDenoiser(runner, "eps")
        prepared = [denoiser.prepare(c, xi) for c, xi in zip(conds, x)]
        device = runner.load_device
        with torch.no_grad():
            if modules is None:
                return denoiser(x.to(device), sigma.to(device), prepared).cpu(), None
            with core.routing_recorder(modules) as record:
                out = denoiser(x.to(device), sigma.to(device), prepared).cpu()
            return out, record
    finally:
        runner.cleanup()


def teacher_pairs(teacher, conds: list, count: int, seed: int, size: int = 16) -> dict:
    """``count`` pairs from ``teacher`` (a forced-gate patched model) with ``conds[i]`` as prompts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, size, size, generator=g)
    schedule = teacher.get_model_object("model_sampling").sigmas.detach().float().cpu()
    sigma = schedule[torch.randint(0, schedule.numel(), (count,), generator=g)]
    conds = [[c[0]] for c in conds[:count]]
    eps, _ = run_denoiser(teacher, x, sigma, conds)
    return {"x": x, "x0": x - sigma[:, None, None, None] * eps, "eps": eps, "sigma": sigma, "conds": conds}


def teacher_experiment(student, teacher, teacher_name: str, train_conds: list, held_conds: list, config,
                       size: int = 16) -> dict:
    """Train ``student``'s gates on the teacher's pairs and measure on held-out pairs.

    Returns ``teacher_routing_accuracy`` (mean weight on the teacher over every token of every MoE site
    on the held-out pairs), ``loss_first`` / ``loss_last`` (means of the first and last 10 steps),
    held-out losses of the trained and of the untrained (uniform) gates, ``steps``, ``seconds`` (training)
    and the trained model (key ``model``) and per-site teacher weights (``per_site``).
    """
    gt, core = pack("nodes.gate_training_nodes"), pack("mepg_core.gate_training")
    train = teacher_pairs(teacher, train_conds, len(train_conds), seed=1, size=size)
    held = teacher_pairs(teacher, held_conds, len(held_conds), seed=2, size=size)
    started = time.perf_counter()
    trained, result = gt.train_moe_gates(student, list(train["x0"]), train["conds"], config,
                                         fixed_noise=list(train["eps"]), fixed_sigmas=train["sigma"].tolist(),
                                         model_space=True)
    seconds = time.perf_counter() - started
    attachment = trained.get_attachment("mepg_moe")
    index = attachment.stack.expert_index(teacher_name)
    pred, record = run_denoiser(trained, held["x"], held["sigma"], held["conds"], attachment.modules)
    overall, per_site = core.mean_routing(record)
    uniform, _ = run_denoiser(student, held["x"], held["sigma"], held["conds"])
    history = result.loss_history
    head = history[: min(10, len(history))]
    tail = history[-min(10, len(history)):]
    return {
        "teacher": teacher_name,
        "teacher_routing_accuracy": float(overall[index]),
        "mean_routing": [round(float(v), 6) for v in overall],
        "loss_first": sum(head) / len(head),
        "loss_last": sum(tail) / len(tail),
        "held_out_loss": float(((pred - held["eps"]) ** 2).mean()),
        "held_out_loss_untrained": float(((uniform - held["eps"]) ** 2).mean()),
        "steps": result.steps,
        "seconds": round(seconds, 3),
        "per_site": {path: float(v[index]) for path, v in per_site.items()},
        "model": trained,
    }


def side_map(size: int) -> torch.Tensor:
    """``[size, size]`` long: 0 on the left half of the latent, 1 on the right half."""
    region_map = torch.zeros(size, size, dtype=torch.long)
    region_map[:, size // 2:] = 1
    return region_map


def spatial_pairs(teacher, left: int, right: int, conds: list, count: int, seed: int, size: int = 16,
                  offset: float = 2.0) -> dict:
    """Pairs from a spatial teacher: expert ``left`` on the left half's tokens, ``right`` on the right half's
    (the teacher's own routing by region map, every site at its resolution). The two halves differ in
    content (channel 0 shifted by ``+offset`` on the left, ``-offset`` on the right), which is all a gate can
    go by: position itself is not an input of the UNet's blocks."""
    gating, routing = pack("mepg_core.gating"), teacher.get_attachment("mepg_moe").routing
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, size, size, generator=g)
    x[:, 0, :, : size // 2] += offset
    x[:, 0, :, size // 2:] -= offset
    schedule = teacher.get_model_object("model_sampling").sigmas.detach().float().cpu()
    sigma = schedule[torch.randint(0, schedule.numel(), (count,), generator=g)]
    conds = [[c[0]] for c in conds[:count]]
    with routing.fixed_regions(side_map(size), (gating.RegionRoute.forced(left), gating.RegionRoute.forced(right))):
        eps, _ = run_denoiser(teacher, x, sigma, conds)
    return {"x": x, "x0": x - sigma[:, None, None, None] * eps, "eps": eps, "sigma": sigma, "conds": conds}


def side_accuracy(model, pairs: dict, left: int, right: int) -> dict:
    """Mean weight the gates of ``model`` give, at every spatial site, to the expert the spatial teacher
    used at each token (``left`` on the left half, ``right`` on the right), on ``pairs``' inputs:
    ``{"all", "left", "right"}`` (every token, the left half's, the right half's). A gate that ignores its
    input gives every token of a site the same weights, so it scores at most 0.5 overall here (the two
    halves hold equally many tokens at every level)."""
    modules = model.get_attachment("mepg_moe").modules
    size = pairs["x"].shape[-1]
    region_map = side_map(size)
    totals, counts = [0.0, 0.0], [0, 0]

    def observe(module, weights):
        if module.input_kind != "spatial":
            return
        batch, tokens, _ = weights.shape
        factor = 1
        while (-(-size // factor)) ** 2 != tokens:
            if factor >= size:
                raise ValueError(f"{module.path}: {tokens} tokens are no level of a {size}×{size} latent")
            factor *= 2
        side = region_map[::factor, ::factor].reshape(-1).to(weights.device)
        want = torch.where(side == 0, left, right)
        got = weights.detach().gather(-1, want[None, :, None].expand(batch, tokens, 1))[..., 0]
        for half in (0, 1):
            totals[half] += float(got[:, side == half].sum())
            counts[half] += batch * int((side == half).sum())

    with modules.runtime.observing(observe):
        run_denoiser(model, pairs["x"], pairs["sigma"], pairs["conds"])
    return {"all": sum(totals) / sum(counts), "left": totals[0] / counts[0], "right": totals[1] / counts[1]}


def held_out_loss(model, pairs: dict) -> float:
    """Mean squared error of ``model``'s ε̂ against the teacher's ε on ``pairs``."""
    pred, _ = run_denoiser(model, pairs["x"], pairs["sigma"], pairs["conds"])
    return float(((pred - pairs["eps"]) ** 2).mean())


def spatial_teacher_experiment(student, teacher, left_name: str, right_name: str, train_conds: list,
                               held_conds: list, config, size: int = 16) -> dict:
    """Train ``student``'s gates on a spatial teacher's pairs (see :func:`spatial_pairs`); accuracy on
    held-out pairs by :func:`side_accuracy`, for the trained gates and the untrained ones."""
    gt = pack("nodes.gate_training_nodes")
    stack = teacher.get_attachment("mepg_moe").stack
    left, right = stack.expert_index(left_name), stack.expert_index(right_name)
    train = spatial_pairs(teacher, left, right, train_conds, len(train_conds), seed=1, size=size)
    held = spatial_pairs(teacher, left, right, held_conds, len(held_conds), seed=2, size=size)
    started = time.perf_counter()
    trained, result = gt.train_moe_gates(student, list(train["x0"]), train["conds"], config,
                                         fixed_noise=list(train["eps"]), fixed_sigmas=train["sigma"].tolist(),
                                         model_space=True)
    seconds = time.perf_counter() - started
    history = result.loss_history
    accuracy = side_accuracy(trained, held, left, right)
    return {
        "side_accuracy": accuracy["all"], "side_accuracy_left": accuracy["left"],
        "side_accuracy_right": accuracy["right"],
        "side_accuracy_untrained": side_accuracy(student, held, left, right)["all"],
        "loss_first": sum(history[:10]) / len(history[:10]), "loss_last": sum(history[-10:]) / len(history[-10:]),
        "held_out_loss": held_out_loss(trained, held), "held_out_loss_untrained": held_out_loss(student, held),
        "steps": result.steps, "seconds": round(seconds, 3), "model": trained,
    }
