"""The CUDA kernels of megaclass._C (csrc/lce_cuda.cu): that the build contains them, and that they
compute the contract of csrc/megaclass_ops.cpp.

The build check runs everywhere (CI has nvcc but no GPU); the kernel checks need a GPU and skip without
one. References are float64 computations on the same (already rounded) logits, so the only error is the
kernel's own: fp32 accumulation with the fast `__expf` (relative ~1e-6 per term; the sums below use a
bound of 2e-5 relative to Σ|term|, several times the worst case for these sizes) and, for values
written back in the logits' dtype, one rounding to that dtype (half its eps, relative).
"""
from __future__ import annotations

import os
import re
import shutil
import struct

import pytest
import torch

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, C_local): odd widths leave rows unaligned to 16 bytes (head + packs + tail), 1 and 7 have no
# full pack at all, 70,001 takes the 512-thread configuration and several grad tiles per row.
SHAPES = [(1, 1), (3, 7), (9, 37), (5, 1000), (4, 4099), (2, 70001)]
SUM_RTOL = 2e-5
EXP_RTOL = 4e-6  # __expf: the rounding of x·log2(e) for |x| up to ~40, plus ex2.approx's own 2^-22


def _floor(dtype) -> float:
    """Absolute error allowed near zero: values below the smallest normal number flush to zero under
    --use_fast_math (fp32) or lose precision as fp16 subnormals (spacing 2^-24)."""
    return 2.0 ** -24 if dtype == torch.float16 else torch.finfo(torch.float32).tiny


def _fatbin_entries(path: str) -> set[tuple[str, int]]:
    """{(kind, sm)} of the device code embedded in a shared library: kind "elf" (a cubin) or "ptx".

    Reads the fat binaries nvcc embeds (magic 0xBA55ED50, version 1, 16-byte header, then entries of
    {u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 payload size, ..., u32 sm at byte 28}) rather
    than calling cuobjdump, which CI machines need not have. A candidate counts only when its entries
    tile its declared size exactly, so a stray occurrence of the magic number is not misread."""
    data = open(path, "rb").read()
    magic = struct.pack("<I", 0xBA55ED50)
    found = set()
    start = data.find(magic)
    while start != -1:
        _, version, header, size = struct.unpack_from("<IHHQ", data, start)
        entries, pos, end = set(), start + header, start + header + size
        while version == 1 and header == 16 and pos + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
            if kind not in (1, 2) or entry_header < 32:
                break
            entries.add(({1: "ptx", 2: "elf"}[kind], struct.unpack_from("<I", data, pos + 28)[0]))
            pos += entry_header + payload
        if pos == end and entries:
            found |= entries
        start = data.find(magic, start + 1)
    return found


def _expects_cuda_build() -> bool:
    """setup.py builds the CUDA kernels when torch is a CUDA build and a toolkit is present."""
    toolkit = shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc")
    cpu_only = os.environ.get("MEGACLASS_CPU_ONLY", "0").lower() not in ("", "0", "false", "no")
    return bool(torch.version.cuda and toolkit and not cpu_only)


def _archs() -> list[int]:
    spec = os.environ.get("MEGACLASS_CUDA_ARCHS", "80;90").replace(",", ";")
    return [int(re.match(r"\d+", a.strip().replace(".", "")).group()) for a in spec.split(";") if a.strip()]


def test_extension_contains_cuda_kernels_for_each_arch():
    if not _expects_cuda_build():
        pytest.skip("no CUDA toolkit or a CPU-only torch: setup.py builds the CPU kernels only")
    try:
        from megaclass import _C
    except ImportError as exc:
        pytest.fail(f"megaclass._C is not built ({exc}), though a CUDA toolkit and a CUDA torch are present: "
                    "run `python setup.py build_ext --inplace` (make build)")

    for op in ("lce_chunk_stats", "lce_chunk_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"megaclass::{op}", "CUDA"), op
    entries = _fatbin_entries(_C.__file__)
    archs = _archs()
    missing = {("elf", a) for a in archs} - entries
    assert not missing, f"{_C.__file__} lacks cubins {sorted(missing)}; it has {sorted(entries)}"
    assert ("ptx", max(archs)) in entries, f"no PTX for sm_{max(archs)} (forward compatibility): {sorted(entries)}"


def test_fatbin_reader_on_a_known_layout():
    """The reader against a fat binary assembled by hand in the documented layout, plus noise."""
    def entry(kind, sm, payload):
        head = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + b"\0" * 12 + struct.pack("<I", sm)
        return head + b"\0" * (64 - len(head)) + payload

    body = entry(2, 80, b"\x7fELF" + b"x" * 20) + entry(2, 90, b"\x7fELF" + b"y" * 4) + entry(1, 90, b"ptx")
    blob = b"junk" + struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    blob += struct.pack("<I", 0xBA55ED50) + b"garbage-after-a-stray-magic" * 3
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fatbin-{os.getpid()}.bin")
    with open(path, "wb") as f:
        f.write(blob)
    try:
        assert _fatbin_entries(path) == {("elf", 80), ("elf", 90), ("ptx", 90)}
    finally:
        os.remove(path)


# ----------------------------------------------------------------------------------------------------
# kernels on the GPU


def _ops():
    from megaclass import _C  # noqa: F401  (loads the library, which registers torch.ops.megaclass)

    return torch.ops.megaclass


def _case(rows, cols, dtype, device="cuda", offset=0, seed=0):
    """Logits [rows, cols] (scale 4: a spread of exponents), a storage offset of `offset` elements so that
    even row 0 can start off a 16-byte boundary, targets partly outside the shard [100, 100 + cols)."""
    gen = torch.Generator().manual_seed(seed)
    storage = (torch.randn(rows * cols + offset, generator=gen) * 4).to(dtype).to(device)
    logits = storage[offset:].view(rows, cols)
    target = torch.randint(100, 100 + cols, (rows,), generator=gen)
    target[::3] = -100  # ignore_index: outside every shard
    if rows > 1:
        target[1] = 100 + cols  # another rank's class
    return logits, target.to(device)


def _reference_stats(logits, target, class_start):
    z = logits.double().cpu()
    local = target.cpu() - class_start
    inside = (local >= 0) & (local < z.shape[1])
    m = z.amax(1)
    terms = torch.exp(z - m[:, None])
    zt = torch.where(inside, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
    return m, terms.sum(1), zt, z.sum(1), z.abs().sum(1), terms


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_chunk_stats_cuda(dtype, rows, cols, offset):
    logits, target = _case(rows, cols, dtype, offset=offset)
    before = logits.clone()
    stats = _ops().lce_chunk_stats(logits, target, 100, False)
    assert stats.dtype == torch.float32 and stats.shape == (4, rows) and stats.device == logits.device
    assert torch.equal(logits, before), "store_exp=False must leave the logits alone"
    m, sumexp, zt, zsum, zabs, _ = _reference_stats(before, target, 100)
    s = stats.double().cpu()
    assert torch.equal(s[0], m), "the max of fp32-converted values is exact"
    assert torch.equal(s[2], zt), "the target logit is copied, not computed"
    torch.testing.assert_close(s[1], sumexp, rtol=SUM_RTOL, atol=0)
    assert ((s[3] - zsum).abs() <= SUM_RTOL * zabs).all()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_chunk_stats_store_exp_cuda(dtype, rows, cols):
    logits, target = _case(rows, cols, dtype, offset=1)
    before = logits.clone()
    stats = _ops().lce_chunk_stats(logits, target, 100, True)
    m, sumexp, zt, zsum, zabs, terms = _reference_stats(before, target, 100)
    s = stats.double().cpu()
    assert torch.equal(s[0], m) and torch.equal(s[2], zt), "the target logit is read before the overwrite"
    torch.testing.assert_close(s[1], sumexp, rtol=SUM_RTOL, atol=0)
    assert ((s[3] - zsum).abs() <= SUM_RTOL * zabs).all()
    # logits now hold exp(z - max) in their dtype: one rounding (eps/2) on top of __expf's error
    e = logits.double().cpu()
    tol = (torch.finfo(dtype).eps / 2 + EXP_RTOL) * terms + _floor(dtype)
    assert ((e - terms).abs() <= tol).all()


def _reference_grad(z, target, class_start, shift, coef, target_coef, uniform_coef, stored_exp):
    z, shift, coef = z.double().cpu(), shift.double().cpu(), coef.double().cpu()
    p = z * torch.exp(-shift)[:, None] if stored_exp else torch.exp(z - shift[:, None])
    hit = torch.zeros_like(p)
    local = target.cpu() - class_start
    inside = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
    hit[inside, local[inside]] = target_coef
    return coef[:, None] * (p - hit - uniform_coef)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("stored_exp", [False, True])
def test_chunk_grad_cuda(dtype, rows, cols, stored_exp):
    logits, target = _case(rows, cols, dtype, offset=1, seed=1)
    m, sumexp, *_ = _reference_stats(logits, target, 100)
    lse = m + torch.log(sumexp) + 0.5  # as if other ranks' classes added to the sum
    if stored_exp:
        logits.copy_(torch.exp(logits.double() - m.to(logits.device)[:, None]).to(dtype))
        shift = (lse - m).float()
    else:
        shift = lse.float()
    coef = torch.rand(rows, dtype=torch.float64).float() * 2
    coef[::4] = 0.0  # ignored rows
    if rows > 2:
        shift[2] = float("inf")  # an ignored row's garbage shift must not leak: its gradient is exactly 0
        coef[2] = 0.0
    before = logits.clone()
    eps = 0.1
    _ops().lce_chunk_grad_(logits, target, 100, shift.cuda(), coef.cuda(), 1 - eps, eps / 5000, stored_exp)
    ref = _reference_grad(before, target, 100, shift, coef, 1 - eps, eps / 5000, stored_exp)
    got = logits.double().cpu()
    assert torch.equal(got[coef == 0], torch.zeros_like(got[coef == 0]))
    # fp32 arithmetic (__expf: EXP_RTOL of p ≤ 1) then one rounding to the dtype (eps/2 of |g|)
    scale = coef.double()[:, None] * (2 - eps)
    tol = torch.finfo(dtype).eps / 2 * ref.abs() + EXP_RTOL * scale + _floor(dtype)
    assert ((got - ref).abs() <= tol).all(), (got - ref).abs().max()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_and_cpu_kernels_agree(dtype):
    ops = _ops()
    logits, target = _case(6, 50_003, dtype, seed=2)
    cpu_logits, cpu_target = logits.cpu(), target.cpu()
    for store_exp in (False, True):
        a, b = logits.clone(), cpu_logits.clone()
        sa, sb = ops.lce_chunk_stats(a, target, 100, store_exp).cpu(), ops.lce_chunk_stats(b, cpu_target, 100, store_exp)
        assert torch.equal(sa[0], sb[0]) and torch.equal(sa[2], sb[2])
        torch.testing.assert_close(sa[1], sb[1], rtol=2 * SUM_RTOL, atol=0)
        torch.testing.assert_close(sa[3], sb[3], rtol=0, atol=2 * SUM_RTOL * float(logits.float().abs().sum(1).max()))
        if store_exp:  # both rounded exp(z − max) to the dtype (CPU: an accurate exp; CUDA: __expf)
            torch.testing.assert_close(a.cpu().float(), b.float(), rtol=torch.finfo(dtype).eps + EXP_RTOL,
                                       atol=_floor(dtype))
        lse = sb[0] + torch.log(sb[1])
        shift = lse - sb[0] if store_exp else lse
        coef = torch.linspace(0, 1, 6)
        ops.lce_chunk_grad_(a, target, 100, shift.cuda(), coef.cuda(), 0.9, 1e-5, store_exp)
        ops.lce_chunk_grad_(b, cpu_target, 100, shift, coef, 0.9, 1e-5, store_exp)
        # one rounding each, plus (store_exp) the one-ulp difference of the stored e they started from
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=2 * torch.finfo(dtype).eps, atol=2 * EXP_RTOL)


@needs_gpu
def test_cuda_kernels_reject_mixed_devices_and_bad_dtypes():
    ops = _ops()
    logits, target = _case(4, 33, torch.float32)
    with pytest.raises(ValueError, match="target is on cpu but logits on cuda"):
        ops.lce_chunk_stats(logits, target.cpu(), 100, False)
    with pytest.raises(ValueError, match="shift is on cpu"):
        ops.lce_chunk_grad_(logits, target, 100, torch.zeros(4), torch.zeros(4, device="cuda"), 1.0, 0.0, False)
    with pytest.raises(ValueError, match="row_coef must be a contiguous float32"):
        ops.lce_chunk_grad_(logits, target, 100, torch.zeros(4, device="cuda"),
                            torch.zeros(4, device="cuda", dtype=torch.float64), 1.0, 0.0, False)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ops.lce_chunk_stats(logits.double(), target, 100, False)
    with pytest.raises(ValueError, match="contiguous"):
        ops.lce_chunk_stats(logits.t(), torch.zeros(33, dtype=torch.int64, device="cuda"), 100, False)


@needs_gpu
def test_cuda_kernels_run_on_the_current_stream():
    """Queued behind a long kernel on a side stream, the result is only right if the kernel waits for
    it, i.e. runs on that same (current) stream."""
    ops = _ops()
    logits, target = _case(64, 100_000, torch.float32)
    expected = ops.lce_chunk_stats(logits.clone(), target, 100, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # logits and expected are made on the default stream
    with torch.cuda.stream(side):
        work = torch.zeros_like(logits)
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy for tens of milliseconds
        work.copy_(logits)
        got = ops.lce_chunk_stats(work, target, 100, False)
        grad_in = work.clone()
        shift = got[0] + torch.log(got[1])
        ops.lce_chunk_grad_(grad_in, target, 100, shift, torch.ones_like(shift), 1.0, 0.0, False)
        rowsum = grad_in.sum(1)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Σ_c (p − [c = t]) = 1 − [target in shard]
    inside = ((target >= 100) & (target < 100 + 100_000)).float()
    torch.testing.assert_close(rowsum, 1 - inside, rtol=0, atol=1e-3)
