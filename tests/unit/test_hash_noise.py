"""The hash stream and its compiled pass (zo/hashz.py, zo/compiled.py).

The compiled kernels must compute exactly the function hashz.py defines, whatever slice a rank
holds: every check below compares bits with the numpy evaluation of the same source
(``hashz.reference``), at offsets and lengths that put elements in vector main loops, masked
tails, partial blocks and whole blocks, and at indices past 2^31, 2^32 and 2^33.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mezo_dist.errors import TrainingError
from mezo_dist.placement.base import Piece
from mezo_dist.zo import compiled, hashz, noise, passes

KEY = noise.param_key(noise.step_seed(7, 3), "model.layers.0.mlp.up_proj.weight")
# Around the vector width (16 fp32), the pair half (2048) and the block (4096), and a prime.
LENGTHS = [1, 2, 7, 15, 16, 17, 31, 33, 2047, 2048, 2049, 4095, 4096, 4097, 3 * 4096 + 5, 1_000_003]
OFFSETS = [0, 1, 5, 15, 17, 2047, 2048, 4095, 4096, 4097, 12345]


def spec(offset: int, count: int, kind: str = "gaussian", key: int = KEY) -> torch.Tensor:
    return torch.from_numpy(hashz.reference(key, offset, count, kind))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_compiled_draw_is_the_specified_function_on_every_slice(kind):
    for count in LENGTHS:
        for offset in OFFSETS if count < 10_000 else [0, 3]:
            got = compiled.draw(KEY, offset, count, kind=kind)
            assert torch.equal(got, spec(offset, count, kind)), (offset, count)


def test_indices_past_2_31_2_32_and_the_segment_edge():
    # Nothing that size is allocated: the slices say where they are.
    for offset in (2**31 - 5, 2**32 - 3, hashz.SEGMENT - 4100, hashz.SEGMENT + 1, 2**40 + 3):
        long = compiled.draw(KEY, offset, 9000)
        assert torch.equal(long, spec(offset, 9000)), offset
        assert torch.equal(compiled.draw(KEY, offset + 4097, 17), long[4097:4114]), offset
    # Segments differ: the same in-segment index in the next segment is another vector.
    assert not torch.equal(compiled.draw(KEY, 0, 4096), compiled.draw(KEY, hashz.SEGMENT, 4096))


def shards(x: torch.Tensor, name: str, world: int, compute: torch.Tensor | None = None) -> list[Piece]:
    n, chunk = x.numel(), -(-x.numel() // world)
    out = []
    for r in range(world):
        lo, hi = min(n, r * chunk), min(n, (r + 1) * chunk)
        out.append(Piece(name, x[lo:hi], lo, n, decay=True, shard=True,
                         compute=None if compute is None else compute[lo:hi]))
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_every_layout_and_thread_count_applies_the_same_z(threads):
    n, seed = 1_000_003, noise.step_seed(1, 2)
    torch.manual_seed(0)
    base = torch.randn(n)
    op = passes.Affine(1e-3, 0.9, -2e-3)
    z = spec(0, n, key=noise.param_key(seed, "w"))
    # The documented order of operations, in fp32, one rounding per operation.
    a, c, b = (torch.tensor(v) for v in (op.a, op.c, op.b))
    expected = (base + a * z) * c + b * z
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for world in (1, 2, 3, 7, 64):
            x = base.clone()
            passes.run_pass(shards(x, "w", world), seed, op, kind="gaussian", kernel="compiled", scratch=passes.Scratch())
            assert torch.equal(x, expected), world
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_values_compute_in_fp32(dtype):
    n = 4096 + 999
    x = torch.randn(n).to(dtype)
    z = spec(333, n)
    expected = ((x.float() + torch.tensor(1e-2) * z) * torch.tensor(0.5) + torch.tensor(0.25) * z).to(dtype)
    compiled.apply_(x, KEY, 333, 1e-2, 0.5, 0.25, kind="gaussian")
    assert torch.equal(x, expected)


def test_masters_take_the_update_and_the_storage_the_perturbation():
    n, offset = 3 * 4096 + 77, 10
    torch.manual_seed(1)
    master = torch.randn(n)
    before = master.clone()
    storage = master.to(torch.bfloat16)
    z = spec(offset, n)
    # A perturbation leaves the master alone (not even rewritten) and sets storage = m + s z.
    compiled.apply_(master, KEY, offset, 1e-3, 1.0, 0.0, kind="gaussian", compute=storage, scale=1e-3, update=False)
    assert torch.equal(master, before)
    assert torch.equal(storage, (before + torch.tensor(1e-3) * z).to(torch.bfloat16))
    # An update: m <- m c + b z, storage <- m + 0 z = m.
    compiled.apply_(master, KEY, offset, 1e-3, 0.9, -0.5, kind="gaussian", compute=storage, scale=0.0)
    updated = before * torch.tensor(0.9) + torch.tensor(-0.5) * z
    assert torch.equal(master, updated)
    assert torch.equal(storage, updated.to(torch.bfloat16))


def test_callable_ops_get_the_same_z():
    n, seed = 4096 * 2 + 100, noise.step_seed(2, 0)
    seen = []
    x = torch.zeros(n)
    passes.run_pass(shards(x, "w", 3), seed, lambda t, z, p: seen.append((p.offset, z.clone())), kind="gaussian",
                    kernel="compiled", scratch=passes.Scratch())
    full = spec(0, n, key=noise.param_key(seed, "w"))
    assert seen and all(torch.equal(z, full[off : off + z.numel()]) for off, z in seen)


def test_gaussian_statistics_and_tails():
    n = 1 << 22
    z = compiled.draw(KEY, 0, n).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se and abs(z.std().item() - 1) < 5 * se
    assert abs(((z**4).mean() - 3).item()) < 5 * math.sqrt(96 / n)
    # u1 is never 0: every z is finite and |z| <= sqrt(48 ln 2).
    assert torch.isfinite(z).all() and z.abs().max().item() <= math.sqrt(48 * math.log(2)) + 1e-6
    for t in (2.0, 3.0, 4.0):
        p = math.erfc(t / math.sqrt(2))
        assert abs((z.abs() > t).double().mean().item() - p) < 5 * math.sqrt(p / n), t
    # Neighbours, Box-Muller partners (the two halves of a block) and squares are uncorrelated.
    pairs = z.view(-1, 2, hashz.HALF)
    for u, v in ((z[1:], z[:-1]), (pairs[:, 0], pairs[:, 1]), (pairs[:, 0] ** 2, pairs[:, 1] ** 2)):
        assert abs(np.corrcoef(u.reshape(-1).numpy(), v.reshape(-1).numpy())[0, 1]) < 5 * se * math.sqrt(2)
    other = compiled.draw(noise.param_key(noise.step_seed(7, 4), "model.layers.0.mlp.up_proj.weight"), 0, n).double()
    assert abs((z * other).mean().item()) < 5 * se


def test_rademacher_is_balanced_and_independent():
    n = 1 << 22
    r = compiled.draw(KEY, 0, n, kind="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    se = 1 / math.sqrt(n)
    pairs = r.view(-1, 2, hashz.HALF)
    assert abs(r.mean().item()) < 5 * se and abs((r[1:] * r[:-1]).mean().item()) < 5 * se
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item()) < 5 * se * math.sqrt(2)


def test_kernels_stay_few_over_a_model_and_many_steps():
    # Pieces of a small model under 1, 2 and 3 ranks: every size, offset and key of the run.
    shapes = {"emb": 5000 * 64, "q": 64 * 64, "norm": 64, "bias": 3, "up": 64 * 176}
    params = {k: torch.randn(n) for k, n in shapes.items()}
    pieces = [p for world in (1, 2, 3) for k, v in params.items() for p in shards(v, k, world)]
    passes.run_pass(pieces, 0, passes.Affine(1e-3), kind="gaussian", kernel="compiled", scratch=passes.Scratch())
    variants = set(compiled.loaded_variants())
    packages = sorted(compiled.cache_dir().glob("*.pt2"))
    for step in range(1, 6):
        for a in (1e-3, -2e-3):
            passes.run_pass(pieces, noise.step_seed(0, step), passes.Affine(a), kind="gaussian", kernel="compiled",
                            scratch=passes.Scratch())
        passes.run_pass(pieces, noise.step_seed(0, step), passes.Affine(1e-3, 0.99, -1e-4), kind="gaussian",
                        kernel="compiled", scratch=passes.Scratch())
    # Two kernels serve every piece, offset, key and step of an fp32 Gaussian run (other tests
    # of this process may have loaded others).
    assert {(v.whole, v.update) for v in variants if v.kind == "gaussian" and v.dtypes == (torch.float32,)} == \
        {(True, False), (False, False)}
    assert set(compiled.loaded_variants()) == variants, "a step needed another kernel"
    assert sorted(compiled.cache_dir().glob("*.pt2")) == packages, "a step compiled a kernel"


def test_a_failed_compile_names_the_way_out(monkeypatch, tmp_path):
    def broken(_program, package_path, **_kw):
        with open(package_path, "wb") as f:  # dies halfway through writing its package
            f.write(b"PK\x03\x04")
        raise RuntimeError("CppCompileError: no C++ compiler\nand the rest of its log")

    monkeypatch.setenv("MEZO_DIST_CACHE", str(tmp_path))  # a cold cache, so the kernel must be built
    monkeypatch.setattr(compiled, "_LOADED", {})
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(TrainingError, match="--zo_kernel blocks") as info:
        compiled.draw(KEY, 0, 10)
    assert "\n" not in str(info.value) and "no C++ compiler" in str(info.value)
    assert not list(tmp_path.rglob("*.pt2")), "a failed build left a package behind"


def test_a_cached_kernel_loads_in_a_new_process_without_compiling(tmp_path):
    import subprocess
    import sys
    import textwrap

    # A new process with the cache this session filled: it loads the packages instead of
    # building them (a build would write new files and take tens of seconds).
    compiled.draw(KEY, 0, 5000)  # both kernels of the Gaussian stream are in the cache now
    before = {p: p.stat().st_mtime_ns for p in compiled.cache_dir().glob("*.pt2")}
    code = textwrap.dedent(f"""
        import time, numpy as np
        from mezo_dist.zo import compiled, hashz
        t = time.perf_counter()
        z = compiled.draw({KEY}, 3, 5000)
        assert np.array_equal(z.numpy(), hashz.reference({KEY}, 3, 5000))
        print(time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert float(out.stdout.split()[-1]) < 10.0, out.stdout  # a load, not a compile
    assert {p: p.stat().st_mtime_ns for p in compiled.cache_dir().glob("*.pt2")} == before


def test_stream_names_round_trip():
    from mezo_dist import trajectory

    assert tuple(passes.STREAMS.values()) == trajectory.STREAMS
    assert [passes.kernel_for_stream(passes.stream_name(k, "gaussian")) for k in passes.STREAMS] == list(passes.STREAMS)
    assert passes.resolve_kernel("auto", torch.device("cpu")) == "compiled"


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    worst = 0
    for kind in ("gaussian", "rademacher"):
        for offset, count in ((0, 1 << 22), (4097, 100_003), (2**32 + 5, 9000)):
            cpu = compiled.draw(KEY, offset, count, kind=kind)
            gpu = compiled.draw(KEY, offset, count, kind=kind, device="cuda").cpu()
            ulps = (cpu.view(torch.int32).long() - gpu.view(torch.int32).long()).abs().max().item()
            worst = max(worst, ulps)
            print(f"{kind} [{offset}, +{count}): max {ulps} ulp between CPU and CUDA")
    # By design 0 (see zo/compiled.py); a few ulp would still let a CPU replay check a GPU run.
    assert worst <= 4
