"""The stack store: a zarr v3 directory holding frames, registration, statistics and
rejection maps, opened lazily as an :class:`xarray.Dataset`.

Layout (docs/design.md): ``frames(frame, y, x)`` float32, chunked spatially and one frame per
chunk; per-frame variables ``path``, ``exptime``, ``header``, ``status``, ``saturation``;
later steps add their own variables. Root attributes hold the format marker, the package
version, the reference frame and, per step, its parameters and completion.

Safety: a frame is *committed* only when the ``n_frames`` attribute is bumped, after its
pixels and metadata are written. Arrays longer than ``n_frames`` (a crash mid-append)
are trimmed on open and the slot is reused by the next append, so an interrupted ingest
never loses or corrupts frames already in the store.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from . import location as _location
from ._version import __version__
from ._warnings import StoreError

FORMAT_NAME = "drizzlestack-store"
FORMAT_VERSION = 1

#: per-frame variables that ingest writes, with their fill values
FRAME_METADATA = {
    "path": ("", str),
    "exptime": (np.nan, np.float64),
    "header": ("", str),
    "status": ("", str),
    "saturation": (np.nan, np.float64),
    "cfa_pattern": ("", str),  # Bayer pattern of the array as stored (drizzlestack.cfa), "" for grey
}

#: per-frame, per-colour-channel (R, G, B) variables, dims (frame, channel)
FRAME_CHANNEL_METADATA = {
    "black_level": (np.nan, np.float64),  # ADU, from a raw file or BLKLEV keywords; NaN if unknown
}

#: compressor of the frames (and of other large pixel arrays)
FRAME_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")

#: status of a frame that takes part in the later steps
STATUS_OK = "ok"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _same_numbers(value):
    """Numbers as floats (``scale=2`` from the API and ``2.0`` from a YAML file are the
    same parameter), recursively; booleans stay booleans."""
    if isinstance(value, dict):
        return {k: _same_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_same_numbers(v) for v in value]
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    return value


def params_digest(params: dict) -> str:
    """Stable short hash of a JSON-able parameter dict (used to decide whether a step must rerun)."""
    text = json.dumps(_same_numbers(params), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StackStore:
    """Read/write access to a stack store (the writer side; readers use :func:`open_stack`).

    Use :meth:`create` for a new store and :meth:`open` for an existing one; both refuse
    a path that holds something else. A store is a local directory or an fsspec URL
    (``s3://bucket/stack.zarr``, :mod:`.location`).

    Attributes
    ----------
    path : Path or str
        The store as given (for messages): a local :class:`~pathlib.Path`, or the URL.
    location : str
        The absolute local path or the URL: what tile tasks receive to open the store.
    """

    def __init__(self, group: zarr.Group, path):
        self.group = group
        self._appending: dict = {}  # the per-frame arrays append_frame writes, opened once
        self._pending: list = []  # metadata of appended frames not yet committed
        self._in_flight = 0  # frames appended whose finish() has not returned
        self.path = _location.display(path)
        self.location = _location.normalize(path)

    @property
    def is_remote(self) -> bool:
        """Whether the store is on an fsspec file system (object storage), not a local directory."""
        return _location.is_url(self.location)

    # ----------------------------------------------------------------- open/create
    @classmethod
    def exists(cls, path) -> bool:
        """Whether anything (a store or not) is at ``path``, a local path or a URL."""
        return _location.exists(_location.normalize(path))

    @classmethod
    def open(cls, path, mode: str = "r+") -> "StackStore":
        """Open an existing store; :class:`StoreError` if ``path`` is not a drizzlestack store."""
        path, loc = _location.display(path), _location.normalize(path)
        if not _location.exists(loc):
            raise StoreError(f"{path}: no such store (create it with 'drizzlestack ingest {path} FILES...')")
        if _location.is_file(loc):
            raise StoreError(f"{path}: not a drizzlestack store (it is a file, not a zarr directory)")
        try:
            group = zarr.open_group(_location.zarr_store(loc, read_only=mode == "r"), mode=mode, zarr_format=3)
        except StoreError:
            raise
        except Exception as exc:  # zarr raises several types for "not a group"
            raise StoreError(f"{path}: not a drizzlestack store ({type(exc).__name__}: {exc})") from None
        fmt = group.attrs.get("format")
        if fmt != FORMAT_NAME:
            raise StoreError(f"{path}: not a drizzlestack store (zarr group without the '{FORMAT_NAME}' marker)")
        version = group.attrs.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format {version} was written by a newer drizzlestack "
                f"({group.attrs.get('created_by')}); this is {__version__} (format {FORMAT_VERSION})"
            )
        return cls(group, path)

    @classmethod
    def create(cls, path, frame_shape: tuple[int, int], chunk: int = 512) -> "StackStore":
        """Create an empty store for frames of ``frame_shape = (ny, nx)``.

        Refuses an existing non-empty path (it might be someone's data).
        """
        path, loc = _location.display(path), _location.normalize(path)
        if not _location.is_empty(loc):
            raise StoreError(f"{path}: exists and is not a drizzlestack store; refusing to write into it")
        ny, nx = (int(v) for v in frame_shape)
        group = zarr.open_group(_location.zarr_store(loc), mode="w", zarr_format=3)
        group.create_array(
            "frames",
            shape=(0, ny, nx),
            chunks=(1, min(chunk, ny), min(chunk, nx)),
            dtype="float32",
            fill_value=np.nan,
            dimension_names=("frame", "y", "x"),
            # Blosc LZ4 with byte shuffle: on noisy float32 frames it stores 25 % less
            # than zarr's default zstd and decodes twice as fast (benchmarks/README.md),
            # and every later step reads frames window by window, many times over.
            compressors=FRAME_CODEC,
        )
        for name, (fill, dtype) in FRAME_METADATA.items():
            group.create_array(name, shape=(0,), chunks=(1024,), dtype=dtype, fill_value=fill,
                               dimension_names=("frame",))
        group.attrs.update(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "created_by": __version__,
                "created": _now(),
                "n_frames": 0,
                "frame_shape": [ny, nx],
                "reference": None,
                "steps": {},
            }
        )
        return cls(group, path)

    # -------------------------------------------------------------------- frames
    @property
    def n_frames(self) -> int:
        """Number of committed frames."""
        return int(self.group.attrs["n_frames"])

    @property
    def frame_shape(self) -> tuple[int, int]:
        ny, nx = self.group.attrs["frame_shape"]
        return int(ny), int(nx)

    @property
    def cfa_pattern(self) -> str:
        """The store's Bayer pattern (one for all frames, see ingest), ``""`` for grey."""
        if self.n_frames == 0 or "cfa_pattern" not in self.group:
            return ""
        return str(self.group["cfa_pattern"][0])

    def paths(self) -> list[str]:
        """Source paths of the committed frames."""
        n = self.n_frames
        return [str(p) for p in self.group["path"][:n]] if n else []

    def append_frame(self, data: np.ndarray, **metadata: Any) -> int:
        """Append one frame (float32 ``(ny, nx)``) with its per-frame metadata; returns its index.

        The frame is committed (visible to readers) only once everything is written.
        """
        i = self.append_frame_later(data, None, **metadata)()
        self.commit_frames()
        return i

    @property
    def _queued(self) -> int:
        """Frames committed or finished and waiting for the next commit."""
        return self.n_frames + len(self._pending)

    def reserve_frames(self, n: int) -> None:
        """Make room for ``n`` more frames in ``frames`` at once (one resize instead of one
        per append; rows past ``n_frames`` are never read, see :meth:`trim_frames`)."""
        frames = self._appending_array("frames")
        need = self._queued + int(n)
        if frames.shape[0] < need:
            frames.resize((need,) + frames.shape[1:])

    def trim_frames(self) -> None:
        """Drop the rows of ``frames`` past the committed frames (left by
        :meth:`reserve_frames` for files that were skipped)."""
        frames = self._appending_array("frames")
        if frames.shape[0] > self._queued:
            frames.resize((self._queued,) + frames.shape[1:])

    def append_frame_later(self, data: np.ndarray, pool, **metadata: Any):
        """Start appending one frame: its pixels are written in ``pool`` (a
        ``concurrent.futures`` executor; ``None``: now, in this thread) while the caller
        goes on (ingest reads the next file). Returns the function that finishes the
        append -- waits for the pixels, queues the metadata (with any given to it: what
        was measured on the pixels meanwhile) -- and returns the frame's index. Several
        frames may be in flight; their finish functions are called in the order they
        were appended. The frame is committed by the next :meth:`commit_frames`.
        """
        if data.shape != self.frame_shape:
            raise StoreError(f"frame shape {data.shape} differs from the store's {self.frame_shape}")
        unknown = set(metadata) - set(FRAME_METADATA) - set(FRAME_CHANNEL_METADATA)
        if unknown:
            raise ValueError(f"unknown frame metadata: {sorted(unknown)}")
        i = self._queued + self._in_flight
        frames = self._appending_array("frames")
        # A previous crash may have left the arrays longer than n_frames: reuse the slot.
        if frames.shape[0] < i + 1:
            frames.resize((i + 1,) + frames.shape[1:])
        from .chunkio import DirectArray

        # Encoded and written whole chunks at a time in one thread (opened after the
        # resize, so it sees the new shape): through zarr's event loop a 2048^2 frame took
        # ~3x longer. Pixels only: no zarr metadata and no warnings in the other thread.
        target = DirectArray(self.location, "frames", "r+")
        pixels = np.asarray(data, dtype=np.float32)

        def write():
            target[i] = pixels

        written = pool.submit(write) if pool is not None else None
        if written is None:
            write()
        self._in_flight += 1

        def finish(**late: Any) -> int:
            try:
                unknown_late = set(late) - set(FRAME_METADATA) - set(FRAME_CHANNEL_METADATA)
                if unknown_late:
                    raise ValueError(f"unknown frame metadata: {sorted(unknown_late)}")
                if written is not None:
                    written.result()  # (raises the write's error: the frame is not queued)
            finally:
                self._in_flight -= 1
            # Queued in index order only: after a failed frame, the frames behind it are
            # never committed (their pixels sit in rows a later append reuses).
            if i != self._queued:
                raise StoreError(f"frame {i} finished out of order (an earlier frame of this append failed)")
            self._pending.append({**metadata, **late})
            return i

        return finish

    def commit_frames(self) -> int:
        """Write the metadata of the frames finished since the last commit and commit
        them (``n_frames``, the last write); returns how many were committed.

        Each metadata array is resized and written once for all of them: per frame, the
        dozen small zarr writes cost ~30 ms, as much as reading and writing the pixels
        of a 1024x768 frame.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        i0 = self.n_frames
        self._write_frame_metadata(i0, pending)
        self.group.attrs["n_frames"] = i0 + len(pending)  # the commit
        return len(pending)

    def _write_frame_metadata(self, i0: int, rows: list[dict]) -> None:
        """Frames ``i0 .. i0 + len(rows) - 1``'s metadata, one write per array."""
        i1 = i0 + len(rows)
        for name, (fill, dtype) in FRAME_METADATA.items():
            arr = self._appending_array(name)
            if arr is None:  # a store written before this variable existed
                arr = self._appending[name] = self.group.create_array(
                    name, shape=(i0,), chunks=(1024,), dtype=dtype, fill_value=fill, dimension_names=("frame",))
            if arr.shape[0] < i1:
                arr.resize((i1,))
            values = [row.get(name, fill) for row in rows]
            arr[i0:i1] = np.array(values, dtype=object if dtype is str else dtype)
        for name, (fill, dtype) in FRAME_CHANNEL_METADATA.items():
            arr = self._appending_array(name)
            if arr is None and all(row.get(name) is None for row in rows):
                continue  # created with the first frame that has it (grey stores keep their dims)
            if arr is None:
                arr = self._appending[name] = self.group.create_array(
                    name, shape=(i0, 3), chunks=(1024, 3), dtype=dtype, fill_value=fill,
                    dimension_names=("frame", "channel"))
            if arr.shape[0] < i1:
                arr.resize((i1, 3))
            values = [np.full(3, fill) if row.get(name) is None or len(row[name]) != 3
                      else np.asarray(row[name], dtype=np.float64) for row in rows]
            arr[i0:i1] = np.stack(values)

    def _appending_array(self, name: str):
        """The array ``name`` as :meth:`append_frame` writes it (``None`` if absent), opened
        once per store object: each lookup reads metadata (~45 ms a frame before)."""
        if name not in self._appending:
            if name not in self.group:
                return None
            self._appending[name] = self.group[name]
        return self._appending[name]

    def frame(self, i: int) -> np.ndarray:
        """Pixels of frame ``i`` (float32)."""
        return self.group["frames"][i]

    def frame_rows(self, i: int) -> "FrameRows":
        """Frame ``i`` as a source of row bands (:class:`FrameRows`), for work that never
        holds a whole frame (star detection)."""
        from .chunkio import DirectArray

        return FrameRows(DirectArray(self.location, "frames"), i)

    def set_frame_values(self, name: str, index, values) -> None:
        """Overwrite a per-frame metadata variable (e.g. ``status``) at ``index``."""
        self.group[name][index] = values

    # ------------------------------------------------------------------ variables
    def write_variable(self, name: str, data, dims: tuple[str, ...], chunks=None, fill_value=None,
                       attrs: dict | None = None) -> zarr.Array:
        """Create or replace variable ``name`` with ``data`` (numpy) and dimension names ``dims``.

        For per-frame variables the first dimension is ``frame`` and must have the
        committed length.
        """
        data = np.asarray(data)
        if dims and dims[0] == "frame" and data.shape[0] != self.n_frames:
            raise ValueError(f"{name}: {data.shape[0]} frames given, store has {self.n_frames}")
        if fill_value is None:
            fill_value = "" if data.dtype.kind in "UTO" else (np.nan if data.dtype.kind == "f" else 0)
        dtype = str if data.dtype.kind in "UTO" else data.dtype
        # overwrite= and attributes= in the one call: a lookup, a delete, a create and an
        # attribute update each went through zarr's event loop (3x the time).
        arr = self.group.create_array(
            name, shape=data.shape, chunks=chunks or data.shape or None, dtype=dtype,
            fill_value=fill_value, dimension_names=dims, overwrite=True, attributes=dict(attrs or {}),
        )
        if data.size:
            arr[...] = data
        return arr

    def create_variable(self, name: str, shape, dims, chunks, dtype, fill_value, compressors=None,
                        attrs: dict | None = None) -> zarr.Array:
        """Create (replacing) an empty variable to be filled region by region (tiled writers).

        ``compressors``: a zarr codec (e.g. :data:`FRAME_CODEC`) or ``None`` for zarr's
        default (zstd); ``attrs``: its attributes."""
        extra = {} if compressors is None else {"compressors": compressors}
        arr = self.group.create_array(name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
                                      fill_value=fill_value, dimension_names=tuple(dims), overwrite=True,
                                      attributes=dict(attrs or {}), **extra)
        from .chunkio import remember_array

        remember_array(self.location, name, arr)  # the tile tasks that fill it find it open
        return arr

    def delete_variables(self, *names: str) -> None:
        for name in names:
            if name in self.group:
                del self.group[name]

    # ---------------------------------------------------------------------- steps
    def step(self, name: str) -> dict | None:
        """Bookkeeping of step ``name``: parameters, digest, completion, or ``None``."""
        return self.group.attrs.get("steps", {}).get(name)

    def _set_steps(self, steps: dict) -> None:
        self.group.attrs["steps"] = steps

    def begin_step(self, name: str, params: dict, inputs: dict | None = None) -> None:
        """Record that step ``name`` started with ``params`` (marks it incomplete)."""
        steps = dict(self.group.attrs.get("steps", {}))
        steps[name] = {
            "params": params,
            "inputs": inputs or {},
            "digest": params_digest({"params": params, "inputs": inputs or {}}),
            "complete": False,
            "started": _now(),
            "version": __version__,
        }
        self._set_steps(steps)

    def end_step(self, name: str, **summary: Any) -> None:
        """Mark step ``name`` complete, with an optional JSON-able summary."""
        steps = dict(self.group.attrs.get("steps", {}))
        record = dict(steps.get(name, {}))
        record.update({"complete": True, "finished": _now(), "summary": summary})
        steps[name] = record
        self._set_steps(steps)

    def is_current(self, name: str, params: dict, inputs: dict | None = None) -> bool:
        """True when step ``name`` completed with exactly these parameters and inputs."""
        rec = self.step(name)
        return bool(rec and rec.get("complete")
                    and rec.get("digest") == params_digest({"params": params, "inputs": inputs or {}}))

    def is_resumable(self, name: str, params: dict, inputs: dict | None = None) -> bool:
        """True when step ``name`` was begun with exactly these parameters and inputs
        and did not complete (it was interrupted): its finished tiles can be kept."""
        rec = self.step(name)
        return bool(rec and not rec.get("complete")
                    and rec.get("digest") == params_digest({"params": params, "inputs": inputs or {}}))

    # ---------------------------------------------------------------- tile ledgers
    def resume_tiles(self, step: str, params: dict, inputs: dict, tiles: tuple[int, int], width: int,
                     tile: int, outputs, ledger: str | None = None) -> np.ndarray | None:
        """The tile ledger of an interrupted run of ``step`` that can be resumed.

        A tiled step writes each tile's products into the store and then records the
        tile's small summary vector in its ledger (``{step}_tiles``, one chunk per
        tile, so tasks never write the same chunk). When the step was interrupted
        with these same parameters and inputs, on the same tiling, and its ``outputs``
        are still there, the ledger tells which tiles are finished.

        A step made of several tiled passes gives each pass its own ``ledger`` name
        (default: the step's name).

        Returns
        -------
        (ny_tiles, nx_tiles, width) float64 or None
            The ledger (NaN rows: tiles still to do), or ``None`` when the step must
            start afresh (then call :meth:`start_tiles`).
        """
        name = f"{ledger or step}_tiles"
        if not self.is_resumable(step, params, inputs) or name not in self.group:
            return None
        record = self.group[name]
        if (record.shape != (int(tiles[0]), int(tiles[1]), int(width)) or record.attrs.get("tile") != int(tile)
                or not all(v in self.group for v in outputs)):
            return None
        return np.asarray(record[...], dtype=np.float64)

    def start_tiles(self, step: str, tiles: tuple[int, int], width: int, tile: int) -> np.ndarray:
        """Create an empty tile ledger for ``step`` (or a pass's ledger name; see
        :meth:`resume_tiles`)."""
        shape = (int(tiles[0]), int(tiles[1]), int(width))
        self.create_variable(f"{step}_tiles", shape, (f"{step}_tile_y", f"{step}_tile_x", f"{step}_tile_value"),
                             (1, 1, shape[2]), "float64", np.nan, attrs={"tile": int(tile)})
        return np.full(shape, np.nan)

    @property
    def attrs(self):
        return self.group.attrs


def record_tile(location, step: str, iy: int, ix: int, values) -> None:
    """Record tile ``(iy, ix)`` of ``step`` as finished, with its summary ``values``
    (called by the tile task itself, after it wrote the tile's products)."""
    from .chunkio import DirectArray

    # One chunk per tile: written whole in this thread (through zarr's event loop the
    # ledger rows of concurrent tasks queued behind each other, ~3 ms each).
    ledger = DirectArray(str(location), f"{step}_tiles", "r+")
    ledger[iy, ix, :] = np.asarray(values, dtype=np.float64)


def content_token(st: "StackStore", name: str | None = None, array=None, _store_part=None) -> str:
    """A dask token for the store's content (or one array's): its resolved location,
    committed frame count, step records and the array's metadata.

    Dask arrays named from this never share keys across two stores (two ``stack.zarr``
    in different folders once did, and ``b.frames - a.frames`` computed as 0), nor
    across a store before and after a step rewrote it: rewriting an array replaces its
    ``zarr.json`` (new modification time) and every step stamps its start time. A URL
    is its own location (never resolved as a local path); on object storage the
    modification time is not asked for (one request per array, ~50 ms each, every
    time a store is opened): the step stamps tell the runs apart.
    """
    from dask.base import tokenize

    # ``array`` (the opened ``name``) and ``_store_part`` spare re-reading metadata when
    # :func:`open_stack` tokenizes every array of a store (0.3 s per open before).
    parts: list = list(_store_part) if _store_part is not None else _store_token_part(st)
    if name is not None:
        arr = st.group[name] if array is None else array
        if not st.is_remote:
            parts.append(_location.modified(st.location, name))
        parts += [name, arr.shape, arr.chunks, str(arr.dtype)]
    return tokenize(*parts)


def _store_token_part(st: "StackStore") -> list:
    return [st.location, st.n_frames, json.dumps(st.group.attrs.get("steps", {}), sort_keys=True, default=str)]


def open_stack(store) -> xr.Dataset:
    """Open a stack store lazily (dask-backed) as an :class:`xarray.Dataset`.

    Nothing is computed: ``frames`` and the other variables are dask arrays, trimmed to
    the committed frames. Per-frame string variables (``path``, ``status``, ...) are
    small and loaded eagerly so they can be printed and filtered.

    Parameters
    ----------
    store : str or path-like or StackStore
        The store directory, or an fsspec URL (``s3://bucket/stack.zarr``).

    Returns
    -------
    xarray.Dataset
    """
    st = store if isinstance(store, StackStore) else StackStore.open(store, mode="r")
    n = st.n_frames
    variables = {}
    store_part = _store_token_part(st)
    for name, arr in st.group.arrays():
        dims = tuple(arr.metadata.dimension_names or (f"{name}_dim{i}" for i in range(arr.ndim)))
        if arr.dtype.kind in "UOT" or str(arr.dtype).startswith("StringDType"):
            # Small per-frame text (paths, headers, statuses): load now, as Python strings.
            data = np.asarray(arr[...]).astype(object)
        else:
            # (from_array with the meta given: da.from_zarr reads an empty selection
            # through zarr's event loop to learn it, ~1 ms per array and open)
            data = da.from_array(arr, chunks=arr.chunks, name=f"{name}-{content_token(st, name, arr, store_part)}",
                                 meta=np.empty((0,) * arr.ndim, arr.dtype))
        if dims and dims[0] == "frame" and data.shape[0] != n:
            # Rows past n_frames belong to an append that never committed.
            data = data[:n]
        variables[name] = xr.Variable(dims, data, attrs=dict(arr.attrs))
    ds = xr.Dataset(variables, attrs=dict(st.group.attrs))
    if "frame" in ds.dims:
        ds = ds.assign_coords(frame=np.arange(ds.sizes["frame"]))
    return ds


class FrameRows:
    """Rows of one stored frame, read a band at a time.

    ``rows(y0, y1, out=None)`` returns rows ``y0:y1`` as float32 (in ``out`` when given,
    a new array otherwise). Chunks are decompressed whole, so the last two chunk rows
    read (e.g. 512 rows of the whole width) are kept, in two buffers allocated once:
    bands read in order, each with a few rows of its neighbours, decompress every chunk
    once, and reading allocates nothing frame-sized. Chunks are decoded in the calling
    thread (:class:`~drizzlestack.chunkio.DirectArray`): through zarr, whose reads all
    queue on one event-loop thread, two registration tasks detected stars 1.1-1.5x
    faster than one instead of ~2x.
    """

    def __init__(self, frames, index: int):
        self._frames = frames  # a DirectArray: chunks decoded in the calling thread
        self._index = int(index)
        self.shape = tuple(int(n) for n in frames.shape[1:])
        self._chunk = int(frames.chunks[1])
        self._blocks: list[np.ndarray] = []
        self._held: list[int] = []  # chunk row held by each block, oldest first

    def _block(self, k: int) -> np.ndarray:
        if k in self._held:  # a hit: now the most recent
            j = self._held.index(k)
            self._blocks.append(self._blocks.pop(j))
            self._held.append(self._held.pop(j))
            return self._blocks[-1]
        if len(self._blocks) < 2:
            self._blocks.append(np.empty((self._chunk, self.shape[1]), np.float32))
        else:  # the older block is overwritten
            self._blocks.append(self._blocks.pop(0))
            self._held.pop(0)
        self._held.append(k)
        y0, y1 = k * self._chunk, min((k + 1) * self._chunk, self.shape[0])
        self._frames.read((self._index, slice(y0, y1), slice(None)), out=self._blocks[-1][:y1 - y0])
        return self._blocks[-1]

    def rows(self, y0: int, y1: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((y1 - y0, self.shape[1]), np.float32)
        for k in range(y0 // self._chunk, (y1 - 1) // self._chunk + 1):
            a, b = max(y0, k * self._chunk), min(y1, (k + 1) * self._chunk)
            out[a - y0:b - y0] = self._block(k)[a - k * self._chunk:b - k * self._chunk]
        return out
