"""model.drop_rate's dropout: each row's mask a hash of (seed, the row's key), checked against a pure-Python
splitmix64; the same mask in any batch; the keys the engine gives each image, the same on any layout."""
import math

import pytest
import torch

from megaclass.engine.data import RankBatches, epoch_order, sample_keys
from megaclass.nn import row_seeded_dropout

U64 = 2**64 - 1
GAMMA = 0x9E3779B97F4A7C15
SEED = 0x2545F4914F6CDD1D  # 62 bits (derive_seed gives up to 63)


def _mix(z: int) -> int:
    """splitmix64's finalizer on Python ints (Steele, Lea & Flood 2014; Vigna's splitmix64.c)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def _kept(seed: int, key: int, column: int, p: float) -> bool:
    state = _mix((seed + GAMMA * (key + 1)) & U64)  # output key + 1 of the stream seeded by `seed`
    u = (_mix((state + GAMMA * (column + 1)) & U64) >> 11) / 2**53  # output column + 1 of the row's stream
    return u >= p


def _mask(p, seed, keys, width):
    """The keep mask [n, width] as the op computes it: where the dropout of ones is not zero."""
    return row_seeded_dropout(torch.ones(len(keys), width), p, seed, torch.as_tensor(keys)) != 0


def test_the_python_reference_is_splitmix64():
    # the first outputs of splitmix64 seeded with 0, as published with the reference C code
    assert [_mix(GAMMA * k & U64) for k in (1, 2, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_the_mask_is_the_python_reference_hash_bit_for_bit():
    keys = [0, 1, 7, 2**32 + 5, 3 * 2**32 + 2**31, 2**62]  # epoch · 2**32 + row, as the trainer makes them
    width, p = 40, 0.3
    got = _mask(p, SEED, keys, width)
    want = torch.tensor([[_kept(SEED, k, c, p) for c in range(width)] for k in keys])
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < want.numel()  # both outcomes occur among the 240 checked


def test_a_row_keeps_its_mask_in_any_batch_in_any_order():
    keys = torch.arange(48) * 977 + (5 << 32)
    x = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    whole = row_seeded_dropout(x, 0.4, SEED, keys)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # a random split into batches, processed in a random order
        perm = torch.randperm(48, generator=g)
        cuts = sorted(torch.randperm(47, generator=g)[:4].add(1).tolist())
        for rows in torch.tensor_split(perm, cuts):
            assert torch.equal(row_seeded_dropout(x[rows], 0.4, SEED, keys[rows]), whole[rows])
    assert not torch.equal(row_seeded_dropout(x, 0.4, SEED + 1, keys), whole)  # the seed matters
    assert not torch.equal(row_seeded_dropout(x, 0.4, SEED, keys + 1), whole)  # and so does the key


def test_the_kept_fraction_is_one_minus_p_and_neighbouring_rows_are_independent():
    n, width, p = 1000, 1000, 0.3
    mask = _mask(p, SEED, torch.arange(n), width).double()
    # 10^6 Bernoulli(0.7) draws: standard deviation of the fraction sqrt(0.21 / 10^6) = 4.6e-4; 6 sigma
    sigma = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(float(mask.mean()) - (1 - p)) < 6 * sigma
    # consecutive keys (rows) and consecutive columns: each pair agrees with probability p² + (1-p)² if independent
    agree = p**2 + (1 - p) ** 2
    sigma_agree = math.sqrt(agree * (1 - agree) / (mask.numel() - width))
    assert abs(float((mask[1:] == mask[:-1]).double().mean()) - agree) < 6 * sigma_agree
    assert abs(float((mask[:, 1:] == mask[:, :-1]).double().mean()) - agree) < 6 * sigma_agree


def test_the_output_and_gradient_are_the_mask_over_one_minus_p():
    keys, width, p = [3, 11, 2**33 + 4], 20, 0.25
    mask = torch.tensor([[_kept(SEED, k, c, p) for c in range(width)] for k in keys], dtype=torch.float64)
    x = torch.randn(3, width, dtype=torch.float64, requires_grad=True)
    y = row_seeded_dropout(x, p, SEED, torch.tensor(keys))
    # the op multiplies by 1/(1-p), the reference divides by 1-p: equal to float64 rounding
    torch.testing.assert_close(y, x.detach() * mask / (1 - p), rtol=1e-15, atol=0)
    grad = torch.randn(3, width, dtype=torch.float64)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad * mask / (1 - p), rtol=1e-15, atol=0)


def test_eval_and_p_zero_are_the_identity_and_bad_arguments_are_refused():
    x = torch.randn(4, 5)
    keys = torch.arange(4)
    assert row_seeded_dropout(x, 0.5, SEED, keys, training=False) is x
    assert row_seeded_dropout(x, 0.0, SEED, keys) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        row_seeded_dropout(x, 1.0, SEED, keys)
    with pytest.raises(ValueError, match="one per row"):
        row_seeded_dropout(x, 0.5, SEED, torch.arange(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_the_cpu_mask():
    keys = torch.arange(256) + (2 << 32)
    x = torch.randn(256, 512)
    torch.testing.assert_close(row_seeded_dropout(x.cuda(), 0.3, SEED, keys.cuda()).cpu(),
                               row_seeded_dropout(x, 0.3, SEED, keys), rtol=0, atol=0)


@pytest.mark.parametrize("layouts", [
    [(1, 12, 1), (2, 6, 1), (3, 4, 1), (4, 3, 1)],  # world, micro-batch, accumulation: a global batch of 12
    [(2, 3, 2), (3, 2, 2), (3, 4, 1), (6, 1, 2)],
])
def test_every_image_gets_the_same_key_on_any_number_of_ranks(layouts):
    items, steps = 50, 10  # 4 steps an epoch (48 images, 2 dropped): into a third epoch
    order_fn = lambda epoch: epoch_order(items, seed=3, epoch=epoch)  # noqa: E731
    seen = []
    for world, micro, accum in layouts:
        per_epoch = items // (world * micro)
        per_step = {}
        for rank in range(world):
            batches = RankBatches(items, rank, world, micro, total_micro_steps=steps * accum, order_fn=order_fn)
            for m, batch in enumerate(batches):
                keys = sample_keys(m, per_epoch, rank, world, micro).tolist()
                per_step.setdefault(m // accum, {}).update(zip(keys, batch))
        seen.append(per_step)
    assert all(per_step == seen[0] for per_step in seen[1:])  # each step: the same images under the same keys
    for step, keyed in seen[0].items():
        epoch = step // 4
        assert all(key >> 32 == epoch == e and int(order_fn(e)[key % 2**32]) == i for key, (e, i) in keyed.items())
