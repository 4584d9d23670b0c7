"""Fused, class-sharded, sample-weighted linear + softmax cross-entropy.

Rank r of a group of P holds classes [class_start, class_start + C_local) of C = Σ C_local; hidden
X [N, D] is the same on every rank. Per row i with label y_i, weight s_i and label smoothing ε:

    z = X Wᵀ (+ b)                                  a chunk of rows at a time, never [N, C_local]
    lse_i = log Σ_c exp(z_ic)                       over all C classes of the group
    ℓ_i = s_i · (lse_i − (1−ε)·z_{i,y_i} − (ε/C)·Σ_c z_ic)        ignored rows give 0
    g_ic = k_i · (exp(z_ic − lse_i) − (1−ε)·[c = y_i] − ε/C)       k_i = s_i·upstream_i (/ #valid for "mean")
    dX = Σ_ranks g W,  dW = gᵀ X,  db = Σ_i g_i

Options (docs/fused-op.md): `softcap` c replaces z by c·tanh(z/c) before everything (the gradient gets
the factor 1 − tanh²); `class_weight` w makes CE_i = (1−ε)·w_{y_i}·(lse_i − z_{i,y_i}) + (ε/C)·Σ_c w_c·(lse_i − z_ic)
(F.cross_entropy(weight=)) and "mean" divide by Σ w_{y_i} over non-ignored rows; `z_loss` adds
z_loss·lse_i² to each row before s_i. Then g_ic = k_i·(a_i·p_ic − w_c·((1−ε)·[c = y_i] + ε/C)) with
a_i = (1−ε)·w_{y_i} + (ε/C)·Σ_c w_c + 2·z_loss·lse_i (1 for plain cross-entropy).

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
import functools
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
    """Everything about a call but its tensors, the same on every rank."""
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
    softcap: float = 0.0  # 0: none
    z_loss: float = 0.0
    return_lse: bool = False
    host_checks: bool = True  # False: value checks are device-side asserts in forward (CUDA, torch.compile)


def linear_cross_entropy(hidden, weight, target, sample_weight=None, *, bias=None, class_start=0,
                         process_group=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                         chunk_size=None, hidden_grad="full", implementation="auto", weight_grad_into=None,
                         softcap=None, z_loss=0.0, class_weight=None, return_lse=False):
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
    softcap:       None, or c > 0: the logits become c·tanh(z/c) (after the bias) before everything else
                   (Gemma 2's final_logit_softcapping)
    z_loss:        ≥ 0: each row's loss gains z_loss·lse_i² before s_i, ℓ_i = s_i·(CE_i + z_loss·lse_i²)
                   (PaLM's auxiliary loss; Liger's lse_square_scale)
    class_weight:  None, or [C_local] non-negative weights of this rank's classes (no gradient), exactly
                   F.cross_entropy(weight=)'s semantics, label smoothing included; "mean" then divides by
                   Σ w_{y_i} over the non-ignored rows (0 when that is 0)
    return_lse:    True: return (loss, lse) with lse [N] the log-sum-exp over all C classes of the
                   (soft-capped) logits, fp32 (fp64 for fp64 inputs), no gradient

    Returns the loss in hidden's dtype: a scalar, or [N] for "none". Gradients flow to hidden, weight,
    bias and sample_weight. Bad input, and ranks that disagree on an option, raise ValueError on every
    rank of the group. Double backward (create_graph=True) raises RuntimeError.
    """
    if torch.compiler.is_compiling():
        return _compiled(hidden, weight, target, sample_weight, bias, class_start, process_group, ignore_index,
                         label_smoothing, reduction, chunk_size, hidden_grad, implementation, weight_grad_into,
                         softcap, z_loss, class_weight, return_lse)
    opts = _validate(hidden, weight, target, sample_weight, bias, class_start, process_group, ignore_index,
                     label_smoothing, reduction, chunk_size, hidden_grad, implementation,
                     weight_grad_into=weight_grad_into, softcap=softcap, z_loss=z_loss, class_weight=class_weight,
                     return_lse=return_lse)
    out = _LinearCrossEntropy.apply(hidden, weight, bias, target, sample_weight, class_weight, opts,
                                    torch.is_grad_enabled(), _fold(weight_grad_into))
    return out if return_lse else out[0]


def linear_cross_entropy_gathered(hidden, weight, target, sample_weight=None, *, bias=None, class_start=0,
                                  process_group=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                  chunk_size=None, implementation="auto", weight_grad_into=None, softcap=None,
                                  z_loss=0.0, class_weight=None, return_lse=False):
    """`linear_cross_entropy` in the data-parallel layout: each rank of `process_group` brings its OWN rows.

    hidden [n, D], target [n], sample_weight [n] or None: this rank's rows, the same n on every rank. They
    are all-gathered into the global batch [P·n] (hidden through `comm.gather_rows`, whose backward
    sums the gradient over ranks and returns each rank its rows; the op adds only its shard's part,
    hidden_grad="partial") and the loss is over that batch, identical on every rank. The local
    arguments are validated before the gather, in the op's one small collective (equal n included).
    sample_weight must not require grad here (its gradient would need a reduce-scatter of its own).
    weight_grad_into, softcap, z_loss, class_weight, return_lse: as in `linear_cross_entropy` ("none" and
    lse are over the gathered batch [P·n]).
    """
    opts = _validate(hidden, weight, target, sample_weight, bias, class_start, process_group, ignore_index,
                     label_smoothing, reduction, chunk_size, "partial", implementation, gathered=True,
                     weight_grad_into=weight_grad_into, softcap=softcap, z_loss=z_loss, class_weight=class_weight,
                     return_lse=return_lse)
    if opts.world > 1:
        hidden = comm.gather_rows(hidden, process_group)
        target = comm.all_gather_stacked(target, process_group).reshape(-1)
        if sample_weight is not None:
            sample_weight = comm.all_gather_stacked(sample_weight, process_group).reshape(-1)
    out = _LinearCrossEntropy.apply(hidden, weight, bias, target, sample_weight, class_weight, opts,
                                    torch.is_grad_enabled(), _fold(weight_grad_into))
    return out if return_lse else out[0]


# ----------------------------------------------------------------------------------------------------
# validation: every rank reaches the same verdict (one small all-gather), so bad input never hangs a group


def _local_problem(hidden, weight, target, sample_weight, bias, class_start, ignore_index, label_smoothing,
                   reduction, chunk_size, hidden_grad, gathered, weight_grad_into=None, softcap=None, z_loss=0.0,
                   class_weight=None, return_lse=False, host_checks=True):
    """The first problem with this rank's arguments, as a message (a TypeError where PyTorch raises one), or
    None. host_checks: also the checks of values that need the host (sample and class weights' sign)."""
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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):  # a bool is an int to Python
        return TypeError(f"ignore_index must be an int, got {ignore_index!r}")  # a TypeError, as in F.cross_entropy
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
    if host_checks and sample_weight is not None and n:
        bad = ~torch.isfinite(sample_weight) | (sample_weight < 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            return f"sample_weight must be finite and non-negative: row {row} holds {sample_weight[row].item()}"
    problem = _option_problem(weight, softcap, z_loss, class_weight, return_lse, host_checks)
    if problem is not None:
        return problem
    if weight_grad_into is not None:
        return _fold_problem(weight_grad_into, weight, reduction)
    return None


def _finite_number(x):
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _option_problem(weight, softcap, z_loss, class_weight, return_lse, host_checks=True):
    """The problem with the loss options softcap, z_loss, class_weight, return_lse, as a message, or None."""
    if softcap is not None and not (_finite_number(softcap) and softcap > 0):
        return f"softcap must be None or a finite number > 0, got {softcap!r}"
    if not (_finite_number(z_loss) and z_loss >= 0):
        return f"z_loss must be a finite number >= 0, got {z_loss!r}"
    if not isinstance(return_lse, bool):
        return f"return_lse must be a bool, got {return_lse!r}"
    if class_weight is None:
        return None
    c_local = weight.shape[0]
    if not isinstance(class_weight, torch.Tensor) or class_weight.shape != (c_local,):
        return (f"class_weight must be a tensor of shape [{c_local}] (one weight per class of this rank's shard), "
                f"got {_describe(class_weight)}")
    if not class_weight.is_floating_point():
        return f"class_weight must be floating point, got dtype {class_weight.dtype}"
    if class_weight.device != weight.device:
        return f"class_weight is on {class_weight.device} but weight is on {weight.device}"
    if class_weight.requires_grad:
        return "class_weight requires grad, but the op makes no gradient for it: pass class_weight.detach()"
    if host_checks and c_local:
        bad = ~torch.isfinite(class_weight) | (class_weight < 0)
        if bool(bad.any()):
            c = int(bad.nonzero()[0, 0])
            return f"class_weight must be finite and non-negative: class {c} (local index) holds {class_weight[c].item()}"
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
    "softcap": (lambda v: _float_code(v or 0.0), lambda c: _float_value(c) or None),
    "z_loss": (_float_code, _float_value),
    "class_weight presence": (int, bool),
}


_AGREEMENTS = {}
"""(group, this rank's static row) -> (C, the group's largest shard): what the ranks agreed on. Ranks that
agreed once on a call's shapes, dtypes and options agree on the next such call: the agreement's collective
runs once per (shapes, dtypes, options, group), not on every call."""


def _validate(hidden, weight, target, sample_weight, bias, class_start, group, ignore_index, label_smoothing,
              reduction, chunk_size, hidden_grad, implementation, gathered=False, weight_grad_into=None,
              softcap=None, z_loss=0.0, class_weight=None, return_lse=False, host_checks=None, wants_dx=None):
    """Options of one call, the same on every rank, or ValueError on every rank. gathered: the arguments are
    this rank's own rows, to be all-gathered after (then N must agree and the batch is P·N rows).

    host_checks (None: hidden is on the CPU and this is not traced by torch.compile): the checks of values
    (target range, sample and class weights' sign) run on the host and raise on every rank, from one small
    all-gather per call of each rank's status, target range, shard and `_AGREED` options (an int table).
    Otherwise (CUDA, compile) they become device-side asserts in forward (`_assert_values`), and the table
    is gathered only for a call whose shapes/options this rank has not seen agreed before (`_AGREEMENTS`):
    no call synchronises with the host after the first of its kind. Each rank decides that alone, so ranks
    must change shapes together there (a rank that alone changes them is a programming error that the
    first call of each shape catches). The chunk size is chosen from the group's largest shard, so that
    every rank runs the same number of chunks, hence of collectives.
    wants_dx: whether hidden's gradient is wanted (None: grad mode and hidden.requires_grad)."""
    world = 1 if group is None else comm.world_size(group)
    gathered = gathered and world > 1
    if host_checks is None:
        host_checks = (isinstance(hidden, torch.Tensor) and hidden.device.type == "cpu"
                       and not torch.compiler.is_compiling())
    problem = _local_problem(hidden, weight, target, sample_weight, bias, class_start, ignore_index,
                             label_smoothing, reduction, chunk_size, hidden_grad, gathered, weight_grad_into,
                             softcap, z_loss, class_weight, return_lse, host_checks)
    head = 3  # status, C_local, class_start; then the agreed options; then the target range
    lo, hi = 0, -1
    if problem is None:
        n, d = hidden.shape
        if host_checks and n:  # the range of this rank's targets: checked against C once it is known
            valid = target != ignore_index
            wide = target.to(torch.int64)
            lo, hi = torch.stack([torch.where(valid, wide, torch.iinfo(torch.int64).max).min(),
                                  torch.where(valid, wide, -1).max()]).tolist()
        if wants_dx is None:
            wants_dx = torch.is_grad_enabled() and hidden.requires_grad
        agreed = (n, d, hidden.dtype, bias is not None, label_smoothing, ignore_index, reduction, hidden_grad,
                  chunk_size, wants_dx and hidden_grad == "full", softcap, z_loss, class_weight is not None)
        row = [0, weight.shape[0], class_start] + [enc(v) for (enc, _), v in zip(_AGREED.values(), agreed)]
    else:
        row = [1, -1, -1] + [0] * len(_AGREED)
    key = (group, tuple(row))
    agreed_before = _AGREEMENTS.get(key) if problem is None and world > 1 else None
    row += [lo, hi]
    if world > 1:
        device = hidden.device if comm.backend(group) == "nccl" and isinstance(hidden, torch.Tensor) else "cpu"
        me = comm.rank(group)
        table = comm.gather_ints(row, device=device, group=group) if host_checks or agreed_before is None else None
    else:
        table, me = [row], 0
    if problem is not None:
        raise (TypeError if isinstance(problem, TypeError) else ValueError)(f"linear_cross_entropy: {problem}")
    if table is not None:
        failed = [r for r, t in enumerate(table) if t[0]]
        if failed:
            raise ValueError(f"linear_cross_entropy: rank {failed[0]} of the process group rejected its arguments "
                             "(its own error says why)")
        agreed_before = _agreement(table, head, gathered)
        if world > 1:
            _AGREEMENTS[key] = agreed_before
    num_classes, largest_shard = agreed_before
    if host_checks:
        for r, (*_, lo, hi) in enumerate(table):
            if hidden.shape[0] and (lo < 0 or hi >= num_classes):
                if r == me:
                    _raise_bad_target(target, ignore_index, num_classes)
                raise ValueError(f"linear_cross_entropy: rank {r} has a target outside [0, {num_classes}) that is "
                                 f"not ignore_index={ignore_index} (its own error names the row)")
    use_ext = kernels.uses_extension(hidden, implementation)
    rows = hidden.shape[0] * (world if gathered else 1)
    chunk_rows = chunk_size if chunk_size is not None else _chunk_rows(rows, largest_shard, hidden)
    return _Options(class_start=class_start, num_classes=num_classes, group=group, world=world, rank=me,
                    ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction,
                    chunk_rows=max(1, min(chunk_rows, rows)), hidden_grad=hidden_grad, use_extension=use_ext,
                    softcap=float(softcap or 0.0), z_loss=float(z_loss), return_lse=return_lse,
                    host_checks=host_checks)


def _agreement(table, head, gathered):
    """(C, the largest shard) from every rank's row [status, C_local, class_start, agreed options...], or
    ValueError naming what the ranks disagree on."""
    for col, (name, (_, dec)) in enumerate(_AGREED.items(), start=head):
        values = [t[col] for t in table]
        if len(set(values)) > 1:
            why = (" (gather_input=True needs the same number of rows on every rank)"
                   if gathered and name.startswith("N ") else "")
            raise ValueError(f"linear_cross_entropy: ranks disagree on {name}: {[dec(v) for v in values]} "
                             f"(rank order){why}")
    shards = sorted((t[2], t[1], r) for r, t in enumerate(table))
    expected = 0
    for start, size, r in shards:
        if start != expected:
            raise ValueError(
                f"linear_cross_entropy: class shards do not tile [0, C): rank {r} starts at class {start} "
                f"but the shards before it end at {expected}; shards (rank: start, size) = "
                + ", ".join(f"{rr}: {t[2]}, {t[1]}" for rr, t in enumerate(table)))
        expected += size
    if expected == 0:
        raise ValueError("linear_cross_entropy: the group holds no classes (every weight shard has 0 rows)")
    return expected, max(t[1] for t in table)


def _assert_values(target, sample_weight, class_weight, opts):
    """The host checks of `_validate` as device-side asserts (CUDA, torch.compile): no synchronisation; a
    failure stops the process with the message (on CUDA at the next synchronising call)."""
    valid = target != opts.ignore_index
    torch._assert_async(~(valid & ((target < 0) | (target >= opts.num_classes))).any(),
                        f"linear_cross_entropy: a target is outside [0, {opts.num_classes}) and is not "
                        f"ignore_index ({opts.ignore_index})")
    for name, w in (("sample_weight", sample_weight), ("class_weight", class_weight)):
        if w is not None:
            torch._assert_async((torch.isfinite(w) & (w >= 0)).all(),
                                f"linear_cross_entropy: {name} must be finite and non-negative")


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


@dataclasses.dataclass(frozen=True)
class _ClassTerms:
    """What class weights and z-loss add to each row (`_class_terms`): None fields when there are none.

    class_weight: [C_local] fp32/fp64 (this shard's), w_target: [N] w_{y_i} over the group (0 for rows
    whose target no rank holds, e.g. ignored ones), w_total: 0-d Σ_c w_c over the group."""
    class_weight: torch.Tensor | None = None
    w_target: torch.Tensor | None = None
    w_total: torch.Tensor | None = None


def _class_terms(class_weight, target, opts, acc):
    if class_weight is None:
        return _ClassTerms()
    w = class_weight.detach().to(acc).contiguous()
    local = target - opts.class_start
    inside = (local >= 0) & (local < w.shape[0])
    w_target = (torch.where(inside, w[local.clamp(0, w.shape[0] - 1)], 0) if w.numel()
                else torch.zeros(target.shape, dtype=acc, device=target.device))
    both = torch.cat([w_target, w.sum().reshape(1)])
    if opts.world > 1:  # each row's w_{y_i} lives on its target's owner; Σ_c w_c is split by class
        comm.all_reduce_(both, opts.group)
    return _ClassTerms(w, both[:-1], both[-1])


def _row_loss(lse, zt, zsum, terms, a, b, opts):
    """CE_i + z_loss·lse_i² of rows [a, b) from the combined statistics (zsum: Σ_c w_c·z_ic when weighted).
    Without smoothing the Σz term is left out, not multiplied by 0: a masked class (a −inf logit) makes
    Σz = −inf, and F.cross_entropy's loss stays finite there."""
    eps, uniform = opts.label_smoothing, opts.label_smoothing / opts.num_classes
    if terms.class_weight is None:
        ce = lse - (1.0 - eps) * zt
        if eps:
            ce = ce - uniform * zsum
    else:
        ce = (1.0 - eps) * terms.w_target[a:b] * (lse - zt)
        if eps:
            ce = ce + uniform * (terms.w_total * lse - zsum)
    return ce + opts.z_loss * lse.square() if opts.z_loss else ce


def _p_coef(row_coef, lse, terms, a, b, opts):
    """k_i·a_i (the coefficient of p in the kernels' gradient) of rows [a, b), or None when a_i = 1."""
    if terms.class_weight is None and not opts.z_loss:
        return None
    eps = opts.label_smoothing
    if terms.class_weight is None:
        coef = 1.0 + 2 * opts.z_loss * lse
    else:
        coef = (1.0 - eps) * terms.w_target[a:b] + (eps / opts.num_classes) * terms.w_total
        if opts.z_loss:
            coef = coef + 2 * opts.z_loss * lse
    return (row_coef * coef).contiguous()


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
        padded = torch.empty(rows, pitch, dtype=dtype, device=device)
    else:
        cache = getattr(_BUFFERS, "by_dtype", None)
        if cache is None:
            cache = _BUFFERS.by_dtype = {}
        flat = cache.get(dtype)
        if flat is None or flat.numel() < rows * pitch:
            cache.pop(dtype, None)  # free the old one before allocating the new
            flat = cache[dtype] = torch.empty(rows * pitch, dtype=dtype)
        padded = flat[:rows * pitch].view(rows, pitch)
    # Zeroed padding: torch's CPU bf16 GEMM reads a strided operand's row padding into its sums, so a NaN
    # left there by earlier use of the memory made dX NaN (tests/test_ops_lce_options.py: poisoned buffer).
    padded[:, cols:].zero_()
    return padded[:, :cols]


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


def _row_sweep(hidden, weight, bias, target, row_coef, opts, need, terms, lse=None, fold=None, scale=1.0):
    """One pass over the rows, a chunk at a time, in one reused logits buffer [chunk rows, C_local].

    lse None (forward): returns (CE_i + z_loss·lse_i² [N], lse [N], grads): statistics, combined over
        ranks with one all-gather per chunk; when row_coef [N] is given, also the gradients, from the
        stored exps. terms: the rows' `_ClassTerms`.
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
    cap, cw = opts.softcap, terms.class_weight
    # Storing exp(z - max) saves the gradient pass an exp: a gain on CPUs, where the chunk is still in
    # cache; on GPUs exp is nearly free and storing needs the row max first, an extra read.
    # Soft-capped gradients need the capped logits, not their exponentials.
    fusable = forward and grads is not None and hidden.device.type == "cpu"
    store_exp = fusable and not cap
    # One rank holding every class knows each row's lse from its own statistics: then statistics and
    # gradient come from one visit of each row (no all-gather to wait for between them).
    fused = fusable and opts.world == 1 and (not ext or kernels.has_fused_kernel(hidden.device.type))
    for a in range(0, n, opts.chunk_rows):
        b = min(n, a + opts.chunk_rows)
        logits = buf[:b - a]
        _logits_(logits, hidden[a:b], weight, bias)
        if fused:
            local = kernels.chunk_stats_grad_(logits, target[a:b], row_coef[a:b], 1.0 - eps, uniform, ext,
                                              cap, cw, 2 * opts.z_loss)
            lse[a:b], zt, zsum = _combine(local.unsqueeze(0))
            ce[a:b] = _row_loss(lse[a:b], zt, zsum, terms, a, b, opts)
            grads.add_rows(logits, a, b, hidden, weight)
            continue
        if forward:
            local = kernels.chunk_stats(logits, target[a:b], start, store_exp, ext, cap, cw)  # [4, R]
            stats = comm.all_gather_stacked(local, opts.group) if opts.world > 1 else local.unsqueeze(0)
            lse_c, zt, zsum = _combine(stats)
            ce[a:b] = _row_loss(lse_c, zt, zsum, terms, a, b, opts)
            lse[a:b] = lse_c
            shift = lse_c - local[0] if store_exp else lse_c
        else:
            lse_c = shift = lse[a:b]
        if grads is not None:
            kernels.chunk_grad_(logits, target[a:b], start, shift, row_coef[a:b], 1.0 - eps, uniform, store_exp, ext,
                                cap, cw, _p_coef(row_coef[a:b], lse_c, terms, a, b, opts))
            grads.add_rows(logits, a, b, hidden, weight)
    return (ce, lse, grads) if forward else (None, None, grads)


def _class_sweep(hidden, weight, bias, target, lse, row_coef, opts, need, terms, fold=None, scale=1.0):
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
    p_coef = _p_coef(row_coef, lse, terms, 0, n, opts)
    cw = terms.class_weight
    for c0 in range(0, c_local, per_block):
        c1 = min(c_local, c0 + per_block)
        logits = _logits_buffer(n, c1 - c0, hidden.dtype, hidden.device)
        _logits_(logits, hidden, weight[c0:c1], None if bias is None else bias[c0:c1])
        kernels.chunk_grad_(logits, target, opts.class_start + c0, lse, row_coef, 1.0 - opts.label_smoothing,
                            uniform, False, opts.use_extension, opts.softcap, None if cw is None else cw[c0:c1],
                            p_coef)
        grads.add_classes(logits, c0, c1, hidden, weight)
    return grads


def _sweep(hidden, weight, bias, target, row_coef, opts, need, terms, lse=None, fold=None, scale=1.0):
    """`_row_sweep`, with the gradients from `_class_sweep` where `_by_class` says so."""
    n = hidden.shape[0]
    if row_coef is None or not _by_class(hidden, n, opts):
        return _row_sweep(hidden, weight, bias, target, row_coef, opts, need, terms, lse, fold, scale)
    ce = None
    if lse is None:
        ce, lse, _ = _row_sweep(hidden, weight, bias, target, None, opts, need, terms)
    return ce, lse, _class_sweep(hidden, weight, bias, target, lse, row_coef, opts, need, terms, fold, scale)


def _forward(hidden, weight, bias, target, sample_weight, class_weight, opts, need, fold):
    """The loss of one call: (out, lse, row_term, grads, saved).

    need = (dX?, dW?, db?, d sample_weight?). "mean"/"sum": grads = ((dx, dw, db), scales) made here (None
    where not needed; dw None when folded), each gradient made at its scale (`_grad_scale`: 1 but for
    fp16), row_term = d loss / d s_i (None unless needed). "none": grads None, row_term = CE_i +
    z_loss·lse_i, saved = what `_backward_none` needs besides the inputs."""
    acc = kernels.stats_dtype(hidden.dtype)
    target = target.to(torch.int64).contiguous()
    if not opts.host_checks:
        _assert_values(target, sample_weight, class_weight, opts)
    valid = target != opts.ignore_index
    s = (torch.ones(target.shape, dtype=acc, device=hidden.device) if sample_weight is None
         else sample_weight.detach().to(acc))
    s_valid = torch.where(valid, s, 0)
    grad_need = need[:3]
    terms = _class_terms(class_weight, target, opts, acc)
    denom = None
    if opts.reduction == "mean":
        if terms.w_target is None:
            denom = valid.sum().clamp(min=1).to(acc)
        else:  # F.cross_entropy(weight=): Σ w_{y_i} over the non-ignored rows (1 when that is 0)
            denom = torch.where(valid, terms.w_target, 0).sum()
            denom = torch.where(denom > 0, denom, 1)
    if opts.reduction == "none":
        row_coef = None
    else:
        row_coef = (s_valid / denom if denom is not None else s_valid) if any(grad_need) else None
    scale = _grad_scale(hidden, weight, row_coef, fold, grad_need)
    if not isinstance(scale, float) or scale != 1.0:
        row_coef = row_coef * scale
    ce, lse, grads = _sweep(hidden, weight, bias, target, row_coef, opts, grad_need, terms, fold=fold, scale=scale)
    ce = torch.where(valid, ce, 0)
    rows = s_valid * ce
    if opts.reduction == "none":
        return rows.to(hidden.dtype), lse, ce, None, (s_valid, terms)
    loss = rows.sum()
    if denom is not None:
        ce = ce / denom
        loss = loss / denom
    grads = grads.finish(hidden, bias, opts) if grads is not None else ((None, None, None), (1.0, 1.0, 1.0))
    return loss.to(hidden.dtype), lse, ce if need[3] else None, grads, None


def _backward_none(grad, hidden, weight, bias, target, s_valid, lse, terms, opts, need, fold):
    """(dx, dw, db) of reduction "none" for the per-row upstream gradient `grad`: the logits recomputed."""
    if not any(need):
        return None, None, None
    _, _, grads = _sweep(hidden, weight, bias, target.to(torch.int64).contiguous(), s_valid * grad.to(lse.dtype),
                         opts, need, terms, lse=lse, fold=fold)
    return grads.finish(hidden, bias, opts)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """The op in eager mode (torch.compile runs the custom op `megaclass::linear_cross_entropy` instead):
    gradients made in forward are kept as ctx attributes, not saved tensors, so that backward can hand
    them over without a copy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, sample_weight, class_weight, opts, grad_enabled, fold):
        # inside the Function grad mode is always off, and needs_input_grad still says True under no_grad:
        # an eval-time loss must not make (and all-reduce) gradients nobody will read
        wants = [grad_enabled and w for w in ctx.needs_input_grad]
        need = (wants[0], wants[1], bias is not None and wants[2], wants[4])
        ctx.opts, ctx.need, ctx.need_s, ctx.fold = opts, need[:3], need[3], fold
        out, lse, row_term, grads, saved = _forward(hidden, weight, bias, target, sample_weight, class_weight, opts,
                                                    need, fold)
        ctx.mark_non_differentiable(lse)
        if opts.reduction == "none":
            s_valid, terms = saved
            ctx.save_for_backward(hidden, weight, bias, target, s_valid, lse, row_term, terms.class_weight,
                                  terms.w_target, terms.w_total)
        else:
            ctx.grads = grads
            ctx.save_for_backward(row_term)
        return out, lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
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
            (grads, scales), ctx.grads = ctx.grads, None
            dx, dw, db = (None if t is None else _unscale_(t, grad, scale) for t, scale in zip(grads, scales))
            del grads
            return dx, dw, db, None, ds, None, None, None, None
        hidden, weight, bias, target, s_valid, lse, ce, class_weight, w_target, w_total = ctx.saved_tensors
        dx, dw, db = _backward_none(grad, hidden, weight, bias, target, s_valid, lse,
                                    _ClassTerms(class_weight, w_target, w_total), opts, ctx.need, ctx.fold)
        ds = ce * grad.to(ce.dtype) if ctx.need_s else None
        return dx, dw, db, None, ds, None, None, None, None


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


# ----------------------------------------------------------------------------------------------------
# torch.compile: the op as two torch.library custom ops, opaque to the compiler (their chunk loop,
# collectives and caches run eagerly), with fake implementations and a traceable autograd formula.
# The eager path above keeps its autograd.Function, whose backward hands over the gradients made in
# forward without a copy; the math of both is `_forward` / `_backward_none`.


@dataclasses.dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of a call as the custom ops carry them: one string (`spec`)."""
    class_start: int
    group: str  # comm.group_name
    ignore_index: int
    label_smoothing: float
    reduction: str
    chunk_size: int  # 0: None
    hidden_grad: str
    implementation: str
    softcap: float  # 0: None
    z_loss: float
    need: str  # "dx dw db ds" as four 0/1 digits

    @property
    def spec(self):
        # plain formatting: torch.compile traces it as a constant (json would break the graph)
        return (f"{self.class_start};{self.group};{self.ignore_index};{self.label_smoothing!r};{self.reduction};"
                f"{self.chunk_size};{self.hidden_grad};{self.implementation};{self.softcap!r};{self.z_loss!r};"
                f"{self.need}")


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> _Call:
    f = spec.split(";")
    return _Call(int(f[0]), f[1], int(f[2]), float(f[3]), f[4], int(f[5]), f[6], f[7], float(f[8]), float(f[9]), f[10])


def _need(call):
    return tuple(c == "1" for c in call.need)


def _call_options(call, hidden, weight, target, sample_weight, bias, class_weight):
    return _validate(hidden, weight, target, sample_weight, bias, call.class_start, comm.group_by_name(call.group),
                     call.ignore_index, call.label_smoothing, call.reduction, call.chunk_size or None,
                     call.hidden_grad, call.implementation, softcap=call.softcap or None, z_loss=call.z_loss,
                     class_weight=class_weight, host_checks=False, wants_dx=_need(call)[0])


def _forward_shapes(call, hidden, weight, bias, class_weight):
    """(shape, dtype) of the forward op's outputs: loss, lse, row_term, dx, dw, db, s_valid, w_target,
    w_total, the scales dx, dw, db carry (`_grad_scale`); [0] where an output is not made."""
    n, acc = hidden.shape[0], kernels.stats_dtype(hidden.dtype)
    none = call.reduction == "none"
    need_dx, need_dw, need_db, need_ds = _need(call)
    weighted = none and class_weight is not None
    return [((n,) if none else (), hidden.dtype), ((n,), acc), ((n,) if none or need_ds else (0,), acc),
            (hidden.shape if need_dx and not none else (0,), hidden.dtype),
            (weight.shape if need_dw and not none else (0,), weight.dtype),
            (bias.shape if bias is not None and need_db and not none else (0,), hidden.dtype),
            ((n,) if none else (0,), acc), ((n,) if weighted else (0,), acc), (() if weighted else (0,), acc),
            ((3,), torch.float32)]


@torch.library.custom_op("megaclass::linear_cross_entropy", mutates_args=())
def _op_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                sample_weight: torch.Tensor | None, class_weight: torch.Tensor | None, spec: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` forward (outputs: `_forward_shapes`); the agreement and checks inside."""
    call = _parse(spec)
    opts = _call_options(call, hidden, weight, target, sample_weight, bias, class_weight)
    out, lse, row_term, grads, saved = _forward(hidden, weight, bias, target, sample_weight, class_weight, opts,
                                                _need(call), None)
    s_valid, terms = saved if saved is not None else (None, _ClassTerms())
    made_grads, scales = grads if grads is not None else ((None, None, None), (1.0, 1.0, 1.0))
    factors = torch.empty(3, dtype=torch.float32, device=hidden.device)
    for i, x in enumerate(scales):  # fill and device copies: no host-to-device copy, no synchronisation
        factors[i] = x
    scales = factors
    made = [out, lse, row_term, *made_grads, s_valid,
            None if terms.w_target is None else terms.w_target.clone(),  # views of one buffer: no aliasing out
            None if terms.w_total is None else terms.w_total.clone(), scales]
    return tuple(t if t is not None else torch.empty(shape, dtype=dtype, device=hidden.device)
                 for t, (shape, dtype) in zip(made, _forward_shapes(call, hidden, weight, bias, class_weight)))


@_op_forward.register_fake
def _(hidden, weight, bias, target, sample_weight, class_weight, spec):
    return tuple(hidden.new_empty(shape, dtype=dtype)
                 for shape, dtype in _forward_shapes(_parse(spec), hidden, weight, bias, class_weight))


@torch.library.custom_op("megaclass::linear_cross_entropy_backward", mutates_args=())
def _op_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 target: torch.Tensor, sample_weight: torch.Tensor | None, class_weight: torch.Tensor | None,
                 s_valid: torch.Tensor, lse: torch.Tensor, w_target: torch.Tensor, w_total: torch.Tensor, spec: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) of reduction "none" (the logits recomputed); [0] where not needed."""
    call = _parse(spec)
    opts = _call_options(call, hidden, weight, target, sample_weight, bias, class_weight)
    terms = (_ClassTerms() if class_weight is None else
             _ClassTerms(class_weight.detach().to(lse.dtype).contiguous(), w_target, w_total))
    need = _need(call)
    grads = _backward_none(grad, hidden, weight, bias, target, s_valid, lse, terms, opts,
                           (need[0], need[1], bias is not None and need[2]), None)
    return tuple(t if t is not None else hidden.new_empty(0) for t in grads)


@_op_backward.register_fake
def _(grad, hidden, weight, bias, target, sample_weight, class_weight, s_valid, lse, w_target, w_total, spec):
    need_dx, need_dw, need_db, _ = _need(_parse(spec))
    return (torch.empty_like(hidden) if need_dx else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else hidden.new_empty(0),
            torch.empty_like(bias) if bias is not None and need_db else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, sample_weight, class_weight, spec = inputs
    ctx.spec = spec
    if _parse(spec).reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, sample_weight, class_weight, *output[1:3], *output[6:9])
    else:
        ctx.save_for_backward(*output[2:6], output[9])


def _op_autograd(ctx, grad, *_):
    call = _parse(ctx.spec)
    need_dx, need_dw, need_db, need_ds = _need(call)
    if call.reduction != "none":
        row_term, dx, dw, db, scales = ctx.saved_tensors
        factors = grad.float() / scales  # an fp16 gradient's factor may lie below fp16's range: fp32, rounded once
        dx, dw, db = ((t * factors[i] if t.dtype == factors.dtype else (t * factors[i].expand(t.shape)).to(t.dtype))
                      if n else None for i, (t, n) in enumerate(((dx, need_dx), (dw, need_dw), (db, need_db))))
        return dx, dw, db, None, row_term * grad.to(row_term.dtype) if need_ds else None, None, None
    hidden, weight, bias, target, sample_weight, class_weight, lse, ce, s_valid, w_target, w_total = ctx.saved_tensors
    dx, dw, db = torch.ops.megaclass.linear_cross_entropy_backward(grad, hidden, weight, bias, target, sample_weight,
                                                                   class_weight, s_valid, lse, w_target, w_total,
                                                                   ctx.spec)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db and bias is not None else None, None,
            ce * grad.to(ce.dtype) if need_ds else None, None, None)


_op_forward.register_autograd(_op_autograd, setup_context=_setup_context)


def _compiled(hidden, weight, target, sample_weight, bias, class_start, process_group, ignore_index,
              label_smoothing, reduction, chunk_size, hidden_grad, implementation, weight_grad_into, softcap, z_loss,
              class_weight, return_lse):
    """`linear_cross_entropy` while torch.compile traces it: one custom op, the checks that need values
    inside it (device-side asserts)."""
    if weight_grad_into is not None:
        raise ValueError("linear_cross_entropy: weight_grad_into is not supported under torch.compile (it writes "
                         "a buffer in place during forward); let weight.grad take the gradient")
    if class_weight is not None and class_weight.requires_grad:
        raise ValueError("linear_cross_entropy: class_weight requires grad, but the op makes no gradient for it: "
                         "pass class_weight.detach()")
    grad = torch.is_grad_enabled()
    need = (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad,
            grad and sample_weight is not None and sample_weight.requires_grad)
    call = _Call(class_start, comm.group_name(process_group), ignore_index, float(label_smoothing), reduction,
                 chunk_size or 0, hidden_grad, implementation, float(softcap or 0.0), float(z_loss),
                 "".join("1" if n else "0" for n in need))
    out = torch.ops.megaclass.linear_cross_entropy(hidden, weight, bias, target, sample_weight, class_weight,
                                                   call.spec)
    return (out[0], out[1]) if return_lse else out[0]
