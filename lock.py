"""The output directory's lock, made for clusters: one trainer per run directory, and no lock left over forever.

<out>/lock names the pid and host of the running trainer, which refreshes the file's mtime every HEARTBEAT_S seconds
(a lease) from a daemon thread. A lock is live while its lease is fresh and, on this host, its process exists. A lock
whose lease ran out is stale whoever wrote it: a job preempted on another node (whose process cannot be checked from
here), or a pid since reused by another program. The lease is long against the clock skew between hosts that share a
filesystem. `--force` takes a live-looking lock anyway, with a warning.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings

HEARTBEAT_S = 60.0  # seconds between refreshes of the lock's mtime
LEASE_S = 600.0  # a lock not refreshed for this long is stale
_heartbeats: dict[str, threading.Event] = {}


def lock_holder(path: str) -> str | None:
    """Who holds a lock file ('pid N on HOST'), or None when it is stale: its lease ran out, its process is gone, or
    it is this process."""
    try:
        with open(path) as f:
            pid, host = f.read().split()[:2]
        pid = int(pid)
        age = time.time() - os.stat(path).st_mtime
    except (OSError, ValueError):
        return None  # unreadable: written by nothing that finished writing it (the lock is made by a rename)
    if age > LEASE_S:
        return None  # its holder stopped refreshing it: gone, wherever it ran
    holder = f"pid {pid} on {host}, lease refreshed {age:.0f} s ago"
    if host != socket.gethostname():
        return holder  # cannot be checked from here: live while its lease is
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return holder


def acquire_lock(out: str, force: bool = False) -> str:
    """<out>/lock holds this process's pid, refreshed by a heartbeat thread until release_lock; a second run on the
    directory is refused while the lock is live, unless force (a warning names the holder)."""
    os.makedirs(out, exist_ok=True)
    path, tmp = os.path.join(out, "lock"), os.path.join(out, f"lock.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, and fails when the lock exists: two starts cannot both win
                start_heartbeat(path)
                return path
            except FileExistsError:
                holder = lock_holder(path)
                if holder and not force:
                    raise RuntimeError(f"{out} is in use by another tcod run ({holder}); wait for it to end, or pass "
                                       f"another --out. A lock is stale once not refreshed for {LEASE_S / 60:.0f} min; if "
                                       "you know no such run is going, --force takes it over") from None
                if holder:
                    warnings.warn(f"--force: taking over the lock of {out} from {holder}; if that run is in fact still "
                                  "going, both now write to the same directory and will corrupt it")
                os.remove(path)  # stale (or forced): its holder is gone
        raise RuntimeError(f"could not take the lock {path}")
    finally:
        os.remove(tmp)


def start_heartbeat(path: str) -> None:
    """A daemon thread that refreshes the lock's mtime while it is this process's; release_lock stops it."""
    stop = _heartbeats[path] = threading.Event()
    mine = f"{os.getpid()} {socket.gethostname()}"

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with open(path) as f:
                    if f.read().strip() != mine:
                        warnings.warn(f"the lock {path} was taken over by another process (--force): this run's writes "
                                      "to the directory now collide with it")
                        return
                os.utime(path)
            except OSError:
                return  # removed (released, or the directory is gone)

    threading.Thread(target=beat, name=f"lock heartbeat {path}", daemon=True).start()


def release_lock(path: str) -> None:
    if (stop := _heartbeats.pop(path, None)) is not None:
        stop.set()
    try:
        with open(path) as f:
            mine = f.read().split()[:1] == [str(os.getpid())]
        if mine:
            os.remove(path)
    except OSError:
        pass
