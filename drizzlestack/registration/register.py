"""Step 2, register: stars in every frame, matched to the reference, frame -> reference models.

The driver reads nothing but star tables into memory: detection runs as one Dask task
per frame (each task reads its own frame from the store), matching as one task per
frame against the reference's star table, both through :func:`drizzlestack.parallel.compute`
(the active scheduler, with its progress bar). Only the driver writes to the store.

Store variables written (docs/design.md): ``transform (frame, row, col)``, ``stars (frame,
star, field)`` with the ``field`` coordinate, ``n_stars``, ``n_matches``,
``registration_rms``, ``fwhm`` (frame), ``status`` of frames that fail
(``unregistered: <why>``), the root attribute ``reference`` and, with
``distortion=True``, the surface splines in ``distortion_*`` variables.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from .._warnings import DrizzlestackError, DrizzlestackWarning
from ..store import STATUS_OK, StackStore, open_stack
from .match import align_stars
from .models import MODELS, MIN_POINTS
from .stars import FIELDS, detect_stars
from ..mappings import DISTORTION_VARIABLES, _pack_correction

UNREGISTERED = "unregistered"
#: ``distortion_geometry`` columns: spline normalisation and fast-evaluation domain
GEOMETRY_FIELDS = ("centre_x", "centre_y", "length", "x0", "y0", "x1", "y1", "smoothing")


# ------------------------------------------------------------------- per-frame tasks
def _detect_task(store_path: str, index: int, saturation: float, threshold: float, max_stars: int,
                 cfa_pattern: str = "") -> dict:
    """Detect the stars of one frame (runs in a worker; reads only that frame).

    A colour mosaic is searched on its full-resolution luminance proxy (red and blue
    pixels replaced by the mean of their green neighbours, :func:`drizzlestack.cfa.luminance`):
    on the raw mosaic the filter pattern would bias centroids and split stars, and
    the star positions stay in the mosaic's own pixel coordinates."""
    try:
        st = StackStore.open(store_path, mode="r")
        if cfa_pattern:
            from ..cfa import luminance

            # the luminance proxy needs the mosaic's global levels: built whole
            data = luminance(st.frame(index), cfa_pattern)
        else:
            # read a band at a time: no task holds a frame (issue 12, 4096^2 frames)
            data = st.frame_rows(index)
        sl = detect_stars(data, saturation=saturation, threshold=threshold, max_stars=max_stars)
    except Exception as exc:  # one bad frame must not stop the run: report it as the frame's status
        return {"index": index, "error": f"star detection failed ({type(exc).__name__}: {exc})"}
    return {"index": index, "table": sl.table, "background": sl.background, "noise": sl.noise,
            "fwhm": sl.fwhm, "n_rejected": sl.n_rejected}


def _match_task(index: int, table: np.ndarray, ref_table: np.ndarray, frame_shape, options: dict) -> dict:
    """Register one frame's stars to the reference's (runs in a worker)."""
    try:
        al = align_stars(table, ref_table, frame_shape=frame_shape, **options)
    except Exception as exc:
        return {"index": index, "status": f"{UNREGISTERED}: matching failed ({type(exc).__name__}: {exc})"}
    out = {"index": index, "status": al.status, "n_matches": al.n_matches, "rms": al.rms,
           "matrix": al.matrix}
    if al.ok and al.correction is not None:
        out["distortion"] = _pack_correction(al.correction)
    return out


# ------------------------------------------------------------------- reference choice
def _resolve_reference(reference, paths: list[str], eligible: list[int]) -> int | None:
    """Index for an explicit ``reference`` (int or file name); ``None`` for "auto"."""
    if isinstance(reference, str) and reference == "auto":
        return None
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        i = int(reference)
        if not 0 <= i < len(paths):
            raise DrizzlestackError(f"reference={i}: the store has frames 0..{len(paths) - 1}")
    elif isinstance(reference, (str, Path)):
        name = str(reference)
        resolved = str(Path(name).expanduser().resolve())
        hits = [i for i, p in enumerate(paths) if p in (name, resolved)]
        if not hits:  # a bare file name
            hits = [i for i, p in enumerate(paths) if Path(p).name == Path(name).name]
        if len(hits) != 1:
            raise DrizzlestackError(f"reference={name!r}: {'no' if not hits else 'more than one'} frame of the "
                                    "store has that file name (give an index or the full path)")
        i = hits[0]
    else:
        raise DrizzlestackError(f"reference={reference!r}: expected 'auto', a frame index or a file name")
    if i not in eligible:
        raise DrizzlestackError(f"reference={reference!r}: frame {i} is excluded ({paths[i]})")
    return i


def _auto_order(cands: list[int], stats: dict) -> list[int]:
    """Candidates best first: most stars, smallest FWHM, lowest noise (sum of the three ranks;
    ties go to the earlier frame)."""
    n_stars = np.array([len(stats[i]["table"]) for i in cands], float)
    fwhm = np.array([stats[i]["fwhm"] if np.isfinite(stats[i]["fwhm"]) else np.inf for i in cands])
    noise = np.array([stats[i]["noise"] if np.isfinite(stats[i]["noise"]) else np.inf for i in cands])

    def rank(v):
        return np.argsort(np.argsort(v, kind="stable"), kind="stable")

    score = rank(-n_stars) + rank(fwhm) + rank(noise)
    return [cands[k] for k in np.lexsort((np.arange(len(cands)), score))]


# ------------------------------------------------------------------- the step
def register(store, reference="auto", model: str = "homography", distortion: bool = False, mirror: bool = False,
             min_matches: int = 6, threshold: float = 5.0, max_stars: int = 2000, scale_range=(0.8, 1.25),
             smoothing: float | str = "auto", force: bool = False) -> xr.Dataset:
    """Register every frame of a stack store to a reference frame on its stars.

    Parameters
    ----------
    store : str, path-like or StackStore
        The stack store (after ingest).
    reference : "auto", int or str
        The reference frame: ``"auto"`` picks the frame with the most stars, the
        smallest FWHM and the lowest noise (and falls back to the next candidate if it
        registers fewer than half of the frames, e.g. a frame of another field); an
        index; or a file name (as ingested, or its base name).
    model : {"homography", "affine", "similarity"}
        Frame -> reference model, refitted by weighted least squares on all matched stars.
    distortion : bool
        Add a smoothed thin-plate spline correction (in reference coordinates, after
        the model) for optical distortion, with its inverse.
    mirror : bool
        Accept frames mirrored relative to the reference (e.g. after a meridian flip
        on some mounts and cameras); otherwise they are excluded.
    min_matches : int
        Fewest matched stars for a frame to count as registered.
    threshold : float
        Detection threshold: signal-to-noise ratio of a star's peak in the frame
        filtered with a 3x3 matched filter (see
        :func:`~drizzlestack.registration.stars.detect_stars`).
    max_stars : int
        Most stars measured and kept per frame (the brightest).
    scale_range : (float, float)
        Accepted frame -> reference scale.
    smoothing : float or "auto"
        Spline smoothing; ``"auto"`` chooses it per frame by generalised cross-validation.
    force : bool
        Run even if the step already completed with the same parameters on the same frames.

    Returns
    -------
    xarray.Dataset
        The store, opened lazily (:func:`drizzlestack.open_stack`).

    Warns
    -----
    DrizzlestackWarning
        Listing the frames that could not be registered, and why.

    Raises
    ------
    DrizzlestackError
        Bad parameters, an unusable explicit reference, or no frame to register.
    """
    if model not in MODELS:
        raise DrizzlestackError(f"model={model!r}: expected one of {', '.join(MODELS)}")
    if int(min_matches) < MIN_POINTS[model]:
        raise DrizzlestackError(f"min_matches={min_matches}: a {model} needs at least {MIN_POINTS[model]}")
    st = store if isinstance(store, StackStore) else StackStore.open(store)
    n = st.n_frames
    if n == 0:
        raise DrizzlestackError(f"{st.path}: the store holds no frames (ingest some first)")
    paths = st.paths()
    params = {"reference": reference if not isinstance(reference, Path) else str(reference), "model": model,
              "distortion": bool(distortion), "mirror": bool(mirror), "min_matches": int(min_matches),
              "threshold": float(threshold), "max_stars": int(max_stars),
              "scale_range": [float(v) for v in scale_range], "smoothing": smoothing}
    inputs = {"frames": n, "paths": paths}
    if not force and st.is_current("register", params, inputs):
        return open_stack(st.path)

    statuses = [str(s) for s in st.group["status"][:n]]
    # Frames excluded by an earlier step (ingest) stay excluded; an earlier registration
    # failure is retried (the parameters may have changed).
    eligible = [i for i, s in enumerate(statuses) if s == STATUS_OK or s.startswith(UNREGISTERED)]
    if not eligible:
        raise DrizzlestackError(f"{st.path}: every frame is excluded; nothing to register")
    explicit = _resolve_reference(reference, paths, eligible)
    st.begin_step("register", params, inputs)

    from dask import delayed

    from ..parallel import compute

    saturation = np.asarray(st.group["saturation"][:n], dtype=np.float64)
    patterns = ([str(p) for p in st.group["cfa_pattern"][:n]] if "cfa_pattern" in st.group else [""] * n)
    tasks = [delayed(_detect_task, pure=True)(st.location, i, float(saturation[i]), float(threshold),
                                              int(max_stars), patterns[i], dask_key_name=f"register-detect-{i}")
             for i in eligible]
    detected = {r["index"]: r for r in compute(*tasks)}
    need = max(int(min_matches), MIN_POINTS[model])
    new_status = {}
    for i, r in detected.items():
        if "error" in r:
            new_status[i] = f"{UNREGISTERED}: {r['error']}"
        elif len(r["table"]) == 0:
            why = "blank frame" if not (np.isfinite(r["noise"]) and r["noise"] > 0) else "no star detected"
            new_status[i] = f"{UNREGISTERED}: {why}"
        elif len(r["table"]) < need:
            new_status[i] = f"{UNREGISTERED}: only {len(r['table'])} star(s) detected ({need} needed)"
    usable = [i for i in eligible if i not in new_status]
    if explicit is not None and explicit not in usable:
        raise DrizzlestackError(f"reference={reference!r}: frame {explicit} cannot serve as reference "
                                f"({new_status.get(explicit, 'no stars')})")
    if not usable:
        candidates = []
    elif explicit is not None:
        candidates = [explicit]
    else:
        candidates = _auto_order(usable, detected)[:3]

    options = {"model": model, "mirror": bool(mirror), "distortion": bool(distortion),
               "min_matches": int(min_matches), "scale_range": tuple(float(v) for v in scale_range),
               "smoothing": smoothing}
    best = None
    for ref in candidates:
        ref_table = delayed(detected[ref]["table"], name=f"register-reference-{ref}")
        tasks = [delayed(_match_task, pure=True)(i, detected[i]["table"], ref_table, st.frame_shape, options,
                                                 dask_key_name=f"register-match-{ref}-{i}")
                 for i in usable if i != ref]
        results = {r["index"]: r for r in compute(*tasks)}
        n_ok = sum(r["status"] == STATUS_OK for r in results.values())
        if best is None or n_ok > best[1]:
            best = (ref, n_ok, results)
        # An auto reference that registers fewer than half of the frames is probably the
        # odd one out (another field, a hazy frame): try the next candidate.
        if explicit is not None or n_ok >= 0.5 * (len(usable) - 1):
            break

    ref, _n_ok, results = best if best is not None else (None, 0, {})
    _write_results(st, n, eligible, detected, new_status, results, ref, distortion)
    excluded = {i: s for i, s in _final_statuses(st, n).items() if s != STATUS_OK}
    rms = [r["rms"] for r in results.values() if r["status"] == STATUS_OK]
    st.end_step("register", reference=ref, registered=len(eligible) - sum(i in excluded for i in eligible),
                excluded={str(i): s for i, s in excluded.items()},
                median_rms=float(np.median(rms)) if rms else None)
    failed = [i for i in eligible if i in excluded]
    if failed:
        lines = "\n".join(f"  frame {i} ({Path(paths[i]).name}): {excluded[i]}" for i in failed)
        warnings.warn(f"{len(failed)} of {len(eligible)} frame(s) not registered:\n{lines}", DrizzlestackWarning,
                      stacklevel=2)
    return open_stack(st.path)


def _final_statuses(st: StackStore, n: int) -> dict:
    return {i: str(s) for i, s in enumerate(st.group["status"][:n])}


def _write_results(st: StackStore, n: int, eligible, detected, new_status, results, ref, distortion) -> None:
    """Write everything the step produced (driver side, after all tasks finished)."""
    transform = np.full((n, 3, 3), np.nan)
    n_stars = np.full(n, np.nan)
    n_matches = np.full(n, np.nan)
    rms = np.full(n, np.nan)
    fwhm = np.full(n, np.nan)
    max_n = max([1] + [len(r.get("table", ())) for r in detected.values()])
    stars = np.full((n, max_n, len(FIELDS)), np.nan, dtype=np.float32)
    for i, r in detected.items():
        if "table" in r:
            stars[i, : len(r["table"])] = r["table"]
            n_stars[i] = len(r["table"])
            fwhm[i] = r["fwhm"]
    status = dict(new_status)
    if ref is None:
        for i in eligible:
            status.setdefault(i, f"{UNREGISTERED}: no usable reference frame")
    else:
        transform[ref] = np.eye(3)
        n_matches[ref] = n_stars[ref]
        rms[ref] = 0.0
        status[ref] = STATUS_OK
        for i, r in results.items():
            status[i] = r["status"]
            if r["status"] == STATUS_OK:
                transform[i] = r["matrix"]
                n_matches[i] = r["n_matches"]
                rms[i] = r["rms"]
            elif r.get("n_matches"):
                n_matches[i] = r["n_matches"]
    st.write_variable("field", np.array(FIELDS), ("field",))
    st.write_variable("stars", stars, ("frame", "star", "field"), chunks=(1, max_n, len(FIELDS)),
                      attrs={"fields": list(FIELDS),
                             "flags": {"saturated": 1, "blended": 2, "truncated": 4, "no_fit": 8},
                             "description": "detected stars, brightest first, NaN-padded"})
    st.write_variable("transform", transform, ("frame", "transform_row", "transform_col"),
                      attrs={"description": "frame -> reference homography on [x, y, 1]; NaN if unregistered"})
    st.write_variable("n_stars", n_stars, ("frame",))
    st.write_variable("n_matches", n_matches, ("frame",))
    st.write_variable("registration_rms", rms, ("frame",), attrs={"units": "px"})
    st.write_variable("fwhm", fwhm, ("frame",), attrs={"units": "px"})
    _write_distortion(st, n, results if ref is not None else {}, distortion)
    if eligible:  # one write (per frame, ~2 ms each through zarr)
        statuses = np.array([str(v) for v in st.group["status"][:n]], dtype=object)
        for i in eligible:
            statuses[i] = status.get(i, STATUS_OK)
        st.set_frame_values("status", slice(0, n), statuses)
    st.attrs["reference"] = None if ref is None else int(ref)


def _write_distortion(st: StackStore, n: int, results: dict, distortion: bool) -> None:
    st.delete_variables(*DISTORTION_VARIABLES)  # never leave a stale model from an earlier run
    if not distortion:
        return
    packs = {i: r["distortion"] for i, r in results.items() if r["status"] == STATUS_OK and "distortion" in r}
    m = max([1] + [len(p["points"]) for p in packs.values()] + [len(p["inverse_points"]) for p in packs.values()])
    arrays = {"points": np.full((n, m, 2), np.nan), "coeffs": np.full((n, m, 2), np.nan),
              "affine": np.full((n, 3, 2), np.nan), "inverse_points": np.full((n, m, 2), np.nan),
              "inverse_coeffs": np.full((n, m, 2), np.nan), "inverse_affine": np.full((n, 3, 2), np.nan),
              "geometry": np.full((n, len(GEOMETRY_FIELDS)), np.nan)}
    for i, p in packs.items():
        for key, arr in arrays.items():
            arr[i, : len(p[key])] = p[key]
    dims = {"points": ("frame", "distortion_point", "xy"), "coeffs": ("frame", "distortion_point", "xy"),
            "affine": ("frame", "distortion_term", "xy"), "geometry": ("frame", "distortion_field")}
    for key, arr in arrays.items():
        base = key.replace("inverse_", "")
        st.write_variable(f"distortion_{key}", arr, dims[base], chunks=(1,) + arr.shape[1:],
                          attrs={"fields": list(GEOMETRY_FIELDS)} if key == "geometry" else None)
    st.attrs["distortion"] = {
        "model": "thin-plate surface spline on reference coordinates after the homography",
        "kernel": "r^2 log r on q = (p - centre) / length",
        "forward": "x_ref = H(x) + f(H(x)); f(q) = a0 + a1 qx + a2 qy + sum c_i phi(|q - q_i|)",
        "inverse": "start x + g(x) from the inverse spline, polished by u <- x - f(u)",
    }
