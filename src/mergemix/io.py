"""File I/O: atomic writes, JSON, CSV, tensors and models (safetensors + JSON manifest).

Every write goes to a temporary file in the destination folder and is renamed into place, so a
killed job never leaves a half-written output that a later run would trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

MANIFEST_VERSION = 1


class DiskFullError(OSError):
    """A write that ran out of disk space (or quota); nothing half-written is left behind."""

    def __str__(self) -> str:
        return self.strerror


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path, e: OSError) -> DiskFullError:
    what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
    return DiskFullError(
        e.errno,
        f"{what} while writing {path}; nothing was written there: free space on the filesystem of "
        f"{Path(path).parent} (or set results_dir to a larger one) and rerun",
    )


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was; a full disk
    (ENOSPC, EDQUOT) becomes a :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp creates the file 0600 (and some writers, safetensors, recreate it so): give it the
        # mode a plain open() would (0666 less the umask), so a group sharing the folder can read it
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno in _FULL and not isinstance(e, DiskFullError):
            raise _disk_full(path, e) from e
        raise
    except Exception as e:  # writers in Rust or C (safetensors) report the OS error in their message
        code = next((c for c in _FULL if f"(os error {c})" in str(e)), None)
        if code is not None:
            raise _disk_full(path, OSError(code, str(e))) from e
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_jsonl(path, records) -> str:
    """Write JSON lines; returns the sha256 of the file written."""
    h = hashlib.sha256()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for r in records:
                line = (json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8")
                h.update(line)
                f.write(line)
    return h.hexdigest()


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(path, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.10g")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_arrays(path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> str:
    """Write arrays as a safetensors file, streamed from the arrays' memory (no serialised copy).

    ``safetensors.numpy.save_file`` builds the whole file in memory first, which doubles the peak
    memory of a prepare job holding, e.g., 100k images at 224 px (15 GB). The format is simple
    enough to write directly: an 8-byte little-endian header size, a JSON header (dtype, shape and
    byte range of each tensor, padded with spaces to 8 bytes), then the raw little-endian data.
    Returns the sha256 of the file, computed while writing.
    """
    codes = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    order, offset = sorted(arrays), 0
    for key in order:
        a = arrays[key]
        dt = np.dtype(a.dtype).newbyteorder("=")
        if dt not in codes:
            raise TypeError(f"array {key!r}: dtype {a.dtype} cannot be stored; allowed: {sorted(map(str, codes))}")
        header[key] = {"dtype": codes[dt], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    h = hashlib.sha256()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:

            def write(b) -> None:
                h.update(b)
                f.write(b)

            write(len(raw).to_bytes(8, "little"))
            write(raw)
            for key in order:
                a = np.asarray(arrays[key])
                a = a.astype(a.dtype.newbyteorder("<"), copy=False)
                for start in range(0, max(1, len(a)) if a.ndim else 1, 4096):  # bounded temporaries
                    chunk = a[start : start + 4096] if a.ndim else a
                    write(np.ascontiguousarray(chunk).data)
    return h.hexdigest()


def load_arrays(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


_ST_DTYPES = {
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "BOOL": np.bool_,
}


def arrays_header(path) -> dict:
    """The JSON header of a safetensors file (dtype, shape, byte range of each array, ``__metadata__``).

    Raises :class:`ValueError` naming the file when it is too short or not a safetensors file."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a complete safetensors file ({size} bytes); it was truncated or overwritten")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{path}: the safetensors header is not valid JSON; the file was truncated or overwritten"
            ) from None
    try:
        end = max((int(m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise ValueError(
            f"{path}: the safetensors header is malformed; the file was overwritten by something else"
        ) from None
    if 8 + n + end != size:
        raise ValueError(
            f"{path}: {size} bytes, but its header describes {8 + n + end}; the file was truncated or overwritten"
        )
    return header


def arrays_metadata(path) -> dict:
    """The ``__metadata__`` of a safetensors file (strings), without reading its arrays."""
    return dict(arrays_header(path).get("__metadata__", {}))


def map_arrays(path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file as read-only memory maps (nothing is read until sliced).

    Large prepared datasets (e.g. uint8 images at 224 px, 147 KiB each) are sliced per batch and
    per split instead of being read into memory whole by every job.
    """
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype, shape = np.dtype(_ST_DTYPES[meta["dtype"]]).newbyteorder("<"), tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        if end == begin:
            out[key] = np.empty(shape, dtype=dtype)
        else:
            out[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    return out


def manifest_path(model_path) -> Path:
    """``.../model.safetensors`` -> ``.../model.json``."""
    return Path(model_path).with_suffix(".json")


def save_model(path, state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> dict:  # noqa: F821
    """Save a state dict as safetensors and write its manifest (with the file's sha256) beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        digest = sha256_file(tmp)
    full = dict(manifest)
    full.update(format_version=MANIFEST_VERSION, tensors=path.name, sha256=digest)
    try:
        write_json(manifest_path(path), full)
    except BaseException:
        path.unlink(missing_ok=True)  # a model without its manifest would only be refused later
        raise
    return full


class ModelFileError(RuntimeError):
    pass


def load_model(path, verify: bool = True) -> tuple[dict, dict]:
    """Load a model saved by :func:`save_model`. Returns (state dict, manifest)."""
    from safetensors.torch import load_file

    path = Path(path)
    mpath = manifest_path(path)
    if not path.exists() or not mpath.exists():
        raise ModelFileError(f"model {path} or its manifest {mpath} is missing; rerun the stage that writes it")
    manifest = read_json(mpath)
    if verify and manifest.get("sha256") != sha256_file(path):
        raise ModelFileError(
            f"{path} does not match the sha256 in {mpath}: the file was changed or truncated; "
            "delete both files and rerun the stage that writes them"
        )
    return load_file(str(path)), manifest
