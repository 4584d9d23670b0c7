"""Where a shard folder's files come from: a local (or shared, or mounted) folder, or an object store.

`data.shards` is either a folder or a URL (webdataset's forms; all but `pipe:` opened by its `gopen`):
  pipe:COMMAND      a shell command that writes the file named {name} to stdout, e.g.
                    `pipe:aws s3 cp s3://bucket/wv2-shards/{name} -` or `pipe:gsutil cat gs://b/wv2/{name}`
  https://HOST/DIR  (also http, gs, file): the file is DIR/{name}, or wherever {name} stands in the URL

From a URL, each file is copied once per node into a local cache (`data.shard_cache`, by default
`$TMPDIR/megaclass-shards`) and read there with the same positioned reads as from a folder: the global
order spreads a shuffle buffer over all ranks, so every node reads every shard of an epoch, and a
random-access copy serves every epoch after the first. The copy is
  - verified: a tar must have the size index.json gives, a sample index its size and SHA-256;
  - atomic: written to a temp file in the cache, fsynced, then renamed, so a killed copy leaves no
    half file that a later run would trust;
  - made once per node: the ranks and loader workers of a node take a lock file per shard, and the
    second one waits for the first one's copy instead of making its own;
  - versioned: the cache keeps each distinct index.json (by its SHA-256) in a folder of its own, so a
    re-converted set never mixes with an older copy.
A failed copy (the command's exit status, a short or damaged file, no byte for `STALL_S` seconds) is
retried (`TRIES`, with a pause that doubles), then raises `ShardFetchError` naming the file, the URL and
the reason: an error that stops the run, not an unreadable image that the reader would skip. The cache is never evicted: it grows to the size of the set (0.67 TB
at WebVision 2.0's 16M images); see docs/scale.md.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

INDEX = "index.json"
TRIES = 3
PAUSE = 1.0  # seconds before the second try; doubled before each next one
STALL_S = 300.0  # a try that receives no byte for this long is stopped and counts as failed
LOCK_POLL_S = 0.05  # waiting for another process's copy: how often its lock is tried again
CHUNK = 1 << 20
SCHEMES = ("http", "https", "gs", "file")  # besides pipe:, what webdataset's gopen opens by itself


class ShardFetchError(RuntimeError):
    """A file of a shard URL could not be copied into the local cache. Not an OSError: the reader counts
    and skips an unreadable image, but a shard it cannot copy must stop the run."""


def is_url(location: str | os.PathLike) -> bool:
    """A `data.shards` value that names an object store rather than a folder."""
    text = str(location)
    return text.startswith("pipe:") or bool(re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text))


def url_problem(location: str) -> str | None:
    """Why `location` is not a shards URL megaclass can copy from (None: it is one, or it is a folder)."""
    if location.startswith("pipe:"):
        return None if "{name}" in location else (
            f"{location!r} is a pipe: URL without {{name}}, where each file's name goes "
            f"(e.g. 'pipe:aws s3 cp s3://bucket/shards/{{name}} -')")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", location)
    if scheme and scheme[1].lower() not in SCHEMES:
        return (f"{location!r}: {scheme[1]}:// is not opened directly; give a command that writes the file to "
                f"stdout, e.g. 'pipe:aws s3 cp {location.rstrip('/')}/{{name}} -' (or one of {', '.join(SCHEMES)})")
    return None


def default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "megaclass-shards"


class ShardStore:
    """The files of one shard folder, by name: `path(name)` is where it is read from, `fetch(name, ...)`
    makes sure it is there first (a no-op for a folder)."""

    def __init__(self, location: str | os.PathLike, cache: str | os.PathLike | None = None):
        self.location = str(location)
        self.remote = is_url(self.location)
        problem = url_problem(self.location)
        if problem:
            raise ValueError(f"data.shards: {problem}")
        self.cache = None
        self.folder = Path(self.location)
        if self.remote:  # resolved: one spelling per file, so that one process has one lock per file
            base = (Path(cache) if cache else default_cache()).resolve()
            self.cache = base / hashlib.sha256(self.location.encode()).hexdigest()[:16]
            self.folder = self.cache  # until the index is read: then its version's folder

    def __repr__(self) -> str:
        return f"ShardStore({self.location!r}{f', cache={str(self.cache)!r}' if self.remote else ''})"

    def url(self, name: str) -> str:
        if "{name}" in self.location:
            return self.location.replace("{name}", name)
        return self.location.rstrip("/") + "/" + name

    def path(self, name: str) -> Path:
        return self.folder / name

    def index(self) -> Path:
        """index.json, read fresh from the URL (it is small) and kept in the folder of its version."""
        if not self.remote:
            return self.path(INDEX)
        self.cache.mkdir(parents=True, exist_ok=True)
        fresh = self._copy(INDEX, self.cache / f".{INDEX}.{os.getpid()}-{threading.get_ident()}")
        digest = hashlib.sha256(fresh.read_bytes()).hexdigest()
        self.folder = self.cache / digest[:16]
        os.makedirs(self.folder, exist_ok=True)
        os.replace(fresh, self.path(INDEX))
        return self.path(INDEX)

    def fetch(self, name: str, size: int | None = None, sha256: str | None = None, wait: bool = True) -> Path | None:
        """`path(name)`, copied from the URL first unless the cache holds it with that size (and SHA-256).
        wait=False: None instead of waiting while another process of the node copies it."""
        path = self.path(name)
        if not self.remote or _intact(path, size, sha256):
            return path
        (self.folder / ".locks").mkdir(exist_ok=True)
        # one copy per node: a POSIX lock between processes (not inherited by forked loader workers, unlike
        # flock's, which a worker forked mid-copy would hold for its lifetime), a thread lock within one
        thread_lock = _thread_lock(str(path))
        if not thread_lock.acquire(blocking=wait):
            return None
        try:
            with open(self.folder / ".locks" / name, "a") as lock:
                # polled, never a blocking lockf: the kernel's deadlock check counts processes, not threads,
                # and would refuse a wait while this process's prefetch thread holds another file's lock
                while not _try_lock(lock):
                    if not wait:
                        return None
                    time.sleep(LOCK_POLL_S)
                if not _intact(path, size, sha256):  # else the lock's last holder copied it meanwhile
                    for stale in self.folder.glob(f".{name}.*"):  # temp files of a copy that was killed
                        stale.unlink(missing_ok=True)
                    self._copy(name, path, size, sha256)
        finally:
            thread_lock.release()
        return path

    def _copy(self, name: str, path: Path, size: int | None = None, sha256: str | None = None) -> Path:
        """Copy the file `name` from its URL to `path` (atomically), checked; `TRIES` tries."""
        from megaclass.io import atomic_output

        url, pause, problem = self.url(name), PAUSE, ""
        for attempt in range(1, TRIES + 1):
            started, digest, got = time.perf_counter(), hashlib.sha256(), 0
            try:
                with atomic_output(path) as tmp, open(tmp, "wb") as out:
                    watchdog = None
                    try:
                        with _open(url) as stream:
                            watchdog = _Watchdog(stream, STALL_S)
                            while chunk := stream.read(CHUNK):
                                watchdog.progress()
                                out.write(chunk)
                                got += len(chunk)
                                if sha256 is not None:
                                    digest.update(chunk)
                    except (OSError, ValueError) as exc:  # the command's exit status, a refused connection, a full disk
                        stalled = watchdog is not None and watchdog.stalled
                        raise _Mismatch(watchdog.reason if stalled else _reason(exc)) from exc
                    finally:
                        if watchdog is not None:
                            watchdog.stop()
                    if watchdog.stalled:
                        raise _Mismatch(watchdog.reason)
                    if size is not None and got != size:
                        raise _Mismatch(f"{got} bytes, index.json says {size} (a partial copy, or a file of "
                                        f"another conversion)")
                    if sha256 is not None and digest.hexdigest() != sha256:
                        raise _Mismatch("a SHA-256 other than index.json's (damaged, or a file of another conversion)")
                log.info("%s: %.1f MB copied to %s in %.1f s", url, got / 1e6, path, time.perf_counter() - started)
                return path
            except _Mismatch as exc:
                problem = str(exc)[:300]
            if attempt < TRIES:
                log.warning("%s: %s, copying it from %r; try %d of %d in %.0f s", name, problem, url, attempt + 1,
                            TRIES, pause)
                time.sleep(pause)
                pause *= 2
        raise ShardFetchError(f"{name}: {problem}, after {TRIES} tries of copying it from {url!r} to {path}")


_thread_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _guard:
        return _thread_locks.setdefault(key, threading.Lock())


def _forget_thread_locks() -> None:  # a forked child: its parent's threads (and their locks) are not in it
    global _guard
    _guard = threading.Lock()
    _thread_locks.clear()


os.register_at_fork(after_in_child=_forget_thread_locks)


class _Mismatch(ValueError):
    """One try's failure, retried."""


def _reason(exc: Exception) -> str:
    """Why a try's stream failed, in words: the command's exit status, or the error itself."""
    status = re.search(r"exit (-?\d+) \(read\)", str(exc))  # how gopen's Pipe (curl, gsutil) says it
    if status and getattr(exc, "errno", None) is None:
        return f"the command exited with status {status[1]}"
    return str(exc) if getattr(exc, "errno", None) is None else f"{type(exc).__name__}: {exc}"


def _try_lock(lock) -> bool:
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


class _Command:
    """The stdout of a `pipe:` URL's shell command, in a session of its own, so that a stalled copy can
    be stopped with everything the command started (webdataset's gopen kills only the shell)."""

    def __init__(self, command: str):
        import subprocess

        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)

    def read(self, size: int) -> bytes:
        return self.proc.stdout.read(size)

    def kill(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.proc.stdout.close()
        status = self.proc.wait()
        if kind is None and status != 0:
            raise OSError(f"the command exited with status {status}")


def _open(url: str):
    """A readable stream of `url`: a `pipe:` command here, anything else through webdataset's gopen
    (curl for http/https, gsutil for gs://, a plain file for file://)."""
    if url.startswith("pipe:"):
        return _Command(url[len("pipe:"):])
    from webdataset.gopen import gopen

    return gopen(url, "rb")


class _Watchdog:
    """Stops a copy that receives no byte for `stall` seconds: kills the stream's process (a pipe's
    command and its children, or curl), whose read then ends."""

    def __init__(self, stream, stall: float):
        self.stream, self.stall, self.stalled = stream, stall, False
        self.last, self.done = time.monotonic(), threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def progress(self) -> None:
        self.last = time.monotonic()

    @property
    def reason(self) -> str:
        return f"no data for {self.stall:g} s (the copy was stopped)"

    def _watch(self) -> None:
        while not self.done.wait(min(1.0, self.stall / 4)):
            if time.monotonic() - self.last > self.stall:
                self.stalled = True
                if isinstance(self.stream, _Command):
                    self.stream.kill()
                elif getattr(self.stream, "proc", None) is not None:  # gopen's Pipe (curl, gsutil)
                    self.stream.proc.kill()
                return

    def stop(self) -> None:
        self.done.set()


def _intact(path: Path, size: int | None, sha256: str | None) -> bool:
    try:
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
        return sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False
