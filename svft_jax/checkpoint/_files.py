"""Atomic, no-clobber file writes and a small safetensors reader/writer.

Why our own safetensors codec (≈80 lines) instead of `safetensors.numpy.save`:
  * the bytes go out in chunks through one function (`_write_chunk`), so a disk that
    fills up mid-write is a plain `OSError` that we can catch, clean up after and test;
  * bfloat16 round-trips (safetensors' numpy loader of this version rejects BF16);
  * a truncated or garbled file gives a `ValueError` that names the file.
The files are standard safetensors (8-byte little-endian header length, JSON header, raw
little-endian data), so `safetensors.safe_open` and Hugging Face loaders read them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from svft_jax._args import check_bool

_DTYPE_TO_CODE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_CODE_TO_DTYPE = {code: name for name, code in _DTYPE_TO_CODE.items()}
_CHUNK_BYTES = 1 << 20
_MAX_HEADER_BYTES = 100 << 20


def numpy_dtype(name: str) -> np.dtype:
    """np.dtype from a name, including ml_dtypes' bfloat16."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def ensure_directory(directory: Path, what: str) -> Path:
    """Create `directory` (and parents) or raise a ValueError that says why it cannot be.

    Checked before any work so a bad destination fails fast. A parent that is a regular
    file fails for every user, root included (ENOTDIR), unlike permission bits.
    """
    directory = Path(directory)
    for ancestor in [directory, *directory.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            raise ValueError(f"cannot write {what} under {str(directory)!r}: {str(ancestor)!r} is a file, not a directory. Choose another path.")
        if ancestor.exists():
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the directory {str(directory)!r} for {what}: {err.strerror or err}. Choose a writable path.") from err
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} into {str(directory)!r}: no write permission. Choose a writable path.")
    return directory


def _write_chunk(file, chunk) -> None:
    """The one place bytes reach the disk (a seam for disk-full tests)."""
    file.write(chunk)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets us open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- leftovers
# Temporary names carry the writer's pid, so a later call can tell a leftover of a killed
# writer (pid gone: delete it) from the live temporary of a concurrent one (keep it).
_TMP_TAG = "svft-tmp"


def temp_sibling(path: Path, kind: str) -> Path:
    """A hidden sibling of `path` named `.<name>.<kind>-<pid>-<random>` (ours, by name)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return pid > 0


def dead_siblings(path: Path, kinds: Iterable[str]) -> list[Path]:
    """Our hidden siblings of `path` (from `temp_sibling`) whose writer process is gone.

    Names (and anything Orbax appends, e.g. `.orbax-checkpoint-tmp`) are matched exactly, so
    nothing a user made is ever selected.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({'|'.join(map(re.escape, kinds))})-(\d+)-[0-9a-f]{{12}}(\..*)?")
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and not _pid_alive(int(match.group(2))):
                found.append(entry)
    return sorted(found)


def remove_path(path: Path) -> None:
    """Delete a file or folder tree; a concurrent delete is not an error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ----------------------------------------------------------------------------- renames
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2(2). False where the system or file system does not support `flags`."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 / not Linux
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def exchange_paths(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths (renameat2 RENAME_EXCHANGE); False if unsupported.

    At every instant each name points at one complete tree, so a SIGKILL cannot leave
    either name empty — what two plain renames cannot promise.
    """
    return _renameat2(first, second, _RENAME_EXCHANGE)


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with FileExistsError if `target` exists."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if target.exists() or target.is_symlink():  # no renameat2 here: best-effort check
        raise FileExistsError(errno.EEXIST, "already exists", str(target))
    os.rename(source, target)


def atomic_write(path, chunks: Iterable[bytes], *, overwrite: bool, what: str) -> Path:
    """Write `chunks` to `path` through a temporary file in the same directory, then rename.

    A reader never sees a partial file, and a failure (disk full, a crash, SIGKILL) leaves
    any existing file at `path` byte-for-byte unchanged. Temporary files left by a killed
    earlier call for the same `path` are deleted first, so they never accumulate.

    Args:
      path: destination file.
      chunks: the bytes, in order.
      overwrite: replace an existing file (still write-then-rename); False raises
        FileExistsError instead, also when another writer wins a race (hard-link, not rename).
      what: words for error messages ("adapter", "factor cache").
    Returns:
      The destination as a `Path`.
    """
    overwrite = check_bool(overwrite, "overwrite", f"writing {what} {str(path)!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {what} to {str(path)!r}: it is a directory; pass a file path.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} already exists; pass overwrite=True to replace it (the old file stays intact until the new one is complete).")
    ensure_directory(path.parent, what)
    for leftover in dead_siblings(path, [_TMP_TAG]):
        remove_path(leftover)
    # O_EXCL with mode 0o666 (not mkstemp's 0o600): the final file gets the user's umask.
    tmp = temp_sibling(path, _TMP_TAG)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            for chunk in chunks:
                _write_chunk(file, chunk)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` appeared meanwhile: never clobbers
            except FileExistsError:
                raise FileExistsError(f"{what} {str(path)!r} was created by someone else while writing; nothing was overwritten.") from None
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if path.exists():  # no hard links here: best-effort no-clobber rename
                    raise FileExistsError(f"{what} {str(path)!r} already exists.") from None
                os.rename(tmp, path)
        _fsync_directory(path.parent)
    except OSError as err:
        if isinstance(err, FileExistsError):
            raise
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        kept = "the existing file is unchanged" if path.exists() else "nothing was written"
        raise OSError(err.errno, f"could not write {what} to {str(path)!r}: {reason}; {kept}.") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def safetensors_chunks(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]):
    """The safetensors encoding of `tensors` (name -> numpy array), as a generator of bytes.

    Tensors are laid out in sorted-name order; `metadata` is the header's `__metadata__`
    (str -> str, as the format requires).
    """
    header: dict = {"__metadata__": dict(metadata)}
    arrays = {}
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")  # keeps 0-d shape (ascontiguousarray makes it 1-d)
        dtype_name = "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.name
        if dtype_name not in _DTYPE_TO_CODE:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store.")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _DTYPE_TO_CODE[dtype_name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays[name] = array
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns data to 8 bytes
    yield struct.pack("<Q", len(header_bytes)) + header_bytes
    for name in sorted(arrays):
        data = memoryview(arrays[name].reshape(-1).view(np.uint8))
        for start in range(0, len(data), _CHUNK_BYTES):
            yield data[start : start + _CHUNK_BYTES]


def read_safetensors_metadata(path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file, reading only its header; None if `path` is
    not a readable safetensors file (too short, bad header)."""
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return None
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(os.fstat(file.fileno()).st_size - 8, _MAX_HEADER_BYTES):
                return None
            header = json.loads(file.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else None


def read_safetensors(path, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file (memory-mapped, so each tensor is copied into RAM once).

    Returns:
      (tensors, metadata): {name: numpy array}, the header's `__metadata__`.
    Raises:
      FileNotFoundError if `path` does not exist; ValueError naming the file if it is
      truncated or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}.")
    where = f"{what} {str(path)!r}"
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{where} is truncated or not a safetensors file ({size} bytes).")
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", blob[:8].tobytes())
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise ValueError(f"{where} is truncated or not a safetensors file (header of {header_len} bytes in a {size}-byte file).")
    try:
        header = json.loads(blob[8 : 8 + header_len].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is corrupted: its header is not valid JSON ({err}).") from err
    if not isinstance(header, dict):
        raise ValueError(f"{where} is corrupted: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    data = blob[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        try:
            dtype = numpy_dtype(_CODE_TO_DTYPE[info["dtype"]]).newbyteorder("<")
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where} is corrupted: bad header entry for tensor {name!r}.") from err
        if end > len(data) or start > end or (end - start) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{where} is truncated or corrupted: tensor {name!r} needs bytes [{start}, {end}) but the data section has {len(data)}.")
        tensors[name] = np.array(data[start:end].view(dtype).reshape(shape), dtype=dtype.newbyteorder("="))
    del blob, data  # release the mapping
    return tensors, metadata
