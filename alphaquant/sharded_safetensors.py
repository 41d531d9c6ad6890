"""Sharded safetensors checkpoints, read and written one tensor at a time.

Writing: every tensor's name, dtype and shape are known before any data exists (a plan fixes the
packed shapes), so each shard's header is written first and the tensors are streamed after it in
header order; memory holds one tensor, never a shard. Reading: a folder with
``model.safetensors.index.json`` (Hugging Face's sharded layout), or a single ``model.safetensors``;
every shard's header is checked against its file size before anything is read (a truncated shard,
a shard missing from the index, a tensor listed twice are errors), and tensors are read lazily.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import warnings
from typing import Iterable, Optional

import torch

from .checkpoint_file import _DTYPE_BYTES, _SAFETENSORS_DTYPE, read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
READ_WINDOW = 32 << 20  # bytes of a shard mapped at a time by ShardedReader.get
PREFETCH_WINDOW = 8 << 20  # bytes asked to be read ahead per posix_fadvise call
_TORCH_DTYPE = {v: k for k, v in _SAFETENSORS_DTYPE.items()}


def shard_name(i: int, n: int) -> str:
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def nbytes(dtype: str, shape) -> int:
    n = _DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def split_into_shards(entries: list, max_shard_bytes: int) -> list:
    """[(name, dtype, shape)] in order -> lists of them, each at most ``max_shard_bytes`` of data
    (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for e in entries:
        b = nbytes(e[1], e[2])
        if current and size + b > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += b
    if current or not shards:
        shards.append(current)
    return shards


class ShardWriter:
    """One safetensors file whose header (names, dtypes, shapes, offsets) is fixed up front;
    :meth:`write` then takes the tensors in that order."""

    def __init__(self, path: str, entries: list, metadata: Optional[dict] = None):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"tensor {name!r} is listed twice")
            end = offset + nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        self._next = 0
        self.path = path
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{self.path}: {name!r} is not in this shard's header")
        want, dtype, shape = self._order[self._next]
        if name != want or _SAFETENSORS_DTYPE.get(t.dtype) != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{self.path}: expected {want} {dtype} {list(shape)} next, got {name} "
                             f"{_SAFETENSORS_DTYPE.get(t.dtype)} {list(t.shape)}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1

    def close(self, check: bool = True) -> None:
        missing = [n for n, _, _ in self._order[self._next:]]
        self._f.close()
        if missing and check:
            raise ValueError(f"{self.path}: {len(missing)} tensors were never written (e.g. {missing[0]})")


def write_index(folder: str, shards: list, metadata: Optional[dict] = None) -> None:
    """``model.safetensors.index.json`` for ``shards`` (lists of (name, dtype, shape))."""
    n = len(shards)
    weight_map = {name: shard_name(i, n) for i, entries in enumerate(shards) for name, _, _ in entries}
    total = sum(nbytes(d, s) for entries in shards for _, d, s in entries)
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}, f, indent=2)


class ShardedReader:
    """The tensors of a checkpoint folder (sharded with an index, or one ``model.safetensors``),
    or of one safetensors file. ``tensors``: name -> (dtype, shape, shard path). Every shard's
    header is checked before use (ValueError naming the shard and what is wrong)."""

    def __init__(self, path: str):
        if os.path.basename(path) == INDEX:
            path = os.path.dirname(os.path.abspath(path))
        if os.path.isfile(path):
            shards = [path]
        elif os.path.isfile(os.path.join(path, INDEX)):
            shards = self._from_index(path)
        elif os.path.isfile(os.path.join(path, SINGLE)):
            shards = [os.path.join(path, SINGLE)]
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
            if not found:
                raise FileNotFoundError(f"{path}: no {INDEX}, no {SINGLE} and no .safetensors files")
            shards = [os.path.join(path, f) for f in found]
        self.tensors, self.metadata, self._where = {}, {}, {}
        for shard in shards:
            header, meta = read_header(shard)  # sizes against the file: a truncated shard fails here
            if not self.metadata:
                self.metadata = meta
            with open(shard, "rb") as f:
                data_start = 8 + int.from_bytes(f.read(8), "little")
            for name, (dtype, shape, offsets) in header.items():
                self._where[name] = (data_start + offsets[0], offsets[1] - offsets[0])
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} is in two shards: {os.path.basename(self.tensors[name][2])} "
                                     f"and {os.path.basename(shard)}")
                self.tensors[name] = (dtype, shape, shard)
        if self._index is not None:
            for name, shard in self._index.items():
                if name not in self.tensors or os.path.basename(self.tensors[name][2]) != shard:
                    raise ValueError(f"{INDEX} puts {name!r} in {shard}, which does not hold it")
            extra = sorted(set(self.tensors) - set(self._index))
            if extra:
                raise ValueError(f"shards hold tensors {INDEX} does not list: {extra[:3]}")
        self._open = {}

    _index = None

    def _from_index(self, folder: str) -> list:
        try:
            with open(os.path.join(folder, INDEX)) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{folder}/{INDEX} is not a valid index (JSON with a weight_map of tensor -> "
                             f"shard file)") from None
        shards = []
        for shard in dict.fromkeys(weight_map.values()):
            p = os.path.join(folder, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(p):
                raise ValueError(f"shard {shard} listed in {INDEX} is missing from {folder}")
            shards.append(p)
        self._index = weight_map
        return shards

    @property
    def shards(self) -> list:
        return list(dict.fromkeys(s for _, _, s in self.tensors.values()))

    def nbytes(self, name: str) -> int:
        dtype, shape, _ = self.tensors[name]
        return nbytes(dtype, shape)

    def _file(self, name: str):
        """(open file of the shard holding ``name``, data start, size); ValueError if truncated."""
        _, _, shard = self.tensors[name]
        start, size = self._where[name]
        if shard not in self._open:
            self._open[shard] = open(shard, "rb")
        f = self._open[shard]
        if start + size > os.fstat(f.fileno()).st_size:
            raise ValueError(f"{shard} is truncated or corrupted: tensor {name} could not be read in full")
        return f, start, size

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading ``name`` into the page cache (returns before the data
        arrives; no memory of this process): the read-ahead of :meth:`mapped` tensors."""
        f, start, size = self._file(name)
        if hasattr(os, "posix_fadvise"):
            # Linux reads ahead at most a few MB per call (8 MB measured here): one call per window
            for a in range(0, size, PREFETCH_WINDOW):
                os.posix_fadvise(f.fileno(), start + a, min(PREFETCH_WINDOW, size - a), os.POSIX_FADV_WILLNEED)

    @contextlib.contextmanager
    def mapped(self, name: str):
        """The tensor ``name`` as a view of its shard's pages for the ``with`` block: no copy and
        no buffer of its own (the kernel that reads it reads the page cache). Copy-on-write, so a
        write into it never reaches the file. The pages leave this process's memory when the last
        view of the tensor goes (the caller drops it before the block ends). A tensor whose
        offset does not suit its dtype's alignment is copied (:meth:`get`) instead."""
        dtype, shape, _ = self.tensors[name]
        f, start, size = self._file(name)
        if size == 0 or start % _DTYPE_BYTES[dtype]:
            yield self.get(name)
            return
        off = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(f.fileno(), start + size - off, offset=off, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about buffers it cannot resize
            t = torch.frombuffer(memoryview(mm), dtype=torch.uint8, offset=start - off, count=size)
        # Never closed here: the tensor keeps the memoryview (and it the map) alive, so the map
        # is unmapped when the last view of the tensor goes, which is at the end of the block
        # unless the caller kept one (closing it then would leave that view dangling).
        del mm
        yield t.view(_TORCH_DTYPE[dtype]).reshape(shape)

    def get(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor ``name``, copied from its shard into memory of its own. Copied through
        short-lived memory maps of one window at a time: pages of a mapped file count as the
        process's memory for as long as the map lives, so a map of the whole shard would grow with
        the model; a window's pages go when it is unmapped. (Faster than read(): no zero-filled
        buffer, no copy through the kernel's read path.) ``out``: a contiguous CPU tensor of the
        same dtype and shape to read into instead (no second copy in memory); returned."""
        dtype, shape, _ = self.tensors[name]
        f, start, size = self._file(name)
        if out is not None:
            if (out.device.type != "cpu" or not out.is_contiguous() or out.dtype != _TORCH_DTYPE[dtype]
                    or tuple(out.shape) != tuple(shape)):
                raise ValueError(f"cannot read {name} ({dtype} {list(shape)}) into a {out.dtype} {list(out.shape)} "
                                 f"tensor on {out.device} (contiguous: {out.is_contiguous()})")
            flat = out.reshape(-1).view(torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        else:
            flat = torch.empty(size, dtype=torch.uint8)
        for a in range(0, size, READ_WINDOW):
            n = min(READ_WINDOW, size - a)
            off = (start + a) - (start + a) % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(f.fileno(), start + a + n - off, offset=off, access=mmap.ACCESS_READ) as mm:
                with memoryview(mm) as view:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # read-only buffer: only copied from, never written
                        src = torch.frombuffer(view, dtype=torch.uint8, offset=start + a - off, count=n)
                    flat[a:a + n].copy_(src)
                    del src
        return out if out is not None else flat.view(_TORCH_DTYPE[dtype]).reshape(shape)

    def torch_dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPE[self.tensors[name][0]]

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def prefetch_files(paths: list, budget_bytes: int):
    """Start the kernel reading the first ``budget_bytes`` of ``paths`` (in order) into the page
    cache, on a daemon thread; returns the thread. Page cache is not this process's memory and
    is dropped under pressure. For the seconds a job spends importing and planning before its
    first read: the disk is busy meanwhile. Errors are ignored (the real read reports them)."""
    import threading

    def run():
        left = budget_bytes
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = min(os.fstat(fd).st_size, left)
                for a in range(0, size, PREFETCH_WINDOW):
                    os.posix_fadvise(fd, a, min(PREFETCH_WINDOW, size - a), os.POSIX_FADV_WILLNEED)
                left -= size
            except OSError:
                pass
            finally:
                os.close(fd)
            if left <= 0:
                return

    t = threading.Thread(target=run, name="alphaquant-prefetch", daemon=True)
    if hasattr(os, "posix_fadvise"):
        t.start()
    return t


class ShardedWriter:
    """Shards of at most ``max_shard_bytes`` in ``folder`` for ``entries`` ([(name, dtype, shape)]):
    :meth:`write` takes the tensors in the order of ``entries``; :meth:`close` checks that all came
    and writes the index when there is more than one shard."""

    def __init__(self, folder: str, entries: list, metadata: Optional[dict], max_shard_bytes: int):
        self.folder, self.metadata = folder, metadata
        self.shards = split_into_shards(entries, max_shard_bytes)
        self._i, self._w = -1, None
        self._open_next()

    def _open_next(self) -> None:
        if self._w is not None:
            self._w.close()
        self._i += 1
        self._w = None
        if self._i < len(self.shards):
            self._w = ShardWriter(os.path.join(self.folder, shard_name(self._i, len(self.shards))),
                                  self.shards[self._i], self.metadata)

    def write(self, name: str, t: torch.Tensor) -> None:
        while self._w is not None and self._w._next >= len(self._w._order):
            self._open_next()
        if self._w is None:
            raise ValueError(f"{self.folder}: {name!r} is past the last tensor of the shards' headers")
        self._w.write(name, t)

    def close(self) -> list:
        while self._w is not None:
            self._open_next()  # a shard not written in full raises here
        if len(self.shards) > 1:
            write_index(self.folder, self.shards)
        return self.shards

    def abort(self) -> None:
        if self._w is not None:
            self._w.close(check=False)
            self._w = None


def write_sharded(folder: str, entries: list, produce: Iterable, metadata: Optional[dict],
                  max_shard_bytes: int) -> list:
    """Write the tensors ``produce`` yields as (name, tensor), in the order of ``entries``
    ([(name, dtype, shape)]), as shards of at most ``max_shard_bytes`` in ``folder`` (plus the
    index when there is more than one). Returns the shards."""
    from concurrent.futures import ThreadPoolExecutor

    writer = ShardedWriter(folder, entries, metadata, max_shard_bytes)
    pending = None  # the write of the previous tensor, on a thread: it overlaps producing the next
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alphaquant-write") as pool:
            it = iter(produce)
            for _ in entries:
                name, t = next(it)
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, name, t)
            if pending is not None:
                pending, done = None, pending
                done.result()
    except BaseException:
        if pending is not None:
            pending.exception()  # wait for it; the first error is the one raised
        writer.abort()
        raise
    return writer.close()
