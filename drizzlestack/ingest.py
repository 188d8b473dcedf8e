"""Step 1, ingest: read FITS frames one at a time and append them to the stack store."""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ._warnings import DrizzlestackError, DrizzlestackWarning
from .io.fits import FrameReadError, read_frame
from .store import STATUS_OK, StackStore, open_stack

FITS_PATTERNS = ("*.fits", "*.fit", "*.fts", "*.fits.gz", "*.fit.gz", "*.fts.gz", "*.fits.fz", "*.fz")


@dataclass
class IngestReport:
    """What one ingest call did."""

    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # ingested, but status not ok
    mixed: list[str] = field(default_factory=list)  # the store mixes filters, instruments or exposures

    def lines(self) -> list[str]:
        out = [f"ingested {len(self.added)} frame(s), {len(self.already)} already in the store, "
               f"{len(self.skipped)} skipped"]
        out += [f"  skipped {reason}" for _path, reason in self.skipped]
        out += [f"  {Path(p).name}: status '{s}'" for p, s in self.excluded]
        out += [f"  warning: {m}" for m in self.mixed]
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
            found = sorted({p for pat in FITS_PATTERNS for p in glob.glob(os.path.join(item, pat))})
            if not found:
                raise DrizzlestackError(f"{item}: directory holds no FITS files ({', '.join(FITS_PATTERNS[:4])}, ...)")
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


def ingest_files(paths, store, chunk: int = 512, saturation: float | None = None,
                 progress=None) -> IngestReport:
    """Append FITS frames to a store (created if absent), one frame in memory at a time.

    Files already in the store (same absolute path) are left alone; unreadable files
    and files whose shape differs from the store's are skipped with a reason; nothing
    already in the store is touched. See :func:`ingest` for the parameters.
    """
    paths = expand_inputs(paths)
    store_path = str(store)  # a local path or an fsspec URL: never a Path (s3:// is not a folder)
    report = IngestReport()
    st: StackStore | None = None
    if StackStore.exists(store_path):
        st = StackStore.open(store_path)  # refuses anything that is not a store
    known = set(st.paths()) if st is not None else set()
    for i, path in enumerate(paths):
        if progress is not None:
            progress(i, len(paths), path)
        if path in known:
            report.already.append(path)
            continue
        try:
            frame = read_frame(path, saturation=saturation)
        except FrameReadError as exc:
            report.skipped.append((path, str(exc)))
            continue
        if st is None:
            st = StackStore.create(store_path, frame.data.shape, chunk=chunk)
        if frame.data.shape != st.frame_shape:
            report.skipped.append((path, f"{Path(path).name}: shape {frame.data.shape} differs from the "
                                         f"store's {st.frame_shape} (all frames must have one shape)"))
            continue
        status = frame_status(frame.data)
        st.append_frame(frame.data, path=path, exptime=frame.exptime,
                        header=frame.header.tostring(sep="\n"), status=status,
                        saturation=frame.saturation)
        known.add(path)
        report.added.append(path)
        if status != STATUS_OK:
            report.excluded.append((path, status))
    if st is not None and report.added:
        from .info import mixed_setups

        stack = open_stack(st)
        report.mixed = mixed_setups(stack["path"].values, stack["header"].values, stack["exptime"].values)
    if st is not None:
        steps = dict(st.attrs.get("steps", {}))
        steps["ingest"] = {"complete": True, "params": {"chunk": chunk, "saturation": saturation},
                           "summary": {"frames": st.n_frames, "paths": len(st.paths())}}
        st.attrs["steps"] = steps
    return report


def ingest(paths, store, chunk: int = 512, saturation: float | None = None) -> xr.Dataset:
    """Ingest FITS light frames into a stack store.

    Parameters
    ----------
    paths : str, path-like or sequence of them
        Files, directories (all FITS files in them) or glob patterns.
    store : str or path-like
        Store directory, or an fsspec URL (``s3://bucket/stack.zarr``); created on first use. An existing path that is not a
        drizzlestack store is refused and left untouched.
    chunk : int
        Spatial chunk size of the ``frames`` array in a new store.
    saturation : float, optional
        Saturation level (ADU) overriding the header ``SATURATE`` keyword and the
        integer type's maximum.

    Returns
    -------
    xarray.Dataset
        The store, opened lazily.

    Warns
    -----
    DrizzlestackWarning
        For every skipped file (with the reason), every frame ingested with a status
        other than ``ok``, and when the store's frames mix filters (``FILTER``),
        instruments (``INSTRUME``) or exposure times (naming the files).

    Raises
    ------
    StoreError
        ``store`` exists but is not a drizzlestack store.
    DrizzlestackError
        Nothing could be ingested into a new store.
    """
    report = ingest_files(paths, store, chunk=chunk, saturation=saturation)
    for _path, reason in report.skipped:
        warnings.warn(f"skipped {reason}", DrizzlestackWarning, stacklevel=2)
    for path, status in report.excluded:
        warnings.warn(f"{Path(path).name}: {status}", DrizzlestackWarning, stacklevel=2)
    for message in report.mixed:
        warnings.warn(f"{store}: {message}", DrizzlestackWarning, stacklevel=2)
    if not StackStore.exists(str(store)):
        raise DrizzlestackError(f"{store}: no frame could be ingested, store not created")
    return open_stack(store)
