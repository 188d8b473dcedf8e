"""What the tiled steps share: integrate, drizzle, the registered view (and advise,
which judges a drizzle before it runs).

Each of these steps works on a registered store, takes a set of frames, a region of the
reference frame, and (integrate, drizzle) cuts its output into tiles that are written
into the store one Dask task each, recorded in a tile ledger so that an interrupted run
resumes. This module owns the rules they must agree on, once:

- **is it registered** (:func:`require_registration`): a ``transform`` variable, a
  reference frame in the store, and a register step that completed (a store whose
  transforms were written without a step record, by hand, counts as registered). One
  exception type, :class:`~drizzlestack.StoreError`, with one message naming the store
  and the command to run.
- **which frames** (:func:`select_frames`): by default every frame with status ``ok``
  and a finite transform; a frame asked for explicitly whose status is not ``ok`` is
  left out with its reason; an index outside the store is refused.
- **the region of interest** (:func:`clip_roi`): an ROI ``(x0, y0, width, height)`` in
  reference pixels that reaches beyond the reference frame is *clipped* to it, with a
  :class:`~drizzlestack.DrizzlestackWarning` naming the requested and the clipped ROI;
  a malformed ROI, or one with nothing left inside the frame, is refused. Why clip
  rather than refuse: both steps' grids are the reference frame (integrate's is that
  grid itself, drizzle's a finer copy of it), so nothing outside it is ever computed --
  the clipped ROI gives exactly the window of the full run that the requested one
  overlaps, which is what a user drawing a box at the frame's edge wants, and the
  warning says what was done. Refusing instead made the user work out the frame size
  and retype the box. Integrate still requires whole pixels: its output pixels *are*
  the reference pixels.
- **the tile ledger** (:func:`start_or_resume`, :func:`run_tiles`): start a pass's
  ledger afresh (deleting the old products first, creating the ledger last, so a
  ledger present always belongs to the products next to it), or resume it with a
  warning saying how many tiles were done; every tile is one Dask task, and a tile the
  ledger holds as finished returns its ledger row without recomputing.
- **the output WCS** (:func:`celestial_wcs`, :func:`reference_wcs`): the reference
  frame's header parsed and its celestial WCS extracted, or ``None`` when it has none
  or it cannot be read (a malformed camera WCS never stops an output). Each step then
  carries it onto its own grid (integrate: sliced to the ROI, SIP kept; drizzle:
  rescaled, SIP dropped).

It sits below the steps: it imports the store, never integrate or drizzle.
"""

from __future__ import annotations

import uuid
import warnings

import dask.array as da
from dask.highlevelgraph import HighLevelGraph
import numpy as np

from ._warnings import DrizzlestackError, DrizzlestackWarning, StoreError
from .parallel import compute
from .store import STATUS_OK, StackStore


# ------------------------------------------------------------------- registration
def require_registration(st: StackStore) -> int:
    """The reference frame of a registered store, or :class:`StoreError` saying how to
    register it.

    Parameters
    ----------
    st : StackStore

    Returns
    -------
    int
        The index of the reference frame.

    Raises
    ------
    StoreError
        No ``transform`` or reference frame, the register step did not complete, or the
        reference frame is not in the store.
    """
    rec = st.step("register")
    reason = None
    if "transform" not in st.group or st.attrs.get("reference") is None:
        reason = ""
    elif rec is not None and not rec.get("complete", False):
        reason = " (the registration did not complete)"
    elif not 0 <= int(st.attrs["reference"]) < st.n_frames:
        reason = f" (reference frame {st.attrs['reference']} is not in the store of {st.n_frames} frames)"
    if reason is not None:
        raise StoreError(f"{st.path}: the frames are not registered{reason}; "
                         f"run 'drizzlestack register {st.path}' first")
    return int(st.attrs["reference"])


# ------------------------------------------------------------------------- frames
def select_frames(st: StackStore, frames=None, *, refuse_unregistered: bool = False, step: str | None = None,
                  stacklevel: int = 2) -> tuple[list[int], dict[int, str]]:
    """The frames a tiled step takes, and why the others are left out.

    Parameters
    ----------
    st : StackStore
    frames : sequence of int, optional
        Frames asked for; default every frame with status ``ok`` and a finite transform.
    refuse_unregistered : bool
        Refuse a frame asked for explicitly that has no transform (drizzle), instead of
        leaving it out with its reason (integrate).
    step : str, optional
        For a step that reports its selection at once (drizzle, advise): the name in the
        messages. Frames asked for explicitly and left out are then warned, and an empty
        selection is refused. Without it the caller reports ``excluded`` itself.
    stacklevel : int
        Of those warnings, as the caller would give it to :func:`warnings.warn`.

    Returns
    -------
    chosen : list of int
        In the order asked (store order by default).
    excluded : dict
        Frame index -> reason, for every frame considered and left out (by default every
        frame of the store that is not usable).

    Raises
    ------
    DrizzlestackError
        An index outside the store; with ``refuse_unregistered`` a frame asked for
        without a registration; with ``step`` no frame left.
    """
    n = st.n_frames
    status = [str(s) for s in st.group["status"][:n]]
    if "transform" in st.group:
        transform = np.asarray(st.group["transform"][:n], dtype=np.float64)
    else:
        transform = np.full((n, 3, 3), np.nan)
    asked = range(n) if frames is None else [int(i) for i in frames]
    chosen: list[int] = []
    excluded: dict[int, str] = {}
    for i in asked:
        if not 0 <= i < n:
            raise DrizzlestackError(f"frames: index {i} out of range (the store has {n} frames: 0..{n - 1})")
        registered = bool(np.all(np.isfinite(transform[i])))
        if refuse_unregistered and frames is not None and not registered:
            raise DrizzlestackError(f"frames: frame {i} has no registration ({status[i] or 'no status'})")
        if status[i] != STATUS_OK:
            excluded[i] = status[i] or "no status"
        elif not registered:
            excluded[i] = "unregistered: no transform"
        else:
            chosen.append(i)
    if step is not None:
        if frames is not None:
            for i, why in excluded.items():
                warnings.warn(f"frame {i} excluded from the {step}: {why}", DrizzlestackWarning,
                              stacklevel=stacklevel + 1)
        if not chosen:
            why = "; ".join(f"{i}: {s}" for i, s in enumerate(status)) or "the store has no frames"
            raise DrizzlestackError(f"{st.path}: every frame is excluded, nothing to {step} ({why})")
    return chosen, excluded


# ---------------------------------------------------------------------------- ROI
def clip_roi(roi, frame_shape, *, whole_pixels: bool = False, stacklevel: int = 2):
    """An ROI clipped to the reference frame (see the module docstring for why).

    Parameters
    ----------
    roi : (x0, y0, width, height) or None
        In reference pixels.
    frame_shape : (ny, nx)
        Of the reference frame.
    whole_pixels : bool
        Require (and return) integers: integrate's grid is the reference grid.
    stacklevel : int
        Of the warning, as the caller would give it to :func:`warnings.warn`.

    Returns
    -------
    tuple or None
        ``(x0, y0, width, height)`` inside the frame (floats, or ints with
        ``whole_pixels``); ``None`` for ``roi=None``.

    Warns
    -----
    DrizzlestackWarning
        The ROI reaches beyond the frame: it names the requested and the clipped ROI.

    Raises
    ------
    DrizzlestackError
        Not four finite numbers, a width or height that is not positive, fractions of a
        pixel with ``whole_pixels``, or nothing of it inside the frame.
    """
    if roi is None:
        return None
    ny, nx = (int(v) for v in frame_shape)
    try:
        x0, y0, w, h = (float(v) for v in roi)
    except (TypeError, ValueError):
        raise DrizzlestackError(f"roi={roi!r}: expected (x0, y0, width, height) in reference pixels") from None
    if not all(np.isfinite(v) for v in (x0, y0, w, h)):
        raise DrizzlestackError(f"roi={roi!r}: expected (x0, y0, width, height) in reference pixels (finite numbers)")
    if w <= 0 or h <= 0:
        raise DrizzlestackError(f"roi={roi!r}: width and height must be positive")
    if whole_pixels and not all(v.is_integer() for v in (x0, y0, w, h)):
        raise DrizzlestackError(f"roi={roi!r}: the integration grid is the reference grid; use whole pixels")
    cx0, cy0 = max(x0, 0.0), max(y0, 0.0)
    cx1, cy1 = min(x0 + w, float(nx)), min(y0 + h, float(ny))
    if cx0 >= cx1 or cy0 >= cy1:
        raise DrizzlestackError(f"roi={roi!r}: wholly outside the reference frame ({nx} x {ny} px)")
    number = int if whole_pixels else float
    requested = tuple(number(v) for v in (x0, y0, w, h))
    clipped = tuple(number(v) for v in (cx0, cy0, cx1 - cx0, cy1 - cy0))
    if clipped != requested:
        warnings.warn(f"roi={requested} extends beyond the reference frame ({nx} x {ny} px); clipped to {clipped}",
                      DrizzlestackWarning, stacklevel=stacklevel + 1)
    return clipped


# ----------------------------------------------------------------------- ledgers
def finished_tiles(done: np.ndarray) -> np.ndarray:
    """``(ny_tiles, nx_tiles)`` bool: the tiles a ledger holds as finished (a tile task
    writes its whole row at once, after the tile's products)."""
    return np.all(np.isfinite(done), axis=-1)


def start_or_resume(st: StackStore, step: str, params: dict, inputs: dict, *, tiles, width: int, tile: int,
                    products, create, ledger: str | None = None, resumable: bool = True, what: str,
                    part: str = "", stacklevel: int = 2) -> np.ndarray:
    """The tile ledger of one tiled pass: resumed from an interrupted run, or started afresh.

    Parameters
    ----------
    st : StackStore
    step, params, inputs
        The step's record: a ledger is resumed only when the step was begun with these
        parameters and inputs and did not complete (:meth:`StackStore.resume_tiles`).
    tiles : (int, int)
        Tiles along y and x.
    width : int
        Values a tile records.
    tile : int
        Tile size the ledger was made for (another size starts afresh).
    products : sequence of str
        The pass's store variables: all must be there to resume; deleted to start afresh.
    create : callable
        Called with no argument to create the products afresh (after the old ones and
        the ledger were deleted, before the new ledger exists).
    ledger : str, optional
        The pass's ledger name (default the step's): ``{ledger}_tiles``.
    resumable : bool
        ``False`` when the caller already knows the run starts afresh (a step whose
        record it has just begun again would look resumable here).
    what, part : str
        The warning's words: "resuming an interrupted {what} (n of N tiles{part} already
        done)", e.g. ``"integration"`` and ``" of its model pass"``.
    stacklevel : int
        Of the warning, as the caller would give it to :func:`warnings.warn`.

    Returns
    -------
    (ny_tiles, nx_tiles, width) float64
        NaN rows: tiles still to do.

    Warns
    -----
    DrizzlestackWarning
        Resuming with tiles still to do: how many were already done.
    """
    name = ledger or step
    done = st.resume_tiles(step, params, inputs, tiles, width, tile, products, ledger=name) if resumable else None
    if done is None:
        # The ledger is created last: a ledger present for this step's record always
        # belongs to the products next to it.
        st.delete_variables(*products, f"{name}_tiles")
        create()
        return st.start_tiles(name, tiles, width, tile)
    n_done, total = int(finished_tiles(done).sum()), int(done.shape[0] * done.shape[1])
    if n_done < total:
        warnings.warn(f"{st.path}: resuming an interrupted {what} ({n_done} of {total} tiles{part} already done)",
                      DrizzlestackWarning, stacklevel=stacklevel + 1)
    return done


def run_tiles(task, plan, tiles, width: int) -> np.ndarray:
    """Run ``task(plan, iy, ix)`` for every tile, one Dask task each, on the active scheduler.

    ``task`` writes its tile's products into the store, records the tile in the ledger
    and returns the ledger row (``width`` values). A tile that ``plan.done`` (the ledger
    at the start, or ``None``) holds as finished returns its row without running.

    Returns
    -------
    (ny_tiles, nx_tiles, width) float64
        The rows of every tile.
    """
    # The plan rides inside every task, not as a task of its own: a distributed
    # scheduler would run every tile on the worker that holds that task. The graph is
    # written out with a unique name: map_blocks tokenized the plan (frames, mappings,
    # arrays) for ~10 ms a pass, for a name nothing ever shares (each pass runs once).
    ny, nx = int(tiles[0]), int(tiles[1])
    name = f"{getattr(task, '__name__', 'tile')}-{uuid.uuid4().hex}"
    graph = {(name, iy, ix, 0): (_tile_block, task, plan, iy, ix) for iy in range(ny) for ix in range(nx)}
    rows = da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name,
                    chunks=((1,) * ny, (1,) * nx, (int(width),)), dtype=np.float64,
                    meta=np.empty((0, 0, 0), np.float64))
    (per_tile,) = compute(rows)
    return np.asarray(per_tile)


def _tile_block(task, plan, iy: int, ix: int):
    done = plan.done
    if done is not None and np.all(np.isfinite(done[iy, ix])):
        return np.asarray(done[iy, ix], np.float64)[None, None, :]  # finished before an interruption
    return np.asarray(task(plan, iy, ix), np.float64)[None, None, :]


# --------------------------------------------------------------------------- WCS
def celestial_wcs(header_text: str):
    """The celestial WCS of a FITS header (text, one card a line), or ``None`` when it
    has none or cannot be read (a malformed WCS in a camera header must not stop the
    output).

    Returns
    -------
    astropy.wcs.WCS or None
    """
    if "CTYPE" not in str(header_text):
        return None  # no celestial axes (most camera frames): spares importing astropy.wcs (0.4 s)
    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's notes on non-standard camera headers
            wcs = WCS(fits.Header.fromstring(str(header_text), sep="\n"))
            return wcs.celestial if wcs.has_celestial else None
    except Exception:
        return None


def reference_wcs(st: StackStore):
    """The reference frame's celestial WCS (:func:`celestial_wcs`), or ``None``."""
    ref = st.attrs.get("reference")
    if ref is None or not 0 <= int(ref) < st.n_frames:
        return None
    return celestial_wcs(str(st.group["header"][int(ref)]))
