"""Fused, class-sharded, sample-weighted linear + softmax cross-entropy.

Rank r of a group of P holds classes [class_start, class_start + C_local) of C = Σ C_local; hidden
X [N, D] is the same on every rank. Per row i with label y_i, weight s_i and label smoothing ε:

    z = X Wᵀ (+ b)                                  a chunk of rows at a time, never [N, C_local]
    lse_i = log Σ_c exp(z_ic)                       over all C classes of the group
    ℓ_i = s_i · (lse_i − (1−ε)·z_{i,y_i} − (ε/C)·Σ_c z_ic)        ignored rows give 0
    g_ic = k_i · (exp(z_ic − lse_i) − (1−ε)·[c = y_i] − ε/C)       k_i = s_i·upstream_i (/ #valid for "mean")
    dX = Σ_ranks g W,  dW = gᵀ X,  db = Σ_i g_i

Per chunk each rank computes its local (max, Σ exp(z − max), z_target, Σ z) per row; ONE all-gather of
that [4, R] table gives every rank the same lse. For "mean"/"sum" the weights s_i are known at forward
time, so the gradients are made during the forward pass (three GEMMs in all: logits, dX, dW) and the
backward only scales them by the upstream scalar. "none" needs the per-row upstream gradient, known
only in backward: the forward keeps lse and the backward recomputes the logits (four GEMMs).
dX is summed over ranks by ONE all-reduce at the end (none with hidden_grad="partial").

dW of bf16/fp16 weights is never accumulated over row chunks (that would need an fp32 copy of it:
2.4 GB at 256,000 × 2,304): when the rows span several chunks, the gradients are made a block of
classes at a time over all rows (`_class_sweep`: each block's dW is one GEMM, fp32 inside, rounded
once), which recomputes the logits: four GEMMs, and no memory beyond one working set and an fp32 dX.

`weight_grad_into=(buffer, beta[, alpha])` folds dW into a caller's buffer instead of a fresh weight.grad
(as Megatron's gradient-accumulation fusion writes into main_grad): buffer ← beta·buffer + alpha·dW, the
first GEMM into it with beta, later ones adding; e.g. an SGD momentum buffer, which spares the
optimizer step a [C_local, D] gradient. dW of "mean"/"sum" is made in forward, before the upstream
gradient is known, so the caller states it (alpha) and backward checks it.
"""
from __future__ import annotations

import dataclasses
import math
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
CHUNK_BYTES = {"cpu": 128 << 20}
"""The logits buffer (chunk rows × C_local elements), the op's working set, of a batch bigger than
WHOLE_BATCH_BYTES, per device type (others: 512 MiB). On CPU 128 MB, so that e.g. 2^20 classes over
2 ranks stay within 1 GB per rank. On a GPU, 512 MiB keeps the op within 0.7 GB beyond its inputs
and gradients at 8,192 × 256,000 bf16 (working set + fp32 dX) while every GEMM stays large."""
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
    chunk_size:    rows per chunk (the working set is chunk_size × C_local); None = the whole batch as one chunk
                   when its logits fit in WHOLE_BATCH_BYTES (512 MiB), else chunks of CHUNK_BYTES of logits
                   (128 MiB on CPU, 512 MiB elsewhere), at least MIN_CHUNK_ROWS rows
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
    bias and sample_weight. Bad input raises ValueError on every rank of the group.
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


def _validate(hidden, weight, target, sample_weight, bias, class_start, group, ignore_index, label_smoothing,
              reduction, chunk_size, hidden_grad, implementation, gathered=False, weight_grad_into=None):
    """Options of one call, the same on every rank, or ValueError on every rank. gathered: the arguments are
    this rank's own rows, to be all-gathered after (then N must agree and the batch is P·N rows)."""
    world = 1 if group is None else comm.world_size(group)
    gathered = gathered and world > 1
    problem = _local_problem(hidden, weight, target, sample_weight, bias, class_start, ignore_index,
                             label_smoothing, reduction, chunk_size, hidden_grad, gathered, weight_grad_into)
    if problem is None:
        n, d = hidden.shape
        c_local = weight.shape[0]
        valid = target != ignore_index
        # the range of this rank's targets: checked against C once every rank's shard is known
        wide = target.to(torch.int64)
        lo, hi = (torch.stack([torch.where(valid, wide, torch.iinfo(torch.int64).max).min(),
                               torch.where(valid, wide, -1).max()]).tolist() if n else (0, -1))
        row = [0, n, d, c_local, class_start, _DTYPE_CODES[hidden.dtype], int(bias is not None), lo, hi]
    else:
        row = [1, -1, -1, -1, -1, -1, -1, 0, -1]
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
    for name, col in (("N (rows of hidden)", 1), ("D (features)", 2), ("dtype", 5), ("bias presence", 6)):
        values = [t[col] for t in table]
        if len(set(values)) > 1:
            why = " (gather_input=True needs the same number of rows on every rank)" if gathered and col == 1 else ""
            raise ValueError(f"linear_cross_entropy: ranks disagree on {name}: {values} (rank order){why}")
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
        lo, hi = t[7], t[8]
        if t[1] and (lo < 0 or hi >= num_classes):
            if r == me:
                _raise_bad_target(target, ignore_index, num_classes)
            raise ValueError(f"linear_cross_entropy: rank {r} has a target outside [0, {num_classes}) that is not "
                             f"ignore_index={ignore_index} (its own error names the row)")
    use_ext = kernels.uses_extension(hidden, implementation)
    rows = hidden.shape[0] * (world if gathered else 1)
    if chunk_size is None:
        row_bytes = max(1, weight.shape[0] * hidden.element_size())
        if rows * row_bytes <= WHOLE_BATCH_BYTES:
            chunk_size = max(rows, 1)
        else:
            budget = CHUNK_BYTES.get(hidden.device.type, 512 << 20)
            chunk_size = max(MIN_CHUNK_ROWS, budget // row_bytes)
            chunk_size = -(-rows // -(-rows // chunk_size))  # equal chunks: no small last one
    chunk_rows = max(1, min(chunk_size, rows))
    return _Options(class_start=class_start, num_classes=num_classes, group=group, world=world, rank=me,
                    ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction,
                    chunk_rows=chunk_rows, hidden_grad=hidden_grad, use_extension=use_ext)


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


_BUFFERS = threading.local()


def _logits_buffer(rows, cols, dtype, device):
    """An uninitialized [rows, cols] logits buffer. On CPU it is kept per thread between calls (the
    largest one asked for): a fresh tens-of-MB allocation costs a page fault per 4 KB on every call,
    which is several percent of the op. GPU allocators cache by themselves."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    cache = getattr(_BUFFERS, "by_dtype", None)
    if cache is None:
        cache = _BUFFERS.by_dtype = {}
    flat = cache.get(dtype)
    if flat is None or flat.numel() < rows * cols:
        cache.pop(dtype, None)  # free the old one before allocating the new
        flat = cache[dtype] = torch.empty(rows * cols, dtype=dtype)
    return flat[:rows * cols].view(rows, cols)


def _logits_(out, x, weight, bias):
    """out [r, C_local] = x [r, D] @ weightᵀ (+ bias), into a slice of the reused buffer."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


class _Grads:
    """dX [N, D] (hidden's dtype; summed over ranks in fp32), dW [C_local, D] (weight's dtype) and db [C_local]
    (accumulated in fp32, cast at the end). need = (dX?, dW?, db?). dW always goes into a `_Fold`
    target, buffer ← beta·buffer + alpha·dW: the caller's (`weight_grad_into`; `finish` then hands over
    None for it) or a fresh tensor written with beta 0 and handed over as weight's gradient.

    Every GEMM accumulates in fp32 inside (also for bf16/fp16 inputs). dW is never held in fp32 beyond
    the weight's own dtype: it is made either by row chunks added into an fp32/fp64 dW, or for bf16/fp16
    weights by `add_classes` over all rows at once (one GEMM per block, rounded once), so no fp32 copy
    of a large classifier's gradient ever exists."""

    def __init__(self, hidden, weight, bias, need, by_class=False, fold=None):
        acc = kernels.stats_dtype(hidden.dtype)
        if need[0]:
            # by class, dX is a sum over class blocks: accumulated in fp32
            self.dx = (torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if by_class
                       else torch.empty_like(hidden, memory_format=torch.contiguous_format))
        else:
            self.dx = None
        self._hand_over_dw = fold is None
        if not need[1]:
            self.fold = None
        elif fold is None:
            self.fold = _Fold(torch.empty_like(weight, memory_format=torch.contiguous_format), 0.0, 1.0)
        else:
            self.fold = fold
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
            self.dw.addmm_(g.t(), hidden[a:b], beta=beta, alpha=self.fold.alpha)
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
            self.dw[c0:c1].addmm_(g.t(), hidden, beta=self.fold.beta, alpha=self.fold.alpha)
        if self.db is not None:
            self.db[c0:c1] = g.sum(0, dtype=self.db.dtype)
        self._first = False

    def finish(self, hidden, bias, opts):
        if self._first:  # no rows or no classes: the gradients are 0
            for t in (self.dx, self.db):
                if t is not None:
                    t.zero_()
            if self.dw is not None:
                self.dw.zero_() if self.fold.beta == 0 else self.dw.mul_(self.fold.beta)
        dx = self.dx
        if dx is not None and opts.world > 1 and opts.hidden_grad == "full":
            dx = comm.all_reduce_(dx.to(kernels.stats_dtype(dx.dtype)), opts.group)
        dx = None if dx is None else dx.to(hidden.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return dx, self.dw if self._hand_over_dw else None, db


def _by_class(hidden, n, opts):
    """Gradients of bf16/fp16 weights over more than one row chunk are made class block by class block:
    accumulating dW over row chunks would need an fp32 copy of it (2.4 GB at 256k × 2304)."""
    return hidden.dtype in (torch.bfloat16, torch.float16) and n > opts.chunk_rows


def _row_sweep(hidden, weight, bias, target, row_coef, opts, need, lse=None, fold=None):
    """One pass over the rows, a chunk at a time, in one reused logits buffer [chunk rows, C_local].

    lse None (forward): returns (CE_i [N], lse [N], grads): statistics, combined over ranks with one
        all-gather per chunk; when row_coef [N] is given, also the gradients, from the stored exps.
    lse [N] given (backward of "none"): recomputes the logits and returns (None, None, grads) for
        row_coef = s_i · valid_i · upstream_i; no collective but the final dX all-reduce.
    """
    n, c_local = hidden.shape[0], weight.shape[0]
    acc = kernels.stats_dtype(hidden.dtype)
    forward = lse is None
    grads = _Grads(hidden, weight, bias, need, fold=fold) if row_coef is not None else None
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
            ce[a:b] = lse[a:b] - (1.0 - eps) * zt - uniform * zsum
            grads.add_rows(logits, a, b, hidden, weight)
            continue
        if forward:
            local = kernels.chunk_stats(logits, target[a:b], start, store_exp, ext)  # [4, R]
            stats = comm.all_gather_stacked(local, opts.group) if opts.world > 1 else local.unsqueeze(0)
            lse_c, zt, zsum = _combine(stats)
            ce[a:b] = lse_c - (1.0 - eps) * zt - uniform * zsum
            lse[a:b] = lse_c
            shift = lse_c - local[0] if store_exp else lse_c
        else:
            shift = lse[a:b]
        if grads is not None:
            kernels.chunk_grad_(logits, target[a:b], start, shift, row_coef[a:b], 1.0 - eps, uniform, store_exp, ext)
            grads.add_rows(logits, a, b, hidden, weight)
    return (ce, lse, grads) if forward else (None, None, grads)


def _class_sweep(hidden, weight, bias, target, lse, row_coef, opts, need, fold=None):
    """The gradients a block of classes at a time, every row at once: the logits [N, block] are recomputed
    and turned into g (shift = lse), then dX += g W_block and dW_block = gᵀ X, one GEMM over all N rows.
    The block holds as many elements as a row chunk: the same working set, one more GEMM (the logits)."""
    n, c_local = hidden.shape[0], weight.shape[0]
    grads = _Grads(hidden, weight, bias, need, by_class=True, fold=fold)
    per_block = max(1, opts.chunk_rows * c_local // max(n, 1))
    per_block = -(-c_local // -(-c_local // per_block)) if c_local else per_block  # equal blocks
    uniform = opts.label_smoothing / opts.num_classes
    for c0 in range(0, c_local, per_block):
        c1 = min(c_local, c0 + per_block)
        logits = _logits_buffer(n, c1 - c0, hidden.dtype, hidden.device)
        _logits_(logits, hidden, weight[c0:c1], None if bias is None else bias[c0:c1])
        kernels.chunk_grad_(logits, target, opts.class_start + c0, lse, row_coef, 1.0 - opts.label_smoothing,
                            uniform, False, opts.use_extension)
        grads.add_classes(logits, c0, c1, hidden, weight)
    return grads


def _sweep(hidden, weight, bias, target, row_coef, opts, need, lse=None, fold=None):
    """`_row_sweep`, with the gradients from `_class_sweep` where `_by_class` says so."""
    n = hidden.shape[0]
    if row_coef is None or not _by_class(hidden, n, opts):
        return _row_sweep(hidden, weight, bias, target, row_coef, opts, need, lse, fold)
    ce = None
    if lse is None:
        ce, lse, _ = _row_sweep(hidden, weight, bias, target, None, opts, need)
    return ce, lse, _class_sweep(hidden, weight, bias, target, lse, row_coef, opts, need, fold)


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
        ce, lse, grads = _sweep(hidden, weight, bias, target, row_coef, opts, need, fold=fold)
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
        ctx.grads = grads.finish(hidden, bias, opts) if grads is not None else (None, None, None)
        ctx.save_for_backward(ce if ctx.need_s else None)
        return loss.to(hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        opts = ctx.opts
        if opts.reduction != "none":
            (ce,) = ctx.saved_tensors
            ds = None if ce is None else ce * grad.to(ce.dtype)
            if ctx.grads is None:
                raise RuntimeError("linear_cross_entropy: a second backward through the same loss; its gradients "
                                   "were made in forward and handed over by the first one")
            if ctx.fold is not None and ctx.need[1]:
                _check_fold_upstream(grad, ctx.fold.alpha)
            if grad.device.type == "cpu" and float(grad) == 1.0:
                # the usual loss.backward(): hand the gradients over (autograd adopts them without a copy)
                (dx, dw, db), ctx.grads = ctx.grads, None
                return dx, dw, db, None, ds, None, None, None
            return (*(None if t is None else t * grad.to(t.dtype) for t in ctx.grads), None, ds, None, None, None)
        hidden, weight, bias, target, s_valid, lse, ce = ctx.saved_tensors
        up = grad.to(lse.dtype)
        dx = dw = db = None
        if any(ctx.need):
            _, _, grads = _sweep(hidden, weight, bias, target, s_valid * up, opts, ctx.need, lse=lse, fold=ctx.fold)
            dx, dw, db = grads.finish(hidden, bias, opts)
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
