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
