"""Write a folder so that a failure, a kill or Ctrl-C at any moment never loses both the old and
the new version of it.

The new folder is filled under a hidden name beside the target; then the old folder (if any) is
renamed aside to another hidden name, the new one renamed into place, and the old one deleted.
Two renames cannot be one atomic step, so a kill between them leaves the target missing and the
old folder aside: the next write (or read, through :func:`recover`) renames it back.

Every hidden folder holds a marker file naming its writer (host, process id and start time).
:func:`recover` touches only folders whose marker proves that their writer is gone: leftovers of a
process still running, of another machine, or without a marker are left alone.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from typing import Callable, Optional

from ..checkpoint_file import current_umask
from .._logging import logger

MARKER = ".alphaquant-writer.json"
NEW_PREFIX = ".alphaquant-new-"
OLD_PREFIX = ".alphaquant-old-"

# Steps of replace_folder in order; tests stop the writer (SIGKILL) at each to prove recovery.
STEPS = ("filled", "marked", "set-aside", "renamed", "unmarked", "deleting-old", "emptied-old")
_after_step: Optional[Callable[[str], None]] = None


def _reached(step: str) -> None:
    if _after_step is not None:
        _after_step(step)


def _start_time(pid) -> Optional[int]:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _identity(target: str, role: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time("self"),
            "target": os.path.basename(target), "role": role}


def _write_marker(folder: str, target: str, role: str) -> None:
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(_identity(target, role), f)


def _read_marker(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("pid"), int) and isinstance(m.get("host"), str) \
        and isinstance(m.get("target"), str)
    return m if ok else None


def _writer_gone(marker: dict, include_self: bool) -> bool:
    """True only when the marker's process provably no longer runs (same host, pid gone or reused)."""
    if marker["host"] != socket.gethostname():
        return False
    pid = marker["pid"]
    if pid == os.getpid() and marker.get("start") == _start_time("self"):
        return include_self
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = marker.get("start")
    return start is not None and _start_time(pid) not in (None, start)


def _delete_owned(folder: str) -> None:
    """Delete one of our hidden folders, its marker last, so a kill midway leaves it provably ours."""
    for entry in os.listdir(folder):
        if entry == MARKER:
            continue
        p = os.path.join(folder, entry)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
        _reached("deleting-old")
    try:
        os.unlink(os.path.join(folder, MARKER))
    except FileNotFoundError:
        pass
    _reached("emptied-old")
    os.rmdir(folder)


def _apply_umask(folder: str) -> None:
    """mkdtemp/mkstemp create 0700/0600; give the folder the modes any other tool would (umask)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _leftovers(target: str, prefix: str) -> list[str]:
    parent, base = os.path.split(target)
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return []
    return sorted(os.path.join(parent, n) for n in names if n.startswith(prefix + base + "-"))


def recover(target: str, include_self: bool = False) -> list[str]:
    """Finish or undo interrupted writes of ``target``; returns what was done, in words.

    An old folder set aside whose target is missing is renamed back; other leftovers of writers
    that are gone are deleted; a marker left inside the target is removed.
    """
    target = os.path.abspath(target)
    base = os.path.basename(target)
    done = []
    for prefix in (OLD_PREFIX, NEW_PREFIX):
        for path in _leftovers(target, prefix):
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            marker = _read_marker(path)
            if marker is None:
                if not os.listdir(path):  # emptied, or created and killed before its marker
                    os.rmdir(path)
                else:
                    logger.warning("leaving %s: it has no readable writer marker", path)
                continue
            if marker["target"] != base:
                continue
            if not _writer_gone(marker, include_self):
                logger.warning("leaving %s: its writer (pid %s on %s) may still be running", path,
                               marker["pid"], marker["host"])
                continue
            if prefix == OLD_PREFIX and not os.path.lexists(target):
                os.rename(path, target)
                os.unlink(os.path.join(target, MARKER))
                done.append(f"restored {target} from an interrupted replacement")
            else:
                _delete_owned(path)
                done.append(f"removed {os.path.basename(path)} left by an interrupted write")
    marker = _read_marker(target) if os.path.isdir(target) and not os.path.islink(target) else None
    if marker is not None and marker["target"] == base and _writer_gone(marker, include_self):
        os.unlink(os.path.join(target, MARKER))
    return done


def replace_folder(target: str, fill: Callable[[str], None]) -> None:
    """Create or replace the folder ``target`` with what ``fill(tmp_folder)`` writes.

    On any error (KeyboardInterrupt included) the old folder, if there was one, is back in place
    and no hidden folder is left; a kill leaves what :func:`recover` repairs.
    """
    target = os.path.abspath(target)
    parent, base = os.path.split(target)
    for line in recover(target):
        logger.warning("%s", line)
    tmp = tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{base}-", dir=parent)
    try:
        _write_marker(tmp, target, "new")
        fill(tmp)
        _apply_umask(tmp)
        _reached("filled")
        aside = None
        if os.path.lexists(target):
            aside = os.path.join(parent, f"{OLD_PREFIX}{base}-{secrets.token_hex(4)}")
            _write_marker(target, target, "old")
            _reached("marked")
            os.rename(target, aside)
            _reached("set-aside")
        os.rename(tmp, target)
        _reached("renamed")
        os.unlink(os.path.join(target, MARKER))
        _reached("unmarked")
        if aside is not None:
            _delete_owned(aside)
    except BaseException:
        try:
            recover(target, include_self=True)
        except Exception as e:  # the first error is the one to report; what is left, the next run repairs
            logger.warning("could not clean up after a failed write of %s: %s", target, e)
        raise
