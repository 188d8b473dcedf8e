"""The frame -> reference mappings as the registration stored them: written by
:func:`drizzlestack.register`, read back by every step below it (the registered view,
the outlier flags, drizzle, the advisor), so that those never import the registration
step itself.

A mapping is the stored homography, plus the surface-spline correction (forward and
inverse) when the registration fitted one (docs/design.md, "Store layout").
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._warnings import DrizzlestackError
from .geometry import FrameMapping
from .store import StackStore

__all__ = ["frame_mapping", "frame_mappings"]


def _pack_correction(corr) -> dict:
    """A :class:`~.registration.models.DistortionCorrection` as the arrays the store keeps."""
    f, g = corr.forward_spline, corr.inverse_spline
    x0, y0, x1, y1 = f.domain if f.domain is not None else (np.nan,) * 4
    return {"points": f.points, "coeffs": f.coeffs, "affine": f.affine,
            "inverse_points": g.points, "inverse_coeffs": g.coeffs, "inverse_affine": g.affine,
            "geometry": np.array([f.centre[0], f.centre[1], f.length, x0, y0, x1, y1,
                                  f.smoothing if f.smoothing is not None else np.nan])}


def _unpack_correction(points, coeffs, affine, ipoints, icoeffs, iaffine, geometry):
    # Imported here: importing this module must not import the registration package
    # (which imports this module).
    from .registration.models import DistortionCorrection, SurfaceSpline

    cx, cy, length, x0, y0, x1, y1, lam = (float(v) for v in geometry)
    domain = None if not np.isfinite(x0) else (x0, y0, x1, y1)
    n = int(np.sum(np.all(np.isfinite(points), axis=1)))
    m = int(np.sum(np.all(np.isfinite(ipoints), axis=1)))
    fwd = SurfaceSpline(points[:n], coeffs[:n], affine, (cx, cy), length, domain)
    inv = SurfaceSpline(ipoints[:m], icoeffs[:m], iaffine, (cx, cy), length, domain)
    fwd.smoothing = inv.smoothing = lam
    return DistortionCorrection(fwd, inv)


_MAPPING_CACHE: dict = {}
_MAPPING_CACHE_SIZE = 64  # a spline's evaluation lattice is ~1 MB per 4 Mpx touched


def frame_mapping(ds_or_store, i: int, distortion: bool = True) -> FrameMapping:
    """The frame -> reference mapping of frame ``i``, as stored by :func:`register`.

    Parameters
    ----------
    ds_or_store : xarray.Dataset, StackStore, str or path-like
        The stack store, or the dataset :func:`drizzlestack.open_stack` returned.
    i : int
        Frame index (the ``frame`` coordinate).
    distortion : bool
        Include the surface-spline correction when the store has one.

    Returns
    -------
    geometry.FrameMapping
        ``forward`` maps frame pixels to reference pixels, ``inverse`` back.
        Mappings are cached per process (the spline's evaluation lattice is reused
        across calls), keyed by the stored model itself.

    Raises
    ------
    DrizzlestackError
        The store was not registered, or frame ``i`` is not registered.
    """
    get, steps = _reader(ds_or_store, i)
    return _mapping(get, steps, i, distortion)


def frame_mappings(st: StackStore, indices, distortion: bool = True) -> list[FrameMapping]:
    """:func:`frame_mapping` of each frame in ``indices``, every stored variable read once
    for all of them (per frame and variable, a read through zarr costs ~1 ms)."""
    indices = [int(i) for i in indices]
    n = st.n_frames
    for i in indices:
        if not 0 <= i < n:
            raise DrizzlestackError(f"frame {i}: the store has frames 0..{n - 1}")
    names = ("transform", "status") + (DISTORTION_VARIABLES if distortion else ())
    present = set(st.group.array_keys())
    loaded = {name: np.asarray(st.group[name][:n]) for name in names if name in present}
    steps = dict(st.attrs.get("steps", {}))
    return [_mapping(lambda name, i=i: loaded[name][i] if name in loaded else None, steps, i, distortion)
            for i in indices]


#: the spline's stored variables (:func:`_pack_correction`, one row per frame)
DISTORTION_VARIABLES = ("distortion_points", "distortion_coeffs", "distortion_affine", "distortion_inverse_points",
                        "distortion_inverse_coeffs", "distortion_inverse_affine", "distortion_geometry")


def _mapping(get, steps: dict, i: int, distortion: bool) -> FrameMapping:
    if get("transform") is None:
        raise DrizzlestackError("the store has no registration (run 'drizzlestack register' first)")
    matrix = np.asarray(get("transform"), dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        status = get("status")
        raise DrizzlestackError(f"frame {i} is not registered ({status})")
    use_spline = distortion and get("distortion_points") is not None
    key = (matrix.tobytes(), use_spline, str(steps.get("register", {}).get("finished")))
    if key in _MAPPING_CACHE:
        return _MAPPING_CACHE[key]
    mapping = FrameMapping(matrix)
    if use_spline:
        pts = np.asarray(get("distortion_points"), dtype=np.float64)
        if np.any(np.isfinite(pts)):
            corr = _unpack_correction(pts, np.asarray(get("distortion_coeffs")), np.asarray(get("distortion_affine")),
                                      np.asarray(get("distortion_inverse_points")),
                                      np.asarray(get("distortion_inverse_coeffs")),
                                      np.asarray(get("distortion_inverse_affine")),
                                      np.asarray(get("distortion_geometry")))
            mapping = FrameMapping(matrix, corr.forward, corr.inverse)
    if len(_MAPPING_CACHE) >= _MAPPING_CACHE_SIZE:
        _MAPPING_CACHE.pop(next(iter(_MAPPING_CACHE)))
    _MAPPING_CACHE[key] = mapping
    return mapping


def _reader(ds_or_store, i):
    """``get(name)`` -> frame ``i``'s value of variable ``name`` (or None), and the step records."""
    if isinstance(ds_or_store, xr.Dataset):
        ds = ds_or_store

        def get(name):
            if name not in ds.variables:
                return None
            var = ds[name]
            var = var.sel(frame=i) if "frame" in var.coords else var.isel(frame=i)
            return var.values

        return get, ds.attrs.get("steps", {})
    st = ds_or_store if isinstance(ds_or_store, StackStore) else StackStore.open(ds_or_store, mode="r")
    if not 0 <= int(i) < st.n_frames:
        raise DrizzlestackError(f"frame {i}: the store has frames 0..{st.n_frames - 1}")

    def get(name):
        return st.group[name][int(i)] if name in st.group else None

    return get, dict(st.attrs.get("steps", {}))
