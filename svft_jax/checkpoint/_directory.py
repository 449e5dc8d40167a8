"""The folder a `TrainCheckpointer` owns, apart from what it saves in it: the marker that says
the folder is ours (and its format), the writer lock (one writer per folder), and the removal
of what a killed run left (a rename into a trash folder first, so a kill mid-delete leaves only
trash, emptied on the next open). Saving and restoring steps live in `manager.py`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

import orbax.checkpoint as ocp

from svft_jax.checkpoint._files import ensure_directory, remove_path

logger = logging.getLogger("svft_jax.checkpoint.manager")  # the messages' logger before the split

CHECKPOINT_FORMAT = "svft-jax-train-checkpoint"
CHECKPOINT_VERSION = 1  # the directory layout (marker file); steps carry STEP_VERSION
MARKER_FILE = "svft_jax_checkpoints.json"
LOCK_FILE = ".svft_jax_writer.lock"
TRASH_DIR = ".svft_jax_deleted"  # Orbax's todelete_subdir: retention renames steps here
# Orbax's public name for the marker it writes last into a finished step.
COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
_OURS = {MARKER_FILE, f"{MARKER_FILE}.tmp", LOCK_FILE, TRASH_DIR}
_LEGACY_QUARANTINE = re.compile(r"\d+\.incomplete-\d{8}-\d{6}")  # what svft-jax < 0.2 left


# ----------------------------------------------------------------------------- the lock
def take_writer_lock(directory: Path) -> int:
    """An exclusive advisory lock on `directory`, held until the returned fd is closed.

    flock is released by the kernel when the process dies (SIGKILL included), so a crashed
    run never blocks the next one; the file only records who holds it, for the message.
    """
    lock = directory / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OSError(errno.EBUSY, f"checkpoint directory {str(directory)!r} is being written by another TrainCheckpointer ({holder}); two writers would interleave and delete each other's steps. Close the other one (or wait for that run to end), use another directory, or pass read_only=True to only restore.") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    return fd


class CheckpointDirectory:
    """One checkpoint folder: `directory`, and whether this process is the primary (it alone
    takes the lock and deletes)."""

    def __init__(self, directory: Path, primary: bool):
        self.directory = directory
        self.primary = primary

    def check_readable(self) -> None:
        if not (self.directory / MARKER_FILE).is_file():
            raise ValueError(f"read_only=True needs an existing svft-jax checkpoint directory; {str(self.directory)!r} has no {MARKER_FILE}.")
        self.check_marker()

    def check_marker(self) -> None:
        marker = self.directory / MARKER_FILE
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(marker)!r} is unreadable or corrupted ({err}); is {str(self.directory)!r} an svft-jax checkpoint directory?") from err
        if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT or info.get("version") != CHECKPOINT_VERSION:
            found = info if not isinstance(info, dict) else (info.get("format"), info.get("version"))
            raise ValueError(f"{str(self.directory)!r} holds {found!r} checkpoints; this svft-jax reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}.")

    def claim(self) -> int | None:
        """Create the folder, take the writer lock (the primary process) and write our marker,
        or refuse a folder that holds something else (nothing is written into a folder that is
        not ours). Returns the lock's fd (None on other processes); closing it releases it."""
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint directory {str(self.directory)!r} is a file; pass a folder path.")
        try:
            ensure_directory(self.directory, "training checkpoints")
        except ValueError as err:
            raise ValueError(f"{err} To restore from a folder you cannot write, pass read_only=True.") from None
        marker = self.directory / MARKER_FILE
        if marker.exists():
            self.check_marker()
        else:
            foreign = sorted(p.name for p in self.directory.iterdir() if p.name not in _OURS)
            if foreign:
                raise ValueError(f"{str(self.directory)!r} is not empty and was not created by svft_jax TrainCheckpointer (no {MARKER_FILE}; found {foreign[:5]}). Pass a new or empty directory so nothing there is deleted by checkpoint retention.")
        fd = take_writer_lock(self.directory) if self.primary else None
        if not marker.exists():
            tmp = self.directory / f"{MARKER_FILE}.tmp"
            tmp.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}))
            tmp.replace(marker)
        return fd

    def step_dirs(self) -> dict[int, Path]:
        return {int(p.name): p for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()}

    def is_complete(self, step_dir: Path) -> bool:
        return (step_dir / COMMIT_FILE).is_file() and (step_dir / "meta").is_dir() and (step_dir / "state").is_dir()

    def clean_up(self) -> None:
        """Remove what a killed run left: Orbax tmp folders of unfinished saves, trash from
        retention, half-deleted or half-written steps (no commit marker; they can never be
        restored) and legacy quarantine folders.

        Orbax's `cleanup_tmp_directories` does the tmp part too, but in a background future
        that only its next `save` awaits; doing it here makes the folder clean on open.
        """
        if not self.primary:
            return
        for tmp in ocp.path.step.all_temporary_paths(self.directory):
            self.discard(Path(tmp.get()), "an unfinished save")
        for step, step_dir in sorted(self.step_dirs().items()):
            if not self.is_complete(step_dir):
                self.discard(step_dir, f"incomplete step {step} (no {COMMIT_FILE}: an interrupted save or deletion)")
        for legacy in self.directory.iterdir():
            if _LEGACY_QUARANTINE.fullmatch(legacy.name) and legacy.is_dir():
                remove_path(legacy)
        self.empty_trash()

    def discard(self, folder: Path, what: str) -> None:
        logger.warning("removing %s from %s: %s can never be restored.", folder.name, self.directory, what)
        trash = self.directory / TRASH_DIR
        trash.mkdir(exist_ok=True)
        # Rename first (atomic): a kill during the delete leaves only trash, emptied on next open.
        folder.rename(trash / f"{folder.name}-{os.getpid()}-{time.time_ns()}")

    def empty_trash(self) -> None:
        trash = self.directory / TRASH_DIR
        if self.primary and trash.is_dir():
            for entry in trash.iterdir():
                remove_path(entry)
