"""Surviving a cluster: a preemption signal every rank agrees on, and a heartbeat that names a lost rank.

Exit codes (docs/faults.md; launch/ keys on them):

    REQUEUE_EXIT = 75    preempted: every rank saved the step reached; run the job again to resume it
                         (sysexits' EX_TEMPFAIL, "try again later"; Python, DeepSpeed and torchrun use 1)
    LOST_RANK_EXIT = 76  a peer died or stopped answering its heartbeat; resume from the last checkpoint

Preemption (Megatron's dist_signal_handler): SIGTERM or SIGUSR1 only sets a flag; once per step every
rank all-reduces it (`agree_to_stop`), so all ranks learn of a signal sent to any of them within one
step, save that step together and leave with REQUEUE_EXIT.

Heartbeat: a daemon thread per rank adds 1 to its counter in the job's store every heartbeat_s/6 and
watches the next rank's counter (a ring: every lost set of ranks but all of them has a live watcher).
A counter unchanged for heartbeat_s/2 means that rank died or is stopped; the watcher publishes it
under `lost`, which every rank reads each beat. A store operation that fails or takes heartbeat_s/2
means the store's own host is lost (rank 0 under DeepSpeed or mpirun, torchrun's agent under torchrun).
Each rank then logs which rank and host was lost and leaves with os._exit(LOST_RANK_EXIT): its main
thread may be stuck in a collective that would wait parallel.timeout_s. Everything is noticed within
heartbeat_s: a beat is seen late by at most one period, declared stale after three, and read by the
others within one more.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time

from megaclass.parallel import comm

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75
LOST_RANK_EXIT = 76
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_DONE = 1 << 60  # added to a rank's counter when it leaves normally: its silence is no loss

_received: int | None = None  # the first preemption signal this process received
_heartbeat: Heartbeat | None = None


class Preempted(Exception):
    """Every rank agreed to stop on a preemption signal and saved the step reached."""


def install_signal_handlers() -> None:
    """SIGTERM and SIGUSR1 set a flag instead of ending the process (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, _on_signal)


def _on_signal(signum, _frame) -> None:
    global _received
    if _received is None:
        _received = signum


def ignore_preemption_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: launchers signal a rank's whole process tree, and a worker
    killed by SIGTERM would fail the rank's next batch; the workers end with their rank instead."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def agree_to_stop(device) -> bool:
    """Collective, once per step: True on every rank when any rank received a preemption signal."""
    return comm.any_rank(_received is not None, device)


def preempted_message(step: int, folder: str | None) -> str:
    name = signal.Signals(_received).name if _received is not None else "a peer's signal"
    return (f"preempted ({name}) at step {step}: every rank saved {folder}; exiting with {REQUEUE_EXIT} "
            f"(requeue: run the same command again to resume)")


# -- heartbeat ------------------------------------------------------------------------------------
class Heartbeat:
    """This rank's beat and its watch over rank (rank + 1) % world, through `store` (see the module
    docstring). `store_owner` names who serves the store, for the message when it stops answering."""

    def __init__(self, store, rank: int, world: int, heartbeat_s: float, store_owner: str):
        self.store, self.rank, self.world, self.heartbeat_s = store, rank, world, heartbeat_s
        self.period = heartbeat_s / 6
        self.store_owner = store_owner
        self.watched = (rank + 1) % world
        self.hosts: dict[int, str] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megaclass-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.set(f"host/{self.rank}", socket.gethostname())
        self.store.add(f"beat/{self.rank}", 1)
        self._thread.start()

    def stop(self) -> None:
        """Leave normally: peers stop watching this rank."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join()
        try:
            _within(lambda: self.store.add(f"beat/{self.rank}", _DONE), self.heartbeat_s / 2)
        except Exception:  # the store is gone with its host: nobody is left to watch us
            pass

    def _run(self) -> None:
        last, changed = None, time.monotonic()
        while not self._stopping.wait(self.period):
            try:
                lost, value = _within(self._round, self.heartbeat_s / 2)
            except Exception as exc:  # refused, reset or timed out: whoever serves the store is gone
                if self._stopping.is_set():
                    return
                owner = self.store_owner.format(host=self.hosts.get(0, os.environ.get("MASTER_ADDR")))
                reason = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
                self._leave(f"the job's store stopped answering ({reason}); it is served by {owner}: "
                            f"that process died or is stopped")
            if lost:
                self._leave(lost)
            if value == 0 or value >= _DONE:  # not started yet (the collectives' timeout covers that) or left
                continue
            now = time.monotonic()
            if value != last:
                last, changed = value, now
            elif now - changed > 3 * self.period:
                host = self.hosts.get(self.watched, "unknown host")
                message = (f"rank {self.watched} on {host} stopped beating: no heartbeat for {now - changed:.1f} s "
                           f"(parallel.heartbeat_s={self.heartbeat_s:g}): it died or is stopped")
                self._publish(message)
                self._leave(message)

    def _round(self) -> tuple[str | None, int]:
        """One beat: add to this rank's counter; return (the published loss or None, the watched counter)."""
        self.store.add(f"beat/{self.rank}", 1)
        lost = self.store.get("lost").decode() if self.store.check(["lost"]) else None
        value = self.store.add(f"beat/{self.watched}", 0)
        for peer in {self.watched, 0} - set(self.hosts):  # rank 0 serves the store unless torchrun does
            if self.store.check([f"host/{peer}"]):
                self.hosts[peer] = self.store.get(f"host/{peer}").decode()
        return lost, value

    def _publish(self, message: str) -> None:
        try:
            _within(lambda: self.store.compare_set("lost", "", message), self.period)
        except Exception:
            pass
        # the store may live in this process: give the others a beat to read it before it goes
        time.sleep(1.5 * self.period)

    def _leave(self, message: str) -> None:
        log.error("lost a rank: %s; exiting with %d (restart to resume from the last complete checkpoint)",
                  message, LOST_RANK_EXIT)
        for stream in (sys.stderr, sys.stdout):
            stream.flush()
        os._exit(LOST_RANK_EXIT)


def _within(fn, timeout_s: float):
    """fn() run in a daemon thread, or TimeoutError after `timeout_s`: a TCP store's operations wait
    without limit on a server that is stopped (SIGSTOP), and such a wait must not hold this rank."""
    box: list = []

    def call():
        try:
            box.append((True, fn()))
        except BaseException as exc:
            box.append((False, exc))

    thread = threading.Thread(target=call, name="megaclass-heartbeat-store", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def start_heartbeat(heartbeat_s: float) -> None:
    """Start this rank's heartbeat (after the process group exists; nothing for a group of one). The
    store is the job's rendezvous store at MASTER_ADDR:MASTER_PORT, reached by a connection of its own
    whose operations time out after heartbeat_s/2."""
    global _heartbeat
    world, rank = comm.world_size(), comm.rank()
    if world == 1 or _heartbeat is not None or "MASTER_ADDR" not in os.environ:
        return
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        owner = f"torchrun's agent at {address}:{port}"
    else:
        owner = f"rank 0 on {{host}} (store at {address}:{port})"
    # torchrun's agent keeps its store across restarts: each attempt beats under its own prefix
    prefix = f"megaclass/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store = comm.store_client(address, port, heartbeat_s / 2, prefix)
    _heartbeat = Heartbeat(store, rank, world, heartbeat_s, owner)
    _heartbeat.start()
    atexit.register(stop_heartbeat)


def stop_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def await_lost_rank() -> None:
    """After a collective failed (a peer's connection closed): wait up to heartbeat_s for the heartbeat
    to name the lost rank and exit. Returns (the caller re-raises) when nothing was lost, or at once when
    a signal came meanwhile: a launcher that saw the rank die is ending the job and names it itself."""
    if _heartbeat is None:
        return
    deadline = time.monotonic() + _heartbeat.heartbeat_s
    while time.monotonic() < deadline and _received is None:
        time.sleep(0.1)
