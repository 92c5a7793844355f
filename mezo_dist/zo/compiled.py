"""The ``compiled`` pass: the hash stream of ``hashz.py`` drawn and applied by kernels that
inductor compiles ahead of time (AOTInductor), cached on disk.

One call edits a 1-D piece ``x`` holding global elements ``[offset, offset + n)`` of a
parameter, in place: ``x <- (x + a z) c + b z``, z computed in registers from the elements'
global indices (no z buffer). With an fp32 master the same kernel writes both the master
(``m <- m c + b z``, or nothing when the pass only perturbs) and the compute storage
(``compute <- m + s z`` in the storage's dtype). Values stored in bf16/fp16 compute in fp32.

The piece is cut at global block boundaries (``hashz.BLOCK`` elements): whole blocks go to the
pair kernel (one hash and one Box-Muller transform for two elements, read and written as two
contiguous runs), the at most two partial blocks at its edges to the element kernel (the same
function, one element at a time). The cut depends on global indices only, and both kernels
evaluate the same fp32 expressions, so an element gets the same bits whichever kernel, vector
lane or tail iteration computes it (the tests check this against a numpy evaluation).

Compilation. A pass calls its kernel once per piece of every parameter (hundreds per pass on a
real model), so the cost of a call matters as much as the kernel's: through ``torch.compile``
each call paid about 0.15-0.2 ms of guard checks and Python wrappers, half of a whole pass over
SmolLM2-135M on 2 cores. So on CPU each variant
(:class:`Variant`: layout, kind, destination dtypes, master update) is exported once with a
dynamic size (``torch.export``) and compiled by AOTInductor into a package under
``$MEZO_DIST_CACHE/kernels``, named by a hash of the traced source (``hashz.py`` and the
kernel's functions here), torch's version, the compile options and the CPU's instruction set. A
process loads a package in milliseconds and calls it through its C++ loader (about 15 us per
call); the key words, first index and coefficients are tensors, so one kernel serves every
piece, key, offset and step. A cold cache compiles each variant once per machine (tens of
seconds; ranks that need the same one at once wait on a file lock for the first).
Eager evaluation is not the same function bit for bit (eager ``torch.sqrt`` on CPU is not
correctly rounded), so a failed compile raises instead of running eagerly: ``--zo_kernel
blocks`` is the way out. On CUDA the same module is compiled by ``torch.compile`` in the process
(:func:`_dynamo_kernel` says why), with sizes dynamic from the first call.

Devices. On CUDA the same Python becomes a Triton kernel. The integer hash is exact on every
device; the transform uses only fp32 +, -, *, a correctly rounded sqrt (inductor emits
``tl.sqrt_rn``) and exact conversions, and the compile options below turn off fused
multiply-add contraction in Triton (``emulate_precision_casts``) and in the C++ compiler. On
that design CUDA draws the same bits as the CPU; this has been checked on CPU instruction sets
only (``tests/unit/test_hash_noise.py::test_cuda_matches_cpu`` reports the maximum ulp
difference where a GPU exists). What can differ: fp32 parameters that are subnormal, if a
device flushes them to zero.

Sparsity hook. Every kernel edits through :func:`_edit` / :func:`_edit_master`, which see the
element's z and its unperturbed value (the master, or ``x`` before the pass); an elementwise
keep-mask (``torch.where(keep, z, 0)``, keep computed there from a per-parameter threshold
passed like the coefficients) fits in the same kernel.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.fx.experimental import _config as fx_config

from mezo_dist.errors import TrainingError
from mezo_dist.zo import hashz

# Contraction off everywhere, so a*b+c rounds twice on every device; inductor's own CPU default.
OPTIONS = {
    "emulate_precision_casts": True,
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
}
# Graphs a CUDA kernel may build; a recompile past it fails loudly instead of falling back to
# eager (which is not the same function bit for bit).
RECOMPILE_LIMIT = 64
_FAILED = ("compiling the hash-noise kernel failed ({}); run with --zo_kernel blocks (the block stream, "
           "no compiler needed)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _edit(x: torch.Tensor, z: torch.Tensor, p: torch.Tensor) -> None:
    """x <- (x + a z) c + b z with p = [a, c, b, s]; the order of operations is the contract."""
    w = x.to(_compute_dtype(x.dtype))
    p = p.to(w.dtype)
    z = z.to(w.dtype)
    x.copy_(((w + p[0] * z) * p[1] + p[2] * z).to(x.dtype))


def _edit_master(master: torch.Tensor, compute: torch.Tensor, z: torch.Tensor, p: torch.Tensor,
                 update: bool) -> None:
    """master <- master c + b z (when ``update``); compute <- master + s z."""
    if update:
        new = master * p[1] + p[2] * z
        master.copy_(new)
    else:
        new = master
    compute.copy_((new + p[3] * z).to(compute.dtype))


def _kernel(dsts: tuple, ints: torch.Tensor, p: torch.Tensor, kind: str, update: bool) -> None:
    """The compiled body. ``dsts`` is ``((x0,), (x1,))`` / ``((m0, c0), (m1, c1))`` for whole
    blocks (each ``(blocks, HALF)``: first and second halves) or ``((x,),)`` / ``((m, c),)``
    for single elements; ``ints`` = key words, then the first pair number (blocks) or element
    index (elements) relative to the segment."""
    first = dsts[0][0]
    if len(dsts) == 2:
        arange = torch.arange(hashz.HALF, device=first.device)
        starts = torch.arange(first.shape[0], device=first.device) * hashz.HALF
        zs = hashz.PAIRS[kind](ints[4] + starts[:, None] + arange[None, :], ints)
    else:
        index = ints[4] + torch.arange(first.shape[0], device=first.device)
        zs = (hashz.element_z(index, ints, kind),)
    for dst, z in zip(dsts, zs):
        if len(dst) == 1:
            _edit(dst[0], z, p)
        else:
            _edit_master(dst[0], dst[1], z, p, update)


class _Kernel(torch.nn.Module):
    """:func:`_kernel` for one variant, as a module torch.export can trace. ``dsts`` is the flat
    list of destinations: ``[x0, x1]`` / ``[m0, c0, m1, c1]`` for whole blocks, ``[x]`` /
    ``[m, c]`` for single elements."""

    def __init__(self, kind: str, update: bool, whole: bool) -> None:
        super().__init__()
        self.kind, self.update, self.whole = kind, update, whole

    def forward(self, dsts: list[torch.Tensor], ints: torch.Tensor, p: torch.Tensor) -> None:
        per = len(dsts) // (2 if self.whole else 1)
        grouped = tuple(tuple(dsts[i : i + per]) for i in range(0, len(dsts), per))
        _kernel(grouped, ints, p, self.kind, self.update)


@dataclass(frozen=True)
class Variant:
    """What one compiled kernel is specialised to; sizes stay dynamic."""

    kind: str
    update: bool
    whole: bool  # whole blocks (the pair kernel) or single elements
    dtypes: tuple[torch.dtype, ...]  # the destinations' dtypes: (x,) or (master, compute)
    device: torch.device

    def example(self) -> list[torch.Tensor]:
        """Destinations shaped as :func:`apply_` passes them (views of ``(blocks, 2, HALF)`` for
        whole blocks), with a size of 2 so that export keeps the size symbolic."""
        if not self.whole:
            return [torch.zeros(2, dtype=d, device=self.device) for d in self.dtypes]
        halves = [torch.zeros(2, 2, hashz.HALF, dtype=d, device=self.device) for d in self.dtypes]
        return [h[:, i] for i in (0, 1) for h in halves]


# The code a compiled kernel contains, besides hashz.py: its source names the kernel (``_key``).
_TRACED = (_compute_dtype, _edit, _edit_master, _kernel, _Kernel)
# Variant -> the loaded kernel of this process.
_LOADED: dict[Variant, Callable] = {}


def loaded_variants() -> list[Variant]:
    """The kernels this process has loaded (each compiled once per machine and cached on disk)."""
    return list(_LOADED)


def _key(v: Variant) -> str:
    """Names a compiled kernel: it changes with anything that changes the code it would contain
    (the function's source, torch, the compile options, the target), never with sizes."""
    h = hashlib.sha256(Path(hashz.__file__).read_bytes())
    for fn in _TRACED:  # what export traces from this module (not the launcher around it)
        h.update(inspect.getsource(fn).encode())
    # The instruction set the kernel is compiled for: a cache shared between machines (a home
    # folder on a cluster) must not hand AVX-512 code to a CPU without it.
    target = f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
    h.update(repr((torch.__version__, sorted(OPTIONS.items()), v.kind, v.update, v.whole,
                   [str(d) for d in v.dtypes], target)).encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes (``$MEZO_DIST_CACHE/kernels``)."""
    from mezo_dist.assets import cache_dir as root

    return root() / "kernels"


def _build(v: Variant, path: Path) -> None:
    """Export the variant with a dynamic size and compile it ahead of time into ``path``."""
    example = v.example()
    size = torch.export.Dim("n", min=1, max=1 << 40)
    ints = torch.zeros(5, dtype=torch.int64, device=v.device)
    p = torch.zeros(4, dtype=torch.float32, device=v.device)
    program = torch.export.export(_Kernel(v.kind, v.update, v.whole), (example, ints, p),
                                  dynamic_shapes=([{0: size} for _ in example], None, None), strict=False)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=dict(OPTIONS))
        os.replace(tmp, path)  # whole or absent: a reader never sees half a package
    finally:
        tmp.unlink(missing_ok=True)


def _kernel_for(v: Variant) -> Callable[[list[torch.Tensor]], object]:
    """The variant's kernel, a function of the flat inputs (destinations, integers,
    coefficients): on CPU an AOTInductor package from the cache, compiled into it first if
    absent; on CUDA ``torch.compile`` (see :func:`_dynamo_kernel`)."""
    fn = _LOADED.get(v)
    if fn is None:
        fn = _LOADED[v] = _aoti_kernel(v) if v.device.type == "cpu" else _dynamo_kernel(v)
    return fn


def _aoti_kernel(v: Variant) -> Callable[[list[torch.Tensor]], object]:
    from filelock import FileLock

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hash-{_key(v)}.pt2"
    try:
        # Ranks of one machine that need the same kernel at once build it once; an OS lock, so a
        # killed holder releases it.
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                _build(v, path)
        # The package's own loader, not ``torch._inductor.aoti_load_package``: that wrapper probes
        # the CPU's instruction sets in child processes at every load (seconds per process) to warn
        # of a mismatch the cache key already rules out, and re-parses the input layout per call.
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).boxed_run
    except Exception as e:  # noqa: BLE001 - any compiler or loader failure becomes one line
        raise TrainingError(_FAILED.format(_first_line(e))) from e


def _dynamo_kernel(v: Variant) -> Callable[[list[torch.Tensor]], object]:
    """CUDA: AOTInductor would compile its C++ wrapper against the CUDA toolkit's headers, which
    runtime-only GPU images lack, so the kernel is compiled by ``torch.compile`` (Triton) in the
    process. Its launches are asynchronous: a call's Python overhead overlaps the device's work
    on the large pieces that make up a pass's time."""
    compiled = torch.compile(_Kernel(v.kind, v.update, v.whole), fullgraph=True, options=OPTIONS)

    def run(flat: list[torch.Tensor]) -> None:
        *dsts, ints, p = flat
        for t in dsts:
            torch._dynamo.mark_dynamic(t, 0)  # one graph for every size, 1 included (below)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True), \
                    fx_config.patch(backed_size_oblivious=True):
                compiled(dsts, ints, p)
        except Exception as e:  # noqa: BLE001 - any compiler failure becomes one line
            if "RecompileLimitExceeded" in type(e).__name__ or not _is_compile_error(e):
                raise
            raise TrainingError(_FAILED.format(_first_line(e))) from e

    return run


def _is_compile_error(e: Exception) -> bool:
    from torch._dynamo import exc

    return isinstance(e, (exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.TorchRuntimeError)) or \
        type(e).__name__ in ("InductorError", "CppCompileError")


def _launch(dsts: tuple, ints: list[int], p: torch.Tensor, kind: str, update: bool) -> None:
    flat = [t for dst in dsts for t in dst]
    masters = len(dsts[0]) == 2
    # ``update`` only changes what a kernel with masters does: plain ones share one variant.
    v = Variant(kind, update and masters, len(dsts) == 2, tuple(t.dtype for t in dsts[0]), flat[0].device)
    # The flat inputs in the exported order: the destinations, the integers, the coefficients.
    _kernel_for(v)(flat + [torch.tensor(ints, dtype=torch.int64, device=v.device), p])


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _pieces(offset: int, n: int) -> list[tuple[int, int, bool]]:
    """(start, length, whole blocks?) of local ranges, cut at global block and segment edges."""
    out = []
    pos, end = offset, offset + n
    while pos < end:
        seg_end = min(end, (pos // hashz.SEGMENT + 1) * hashz.SEGMENT)
        head_end = min(seg_end, -(-pos // hashz.BLOCK) * hashz.BLOCK)
        mid_end = head_end + (seg_end - head_end) // hashz.BLOCK * hashz.BLOCK
        for lo, hi, whole in ((pos, head_end, False), (head_end, mid_end, True), (mid_end, seg_end, False)):
            if hi > lo:
                out.append((lo - offset, hi - lo, whole))
        pos = seg_end
    return out


def apply_(x: torch.Tensor, key: int, offset: int, a: float, c: float, b: float, *, kind: str,
           compute: torch.Tensor | None = None, scale: float = 0.0, update: bool = True) -> None:
    """Edit the contiguous 1-D ``x`` (global elements ``[offset, offset + x.numel())``) in place.

    Without ``compute``: ``x <- (x + a z) c + b z``. With ``compute`` (``x`` is then an fp32
    master): ``x <- x c + b z`` if ``update`` (``a`` unused), then ``compute <- x + scale z``.

    Args:
        x: the piece's values (or master), contiguous.
        key: the parameter's key (``noise.param_key``).
        offset: global index of ``x[0]`` in the flattened parameter.
        a, c, b: the pass's coefficients (``passes.Affine``, c already 1 where decay is off).
        kind: ``gaussian`` or ``rademacher``.
        compute: the compute storage of a piece with fp32 masters (same length as ``x``).
        scale: the perturbation ``compute`` holds after the pass.
        update: whether the master changes (False for a pure perturbation: it is only read).
    """
    if kind not in hashz.PAIRS:
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {', '.join(hashz.PAIRS)}")
    if not (x.dim() == 1 and x.is_contiguous() and (compute is None or compute.is_contiguous())):
        raise ValueError("the compiled pass needs contiguous 1-D pieces")
    if x.numel() == 0:
        return
    p = torch.tensor([a, c, b, scale], dtype=torch.float32, device=x.device)
    for start, n, whole in _pieces(offset, x.numel()):
        seg, rel = divmod(offset + start, hashz.SEGMENT)
        ints = hashz.key_words(key, seg)
        views = [x[start : start + n]] + ([] if compute is None else [compute[start : start + n]])
        if whole:
            halves = [v.view(-1, 2, hashz.HALF) for v in views]
            dsts = (tuple(h[:, 0] for h in halves), tuple(h[:, 1] for h in halves))
            ints.append(rel // hashz.BLOCK * hashz.HALF)
        else:
            dsts = (tuple(views),)
            ints.append(rel)
        _launch(dsts, ints, p, kind, update)


def draw(key: int, offset: int, count: int, *, kind: str = "gaussian", device: torch.device | str = "cpu",
         out: torch.Tensor | None = None) -> torch.Tensor:
    """z of global elements ``[offset, offset + count)`` (fp32), materialised by the same kernels."""
    z = torch.zeros(count, dtype=torch.float32, device=device) if out is None else out.zero_()
    apply_(z, key, offset, 1.0, 1.0, 0.0, kind=kind)
    return z
