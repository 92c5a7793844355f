"""The zeroth-order optimizers on one process: each update against a dense computation with
materialised z, the mask and multi-seed passes against shards, replay and resume bit for bit."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from torch import nn

from mezo_dist import wrap
from mezo_dist.placement.base import Piece
from mezo_dist.zo import multipass, noise, optimizers, passes
from mezo_dist.zo.adaptive import moment_weights
from mezo_dist.zo.fzoo import spread
from mezo_dist.zo.sparse import find_thresholds, pack_mask, selected_count, unpack_mask

X = torch.linspace(-1, 1, 14).reshape(2, 7)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def z_of(seed: int, name: str, p: torch.Tensor, kind: str = "gaussian") -> torch.Tensor:
    """z as the optimizers' default path (``--zo_kernel auto``) draws it on this device."""
    path = passes.resolve_kernel("auto", p.device)
    return passes.draw(path, noise.param_key(seed, name), 0, p.numel(), p.numel(), kind=kind).view_as(p)


def loss_at(theta: dict[str, torch.Tensor], shift: dict[str, torch.Tensor] | None = None) -> float:
    """The loss of a fresh net holding theta (+ shift), computed without in-place passes."""
    probe = tiny_net()
    with torch.no_grad():
        for name, p in probe.named_parameters():
            p.copy_(theta[name] + (shift[name] if shift else 0.0))
        return float(probe(X).pow(2).mean())


def make(name: str, model: nn.Module, **kw):
    kw.setdefault("lr", 1e-2)
    kw.setdefault("eps", 1e-3)
    if name == "fzoo":
        kw.setdefault("num_directions", 4)
    if name == "sparse":
        kw.setdefault("sparsity", 0.5)
    if name == "adamezo":
        kw.setdefault("history", 3)
    return optimizers.build(name, wrap(model), **kw)


# -- the passes -----------------------------------------------------------------------------------

def _split_pieces(x: torch.Tensor, cut: int, name: str = "w") -> list[Piece]:
    n = x.numel()
    return [Piece(name, x[:cut], 0, n, True, True), Piece(name, x[cut:], cut, n, True, True)]


@pytest.mark.parametrize("kernel", ["blocks", "compiled"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_masked_pass_equals_dense_and_does_not_depend_on_the_shards(kind, kernel):
    n, cut, seed = noise.BLOCK + 1003, 600_001, 17  # two noise blocks, a shard edge inside the first
    torch.manual_seed(1)
    base = torch.randn(n)
    mask = (torch.rand(n) < 0.3).to(torch.uint8)
    whole, parts = base.clone(), base.clone()
    op = passes.Affine(1e-2, 0.9, -3e-3)
    hook = lambda piece, start, count: mask[piece.offset + start : piece.offset + start + count]  # noqa: E731
    passes.run_pass([Piece("w", whole, 0, n, True, False)], seed, op, kind=kind, kernel=kernel,
                    scratch=passes.Scratch(), mask=hook)
    passes.run_pass(_split_pieces(parts, cut), seed, op, kind=kind, kernel=kernel, scratch=passes.Scratch(),
                    mask=hook)
    assert torch.equal(whole, parts)
    z = passes.draw(kernel, noise.param_key(seed, "w"), 0, n, n, kind=kind) * mask
    assert torch.allclose(whole, (base + 1e-2 * z) * 0.9 - 3e-3 * z, atol=1e-6)
    off = mask == 0
    assert torch.equal(whole[off], base[off] * 0.9)


def test_packed_mask_slices_equal_the_mask():
    torch.manual_seed(3)
    x = torch.randn(noise.BLOCK + 77).to(torch.bfloat16)
    half = int(torch.tensor([0.5]).view(torch.int32))
    packed = pack_mask(x, half)
    assert packed.numel() == -(-x.numel() // 8)
    want = (x.float().abs() <= 0.5).to(torch.uint8)
    for start, count in [(0, x.numel()), (3, 13), (noise.BLOCK - 5, 82), (x.numel() - 1, 1)]:
        assert torch.equal(unpack_mask(packed, start, count), want[start : start + count])


@pytest.mark.parametrize("kernel", ["blocks", "compiled"])
def test_multi_seed_pass_equals_dense_and_does_not_depend_on_the_shards(kernel):
    n, cut, seeds, coefs = noise.BLOCK + 51, 1_000_003, [5, 6, 7], [0.5, -0.25, 2.0]
    torch.manual_seed(2)
    base = torch.randn(n)
    zs = [passes.draw(kernel, noise.param_key(s, "w"), 0, n, n) for s in seeds]
    held = 1e-3
    perturbed = base + held * zs[0]

    def op(x, it, piece):
        acc = torch.zeros_like(x)
        for c, z in zip(coefs, it):
            acc.addcmul_(z, z, value=c)
        x.add_(acc)

    whole, parts = perturbed.clone(), perturbed.clone()
    multipass.run_multi_pass([Piece("w", whole, 0, n, True, False)], seeds, op, kind="gaussian", kernel=kernel,
                             held=held)
    multipass.run_multi_pass(_split_pieces(parts, cut), seeds, op, kind="gaussian", kernel=kernel, held=held)
    assert torch.equal(whole, parts)
    expected = base + sum(c * z * z for c, z in zip(coefs, zs))
    assert torch.allclose(whole, expected, atol=1e-5)


# -- FZOO -----------------------------------------------------------------------------------------

def test_fzoo_update_is_the_normalised_one_sided_estimate():
    model = tiny_net()
    theta = snapshot(model)
    lr, eps, wd, n = 1e-4, 1e-3, 0.1, 4
    zo = make("fzoo", model, lr=lr, eps=eps, weight_decay=wd, seed=3, num_directions=n)
    assert zo.perturbation == "rademacher"
    seeds = zo.direction_seeds(0)
    res = zo.step(lambda: model(X).pow(2).mean())
    us = [{k: z_of(s, k, v, "rademacher") for k, v in theta.items()} for s in seeds]
    assert all(torch.equal(u.abs(), torch.ones_like(u)) for u in us[0].values())
    l0 = loss_at(theta)
    ls = [loss_at(theta, {k: eps * u[k] for k in u}) for u in us]
    sigma = spread(ls)
    assert res.loss == pytest.approx(l0, rel=1e-6)
    assert res.sigma == pytest.approx(sigma, rel=1e-3)
    assert [g for _, g in res.directions] == pytest.approx([(v - l0) / eps for v in ls], abs=1e-3)
    for name, p in model.named_parameters():
        decay = 1 - lr * wd if p.dim() >= 2 else 1.0
        g = sum(((v - l0) / eps) * u[name] for v, u in zip(ls, us)) / n
        expected = theta[name] * decay - lr / sigma * g
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


# -- Sparse MeZO ------------------------------------------------------------------------------------

def test_sparse_thresholds_are_the_kth_magnitude_and_the_same_on_simulated_ranks():
    torch.manual_seed(4)
    params = {"a": torch.randn(1000), "b": torch.randn(33, 17), "tie": torch.tensor([1.0, -1.0, 1.0, 2.0, 0.0])}
    sparsity = 0.7
    single = [Piece(k, v.view(-1), 0, v.numel(), True, False) for k, v in params.items()]
    got = find_thresholds(single, sparsity, owns=lambda p: True, reduce=lambda t: t, device=torch.device("cpu"))
    for k, v in params.items():
        kth = v.abs().view(-1).kthvalue(selected_count(sparsity, v.numel())).values
        assert got[k] == int(kth.view(1).view(torch.int32)), k

    # Three "ranks" in threads, meeting in a summing reduce: shards of "a" and "b" (ragged), and
    # "tie" replicated on every rank but counted by rank 0 only.
    cuts = {"a": [0, 1, 999, 1000], "b": [0, 200, 400, 561]}
    world, box, out = 3, [None] * 3, [None] * 3
    barrier = threading.Barrier(world)

    def run(rank: int) -> None:
        pieces = [Piece(k, params[k].view(-1)[c[rank]:c[rank + 1]], c[rank], params[k].numel(), True, True)
                  for k, c in cuts.items()]
        pieces.append(Piece("tie", params["tie"], 0, 5, False, False))

        def reduce(t):
            box[rank] = t.clone()
            barrier.wait()
            total = sum(box)
            barrier.wait()
            return total

        out[rank] = find_thresholds(pieces, sparsity, owns=lambda p: p.shard or rank == 0, reduce=reduce,
                                    device=torch.device("cpu"))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == out[1] == out[2] == got


def test_sparse_update_touches_only_the_small_magnitudes():
    model = tiny_net()
    theta = snapshot(model)
    lr, eps = 5e-2, 1e-3
    zo = make("sparse", model, lr=lr, eps=eps, sparsity=0.6, seed=8)
    res = zo.step(lambda: model(X).pow(2).mean())
    for name, p in model.named_parameters():
        h = torch.tensor([zo.thresholds[name]], dtype=torch.int32).view(torch.float32)
        keep = theta[name].abs() <= h
        k = selected_count(0.6, p.numel())  # ties at the threshold are all in (LayerNorm weights start at 1)
        assert int(keep.sum()) >= k > int((theta[name].abs() < h).sum())
        expected = theta[name] - lr * res.projected_grad * z_of(res.step_seed, name, p) * keep
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        assert torch.equal(p.detach()[~keep], theta[name][~keep]), "frozen elements must come back bit for bit"


# -- AdaMeZO --------------------------------------------------------------------------------------

def test_adamezo_update_is_adam_on_the_truncated_history():
    model = tiny_net()
    lr, eps, wd, h, b1, b2, delta = 1e-3, 1e-3, 0.2, 2, 0.8, 0.9, 1e-8
    zo = make("adamezo", model, lr=lr, eps=eps, weight_decay=wd, history=h, beta1=b1, beta2=b2, adam_eps=delta, seed=9)
    for _ in range(3):
        theta = snapshot(model)
        res = zo.step(lambda: model(X).pow(2).mean())
    assert len(zo.past) == h and zo.past[0] == (res.step_seed, res.projected_grad)
    w1, w2 = moment_weights(b1, h), moment_weights(b2, h)
    assert sum(w1) == pytest.approx(1.0) and w1[0] > w1[1]
    for name, p in model.named_parameters():
        zs = [z_of(s, name, p) for s, _ in zo.past]
        m = sum(w * g * z for w, (_, g), z in zip(w1, zo.past, zs))
        v = sum(w * g * g * z * z for w, (_, g), z in zip(w2, zo.past, zs))
        decay = 1 - lr * wd if p.dim() >= 2 else 1.0
        expected = theta[name] * decay - lr * m / (v.sqrt() + delta)
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


# -- every optimizer: replay, resume, masters -----------------------------------------------------

def nan_at(model: nn.Module, bad_step: int, zo):
    """The loss, NaN on the second forward of step ``bad_step``."""
    calls = {}

    def closure():
        n = calls[zo.step_index] = calls.get(zo.step_index, 0) + 1
        loss = model(X).pow(2).mean()
        return loss * float("nan") if (zo.step_index == bad_step and n == 2) else loss

    return closure


NAMES = ["mezo", "fzoo", "sparse", "adamezo"]


@pytest.mark.parametrize("name", NAMES)
def test_replay_from_rows_rebuilds_the_parameters_bit_for_bit(name):
    from mezo_dist.replay import replay
    from mezo_dist.trajectory import zo_row

    model = tiny_net()
    extra = {"sparse_refresh": 2} if name == "sparse" else {}
    zo = make(name, model, lr=lambda t: 1e-3 * (t + 1), weight_decay=0.1, seed=4, **extra)
    closure = nan_at(model, 2, zo)
    rows = []
    for _ in range(5):
        res = zo.step(closure)
        rows.append(json.loads(json.dumps(zo_row(res, zo))))
    assert rows[2].get("skipped") and not rows[3].get("skipped")
    assert rows[0].get("optimizer", "mezo") == name
    fresh = tiny_net()
    replay(wrap(fresh), rows)
    moved = False
    for (k, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), k
        moved |= not torch.equal(a, tiny_net().state_dict()[k])
    assert moved


@pytest.mark.parametrize("name", ["sparse", "adamezo"])
def test_resume_from_state_dict_continues_bit_for_bit(name):
    closure_of = lambda m: (lambda: m(X).pow(2).mean())  # noqa: E731
    a = tiny_net()
    zo_a = make(name, a, seed=6)
    for _ in range(5):
        zo_a.step(closure_of(a))
    b = tiny_net()
    zo_b = make(name, b, seed=6)
    for _ in range(3):
        zo_b.step(closure_of(b))
    state = json.loads(json.dumps(optimizers.state_dict(zo_b)))
    c = tiny_net()
    c.load_state_dict(b.state_dict())
    zo_c = make(name, c, seed=6)
    optimizers.load_state_dict(zo_c, state)
    zo_c.step_index = 3
    for _ in range(2):
        zo_c.step(closure_of(c))
    for (k, x), y in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(x, y), k


def test_sparse_resume_without_thresholds_is_refused():
    model = tiny_net()
    zo = make("sparse", model)
    zo.step_index = 3
    with pytest.raises(ValueError, match="without its thresholds"):
        zo.step(lambda: model(X).pow(2).mean())


@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_with_fp32_masters_gives_the_parameters_back_bit_for_bit(name):
    from mezo_dist.distributed import current_state
    from mezo_dist.placement.masters import Masters
    from mezo_dist.placement.single import SinglePlacement

    model = tiny_net()
    before = snapshot(model)
    placement = SinglePlacement(model, current_state(), masters=Masters(), autocast_dtype=torch.bfloat16)
    kw = {"num_directions": 3} if name == "fzoo" else {}
    zo = optimizers.build(name, placement, lr=0.0, eps=1e-2, **kw)
    for _ in range(3):
        res = zo.step(lambda: model(X).pow(2).mean())
        assert math.isfinite(res.loss)
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]), k


# -- the same passes on the fused Triton path (CUDA, or Triton's interpreter on CPU) -------------

from tests.unit.test_perturbations import shards, triton_device  # noqa: E402,F401


def test_fused_optimizer_passes_under_triton_interpreter():
    from tests.helpers import run_fused_tests_under_interpreter

    run_fused_tests_under_interpreter(__file__)


def _fused_z(seed: int, n: int, device: str) -> torch.Tensor:
    z = torch.zeros(n, device=device)
    passes.run_pass(shards(z, "w", 1), seed, passes.Affine(1.0), kind="gaussian", kernel="triton",
                    scratch=passes.Scratch())
    return z


def test_fused_masked_pass_equals_dense(triton_device):
    n, seed = 6000 + 7, 21
    base = torch.randn(n, device=triton_device)
    mask = (torch.rand(n, device=triton_device) < 0.4).to(torch.uint8)
    hook = lambda piece, start, count: mask[piece.offset + start : piece.offset + start + count]  # noqa: E731
    op = passes.Affine(1e-2, 0.5, 2e-3)
    out = {}
    for world in (1, 3):
        x = base.clone()
        passes.run_pass(shards(x, "w", world), seed, op, kind="gaussian", kernel="triton", scratch=passes.Scratch(),
                        mask=hook)
        out[world] = x
    assert torch.equal(out[1], out[3])
    z = _fused_z(seed, n, triton_device) * mask
    assert torch.allclose(out[1], (base + 1e-2 * z) * 0.5 + 2e-3 * z, atol=1e-6)


def test_fused_multi_seed_pass_equals_dense(triton_device):
    n, seeds, coefs = 5000 + 3, [31, 32], [1.5, -0.5]
    base = torch.randn(n, device=triton_device)
    zs = [_fused_z(s, n, triton_device) for s in seeds]

    def op(x, it, piece):
        for c, z in zip(coefs, it):
            x.add_(z, alpha=c)

    out = {}
    for world in (1, 2):
        x = base + 1e-3 * zs[0]
        multipass.run_multi_pass(shards(x, "w", world), seeds, op, kind="gaussian", kernel="triton", held=1e-3)
        out[world] = x
    assert torch.equal(out[1], out[2])
    assert torch.allclose(out[1], base + 1.5 * zs[0] - 0.5 * zs[1], atol=1e-5)
