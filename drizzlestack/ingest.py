"""Step 1, ingest: read light frames (FITS, camera raw, TIFF, XISF) one at a time and
append them to the stack store.

Colour (Bayer) frames stay mosaics: each frame's pattern *for the array as stored*
(after the header's offsets, row order and sub-frame origin, see :mod:`drizzlestack.cfa`)
goes into ``cfa_pattern``. One store holds one kind of frame: grey and colour frames
are never mixed, and the pattern may not change from frame to frame.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import xarray as xr

from . import cfa as _cfa
from ._warnings import DrizzlestackError, DrizzlestackWarning
from .io import RAW_SUFFIXES, TIFF_SUFFIXES, XISF_SUFFIXES, FrameReadError, read_any
from .store import STATUS_OK, StackStore, open_stack

FITS_PATTERNS = ("*.fits", "*.fit", "*.fts", "*.fits.gz", "*.fit.gz", "*.fts.gz", "*.fits.fz", "*.fz")

#: What a directory given to ingest is searched for (FITS first, then the other formats).
FRAME_PATTERNS = FITS_PATTERNS + tuple(f"*{s}" for s in RAW_SUFFIXES + TIFF_SUFFIXES + XISF_SUFFIXES) + tuple(
    f"*{s.upper()}" for s in RAW_SUFFIXES + TIFF_SUFFIXES + XISF_SUFFIXES)

#: Longest time (s) between two commits of ingested frames (each commit writes every
#: per-frame metadata array once; an interruption loses at most this much reading).
COMMIT_SECONDS = 1.0

#: threads checking, encoding and writing ingested frames (each holds one frame)
WRITE_THREADS = 2

#: Values of ``cfa=`` that ingest colour-looking frames as grey on purpose.
GREY = ("grey", "gray", "mono", "none")


@dataclass
class IngestReport:
    """What one ingest call did."""

    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # ingested, but status not ok
    mixed: list[str] = field(default_factory=list)  # the store mixes filters, instruments or exposures
    warnings: list[str] = field(default_factory=list)  # e.g. an undeclared Bayer mosaic

    def lines(self) -> list[str]:
        out = [f"ingested {len(self.added)} frame(s), {len(self.already)} already in the store, "
               f"{len(self.skipped)} skipped"]
        out += [f"  skipped {reason}" for _path, reason in self.skipped]
        out += [f"  {Path(p).name}: status '{s}'" for p, s in self.excluded]
        out += [f"  warning: {m}" for m in self.mixed]
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def expand_inputs(inputs) -> list[str]:
    """Expand files, directories (their FITS files) and glob patterns into a sorted,
    de-duplicated list of absolute paths. A pattern or directory that matches nothing
    is an error (a typo should not silently ingest nothing)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found = sorted({p for pat in FRAME_PATTERNS for p in glob.glob(os.path.join(item, pat))})
            if not found:
                raise DrizzlestackError(f"{item}: directory holds no FITS, raw, TIFF or XISF files "
                                        f"({', '.join(FITS_PATTERNS[:4])}, .dng, .cr2, .tif, .xisf, ...)")
            paths += found
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise DrizzlestackError(f"{item}: pattern matches no file")
            paths += found
        else:
            paths.append(item)  # a missing file is reported (and skipped) by the reader
    seen, out = set(), []
    for p in paths:
        a = str(Path(p).resolve())
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def frame_status(data: np.ndarray) -> str:
    """Status of a freshly read frame: ``ok``, or why later steps must exclude it."""
    finite = np.isfinite(data)
    if not finite.any():
        return "excluded: all pixels are NaN or non-finite"
    values = data[finite]
    lo, hi = values.min(), values.max()
    if lo == hi:
        return f"excluded: constant frame (every pixel is {lo:g})"
    return STATUS_OK


def _black_levels(frame) -> list[float] | None:
    if len(frame.black) == 3:
        return [float(v) for v in frame.black]
    values = [frame.header.get(f"BLKLEV{k}") for k in range(3)]
    if all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values]
    value = frame.header.get("BLKLEVEL", frame.header.get("PEDESTAL"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    return None


def _check_cfa_option(cfa) -> str | None:
    if cfa is None:
        return None
    if str(cfa).strip().lower() in GREY:
        return "grey"
    return _cfa.parse_pattern(cfa, "cfa")  # refused here, before any file is read


def frame_pattern(frame, cfa: str | None) -> str:
    """The Bayer pattern of a frame as stored (``""``: grey), from its header and the
    ``cfa`` option (``None``: the header's; ``"grey"``: grey; a pattern: declared)."""
    if cfa == "grey":
        return ""
    return _cfa.header_pattern(frame.header, frame.data.shape[0], override=cfa, name=Path(frame.path).name)


def _pattern_conflict(name: str, pattern: str, store_pattern: str) -> str | None:
    if pattern == store_pattern:
        return None
    if not store_pattern:
        return (f"{name}: colour (Bayer {pattern}) frame, but the store holds grey frames; colour and grey "
                "frames cannot be mixed in one store (ingest it into another store, or pass --grey)")
    if not pattern:
        return (f"{name}: grey frame, but the store holds colour (Bayer {store_pattern}) frames; colour and "
                f"grey frames cannot be mixed in one store (declare its pattern with --cfa {store_pattern} "
                "if it is a mosaic)")
    return (f"{name}: Bayer pattern {pattern} (after offsets and row order) differs from the store's "
            f"{store_pattern}; the pattern may not change within a store")


def _checks(data, name: str, pattern: str, cfa) -> tuple[str, list[str]]:
    """A frame's status and its undeclared-mosaic warning (as text): what ingest measures
    on the pixels, in the thread that writes them."""
    status = frame_status(data)
    mosaic = None
    if not pattern and cfa != "grey" and status == STATUS_OK:
        mosaic = _cfa.mosaic_message(data, name)
    return status, [] if mosaic is None else [mosaic]


def _finish_frame(report, path: str, checks, append) -> None:
    """Commit one appended frame with its status, and report what its checks found."""
    status, mosaic = checks.result()
    report.warnings += mosaic
    append(status=status)
    if status != STATUS_OK:
        report.excluded.append((path, status))


def ingest_files(paths, store, chunk: int = 512, saturation: float | None = None,
                 progress=None, cfa: str | None = None) -> IngestReport:
    """Append light frames to a store (created if absent), at most four frames in memory
    (one being read, two being checked and written, one on its way out).

    Files already in the store (same absolute path) are left alone; unreadable files,
    files whose shape differs from the store's, and frames that would mix grey and
    colour or change the Bayer pattern are skipped with a reason; nothing already in
    the store is touched. See :func:`ingest` for the parameters.
    """
    cfa = _check_cfa_option(cfa)
    paths = expand_inputs(paths)
    store_path = str(store)  # a local path or an fsspec URL: never a Path (s3:// is not a folder)
    report = IngestReport()
    st: StackStore | None = None
    if StackStore.exists(store_path):
        st = StackStore.open(store_path)  # refuses anything that is not a store
    known = set(st.paths()) if st is not None else set()
    store_pattern = st.cfa_pattern if st is not None and st.n_frames else None  # None: no frame yet
    # A frame's pixels are checked, encoded and written in WRITE_THREADS threads while
    # the next file is read here (writing, not reading, is the larger part: the two
    # frames before the one being read are written at once). Frames are committed in batches, at most
    # COMMIT_SECONDS apart (an interruption loses at most that much reading), each
    # metadata array written once per batch.
    last_commit, reserved = time.perf_counter(), False
    with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="drizzlestack-ingest") as pool:
        finishing: deque = deque()  # frames appended, in order, waiting for their pixels

        def finish_oldest():
            nonlocal last_commit
            finishing.popleft()()  # its pixels on disk: queued for the next commit
            if time.perf_counter() - last_commit >= COMMIT_SECONDS:
                st.commit_frames()
                last_commit = time.perf_counter()

        try:
            for i, path in enumerate(paths):
                if progress is not None:
                    progress(i, len(paths), path)
                if path in known:
                    report.already.append(path)
                    continue
                try:
                    frame = read_any(path, saturation=saturation)
                    pattern = frame_pattern(frame, cfa)
                except (FrameReadError, _cfa.PatternError) as exc:
                    report.skipped.append((path, str(exc)))
                    continue
                finally:
                    while len(finishing) >= WRITE_THREADS:
                        finish_oldest()
                name = Path(path).name
                if store_pattern is not None:
                    conflict = _pattern_conflict(name, pattern, store_pattern)
                    if conflict:
                        report.skipped.append((path, conflict))
                        continue
                if st is None:
                    st = StackStore.create(store_path, frame.data.shape, chunk=chunk)
                if frame.data.shape != st.frame_shape:
                    report.skipped.append((path, f"{Path(path).name}: shape {frame.data.shape} differs from the "
                                                 f"store's {st.frame_shape} (all frames must have one shape)"))
                    continue
                if not reserved:  # the first frame added: room for the rest in one resize
                    st.reserve_frames(len(paths) - i)
                    reserved = True
                store_pattern = pattern
                checks = pool.submit(_checks, frame.data, name, pattern, cfa)
                append = st.append_frame_later(frame.data, pool, path=path, exptime=frame.exptime,
                                               header=frame.header.tostring(sep="\n"), saturation=frame.saturation,
                                               cfa_pattern=pattern, black_level=_black_levels(frame))
                finishing.append(partial(_finish_frame, report, path, checks, append))
                known.add(path)
                report.added.append(path)
            while finishing:
                finish_oldest()
        finally:
            if st is not None:  # what is on disk is committed, on an interruption too
                with contextlib.suppress(Exception):  # (from a failed frame on, none is queued)
                    while finishing:
                        finish_oldest()
                st.commit_frames()
                st.trim_frames()
    if st is not None and report.added:
        from .info import mixed_setups

        n = st.n_frames
        report.mixed = mixed_setups([str(v) for v in st.group["path"][:n]], [str(v) for v in st.group["header"][:n]],
                                    np.asarray(st.group["exptime"][:n], np.float64))
    if st is not None:
        steps = dict(st.attrs.get("steps", {}))
        steps["ingest"] = {"complete": True, "params": {"chunk": chunk, "saturation": saturation, "cfa": cfa},
                           "summary": {"frames": st.n_frames, "paths": len(st.paths())}}
        st.attrs["steps"] = steps
    return report


def ingest(paths, store, chunk: int = 512, saturation: float | None = None, cfa: str | None = None) -> xr.Dataset:
    """Ingest light frames (FITS, camera raw, TIFF, XISF) into a stack store.

    Parameters
    ----------
    paths : str, path-like or sequence of them
        Files, directories (all FITS files in them) or glob patterns.
    store : str or path-like
        Store directory, or an fsspec URL (``s3://bucket/stack.zarr``); created on
        first use. An existing path that is not a drizzlestack store is refused and
        left untouched.
    chunk : int
        Spatial chunk size of the ``frames`` array in a new store.
    saturation : float, optional
        Saturation level (ADU) overriding the header ``SATURATE`` keyword and the
        integer type's maximum.
    cfa : str, optional
        Colour filter array: ``None`` (default) reads it from each file (``BAYERPAT``
        or ``COLORTYP`` with ``XBAYROFF``/``YBAYROFF``, ``ROWORDER`` and a sub-frame
        origin; a raw file's own pattern; XISF's ``ColorFilterArray``); a pattern
        (``RGGB``, ``BGGR``, ``GRBG``, ``GBRG``) declares or overrides it (the files'
        offsets and row order still apply); ``"grey"`` ingests mosaics as grey on
        purpose (and silences the undeclared-mosaic warning).

    Returns
    -------
    xarray.Dataset
        The store, opened lazily.

    Warns
    -----
    DrizzlestackWarning
        For every skipped file (with the reason), every frame ingested with a status
        other than ``ok``, when the store's frames mix filters (``FILTER``),
        instruments (``INSTRUME``) or exposure times (naming the files), and for every grey
        frame that looks like an undeclared mosaic.

    Raises
    ------
    StoreError
        ``store`` exists but is not a drizzlestack store.
    DrizzlestackError
        Nothing could be ingested into a new store.
    """
    report = ingest_files(paths, store, chunk=chunk, saturation=saturation, cfa=cfa)
    for message in report.warnings:
        warnings.warn(message, DrizzlestackWarning, stacklevel=2)
    for _path, reason in report.skipped:
        warnings.warn(f"skipped {reason}", DrizzlestackWarning, stacklevel=2)
    for path, status in report.excluded:
        warnings.warn(f"{Path(path).name}: {status}", DrizzlestackWarning, stacklevel=2)
    for message in report.mixed:
        warnings.warn(f"{store}: {message}", DrizzlestackWarning, stacklevel=2)
    if not StackStore.exists(str(store)):
        raise DrizzlestackError(f"{store}: no frame could be ingested, store not created")
    return open_stack(store)
