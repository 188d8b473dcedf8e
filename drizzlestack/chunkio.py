"""Direct chunk I/O: store arrays read and written in the calling thread.

:class:`DirectArray` is how tile tasks read frames and write their products. For a
local store it decodes and encodes whole chunks itself (numcodecs, GIL released), so
tasks do their I/O in parallel; for a remote store (an fsspec URL, :mod:`.location`)
and for any layout it does not know it goes through zarr's own (concurrent) I/O.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from . import location as _location


#: zarr arrays opened recently, by location, name, mode and their metadata file's identity
_OPENED: dict = {}
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 256


def _cache_key(loc: str, name: str, mode: str):
    try:
        meta = os.stat(os.path.join(loc, name, "zarr.json"))
    except OSError:
        return None  # zarr says what is missing
    return (os.path.abspath(loc), name, mode, meta.st_ino, meta.st_size, meta.st_mtime_ns)


def remember_array(location, name: str, arr: zarr.Array) -> None:
    """Put an array just created (``arr``, writable) where :func:`open_array` finds it,
    for reading and writing: the tile tasks that fill it then do not each open it again
    on zarr's event loop, one thread waiting for the other's open (~3-5 ms each, ~0.05 s
    of a 0.3 s outlier pass on two threads). Local stores only."""
    loc = str(location)
    if _location.is_url(loc):
        return
    for mode in ("r", "r+"):
        key = _cache_key(loc, name, mode)
        if key is not None:
            with _OPENED_LOCK:
                if len(_OPENED) >= _OPENED_MAX:
                    _OPENED.pop(next(iter(_OPENED)))
                _OPENED[key] = arr


def open_array(location: str, name: str, mode: str = "r") -> zarr.Array:
    """``zarr.open_array`` of a store variable, remembered while its metadata is unchanged.

    Tile tasks open the same few arrays again and again (frames, flags, products, the
    ledger); each open reads and parses ``zarr.json`` on zarr's one event-loop thread,
    ~3 ms that tasks on other threads wait for. For a local store the opened array is
    kept, keyed by the metadata file's inode, size and modification time: a rewritten
    or resized array (an append, a step creating it afresh) has a new ``zarr.json`` and
    is opened again. Remote stores are opened every time (a stat is a request there).
    """
    loc = str(location)
    key = None if _location.is_url(loc) else _cache_key(loc, name, mode)
    if key is not None:
        with _OPENED_LOCK:
            arr = _OPENED.get(key)
        if arr is not None:
            return arr
    arr = zarr.open_array(_location.zarr_store(loc, name, read_only=mode == "r"), mode=mode)
    if key is not None:
        with _OPENED_LOCK:
            if len(_OPENED) >= _OPENED_MAX:
                _OPENED.pop(next(iter(_OPENED)))
            _OPENED[key] = arr
    return arr


class DirectArray:
    """One store array whose chunks are read and written in the calling thread.

    zarr v3 serves every read and write through one event-loop thread: two worker
    threads reading windows at once hardly ran faster than one, and drizzle tiles did
    not scale (benchmarks/README.md, "Drizzle driver"). For the store's own local,
    unsharded arrays (a ``bytes`` codec and at most one Blosc, Zstd or Gzip
    compressor), this class opens the chunk files itself and decodes and encodes them
    with numcodecs -- the same codecs zarr uses, which release the GIL -- so tile tasks
    do their I/O in parallel (and reads run 3-4x faster than through zarr even on one
    thread). Any other layout (a remote store, sharding, other codecs) and any write
    that does not cover whole chunks goes through zarr itself: same values, only slower.

    Open it per task, not across tasks: an append resizes ``frames`` and a later step
    may rewrite a variable, so a long-lived handle would go stale.

    Parameters
    ----------
    location : str or Path
        The store: a local directory or an fsspec URL (``StackStore.location``).
    name : str
        The array (``frames``, ``rejection``, ``drizzle``, ...).
    mode : {"r", "r+"}
    """

    def __init__(self, location, name: str, mode: str = "r"):
        loc = str(location)
        self.array = open_array(loc, name, mode)
        self.shape = self.array.shape
        self.chunks = self.array.chunks
        self.dtype = self.array.dtype
        self._codec = None
        try:
            self._setup_direct_io()
        except Exception:  # anything unexpected in the metadata: zarr's own path is always right
            self._codec = None

    def _setup_direct_io(self) -> None:
        from zarr.codecs import BytesCodec, GzipCodec, ZstdCodec
        from zarr.storage import LocalStore

        meta = self.array.metadata
        if getattr(meta, "zarr_format", None) != 3 or not isinstance(self.array.store, LocalStore):
            return
        codecs = list(meta.codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
            return
        dtype = np.dtype(self.dtype)
        if dtype.kind not in "biuf":
            return
        endian = codecs[0].endian
        if endian is not None and dtype.itemsize > 1:
            dtype = dtype.newbyteorder("<" if endian.value == "little" else ">")
        if len(codecs) == 1:
            codec = None
        else:
            import numcodecs

            comp = codecs[1]
            if isinstance(comp, BloscCodec):
                # As zarr configures it (typesize included: it sets the shuffle's stride).
                codec = numcodecs.Blosc(cname=comp.cname.value, clevel=comp.clevel, shuffle=_blosc_shuffle(comp),
                                        blocksize=comp.blocksize, typesize=comp.typesize)
            elif isinstance(comp, ZstdCodec):
                codec = numcodecs.Zstd(level=comp.level, checksum=comp.checksum)
            elif isinstance(comp, GzipCodec):
                codec = numcodecs.GZip(level=comp.level)
            else:
                return
        self._chunk_shape = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
        self._fill = meta.fill_value
        self._encode_key = meta.encode_chunk_key
        self._root = os.path.join(str(self.array.store.root), self.array.path)
        self._file_dtype = dtype
        self._codec = codec if codec is not None else _RawCodec()

    @property
    def direct(self) -> bool:
        """Whether whole-chunk I/O bypasses zarr (the store's own local, unsharded layout)."""
        return self._codec is not None

    # ------------------------------------------------------------------ indexing
    def _bounds(self, key) -> tuple[list[tuple[int, int]], list[bool]] | None:
        """``key`` (ints and unit-step slices) as per-axis ``(start, stop)`` and which
        axes an integer dropped; ``None`` for anything fancier."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > len(self.shape) or any(k is Ellipsis for k in key):
            return None
        key = key + (slice(None),) * (len(self.shape) - len(key))
        bounds, squeeze = [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    return None
                bounds.append((start, max(start, stop)))
                squeeze.append(False)
            elif isinstance(k, (int, np.integer)):
                i = int(k) + (n if k < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis of length {n}")
                bounds.append((i, i + 1))
                squeeze.append(True)
            else:
                return None
        return bounds, squeeze

    def _pieces(self, bounds):
        """Per chunk touched by ``bounds``: its coordinates, the slice of the region it
        fills and the slice of the chunk it comes from."""
        cs = self._chunk_shape
        ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(bounds, cs)]
        for coords in np.ndindex(*(len(r) for r in ranges)):
            chunk = tuple(r[i] for r, i in zip(ranges, coords))
            lo = [ci * c for ci, c in zip(chunk, cs)]
            dst = tuple(slice(max(a, l0) - a, min(b, l0 + c) - a) for (a, b), l0, c in zip(bounds, lo, cs))
            src = tuple(slice(max(a, l0) - l0, min(b, l0 + c) - l0) for (a, b), l0, c in zip(bounds, lo, cs))
            yield chunk, dst, src

    def _chunk_path(self, chunk: tuple[int, ...]) -> str:
        return os.path.join(self._root, *self._encode_key(chunk).split("/"))

    # --------------------------------------------------------------------- reads
    def __getitem__(self, key) -> np.ndarray:
        return self.read(key)

    def read(self, key, out: np.ndarray | None = None) -> np.ndarray:
        """``self[key]``, into ``out`` when given (the selection's shape, any strides;
        values cast as numpy assigns them), a new array otherwise."""
        plan = self._bounds(key) if self._codec is not None else None
        if plan is None:
            if out is None:
                return np.asarray(self.array[key])
            out[...] = self.array[key]
            return out
        bounds, squeeze = plan
        full = tuple(b - a for a, b in bounds)
        if out is None:
            region = np.empty(full, dtype=self.dtype)
        else:
            region = out.reshape(full)  # a view of out (only length-1 axes are added)
        if region.size:
            for chunk, dst, src in self._pieces(bounds):
                region[dst] = self._read_chunk(chunk)[src]
        return out if out is not None else region[tuple(0 if s else slice(None) for s in squeeze)]

    def _read_chunk(self, chunk: tuple[int, ...]) -> np.ndarray:
        try:
            with open(self._chunk_path(chunk), "rb") as f:
                raw = f.read()
        except FileNotFoundError:  # zarr leaves chunks that equal the fill value unwritten
            return np.full(self._chunk_shape, self._fill, dtype=self.dtype)
        return np.frombuffer(self._codec.decode(raw), dtype=self._file_dtype).reshape(self._chunk_shape)

    # -------------------------------------------------------------------- writes
    def __setitem__(self, key, value) -> None:
        plan = self._bounds(key) if self._codec is not None else None
        if plan is None or not self._whole_chunks(plan[0]):
            self.array[key] = value
            return
        bounds, squeeze = plan
        full = tuple(b - a for a, b in bounds)
        given = tuple(n for n, dropped in zip(full, squeeze) if not dropped)
        value = np.broadcast_to(np.asarray(value, dtype=self.dtype), given).reshape(full)
        for chunk, dst, src in self._pieces(bounds):
            piece = value[dst]
            if piece.shape == self._chunk_shape and piece.dtype == self._file_dtype:
                block = piece  # a whole chunk: encoded from the value itself, no padded copy
            else:
                block = np.full(self._chunk_shape, self._fill, dtype=self._file_dtype)  # edge chunks: padded
                block[src] = piece
            self._write_chunk(chunk, block)

    def _whole_chunks(self, bounds) -> bool:
        """Whether ``bounds`` covers every chunk it touches entirely (edge chunks up to
        the array's edge): only then may chunks be written without reading them."""
        return all(a % c == 0 and (b % c == 0 or b == n)
                   for (a, b), c, n in zip(bounds, self._chunk_shape, self.shape))

    def _write_chunk(self, chunk: tuple[int, ...], block: np.ndarray) -> None:
        path = self._chunk_path(chunk)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written aside and renamed: a task killed mid-write never leaves a torn chunk.
        tmp = f"{path}.partial-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(self._codec.encode(np.ascontiguousarray(block)))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


class _RawCodec:
    """Uncompressed chunks (a ``bytes`` codec alone)."""

    @staticmethod
    def decode(raw):
        return raw

    @staticmethod
    def encode(block):
        return block.tobytes()


def _blosc_shuffle(comp) -> int:
    import numcodecs

    name = getattr(comp.shuffle, "value", comp.shuffle)
    return {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[name]
