"""One checkout at a time per results folder.

Snakemake's own lock lives in the working directory of a checkout (``.snakemake/locks``), so two
clones whose studies write the same ``results/<study>`` folder (a shared ``results_dir``, say)
would not see each other and would overwrite each other's outputs. The Snakefile's ``onstart``
takes ``results/<study>/.mergemix.lock``, which records the checkout, host and pid of the run;
``onsuccess``/``onerror`` give it back.

* a lock held by the same checkout is taken over (Snakemake's lock already covers that case);
* a lock of another checkout whose process is dead on this host is replaced, with a warning;
* a lock of another checkout that is alive, or on another host, is refused with the way forward.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".mergemix.lock"


class LockError(RuntimeError):
    """Another checkout's run is writing the results folder."""


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return True


def _me(checkout) -> dict:
    return {
        "checkout": str(Path(checkout).resolve()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _read(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(lock: Path, me: dict) -> None:
    from mergemix import io

    io.write_json(lock, me)


def acquire(results_dir, checkout, warn=None) -> Path:
    """Take ``results_dir/.mergemix.lock`` for this process of ``checkout``; raise :class:`LockError`
    if another checkout's live run holds it."""
    warn = warn or (lambda msg: print(f"mergemix: warning: {msg}", file=sys.stderr, flush=True))
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    lock = results / LOCK_NAME
    me = _me(checkout)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f, indent=2, sort_keys=True)
            return lock
        other = _read(lock)
        if other is None:  # being written right now, or garbage: look again, then replace it
            time.sleep(0.2)
            other = _read(lock)
            if other is None:
                warn(f"{lock} is unreadable; replacing it")
                lock.unlink(missing_ok=True)
                continue
        if other.get("checkout") == me["checkout"]:
            _write(lock, me)
            return lock
        if other.get("host") == me["host"] and not _alive(other.get("pid")):
            warn(
                f"{lock}: the run of checkout {other.get('checkout')} (pid {other.get('pid')}, started "
                f"{other.get('started')}) is gone; taking its lock (its unfinished outputs are rebuilt by this run)"
            )
            lock.unlink(missing_ok=True)
            continue
        where = (
            "alive"
            if other.get("host") == me["host"]
            else "on another host, so mergemix cannot see whether it still runs"
        )
        raise LockError(
            f"{results} is being written by a run from another checkout, {other.get('checkout')} (host {other.get('host')}, "
            f"pid {other.get('pid')}, started {other.get('started')}; {where}). Two checkouts writing one results folder "
            "would overwrite each other's outputs: wait for that run to finish, run this study from that checkout, or "
            f"give this one another results_dir or study name; if that run is gone, delete {lock} and rerun"
        )
    raise LockError(f"could not take {lock}: other runs keep replacing it; delete it and rerun")


def release(results_dir, checkout) -> None:
    """Remove the lock if this process of ``checkout`` holds it."""
    lock = Path(results_dir) / LOCK_NAME
    other = _read(lock)
    if other and other.get("checkout") == str(Path(checkout).resolve()) and other.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)
