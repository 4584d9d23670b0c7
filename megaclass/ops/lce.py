"""Fused, class-sharded, sample-weighted linear + softmax cross-entropy.

Rank r of a group of P holds classes [class_start, class_start + C_local) of C = Σ C_local; hidden
X [N, D] is the same on every rank. Per row i with label y_i, weight s_i and label smoothing ε:

    z = X Wᵀ (+ b)                                  a chunk of rows at a time, never [N, C_local]
    lse_i = log Σ_c exp(z_ic)                       over all C classes of the group
    ℓ_i = s_i · (lse_i − (1−ε)·z_{i,y_i} − (ε/C)·Σ_c z_ic)        ignored rows give 0
    g_ic = k_i · (exp(z_ic − lse_i) − (1−ε)·[c = y_i] − ε/C)       k_i = s_i·upstream_i (/ #valid for "mean")
    dX = Σ_ranks g W,  dW = gᵀ X,  db = Σ_i g_i

Per chunk each rank computes its local (max, Σ exp(z − max), z_target, Σ z) per row; ONE all-gather of
that [4, R] table gives every rank the same lse. Every rank runs the same chunks (chosen from the group's
largest shard), hence the same collectives. For "mean"/"sum" the weights s_i are known at forward
time, so the gradients are made during the forward pass (three GEMMs in all: logits, dX, dW); backward
hands them over to autograd and keeps no reference (an upstream gradient other than 1 scales them in
place). "none" needs the per-row upstream gradient, known only in backward: the forward keeps lse and
the backward recomputes the logits (four GEMMs). dX is summed over ranks by ONE all-reduce at the end
(none with hidden_grad="partial"). Double backward is not supported (a RuntimeError, not a graph-less
gradient).

dW is added over row chunks in the weight's own dtype (each addmm_ is fp32 inside and rounds once): for
bf16/fp16 over at most MAX_ROW_CHUNKS (4) chunks, so still three GEMMs, with dW rounded at most 4 times
(an fp32 accumulator would be 2.4 GB at 256,000 × 2,304). Beyond 4 chunks the bf16/fp16 gradients are
made a block of classes at a time over all rows (`_class_sweep`: each block's dW one GEMM, rounded once),
which recomputes the logits: four GEMMs, and no memory beyond one working set and an fp32 dX.

fp16 gradients made in forward would be made before the loss scale arrives, and k·p ≈ 1/(N·C) lies
below fp16's smallest subnormal at large N·C: they are made at a power-of-two scale S, the largest for
which no gradient can exceed 2^15 (a bound from k, X and max|W|, `_grad_scale`), and backward
multiplies by upstream / S in fp32, rounding once; a power-of-two upstream (a GradScaler's) is exact.

The logits buffer's row pitch and the class blocks' starts are multiples of 16 bytes (odd C_local shards
are padded in the pitch; blocks are multiples of 128 classes): cuBLAS takes its fastest kernels only
for aligned leading dimensions. On CPU the buffer is kept between calls, and large gradients handed to
autograd reuse a storage autograd has released (`_fresh`): a fresh 50 MB weight.grad would page-fault
every step. docs/fused-op.md gives the measurements.

`weight_grad_into=(buffer, beta[, alpha])` folds dW into a caller's buffer instead of a fresh weight.grad
(as Megatron's gradient-accumulation fusion writes into main_grad): buffer ← beta·buffer + alpha·dW, the
first GEMM into it with beta, later ones adding; e.g. an SGD momentum buffer, which spares the
optimizer step a [C_local, D] gradient. dW of "mean"/"sum" is made in forward, before the upstream
gradient is known, so the caller states it (alpha) and backward checks it.
"""
from __future__ import annotations

import dataclasses
import math
import struct
import threading

import torch

from megaclass.ops import kernels
from megaclass.parallel import comm

REDUCTIONS = ("mean", "sum", "none")
HIDDEN_GRADS = ("full", "partial")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

WHOLE_BATCH_BYTES = 512 << 20
"""A batch whose logits (rows × C_local elements) fit in this many bytes runs as ONE chunk. Chunking
costs time: each chunk streams W through two GEMMs again, about 3.5 % per halving of the chunk rows at
this machine's GEMM rate and memory bandwidth (fp32, N=2048, C=50k, 2 threads: one chunk 1.03× the
three-GEMM floor, chunks of 1,024 rows 1.08×, of 512 rows 1.12×), so it pays only when it saves memory
that matters."""
CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
"""The logits buffer (chunk rows × C_local elements), the op's working set, of a batch bigger than
WHOLE_BATCH_BYTES, per device type (others: 512 MiB). On CPU 128 MB, so that e.g. 2^20 classes over
2 ranks stay within 1 GB per rank. On a GPU, 1 GiB: 8,192 × 256,000 bf16 runs as 4 chunks of 2,048 rows
(1.05 GB), so within MAX_ROW_CHUNKS: three GEMMs and ≈ 1.05 GB beyond inputs, parameters and gradients."""
MIN_CHUNK_ROWS = 64
"""Fewer rows per chunk would starve the GEMMs (dW = gᵀX has only chunk rows as its inner dimension)."""


@dataclasses.dataclass(frozen=True)
class _Options:
    class_start: int
    num_classes: int
    group: object
    world: int
    rank: int
    ignore_index: int
    label_smoothing: float
    reduction: str
    chunk_rows: int
    hidden_grad: str
    use_extension: bool


def linear_cross_entropy(hidden, weight, target, sample_weight=None, *, bias=None, class_start=0,
                         process_group=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                         chunk_size=None, hidden_grad="full", implementation="auto", weight_grad_into=None):
    """Sample-weighted softmax cross-entropy of `hidden @ weight.T (+ bias)` without materializing the logits.

    hidden:        [N, D], identical on every rank of `process_group`
    weight:        [C_local, D], this rank's classes [class_start, class_start + C_local)
    target:        [N] int64 global class ids in [0, C), or `ignore_index` (the row then counts 0)
    sample_weight: [N] non-negative per-row loss weights s_i, or None for all ones
    bias:          [C_local] or None
    process_group: the group the classes are split over; None = one rank holding all C classes
    label_smoothing: ε as in `F.cross_entropy` (the uniform part spread over all C classes)
    reduction:     "mean" (Σ ℓ_i / number of non-ignored rows; 0 when all are ignored), "sum", "none" ([N])
    chunk_size:    rows per chunk (the working set is chunk_size × C_local), the same on every rank; None =
                   about 128 MB (CPU) / 1 GiB (GPU) of logits of the group's largest shard
    hidden_grad:   (extension) "full": hidden gets the gradient summed over all shards (one all-reduce);
                   "partial": only this shard's part, for callers whose hidden is an all-gather that
                   sums the gradient itself in backward (e.g. `comm.gather_rows`)
    implementation: (extension) "auto" | "extension" (megaclass._C) | "torch" (the PyTorch twin)
    weight_grad_into: (extension) None, or (buffer, beta) or (buffer, beta, alpha): weight's gradient is
                   folded into `buffer` (contiguous, weight's shape/dtype/device, not requiring grad) as
                   buffer ← beta·buffer + alpha·dW (beta 0: buffer's content is ignored) and weight gets
                   no gradient from autograd (weight.grad stays None). For "mean"/"sum" dW is made in
                   forward, so alpha (default 1) must be the gradient backward will bring to the loss
                   (1/grad_accum under DeepSpeed's engine.backward); backward raises if it differs. For
                   "none" the fold happens in backward and alpha must be 1. Nothing is written when no
                   gradient is made (no_grad, inference mode, weight not requiring grad).

    Returns the loss in hidden's dtype: a scalar, or [N] for "none". Gradients flow to hidden, weight,
    bias and sample_weight. Bad input, and ranks that disagree on an option, raise ValueError on every
    rank of the group. Double backward (create_graph=True) raises RuntimeError.
    """
    opts = _validate(hidden, weight, target, sample_weight, bias, class_start, process_group, ignore_index,
                     label_smoothing, reduction, chunk_size, hidden_grad, implementation,
                     weight_grad_into=weight_grad_into)
    # inside the Function grad mode is always off, and needs_input_grad still says True under no_grad:
    # an eval-time loss must not make (and all-reduce) gradients nobody will read
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, sample_weight, opts, torch.is_grad_enabled(),
                                     _fold(weight_grad_into))


def linear_cross_entropy_gathered(hidden, weight, target, sample_weight=None, *, bias=None, class_start=0,
                                  process_group=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                  chunk_size=None, implementation="auto", weight_grad_into=None):
    """`linear_cross_entropy` in the data-parallel layout: each rank of `process_group` brings its OWN rows.

    hidden [n, D], target [n], sample_weight [n] or None: this rank's rows, the same n on every rank. They
    are all-gathered into the global batch [P·n] (hidden through `comm.gather_rows`, whose backward
    sums the gradient over ranks and returns each rank its rows; the op adds only its shard's part,
    hidden_grad="partial") and the loss is over that batch, identical on every rank. The local
    arguments are validated before the gather, in the op's one small collective (equal n included).
    sample_weight must not require grad here (its gradient would need a reduce-scatter of its own).
    weight_grad_into: as in `linear_cross_entropy`.
    """
    opts = _validate(hidden, weight, target, sample_weight, bias, class_start, process_group, ignore_index,
                     label_smoothing, reduction, chunk_size, "partial", implementation, gathered=True,
                     weight_grad_into=weight_grad_into)
    if opts.world > 1:
        hidden = comm.gather_rows(hidden, process_group)
        target = comm.all_gather_stacked(target, process_group).reshape(-1)
        if sample_weight is not None:
            sample_weight = comm.all_gather_stacked(sample_weight, process_group).reshape(-1)
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, sample_weight, opts, torch.is_grad_enabled(),
                                     _fold(weight_grad_into))


# ----------------------------------------------------------------------------------------------------
# validation: every rank reaches the same verdict (one small all-gather), so bad input never hangs a group


def _local_problem(hidden, weight, target, sample_weight, bias, class_start, ignore_index, label_smoothing,
                   reduction, chunk_size, hidden_grad, gathered, weight_grad_into=None):
    """The first problem with this rank's arguments, as a message, or None."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        return f"hidden must be a 2-D tensor [N, D], got {_describe(hidden)}"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return f"weight must be a 2-D tensor [C_local, D], got {_describe(weight)}"
    if hidden.dtype not in _DTYPE_CODES:
        return f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}"
    if weight.dtype != hidden.dtype:
        return f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}"
    if weight.device != hidden.device:
        return f"weight is on {weight.device} but hidden is on {hidden.device}"
    if weight.shape[1] != hidden.shape[1]:
        return f"weight has {weight.shape[1]} features per class but hidden has D={hidden.shape[1]}"
    n = hidden.shape[0]
    if not isinstance(target, torch.Tensor) or target.shape != (n,):
        return f"target must be a tensor of shape [{n}] (one class id per row of hidden), got {_describe(target)}"
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        return f"target must hold integer class ids, got dtype {target.dtype}"
    if target.device != hidden.device:
        return f"target is on {target.device} but hidden is on {hidden.device}"
    if sample_weight is not None:
        if not isinstance(sample_weight, torch.Tensor) or sample_weight.shape != (n,):
            return f"sample_weight must be a tensor of shape [{n}], got {_describe(sample_weight)}"
        if not sample_weight.is_floating_point():
            return f"sample_weight must be floating point, got dtype {sample_weight.dtype}"
        if sample_weight.device != hidden.device:
            return f"sample_weight is on {sample_weight.device} but hidden is on {hidden.device}"
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            return f"bias must be a tensor of shape [{weight.shape[0]}] (one per local class), got {_describe(bias)}"
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            return f"bias must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), got {bias.dtype}, {bias.device}"
    if not isinstance(class_start, int) or class_start < 0:
        return f"class_start must be a non-negative int, got {class_start!r}"
    if not isinstance(ignore_index, int):
        return f"ignore_index must be an int, got {ignore_index!r}"
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        return f"label_smoothing must be in [0, 1], got {label_smoothing!r}"
    if reduction not in REDUCTIONS:
        return f"reduction must be one of {REDUCTIONS}, got {reduction!r}"
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        return f"chunk_size must be a positive int or None, got {chunk_size!r}"
    if hidden_grad not in HIDDEN_GRADS:
        return f"hidden_grad must be one of {HIDDEN_GRADS}, got {hidden_grad!r}"
    if gathered and sample_weight is not None and sample_weight.requires_grad:
        return ("sample_weight requires grad, but with each rank's own rows gathered (gather_input=True) its "
                "gradient is not supported: pass sample_weight.detach()")
    if sample_weight is not None and n:
        bad = ~torch.isfinite(sample_weight) | (sample_weight < 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            return f"sample_weight must be finite and non-negative: row {row} holds {sample_weight[row].item()}"
    if weight_grad_into is not None:
        return _fold_problem(weight_grad_into, weight, reduction)
    return None


def _fold_problem(into, weight, reduction):
    """The problem with `weight_grad_into`, as a message, or None."""
    if not isinstance(into, (tuple, list)) or len(into) not in (2, 3):
        return f"weight_grad_into must be None or (buffer, beta) or (buffer, beta, alpha), got {_describe(into)}"
    buffer, *scalars = into
    if not isinstance(buffer, torch.Tensor) or buffer.shape != weight.shape:
        return (f"weight_grad_into: the buffer must be a tensor of weight's shape {list(weight.shape)}, "
                f"got {_describe(buffer)}")
    if buffer.dtype != weight.dtype or buffer.device != weight.device:
        return (f"weight_grad_into: the buffer must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                f"got {buffer.dtype}, {buffer.device}")
    if not buffer.is_contiguous():
        return "weight_grad_into: the buffer must be contiguous"
    if buffer.requires_grad:
        return "weight_grad_into: the buffer must not require grad (it is written in place)"
    if buffer.data_ptr() == weight.data_ptr() and weight.numel():
        return "weight_grad_into: the buffer is weight itself"
    for name, value in zip(("beta", "alpha"), scalars):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"weight_grad_into: {name} must be a finite number, got {value!r}"
    if reduction == "none" and len(scalars) == 2 and scalars[1] != 1:
        return (f"weight_grad_into: alpha must be 1 for reduction='none' (the upstream gradients reach the "
                f"fold in backward), got {scalars[1]!r}")
    return None


@dataclasses.dataclass(frozen=True)
class _Fold:
    """buffer ← beta·buffer + alpha·dW (`weight_grad_into`, validated)."""
    buffer: torch.Tensor
    beta: float
    alpha: float


def _fold(into):
    if into is None:
        return None
    buffer, beta, *alpha = into
    return _Fold(buffer, float(beta), float(alpha[0]) if alpha else 1.0)


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:80]


def _float_code(x):
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _float_value(code):
    return struct.unpack("<d", struct.pack("<q", code))[0]


def _choice(choices):
    return (choices.index, choices.__getitem__)


# Options every rank of the group must pass alike (a rank with other values would compute another loss,
# or run other collectives): name -> (encode to int64, decode for the message). One line per option.
_AGREED = {
    "N (rows of hidden)": (int, int),
    "D (features)": (int, int),
    "dtype": (_DTYPE_CODES.__getitem__, list(_DTYPE_CODES).__getitem__),
    "bias presence": (int, bool),
    "label_smoothing": (_float_code, _float_value),
    "ignore_index": (int, int),
    "reduction": _choice(REDUCTIONS),
    "hidden_grad": _choice(HIDDEN_GRADS),
    "chunk_size": (lambda v: 0 if v is None else v, lambda c: None if c == 0 else c),
    "whether hidden's gradient is wanted (grad mode and hidden.requires_grad)": (int, bool),
}


def _validate(hidden, weight, target, sample_weight, bias, class_start, group, ignore_index, label_smoothing,
              reduction, chunk_size, hidden_grad, implementation, gathered=False, weight_grad_into=None):
    """Options of one call, the same on every rank, or ValueError on every rank. gathered: the arguments are
    this rank's own rows, to be all-gathered after (then N must agree and the batch is P·N rows).

    One all-gather of a small int table: each rank's status, target range and shard, and the `_AGREED`
    options. The chunk size is chosen from the group's largest shard, so that every rank runs the same
    number of chunks, hence of collectives."""
    world = 1 if group is None else comm.world_size(group)
    gathered = gathered and world > 1
    problem = _local_problem(hidden, weight, target, sample_weight, bias, class_start, ignore_index,
                             label_smoothing, reduction, chunk_size, hidden_grad, gathered, weight_grad_into)
    head = 5  # status, lo, hi, C_local, class_start; then the agreed options
    if problem is None:
        n, d = hidden.shape
        c_local = weight.shape[0]
        valid = target != ignore_index
        # the range of this rank's targets: checked against C once every rank's shard is known
        wide = target.to(torch.int64)
        lo, hi = (torch.stack([torch.where(valid, wide, torch.iinfo(torch.int64).max).min(),
                               torch.where(valid, wide, -1).max()]).tolist() if n else (0, -1))
        wants_dx = torch.is_grad_enabled() and hidden.requires_grad and hidden_grad == "full"
        agreed = (n, d, hidden.dtype, bias is not None, label_smoothing, ignore_index, reduction, hidden_grad,
                  chunk_size, wants_dx)
        row = [0, lo, hi, c_local, class_start] + [enc(v) for (enc, _), v in zip(_AGREED.values(), agreed)]
    else:
        row = [1, 0, -1, -1, -1] + [0] * len(_AGREED)
    if world > 1:
        device = hidden.device if comm.backend(group) == "nccl" and isinstance(hidden, torch.Tensor) else "cpu"
        table = comm.gather_ints(row, device=device, group=group)
        me = comm.rank(group)
    else:
        table, me = [row], 0
    if problem is not None:
        raise ValueError(f"linear_cross_entropy: {problem}")
    failed = [r for r, t in enumerate(table) if t[0]]
    if failed:
        raise ValueError(f"linear_cross_entropy: rank {failed[0]} of the process group rejected its arguments "
                         "(its own error says why)")
    for col, (name, (_, dec)) in enumerate(_AGREED.items(), start=head):
        values = [t[col] for t in table]
        if len(set(values)) > 1:
            why = (" (gather_input=True needs the same number of rows on every rank)"
                   if gathered and name.startswith("N ") else "")
            raise ValueError(f"linear_cross_entropy: ranks disagree on {name}: {[dec(v) for v in values]} "
                             f"(rank order){why}")
    shards = sorted((t[4], t[3], r) for r, t in enumerate(table))
    expected = 0
    for start, size, r in shards:
        if start != expected:
            raise ValueError(
                f"linear_cross_entropy: class shards do not tile [0, C): rank {r} starts at class {start} "
                f"but the shards before it end at {expected}; shards (rank: start, size) = "
                + ", ".join(f"{rr}: {t[4]}, {t[3]}" for rr, t in enumerate(table)))
        expected += size
    num_classes = expected
    if num_classes == 0:
        raise ValueError("linear_cross_entropy: the group holds no classes (every weight shard has 0 rows)")
    for r, t in enumerate(table):
        lo, hi = t[1], t[2]
        if n and (lo < 0 or hi >= num_classes):
            if r == me:
                _raise_bad_target(target, ignore_index, num_classes)
            raise ValueError(f"linear_cross_entropy: rank {r} has a target outside [0, {num_classes}) that is not "
                             f"ignore_index={ignore_index} (its own error names the row)")
    use_ext = kernels.uses_extension(hidden, implementation)
    rows = hidden.shape[0] * (world if gathered else 1)
    largest_shard = max(t[3] for t in table)
    chunk_rows = chunk_size if chunk_size is not None else _chunk_rows(rows, largest_shard, hidden)
    return _Options(class_start=class_start, num_classes=num_classes, group=group, world=world, rank=me,
                    ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction,
                    chunk_rows=max(1, min(chunk_rows, rows)), hidden_grad=hidden_grad, use_extension=use_ext)


def _chunk_rows(rows, c_local, hidden):
    """Rows per chunk for logits [rows, c_local]: all of them within WHOLE_BATCH_BYTES, else equal chunks of
    about CHUNK_BYTES. c_local is the group's largest shard: every rank must run the same chunks."""
    row_bytes = max(1, c_local * hidden.element_size())
    if rows * row_bytes <= WHOLE_BATCH_BYTES:
        return max(rows, 1)
    budget = CHUNK_BYTES.get(hidden.device.type, 512 << 20)
    chunk = max(MIN_CHUNK_ROWS, budget // row_bytes)
    return -(-rows // -(-rows // chunk))  # equal chunks: no small last one


def _raise_bad_target(target, ignore_index, num_classes):
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    row = int(bad.nonzero()[0, 0])
    raise ValueError(f"linear_cross_entropy: target[{row}] = {int(target[row])} is outside [0, {num_classes}) "
                     f"and is not ignore_index ({ignore_index})")


# ----------------------------------------------------------------------------------------------------
# the chunk loop


def _combine(stats):
    """stats: [P, 4, R] per-rank (max, Σexp, z_target, Σz) -> (lse, z_target, Σz) over all classes, [R] each."""
    if stats.shape[0] == 1:
        m, sumexp, zt, zsum = stats[0]
        return m + torch.log(sumexp), zt, zsum
    m = stats[:, 0].amax(0)
    sumexp = (stats[:, 1] * torch.exp(stats[:, 0] - m)).sum(0)
    return m + torch.log(sumexp), stats[:, 2].sum(0), stats[:, 3].sum(0)


def _row_ce(lse, zt, zsum, eps, uniform):
    """CE_i = lse − (1−ε)·z_target − (ε/C)·Σz. Without smoothing the Σz term is left out, not multiplied by
    0: a masked class (a −inf logit) makes Σz = −inf, and F.cross_entropy's loss stays finite there."""
    ce = lse - (1.0 - eps) * zt
    return ce - uniform * zsum if eps else ce


_BUFFERS = threading.local()

ALIGN_BYTES = 16
"""Row pitches of the logits buffer and the starts of class blocks are multiples of 16 bytes: cuBLAS on
sm_90 takes its fastest (TMA) kernels only for 16-byte-aligned leading dimensions."""
CLASS_BLOCK = 128
"""Class blocks of `_class_sweep` are multiples of this many classes (16-byte-aligned starts in W)."""
MAX_ROW_CHUNKS = 4
"""bf16/fp16 dW is added over at most this many row chunks, in its own dtype (each addmm_ is fp32 inside and
rounds once, so dW is rounded ≤ 4 times); beyond, the gradients are made by class blocks (`_class_sweep`)."""
POOL_MIN_BYTES = 1 << 20
"""CPU gradients of at least this size are carved from storages kept between calls (`_fresh`)."""


def _pitch(cols, dtype):
    """Elements per row of a logits buffer of `cols` columns: rounded up to ALIGN_BYTES."""
    per = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-cols // per) * per


def _logits_buffer(rows, cols, dtype, device):
    """An uninitialized [rows, cols] logits buffer whose row pitch is `_pitch(cols)` (16-byte aligned, so an
    odd C_local shard is padded). On CPU it is kept per thread between calls (the largest one asked for):
    a fresh tens-of-MB allocation costs a page fault per 4 KB on every call, several percent of the op.
    GPU allocators cache by themselves."""
    pitch = _pitch(cols, dtype)
    if device.type != "cpu":
        return torch.empty(rows, pitch, dtype=dtype, device=device)[:, :cols]
    cache = getattr(_BUFFERS, "by_dtype", None)
    if cache is None:
        cache = _BUFFERS.by_dtype = {}
    flat = cache.get(dtype)
    if flat is None or flat.numel() < rows * pitch:
        cache.pop(dtype, None)  # free the old one before allocating the new
        flat = cache[dtype] = torch.empty(rows * pitch, dtype=dtype)
    return flat[:rows * pitch].view(rows, pitch)[:, :cols]


def _fresh(shape, dtype, device):
    """An uninitialized contiguous tensor for a gradient that autograd will own. On CPU a large one reuses a
    storage kept from an earlier call once nobody else holds it (autograd released the previous step's
    weight.grad, e.g. zero_grad()): a fresh 50 MB allocation costs a page fault per 4 KB, ~5-10% of a
    step here, which the GEMM floor, writing into preallocated outputs, never pays. Between steps a
    released gradient's memory thus stays with the op, like a GPU caching allocator's."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < POOL_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_BUFFERS, "grads", None)
    if pool is None:
        pool = _BUFFERS.grads = []
    for storage in pool:
        if storage.nbytes() == nbytes and torch._C._storage_Use_Count(storage._cdata) == 1:
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    out = torch.empty(shape, dtype=dtype)
    if len(pool) >= 4:  # drop a storage someone else still holds (it costs us nothing), else the oldest
        busy = [i for i, s in enumerate(pool) if torch._C._storage_Use_Count(s._cdata) > 1]
        pool.pop(busy[0] if busy else 0)
    pool.append(out.untyped_storage())
    return out


def _logits_(out, x, weight, bias):
    """out [r, C_local] = x [r, D] @ weightᵀ (+ bias), into a slice of the reused buffer."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _grad_scale(hidden, weight, row_coef, fold, need):
    """The factor S the forward-made gradients of fp16 carry (1 for other dtypes); backward multiplies them by
    upstream / S. fp16 gradients made at the loss's own scale flush to zero (k·p ≈ 1/(N·C) is below fp16's
    smallest subnormal at N·C ≳ 10^8), so they are made at the largest power of two S for which no
    gradient can exceed 2^15 (fp16's largest finite is 65,504), bounded from the data:
        |g| ≤ S·max k,  |dW| ≤ S·max_d Σ_i k_i |X_id|,  |dX| ≤ 2·S·max k·max |W|,  |db| ≤ S·Σ k.
    A 0-dim tensor (no host synchronisation). With `weight_grad_into`, dW is folded in forward at the
    caller's alpha, which IS the upstream gradient: S = alpha, as plain PyTorch under that loss scale."""
    if hidden.dtype != torch.float16 or row_coef is None or not any(need):
        return 1.0
    if fold is not None and need[1]:
        return fold.alpha
    if not row_coef.numel() or not weight.numel():
        return 1.0
    k_max = row_coef.amax()
    lo, hi = torch.aminmax(weight)
    bound = torch.stack([k_max, row_coef.sum(), (hidden.float().abs_().t() @ row_coef).amax(),
                         2 * k_max * torch.maximum(-lo, hi).float()]).amax()
    return torch.exp2(torch.floor(torch.log2(2.0 ** 15 / bound))).clamp(2.0 ** -60, 2.0 ** 60)


def _unscale_(t, upstream, scale):
    """t ← t · upstream / scale in place, computed in fp32 and rounded once (the factor of an fp16 gradient
    may lie below fp16's range, so it must never be rounded to t's dtype first)."""
    if t.device.type == "cpu":
        factor = float(upstream) / float(scale)
        return t if factor == 1.0 else t.mul_(factor)
    factor = upstream.float() / scale
    # a dimensioned fp32 operand makes the product fp32 inside (a 0-dim one would be cast to t's dtype)
    return t.mul_(factor if t.dtype == factor.dtype else factor.expand(t.shape))


class _Grads:
    """dX [N, D] (hidden's dtype; summed over ranks in fp32), dW [C_local, D] (weight's dtype) and db [C_local]
    (accumulated in fp32, cast at the end). need = (dX?, dW?, db?). dW always goes into a `_Fold`
    target, buffer ← beta·buffer + alpha·dW: the caller's (`weight_grad_into`; `finish` then hands over
    None for it) or a fresh tensor written with beta 0 and handed over as weight's gradient.
    scale: the factor S every gradient is made at (`_grad_scale`; row_coef already carries it).

    Every GEMM accumulates in fp32 inside (also for bf16/fp16 inputs), and dW is never held in fp32
    beyond the weight's own dtype (an fp32 copy would be 2.4 GB at 256,000 × 2,304): by row chunks it is
    added into dW in its own dtype (bf16/fp16: at most MAX_ROW_CHUNKS adds, each rounding once), by class
    blocks (`add_classes`) each block is one GEMM over all rows, rounded once."""

    def __init__(self, hidden, weight, bias, need, by_class=False, fold=None, scale=1.0):
        acc = kernels.stats_dtype(hidden.dtype)
        if need[0]:
            # by class, dX is a sum over class blocks: accumulated in fp32
            self.dx = (torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if by_class
                       else _fresh(hidden.shape, hidden.dtype, hidden.device))
        else:
            self.dx = None
        self._hand_over_dw = fold is None
        self.scale = scale
        if not need[1]:
            self.fold = None
        elif fold is None:
            self.fold = _Fold(_fresh(weight.shape, weight.dtype, weight.device), 0.0, 1.0)
        else:
            self.fold = fold
        # the caller's buffer gets alpha·dW: dW made at scale S (then a Python number) is divided by it
        self._dw_alpha = 1.0 if fold is None else fold.alpha / scale
        self.dw = None if self.fold is None else self.fold.buffer
        self.db = torch.empty(weight.shape[0], dtype=acc, device=weight.device) if need[2] else None
        self._first = True  # the first row chunk writes dW and db, later ones add (no zero-fill pass)
        self._cuda = hidden.device.type == "cuda"

    def add_rows(self, g, a, b, hidden, weight):
        """g: [b − a, C_local] gradient of the logits of rows [a, b)."""
        if self.dx is not None:
            torch.mm(g, weight, out=self.dx[a:b])
        if self.dw is not None:
            beta = self.fold.beta if self._first else 1.0
            self.dw.addmm_(g.t(), hidden[a:b], beta=beta, alpha=self._dw_alpha)
        if self.db is not None:
            part = g.sum(0, dtype=self.db.dtype)
            self.db.copy_(part) if self._first else self.db.add_(part)
        self._first = False

    def add_classes(self, g, c0, c1, hidden, weight):
        """g: [N, c1 − c0] gradient of the logits of classes [c0, c1) of the shard, every row."""
        if self.dx is not None:
            w = weight[c0:c1]
            if g.dtype == self.dx.dtype:
                self.dx.addmm_(g, w)
            else:  # CUDA: fp32 out of the GEMM; CPU has no such GEMM and adds the rounded block
                self.dx.add_(torch.mm(g, w, out_dtype=self.dx.dtype) if self._cuda else torch.mm(g, w))
        if self.dw is not None:
            self.dw[c0:c1].addmm_(g.t(), hidden, beta=self.fold.beta, alpha=self._dw_alpha)
        if self.db is not None:
            self.db[c0:c1] = g.sum(0, dtype=self.db.dtype)
        self._first = False

    def finish(self, hidden, bias, opts):
        """(dX, dW or None, db) and the scale each carries (S, or 1 for a dX summed over ranks in fp32)."""
        if self._first:  # no rows or no classes: the gradients are 0
            for t in (self.dx, self.db):
                if t is not None:
                    t.zero_()
            if self.dw is not None:
                self.dw.zero_() if self.fold.beta == 0 else self.dw.mul_(self.fold.beta)
        dx, dx_scale, in_fp32 = self.dx, self.scale, False
        if dx is not None and opts.world > 1 and opts.hidden_grad == "full":
            dx = dx.to(kernels.stats_dtype(dx.dtype))
            if isinstance(self.scale, torch.Tensor):  # each rank's S differs: the true sum, kept in fp32
                dx, dx_scale, in_fp32 = dx.div_(self.scale), 1.0, True
            dx = comm.all_reduce_(dx, opts.group)
        if dx is not None and not in_fp32:
            dx = dx.to(hidden.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        dw = self.dw if self._hand_over_dw else None
        return (dx, dw, db), (dx_scale, self.scale, self.scale)


def _by_class(hidden, n, opts):
    """bf16/fp16 gradients over more than MAX_ROW_CHUNKS row chunks are made class block by class block
    (one GEMM more: the logits again): dW added over that many chunks would round too often, and
    accumulating it in fp32 would need a copy of it (2.4 GB at 256k × 2304)."""
    return hidden.dtype in (torch.bfloat16, torch.float16) and -(-n // opts.chunk_rows) > MAX_ROW_CHUNKS


def _row_sweep(hidden, weight, bias, target, row_coef, opts, need, lse=None, fold=None, scale=1.0):
    """One pass over the rows, a chunk at a time, in one reused logits buffer [chunk rows, C_local].

    lse None (forward): returns (CE_i [N], lse [N], grads): statistics, combined over ranks with one
        all-gather per chunk; when row_coef [N] is given, also the gradients, from the stored exps.
    lse [N] given (backward of "none"): recomputes the logits and returns (None, None, grads) for
        row_coef = s_i · valid_i · upstream_i; no collective but the final dX all-reduce.
    """
    n, c_local = hidden.shape[0], weight.shape[0]
    acc = kernels.stats_dtype(hidden.dtype)
    forward = lse is None
    grads = _Grads(hidden, weight, bias, need, fold=fold, scale=scale) if row_coef is not None else None
    if forward:
        ce = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
    buf = _logits_buffer(min(n, opts.chunk_rows), c_local, hidden.dtype, hidden.device)
    eps, ext, start = opts.label_smoothing, opts.use_extension, opts.class_start
    uniform = eps / opts.num_classes
    # Storing exp(z - max) saves the gradient pass an exp: a gain on CPUs, where the chunk is still in
    # cache; on GPUs exp is nearly free and storing needs the row max first, an extra read.
    store_exp = forward and grads is not None and hidden.device.type == "cpu"
    # One rank holding every class knows each row's lse from its own statistics: then statistics and
    # gradient come from one visit of each row (no all-gather to wait for between them).
    fused = store_exp and opts.world == 1 and (not ext or kernels.has_fused_kernel(hidden.device.type))
    for a in range(0, n, opts.chunk_rows):
        b = min(n, a + opts.chunk_rows)
        logits = buf[:b - a]
        _logits_(logits, hidden[a:b], weight, bias)
        if fused:
            local = kernels.chunk_stats_grad_(logits, target[a:b], row_coef[a:b], 1.0 - eps, uniform, ext)
            lse[a:b], zt, zsum = _combine(local.unsqueeze(0))
            ce[a:b] = _row_ce(lse[a:b], zt, zsum, eps, uniform)
            grads.add_rows(logits, a, b, hidden, weight)
            continue
        if forward:
            local = kernels.chunk_stats(logits, target[a:b], start, store_exp, ext)  # [4, R]
            stats = comm.all_gather_stacked(local, opts.group) if opts.world > 1 else local.unsqueeze(0)
            lse_c, zt, zsum = _combine(stats)
            ce[a:b] = _row_ce(lse_c, zt, zsum, eps, uniform)
            lse[a:b] = lse_c
            shift = lse_c - local[0] if store_exp else lse_c
        else:
            shift = lse[a:b]
        if grads is not None:
            kernels.chunk_grad_(logits, target[a:b], start, shift, row_coef[a:b], 1.0 - eps, uniform, store_exp, ext)
            grads.add_rows(logits, a, b, hidden, weight)
    return (ce, lse, grads) if forward else (None, None, grads)


def _class_sweep(hidden, weight, bias, target, lse, row_coef, opts, need, fold=None, scale=1.0):
    """The gradients a block of classes at a time, every row at once: the logits [N, block] are recomputed
    and turned into g (shift = lse), then dX += g W_block and dW_block = gᵀ X, one GEMM over all N rows.
    The block holds about as many elements as a row chunk (the same working set, one more GEMM: the
    logits); its width is a multiple of CLASS_BLOCK classes, so that every block starts 16-byte aligned."""
    n, c_local = hidden.shape[0], weight.shape[0]
    grads = _Grads(hidden, weight, bias, need, by_class=True, fold=fold, scale=scale)
    per_block = max(1, opts.chunk_rows * c_local // max(n, 1))
    per_block = -(-c_local // -(-c_local // per_block)) if c_local else per_block  # about equal blocks
    per_block = -(-per_block // CLASS_BLOCK) * CLASS_BLOCK
    uniform = opts.label_smoothing / opts.num_classes
    for c0 in range(0, c_local, per_block):
        c1 = min(c_local, c0 + per_block)
        logits = _logits_buffer(n, c1 - c0, hidden.dtype, hidden.device)
        _logits_(logits, hidden, weight[c0:c1], None if bias is None else bias[c0:c1])
        kernels.chunk_grad_(logits, target, opts.class_start + c0, lse, row_coef, 1.0 - opts.label_smoothing,
                            uniform, False, opts.use_extension)
        grads.add_classes(logits, c0, c1, hidden, weight)
    return grads


def _sweep(hidden, weight, bias, target, row_coef, opts, need, lse=None, fold=None, scale=1.0):
    """`_row_sweep`, with the gradients from `_class_sweep` where `_by_class` says so."""
    n = hidden.shape[0]
    if row_coef is None or not _by_class(hidden, n, opts):
        return _row_sweep(hidden, weight, bias, target, row_coef, opts, need, lse, fold, scale)
    ce = None
    if lse is None:
        ce, lse, _ = _row_sweep(hidden, weight, bias, target, None, opts, need)
    return ce, lse, _class_sweep(hidden, weight, bias, target, lse, row_coef, opts, need, fold, scale)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, sample_weight, opts, grad_enabled, fold):
        acc = kernels.stats_dtype(hidden.dtype)
        target = target.to(torch.int64).contiguous()
        valid = target != opts.ignore_index
        s = (torch.ones(target.shape, dtype=acc, device=hidden.device) if sample_weight is None
             else sample_weight.detach().to(acc))
        s_valid = torch.where(valid, s, 0)
        wants = [grad_enabled and w for w in ctx.needs_input_grad]
        need = (wants[0], wants[1], bias is not None and wants[2])
        ctx.opts, ctx.need, ctx.need_s, ctx.fold = opts, need, wants[4], fold
        denom = valid.sum().clamp(min=1).to(acc) if opts.reduction == "mean" else None
        if opts.reduction == "none":
            row_coef = None
        else:
            row_coef = (s_valid / denom if denom is not None else s_valid) if any(need) else None
        scale = _grad_scale(hidden, weight, row_coef, fold, need)
        if not isinstance(scale, float) or scale != 1.0:
            row_coef = row_coef * scale
        ce, lse, grads = _sweep(hidden, weight, bias, target, row_coef, opts, need, fold=fold, scale=scale)
        ce = torch.where(valid, ce, 0)
        rows = s_valid * ce
        if opts.reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target, s_valid, lse, ce)
            return rows.to(hidden.dtype)
        loss = rows.sum()
        if denom is not None:
            ce = ce / denom
            loss = loss / denom
        # kept as attributes, not saved tensors, so that backward can hand them over without a copy
        if grads is not None:
            ctx.grads, ctx.grad_scales = grads.finish(hidden, bias, opts)
        else:
            ctx.grads, ctx.grad_scales = (None, None, None), (1.0, 1.0, 1.0)
        ctx.save_for_backward(ce if ctx.need_s else None)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the gradients below would carry no graph
            raise RuntimeError(
                "linear_cross_entropy does not support double backward (create_graph=True, e.g. a gradient "
                "penalty): its gradients are computed without a graph and would silently drop the second-order "
                "term. Compute the penalty's part of the graph with plain PyTorch ops instead")
        opts = ctx.opts
        if opts.reduction != "none":
            (ce,) = ctx.saved_tensors
            ds = None if ce is None else ce * grad.to(ce.dtype)
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: a second backward through the same loss; its gradients "
                                   "were made in forward and handed over by the first one")
            if ctx.fold is not None and ctx.need[1]:
                _check_fold_upstream(grad, ctx.fold.alpha)
            # hand the gradients over (autograd adopts them without a copy) and keep no reference to them;
            # an upstream gradient other than 1 (loss scaling, (3 * loss).backward()) scales them in place
            grads, ctx.grads = ctx.grads, None
            dx, dw, db = (None if t is None else _unscale_(t, grad, scale) for t, scale in zip(grads, ctx.grad_scales))
            del grads
            return dx, dw, db, None, ds, None, None, None
        hidden, weight, bias, target, s_valid, lse, ce = ctx.saved_tensors
        up = grad.to(lse.dtype)
        dx = dw = db = None
        if any(ctx.need):
            _, _, grads = _sweep(hidden, weight, bias, target, s_valid * up, opts, ctx.need, lse=lse, fold=ctx.fold)
            (dx, dw, db), _ = grads.finish(hidden, bias, opts)
        ds = ce * up if ctx.need_s else None
        return dx, dw, db, None, ds, None, None, None


def _check_fold_upstream(grad, alpha):
    """dW was folded in forward as alpha·dW: the upstream gradient must be alpha (in the loss's dtype).
    On a GPU the check is a device-side assert: reading the value would stall the host every step."""
    expected = float(torch.tensor(alpha, dtype=grad.dtype))
    if grad.device.type != "cpu":
        torch._assert_async(grad == expected, "linear_cross_entropy: upstream gradient != weight_grad_into's alpha")
        return
    got = float(grad)
    if got != expected:
        raise RuntimeError(f"linear_cross_entropy: the loss received the upstream gradient {got}, but weight_grad_into "
                           f"folded weight's gradient in forward for {expected} (its alpha); the buffer now holds "
                           "a wrongly scaled gradient. Pass alpha = the factor the loss is scaled by before backward")
