"""A launch script for fault tests: launch/train.py that sends itself a signal.

MEGACLASS_TEST_FAULT="RANK:STEP:SIGNAL[:launcher]" (e.g. "1:3:SIGKILL"): rank RANK sends SIGNAL to its own
process (with ":launcher", to its parent: the launcher that started it) just before optimizer step STEP + 1, in the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT
unset or 0), so that a restarted run goes through. Unset: no fault (the clean run)."""
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

from megaclass.engine import trainer  # noqa: E402

rank, step, name, *target = os.environ.get("MEGACLASS_TEST_FAULT", "-1:-1:SIGKILL").split(":")
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
train_step = trainer.Trainer.train_step


def faulty_train_step(self, batches):
    if first_attempt and self.rank == int(rank) and self.step == int(step):
        whom = "its launcher" if target == ["launcher"] else "itself"
        print(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} fault_inject: rank {rank} sends {whom} "
              f"{name} before step {self.step + 1}", file=sys.stderr, flush=True)
        os.kill(os.getppid() if target == ["launcher"] else os.getpid(), getattr(signal, name))
    return train_step(self, batches)


trainer.Trainer.train_step = faulty_train_step

import train  # noqa: E402

sys.exit(train.main())
