"""Files of a run directory: written atomically, read with one-line errors.

Every stage writes through these helpers: a temporary file in the target's directory, renamed when
complete, so a failure never leaves a half-written output. Tensor files are safetensors whose metadata key
`neuroproj_prune` holds a JSON object with a `format` tag; readers check the tag.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import NeuroprojError

META_KEY = "neuroproj_prune"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`; remove it on any failure.
    The file gets the usual mode (0666 less the umask), not mkstemp's private 0600. A path that cannot be written
    (a directory in its place, a read-only directory) is one NeuroprojError, never a traceback at the rename."""
    path = Path(path)
    if path.is_dir():
        raise NeuroprojError(f"cannot write {path}: it is a directory; give a file name")
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise NeuroprojError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, path)
        except OSError as e:   # a directory made in its place meanwhile, a read-only target
            raise NeuroprojError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NeuroprojError(f"cannot write {path}: a parent of it is a file, not a directory") from None
    except OSError as e:
        raise NeuroprojError(f"cannot write {path}: {e.strerror or e}") from None


def prepare_out_dir(out, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory (or a file in its place) unless `overwrite`."""
    out = Path(out)
    check_output(out, "dir", overwrite=overwrite)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise NeuroprojError(f"output {out} exists and is not empty: choose another --out or pass --overwrite")


def check_output(path, kind: str, *, overwrite: bool = False, into: bool = False, flag: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written as `kind` ("file" or "dir"): an empty name (or one
    that names no entry: `.`, `..`, `/`), an existing directory where a file goes or a file where a directory goes
    (unless `overwrite`, which replaces it), a parent that is a file or not writable (`check_writable`); with `into`
    (a directory the command adds to or resumes), an existing one that is not writable itself. Cost: a few stat
    calls."""
    what = "a file" if kind == "file" else "a directory"
    if path is None or not str(path).strip():
        raise NeuroprojError(f"{flag} is empty: name {what} to write")
    p = Path(str(path)).expanduser()
    if p.name in ("", ".", ".."):
        raise NeuroprojError(f"{flag} {str(path)!r} names no new entry (it is a directory itself): name {what} to "
                             f"write")
    if not overwrite:
        if kind == "file" and p.is_dir():
            raise NeuroprojError(f"output {p} is a directory, and {flag} names a file here: give a file name (e.g. "
                                 f"{p / 'NAME'})")
        if kind == "dir" and (p.is_file() or p.is_symlink() and not p.is_dir()):
            raise NeuroprojError(f"output {p} is a file, and {flag} names a directory here: choose another {flag}, or "
                                 f"pass --overwrite where the command has it")
    check_writable(p)
    if into and p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise NeuroprojError(f"cannot write into {p}: it is not writable (permissions or a read-only filesystem)")
    return p


@contextlib.contextmanager
def removed_if_left_empty(paths):
    """On a failure inside the block, remove the directories among `paths` and their parents that did not exist
    when it began and are empty now (never a directory that holds anything): a failed command leaves behind no
    directory it created for its output."""
    fresh = []
    for path in paths:
        p = Path(path).expanduser().absolute()
        while not p.exists() and p != p.parent:
            fresh.append(p)
            p = p.parent
    try:
        yield
    except BaseException:
        for p in sorted(set(fresh), key=lambda q: len(q.parts), reverse=True):   # the deepest first
            try:
                if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                    p.rmdir()
            except OSError:
                pass
        raise


def _remove_stale(out: Path) -> None:
    """Remove temporary directories that a killed earlier run left beside `out` (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)) and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
    """`with atomic_dir(out) as tmp:` — fill the temporary directory `tmp` beside `out`; on success it
    replaces `out` (an old one only at the last moment), on any failure it is removed. Mode 0777 less umask."""
    out = Path(out)
    prepare_out_dir(out, overwrite)
    _make_parent(out)
    _remove_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    except OSError as e:
        raise NeuroprojError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            if out.exists() or out.is_symlink():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
            else:
                os.replace(tmp, out)
        except OSError as e:   # a file made in its place meanwhile, a read-only parent
            raise NeuroprojError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj, **kw) -> Path:
    """Strict JSON (no bare NaN/Infinity, which strict parsers reject), written atomically."""
    try:
        text = json.dumps(obj, indent=kw.pop("indent", 2), default=str, allow_nan=False, **kw)
    except ValueError:
        raise NeuroprojError(f"refusing to write {path}: the results hold NaN or infinite values") from None
    return write_text(path, text + "\n")


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path) -> None:
    """Refuse, before any work, an output path that cannot be written: under an existing file, or in a
    directory (or on a filesystem) the user may not write to."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NeuroprojError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NeuroprojError(f"cannot write {path}: {parent} is not writable (permissions or a read-only "
                             f"filesystem)")


def check_same_weights(**fingerprints) -> None:
    """Refuse inputs that describe different weights: `fingerprints` names each input's model fingerprint (None: the
    input does not say). Statistics, projections, clusterings and traces carry the fingerprint of the model they
    were made on; a stage that reads two of them (or one and a model) calls this before any work."""
    given = [(k, v) for k, v in fingerprints.items() if v]
    for k, v in given[1:]:
        if v != given[0][1]:
            (a, va) = given[0]
            raise NeuroprojError(f"inputs from different models: the {k} were made on another model than the {a} "
                                 f"(fingerprint {v}, not {va}): make them from one model")


def save_tensors(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """One safetensors file with `meta` (JSON) under the metadata key `neuroproj_prune`."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata={META_KEY: json.dumps(meta)}))


def load_tensors(path, fmt: str, what: str, remedy: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file written by `save_tensors` with `meta["format"] == fmt`.
    `what` names the kind of file and `remedy` the command that makes it, for the error messages."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NeuroprojError(f"{what} file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise NeuroprojError(f"{path} is not a readable {what} file ({type(e).__name__}): re-run {remedy}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise NeuroprojError(f"{path} is not a neuroproj-prune {what} file (format {found!r})")
    return tensors, meta


class TensorFile:
    """A tagged safetensors file held in memory: tensors by key and the JSON `meta` (with `layers`, `sites`).
    `Stats`, `Projections` and `Trace` are such files."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, path: str | None = None):
        self._t, self.meta, self.path = tensors, meta, path

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def sites(self) -> list[str]:
        return list(self.meta["sites"])

    def save(self, path) -> Path:
        """Write atomically (temporary file in the same directory, then rename)."""
        save_tensors(path, self._t, self.meta)
        self.path = str(path)
        return Path(path)


# numpy dtypes of the safetensors dtype tags a lazy reader can return (BF16 is widened to float32 on read)
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "u1"}


class LazyTensorFile:
    """A tagged safetensors file read on demand: only its JSON header is parsed when opened; `read(key)`
    copies one tensor (or a selection of its rows/columns) out with positioned reads, `diagonal(key)` reads
    the diagonal of a square matrix with one small read per row (N · itemsize bytes, not N² values). For
    readers that need a few tensors, rows or diagonals of files too large for memory (an 8B model's
    statistics hold 32 Gram matrices of 14336², ~53 GB).

    Nothing is memory-mapped on purpose: a mapped page counts as the process's resident memory for as long
    as it stays mapped, and how many pages one fault maps (read-ahead, fault-around, large folios) depends on
    the kernel and the filesystem, so a mapped reader's memory is not bounded by what it reads. `pread` puts
    the bytes in the page cache (the kernel's, reclaimable) and copies only what was asked for.
    Use as a context manager, or call `close()`."""

    def __init__(self, path, fmt: str, what: str, remedy: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise NeuroprojError(f"{what} file {self.path} not found")
        bad = f"{self.path} is not a readable {what} file: re-run {remedy}"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(size - 8, 1 << 30):
                    raise ValueError("header size")
                header = json.loads(f.read(n))
            meta = json.loads((header.pop("__metadata__", None) or {})[META_KEY])
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise NeuroprojError(bad) from None
        if not isinstance(meta, dict) or meta.get("format") != fmt:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise NeuroprojError(f"{self.path} is not a neuroproj-prune {what} file (format {found!r})")
        self.meta, self._base, self._index, self._bad = meta, 8 + n, {}, bad
        for k, v in header.items():
            try:
                dt, shape, (b, e) = _NP_DTYPES[v["dtype"]], [int(x) for x in v["shape"]], v["data_offsets"]
                count = math.prod(shape)
                if not (0 <= b <= e and e - b == count * np.dtype(dt).itemsize and self._base + e <= size):
                    raise ValueError(k)
            except (KeyError, TypeError, ValueError):
                raise NeuroprojError(bad) from None
            self._index[k] = (v["dtype"], dt, tuple(shape), int(b))
        self._fd = os.open(self.path, os.O_RDONLY)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key) -> bool:
        return key in self._index

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key][2]

    def _pread(self, offset: int, nbytes: int, dt: str) -> np.ndarray:
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:                       # pread may return less than asked (signals, large reads)
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if k <= 0:
                raise NeuroprojError(self._bad)   # the file shrank under us
            got += k
        return np.frombuffer(buf, dtype=dt)

    @staticmethod
    def _widen(tag: str, a: np.ndarray) -> np.ndarray:
        return (a.astype(np.uint32) << 16).view(np.float32) if tag == "BF16" else a

    def read(self, key: str, rows=None, cols=None) -> np.ndarray:
        """A copy of the tensor `key` (or of its `rows` / `cols` selection), float tensors as float32/64.
        Cost: one read of the whole tensor, or of the rows from the first to the last selected one."""
        tag, dt, shape, b = self._index[key]
        row = math.prod(shape[1:]) * np.dtype(dt).itemsize if shape else 0
        if rows is not None and len(shape) >= 1 and shape[0] > 0:
            r = np.arange(shape[0])[rows]
            lo, hi = (int(r.min()), int(r.max()) + 1) if r.size else (0, 0)
            a = self._pread(self._base + b + lo * row, (hi - lo) * row, dt).reshape((hi - lo,) + shape[1:])
            a = a[r - lo]
        else:
            a = self._pread(self._base + b, math.prod(shape) * np.dtype(dt).itemsize, dt).reshape(shape)
        if cols is not None:
            a = a[:, cols]
        return self._widen(tag, np.array(a))

    def diagonal(self, key: str) -> np.ndarray:
        """The diagonal of the square matrix `key` (a copy). Cost: N reads of one element each (N pages of
        I/O into the page cache, not 8·N² bytes), O(N) memory in this process."""
        tag, dt, shape, b = self._index[key]
        if len(shape) != 2 or shape[0] != shape[1]:
            raise NeuroprojError(f"{self.path}: {key} has shape {shape}, not a square matrix")
        N, item = shape[0], np.dtype(dt).itemsize
        start, step, fd = self._base + b, (N + 1) * item, self._fd
        raw = b"".join(os.pread(fd, item, start + r * step) for r in range(N))
        if len(raw) != N * item:
            raise NeuroprojError(self._bad)
        return self._widen(tag, np.frombuffer(raw, dtype=dt).copy())


# ----------------------------------------------------------------------------- streamed safetensors files
# safetensors dtype tags, in the order of the format's dtype enum: `safetensors.torch.save_file` lays tensors out by
# that order, highest first, then by name — `write_safetensors` follows it so that its files are the same bytes
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
             "U64")
_ST_TAGS = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
            torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
            torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}


class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file: enough to copy it into another file unread."""

    __slots__ = ("path", "tag", "shape", "offset", "nbytes")

    def __init__(self, path, tag: str, shape, offset: int, nbytes: int):
        self.path, self.tag, self.shape, self.offset, self.nbytes = str(path), tag, tuple(shape), offset, nbytes

    def __repr__(self):
        return f"StoredTensor({self.path!r}, {self.tag}, {self.shape}, offset={self.offset}, nbytes={self.nbytes})"

    def load(self) -> torch.Tensor:
        """The tensor, read from its file into memory (one positioned read of `nbytes`)."""
        dtype = next(d for d, tag in _ST_TAGS.items() if tag == self.tag)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = bytearray(f.read(self.nbytes))
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape) if self.nbytes else torch.empty(self.shape, dtype=dtype)


def stored_tensors(path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, by name, from its header alone (nothing else is read). A header that
    cannot be parsed, or whose tensors end past the end of the file (a truncated copy), is a NeuroprojError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("header size")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {k: StoredTensor(path, v["dtype"], [int(x) for x in v["shape"]], 8 + n + int(v["data_offsets"][0]),
                               int(v["data_offsets"][1]) - int(v["data_offsets"][0])) for k, v in header.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
        raise NeuroprojError(f"{path} is not a readable safetensors file ({type(e).__name__}: its header is damaged): "
                             f"write it again") from None
    end = max((t.offset + t.nbytes for t in out.values()), default=8 + n)
    if end > size or any(t.nbytes < 0 for t in out.values()):
        raise NeuroprojError(f"{path} is truncated or damaged: its header promises {end} bytes, the file has {size}; "
                             f"write (or download) it again")
    return out


def _entry(t) -> tuple[str, tuple, int]:
    if isinstance(t, StoredTensor):
        return t.tag, t.shape, t.nbytes
    if t.dtype not in _ST_TAGS:
        raise NeuroprojError(f"cannot write a {t.dtype} tensor to safetensors")
    return _ST_TAGS[t.dtype], tuple(t.shape), t.numel() * t.element_size()


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time: the same bytes `safetensors.torch.save_file(tensors, path,
    metadata)` writes (header with `__metadata__` first, tensors by dtype then name, header padded to 8 bytes),
    without holding a serialised copy of them all. Each value is a tensor (written from its own storage, one CPU
    copy at a time when it lives elsewhere) or a `StoredTensor` (its bytes copied from its file by the kernel,
    `os.copy_file_range`, never through this process's memory). Memory: the largest in-memory tensor's CPU copy."""
    entries = {k: _entry(t) for k, t in tensors.items()}
    order = sorted(entries, key=lambda k: (-_ST_ORDER.index(entries[k][0]), k))
    header, pos = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for k in order:
        tag, shape, nbytes = entries[k]
        header[k] = {"dtype": tag, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb", buffering=0) as f:
        _write_all(f, len(head).to_bytes(8, "little") + head)
        for k in order:
            t = tensors[k]
            if isinstance(t, StoredTensor):
                _copy_range(t.path, t.offset, t.nbytes, f)
            elif t.numel():
                t = t.detach().contiguous().cpu()
                _write_all(f, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return Path(path)


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:                        # a raw write may write less than it was given
        view = view[f.write(view):]


def _copy_range(src, offset: int, nbytes: int, f, chunk: int = 64 << 20) -> None:
    """Append `nbytes` of file `src` from `offset` to the open raw file `f`: by `copy_file_range` (in the kernel)
    where the filesystems allow it, else by positioned reads of at most `chunk` bytes."""
    with open(src, "rb", buffering=0) as s:
        done = 0
        try:
            while done < nbytes:
                k = os.copy_file_range(s.fileno(), f.fileno(), nbytes - done, offset + done)
                if k <= 0:
                    raise OSError("short copy")
                done += k
        except (OSError, AttributeError):   # another filesystem, an old kernel, a non-Linux system
            while done < nbytes:
                block = os.pread(s.fileno(), min(chunk, nbytes - done), offset + done)
                if not block:
                    raise NeuroprojError(f"{src} ended early: it changed while being copied") from None
                _write_all(f, block)
                done += len(block)
