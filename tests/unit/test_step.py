"""The MeZO step on one process: exact restore, the update rule, and skipped non-finite steps."""

import math

import pytest
import torch
from torch import nn

from mezo_dist import MeZO, wrap
from mezo_dist.zo import noise, passes


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def quadratic_loss(model: nn.Module):
    x = torch.linspace(-1, 1, 14).reshape(2, 7)
    return lambda: model(x).pow(2).mean()


def test_lr_zero_leaves_every_parameter_unchanged():
    model = tiny_net()
    before = snapshot(model)
    zo = MeZO(wrap(model), lr=0.0, eps=1e-3, weight_decay=0.1)
    for _ in range(5):
        zo.step(quadratic_loss(model))
    for k, v in snapshot(model).items():
        assert (v - before[k]).abs().max().item() <= 1e-6, k


def test_update_follows_zo_sgd_with_decay_on_matrices_only():
    model = tiny_net()
    before = snapshot(model)
    lr, eps, wd = 1e-2, 1e-3, 0.5
    zo = MeZO(wrap(model), lr=lr, eps=eps, weight_decay=wd, seed=3)
    res = zo.step(quadratic_loss(model))
    assert res.step == 0 and res.step_seed == noise.step_seed(3, 0) and not res.skipped
    for name, p in model.named_parameters():
        z = passes.draw(zo.kernel, noise.param_key(res.step_seed, name), 0, p.numel(), p.numel()).view_as(p)
        theta = before[name]
        decay = wd if p.dim() >= 2 else 0.0
        expected = theta - lr * (res.projected_grad * z + decay * theta)
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


def test_projected_gradient_is_the_central_difference():
    model = tiny_net()
    loss = quadratic_loss(model)
    zo = MeZO(wrap(model), lr=0.0, eps=1e-2, seed=1)
    seed = noise.step_seed(1, 0)
    with torch.no_grad():
        zo.perturb(seed, 1e-2)
        plus = loss().item()
        zo.perturb(seed, -2e-2)
        minus = loss().item()
        zo.perturb(seed, 1e-2)
    res = zo.step(loss)
    assert math.isclose(res.projected_grad, (plus - minus) / 2e-2, rel_tol=1e-4)
    assert math.isclose(res.loss, (plus + minus) / 2, rel_tol=1e-6)


def test_non_finite_loss_skips_the_update_and_keeps_the_weights():
    model = tiny_net()
    before = snapshot(model)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 2 else quadratic_loss(model)()

    zo = MeZO(wrap(model), lr=1.0, eps=1e-3)
    res = zo.step(closure)
    assert res.skipped and math.isnan(res.projected_grad)
    for k, v in snapshot(model).items():
        assert (v - before[k]).abs().max().item() <= 1e-6, k
    res = zo.step(quadratic_loss(model))  # the next step trains again
    assert not res.skipped and zo.step_index == 2


def test_frozen_parameters_are_never_touched():
    model = tiny_net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    MeZO(wrap(model), lr=1e-1, eps=1e-3).step(quadratic_loss(model))
    assert torch.equal(model[0].weight, frozen)


def test_weighted_closure_and_bad_eps():
    model = tiny_net()
    zo = MeZO(wrap(model), lr=1e-3, eps=1e-3)
    res = zo.step(lambda: (quadratic_loss(model)() * 4, 4))
    assert math.isfinite(res.projected_grad)
    with pytest.raises(ValueError, match="eps must be > 0"):
        MeZO(wrap(model), lr=1e-3, eps=0.0)


def test_several_directions_average_single_direction_estimates_measured_separately():
    """--zo_num_directions 4: the update is the mean of 4 SPSA estimates, each measured at theta."""
    model = tiny_net()
    theta = snapshot(model)
    lr, eps, n = 1e-2, 1e-3, 4
    zo = MeZO(wrap(model), lr=lr, eps=eps, seed=5, num_directions=n)
    seeds = zo.direction_seeds(0)
    assert len(set(seeds)) == n and seeds[0] == noise.step_seed(5, 0)

    def loss_at(scale: float, seed: int) -> float:
        probe = tiny_net()
        with torch.no_grad():
            for name, p in probe.named_parameters():
                z = passes.draw(zo.kernel, noise.param_key(seed, name), 0, p.numel(), p.numel()).view_as(p)
                p.copy_(theta[name] + scale * z)
            return float(quadratic_loss(probe)())

    separate = [(loss_at(eps, s) - loss_at(-eps, s)) / (2 * eps) for s in seeds]
    res = zo.step(quadratic_loss(model))
    assert [s for s, _ in res.directions] == seeds
    # fp32 losses differ in their last bits between in-place and fresh perturbations: g to ~1e-4.
    assert [g for _, g in res.directions] == pytest.approx(separate, abs=1e-4)
    assert res.projected_grad == pytest.approx(sum(separate) / n, abs=1e-4)
    for name, p in model.named_parameters():
        step = sum(g * passes.draw(zo.kernel, noise.param_key(s, name), 0, p.numel(), p.numel()).view_as(p)
                   for s, g in res.directions) / n
        assert torch.allclose(p.detach(), theta[name] - lr * step, atol=1e-6), name
