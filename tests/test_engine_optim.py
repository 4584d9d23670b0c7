"""The head's in-place SGD: torch.optim.SGD's arithmetic without its head-sized temporaries."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megaclass.engine.optim import InPlaceSGD

SETTINGS = [  # (momentum, dampening, weight_decay, nesterov, maximize)
    (0.0, 0.0, 0.0, False, False),
    (0.0, 0.0, 1e-2, False, False),
    (0.9, 0.0, 1e-4, False, False),
    (0.9, 0.1, 1e-2, False, True),
    (0.8, 0.0, 1e-2, True, False),
]


def _grads(steps, shape, dtype):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


def _train(opt_cls, settings, dtype, steps=5, switch_at=None):
    """`steps` updates of a weight and a bias with fixed gradients and a changing lr (a LambdaLR
    schedule, as the trainer uses). switch_at: from that step on, continue with InPlaceSGD loaded
    from the state_dict of the optimizer so far (a checkpoint written by torch's SGD)."""
    momentum, dampening, wd, nesterov, maximize = settings
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3, generator=g, dtype=dtype)),
              torch.nn.Parameter(torch.randn(7, generator=g, dtype=dtype))]
    grads = list(zip(_grads(steps, (7, 3), dtype), _grads(steps, (7,), dtype)))

    def make(cls, start=0):
        opt = cls(params, lr=0.3, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                  maximize=maximize)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + start + step))

    opt, schedule = make(opt_cls)
    for step in range(steps):
        if step == switch_at:
            state = opt.state_dict()
            opt, schedule = make(InPlaceSGD, start=step)
            opt.load_state_dict(state)
        for p, grad in zip(params, grads[step]):
            p.grad = grad.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    buffers = [opt.state[p].get("momentum_buffer") for p in params]
    return [p.detach() for p in params], buffers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("settings", SETTINGS)
def test_in_place_sgd_equals_torch_sgd_bit_for_bit(settings, dtype):
    expected, expected_buffers = _train(torch.optim.SGD, settings, dtype)
    # the same floating-point operations in the same order (only their destinations differ): exact equality
    for switch_at in (None, 2):  # also when resuming from torch's SGD state (the checkpoints' format)
        got, buffers = _train(InPlaceSGD, settings, dtype, switch_at=switch_at)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        for a, b in zip(buffers, expected_buffers):
            assert (a is None and b is None) or torch.equal(a, b)


def test_the_first_gradient_becomes_the_momentum_buffer_and_later_steps_update_it_in_place():
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = InPlaceSGD([p], lr=0.1, momentum=0.9, weight_decay=1e-2)
    grad = p.grad = torch.randn(5, 4)
    opt.step()
    assert p.grad is None  # consumed: a later zero_grad(set_to_none=False) cannot zero the buffer
    buf = opt.state[p]["momentum_buffer"]
    assert buf.data_ptr() == grad.data_ptr()
    p.grad = torch.randn(5, 4)
    opt.step()
    assert opt.state[p]["momentum_buffer"].data_ptr() == buf.data_ptr()


def _allocated_bytes(opt, param, steps=2):
    """Bytes allocated by the ops of each `opt.step()` (torch's profiler, CPU memory events)."""
    out = []
    for _ in range(steps):
        param.grad = torch.randn(param.shape)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        out.append(sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages()))
        opt.zero_grad(set_to_none=True)
    return out


def test_a_step_allocates_nothing_the_size_of_the_parameter():
    size = 1000 * 256 * 4
    p = torch.nn.Parameter(torch.randn(1000, 256))
    # the control shows the measurement sees such temporaries: torch's step makes grad + wd·p out of
    # place, and on the first step also clones the gradient into the momentum buffer
    first, later = _allocated_bytes(torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4), p)
    assert first >= 2 * size and later >= size
    for allocated in _allocated_bytes(InPlaceSGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4), p):
        assert allocated < size // 100


# ---- gradients folded into the momentum buffer (`fold_target`, as the head's fused op writes them)


def _folded_run(dtype, steps=4, accum=2, switch_at=2):
    """A weight whose micro-batch gradients are folded into its buffer (buf ← beta·buf + g, what
    `linear_cross_entropy(..., weight_grad_into=...)` does) and a bias on the usual p.grad path, one
    optimizer; before `switch_at` the weight too takes the usual path (torch's SGD state). Against
    float64 torch.optim.SGD fed the summed gradients."""
    g = torch.Generator().manual_seed(4)
    w0, b0 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    micro = [[(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64))
              for _ in range(accum)] for _ in range(steps)]
    settings = dict(lr=0.2, momentum=0.9, weight_decay=0.05)

    ref = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    ref_opt = torch.optim.SGD(ref, **settings)
    ours = [torch.nn.Parameter(w0.to(dtype)), torch.nn.Parameter(b0.to(dtype))]
    opt = InPlaceSGD(ours, **settings)
    betas = []
    for step in range(steps):
        for p, grads in zip(ref, zip(*micro[step])):
            p.grad = sum(grads)
        ref_opt.step()
        for gw, gb in micro[step]:
            target = opt.fold_target(ours[0]) if step >= switch_at else None
            if target is None:
                ours[0].grad = gw.to(dtype) if ours[0].grad is None else ours[0].grad + gw.to(dtype)
            else:
                buf, beta = target
                betas.append(beta)
                buf.mul_(beta).add_(gw.to(dtype))
            ours[1].grad = gb.to(dtype) if ours[1].grad is None else ours[1].grad + gb.to(dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return ours, ref, opt, ref_opt, betas


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("switch_at", [0, 2])  # folded from the first step; after steps on torch's path
def test_folded_gradients_train_like_torch_sgd(dtype, switch_at):
    ours, ref, opt, ref_opt, betas = _folded_run(dtype, switch_at=switch_at)
    # the first fold of a step scales the buffer by μ (0 when it is created: torch's first buf = d), the next adds
    assert betas == ([0.0, 1.0] + [0.9, 1.0] * 3 if switch_at == 0 else [0.9, 1.0] * 2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for p, r in zip(ours, ref):  # the same math associated differently: equal up to rounding
        torch.testing.assert_close(p.detach().double(), r.detach(), **tol)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), ref_opt.state[r]["momentum_buffer"], **tol)
    assert all(p.grad is None for p in ours)


def test_fold_target_only_for_plain_momentum():
    for kw in (dict(momentum=0.0), dict(momentum=0.9, dampening=0.1), dict(momentum=0.9, nesterov=True),
               dict(momentum=0.9, maximize=True)):
        p = torch.nn.Parameter(torch.randn(3))
        assert InPlaceSGD([p], lr=0.1, **kw).fold_target(p) is None, kw
    p = torch.nn.Parameter(torch.randn(3))
    buf, beta = InPlaceSGD([p], lr=0.1, momentum=0.9).fold_target(p)
    assert beta == 0.0 and torch.equal(buf, torch.zeros(3)) and buf.is_contiguous()


def test_a_folded_parameter_also_takes_a_gradient_that_came_by_autograd():
    w0, g1, g2 = (torch.randn(4, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3))
    ref = torch.nn.Parameter(w0.clone())
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    ours = torch.nn.Parameter(w0.clone())
    opt = InPlaceSGD([ours], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(2):  # g1 folded, g2 in p.grad (the weight used elsewhere too): the step sums them
        ref.grad = g1 + g2
        ref_opt.step()
        buf, beta = opt.fold_target(ours)
        buf.mul_(beta).add_(g1)
        ours.grad = g2.clone()
        opt.step()
        assert ours.grad is None
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not update"):
        opt.fold_target(torch.nn.Parameter(torch.zeros(2)))
