"""Atomic file writes and the small readers every stage shares.

Every artefact is written under a temporary name in its own folder and renamed when complete, so an
interrupted run never leaves a file that looks finished (rename is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); artefacts get the ordinary permissions the umask allows.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


def read_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Load an array without ever unpickling (object arrays are refused)."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# Streaming .npy access with plain reads and writes. A memory map would do the same with less code, but
# every page it touches stays in the process's resident memory until it is unmapped, so a stage that
# walks a 1 GB array through a map ends with 1 GB more resident memory than one that reads it in blocks.


@contextlib.contextmanager
def npy_writer(path: Path, shape: tuple, dtype) -> Iterator:
    """Write an .npy of known ``shape`` block by block: yields ``append(block)``; rows are checked against
    ``shape`` and the file is renamed into place only when all of them arrived."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)

        def append(block: np.ndarray) -> None:
            nonlocal written
            block = np.asarray(block)
            if block.shape[1:] != shape[1:] or written + len(block) > shape[0]:
                raise ValueError(f"{path}: block {block.shape} does not fit rows {written}.. of {shape}")
            handle.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
            written += len(block)

        yield append
        if written != shape[0]:
            raise ValueError(f"{path}: {written} of {shape[0]} rows written")


def npy_header(handle) -> tuple[tuple, np.dtype]:
    """Shape and dtype of the .npy open in ``handle``, which is left at the first data byte."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    if dtype.hasobject or fortran_order:
        raise ValueError("only C-ordered arrays of plain numbers are read (no object arrays)")
    return shape, dtype


def iter_npy_blocks(path: Path, rows: int) -> Iterator[np.ndarray]:
    """The rows of an .npy file, ``rows`` at a time, read from disk (memory: one block)."""
    with open(path, "rb") as handle:
        shape, dtype = npy_header(handle)
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0] if shape else 0, rows):
            count = min(rows, shape[0] - start)
            block = np.fromfile(handle, dtype=dtype, count=count * row_items)
            if block.size != count * row_items:
                raise ValueError(f"{path} is truncated: expected {shape[0]} rows")
            yield block.reshape(count, *shape[1:])


def write_csv(path: Path, header: Sequence[str], rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def pyplot():
    """matplotlib.pyplot drawing to files only: never opens a window, works without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(path: Path, figure) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
