"""Every seed megaclass derives from `train.seed` comes from `derive_seed`, so that no two uses share
a random stream and resuming a run at step j redraws exactly what an unbroken run drew there."""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for `purpose` (e.g. "dropout") at `indices` (e.g. the micro-step).

    A hash rather than a linear fold such as `seed * 1_000_003 + epoch`: a fold makes (seed, epoch) and
    (seed + 1, epoch - 1_000_003) collide and hands every purpose the same stream at the same index
    (the permutation of epoch 3 and the dropout of micro-step 3)."""
    key = repr((int(seed), purpose, *(int(i) for i in indices))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
