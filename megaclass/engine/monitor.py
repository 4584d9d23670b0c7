"""What a run reports: a tqdm bar on rank 0, per-step rows in `<name>.csv` and TensorBoard (peak
memory among them, from `megaclass.memory`)."""
from __future__ import annotations

import csv
import os
import sys

from tqdm import tqdm

from megaclass.io import atomic_output


class Monitor:
    """Rank 0 writes; other ranks' calls do nothing. `log(step, **values)` appends one CSV row
    (columns fixed by the first row) and one TensorBoard scalar per value."""

    def __init__(self, run_dir: str, name: str, total_steps: int, start_step: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.csv_path = os.path.join(run_dir, f"{name}.csv")
        self.eval_path = os.path.join(run_dir, f"{name}_eval.csv")
        self._file = self._writer = self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        for path in (self.csv_path, self.eval_path):
            if start_step == 0 and os.path.exists(path):
                os.remove(path)
            elif os.path.exists(path):
                self._truncate_after(path, start_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard", name), purge_step=start_step or None)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    @staticmethod
    def _truncate_after(path: str, step: int) -> None:
        """On resume, drop rows of steps after the checkpoint (they will be run again)."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step] if rows else []
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
            self._file = open(self.csv_path, "a", newline="")
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(["step", *values])
        self._writer.writerow([step, *(f"{v:.6g}" for v in values.values())])
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def log_eval(self, step: int, **values: float) -> None:
        """One row of `<name>_eval.csv` and `val/<key>` TensorBoard scalars."""
        if not self.enabled:
            return
        new = not os.path.exists(self.eval_path)
        with open(self.eval_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *values])
            writer.writerow([step, *(f"{v:.6g}" for v in values.values())])
        for key, value in values.items():
            self._tb.add_scalar(f"val/{key}", value, step)
        if self._bar is not None:
            self._bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def advance(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        for thing in (self._bar, self._file, self._tb):
            if thing is not None:
                thing.close()
        self._bar = self._file = self._tb = self._writer = None
