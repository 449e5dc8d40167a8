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
import errno
import json
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

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


def atomic_write(path, chunks: Iterable[bytes], *, overwrite: bool, what: str) -> Path:
    """Write `chunks` to `path` through a temporary file in the same directory, then rename.

    A reader never sees a partial file, and a failure (disk full, a crash) leaves any
    existing file at `path` byte-for-byte unchanged.

    Args:
      path: destination file.
      chunks: the bytes, in order.
      overwrite: replace an existing file (still write-then-rename); False raises
        FileExistsError instead, also when another writer wins a race (hard-link, not rename).
      what: words for error messages ("adapter", "factor cache").
    Returns:
      The destination as a `Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {what} to {str(path)!r}: it is a directory; pass a file path.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} already exists; pass overwrite=True to replace it (the old file stays intact until the new one is complete).")
    ensure_directory(path.parent, what)
    # O_EXCL with mode 0o666 (not mkstemp's 0o600): the final file gets the user's umask.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
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
