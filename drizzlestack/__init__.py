"""drizzlestack: out-of-core drizzle integration of dithered, undersampled frames on Dask.

Public API (docs/design.md)::

    import drizzlestack as ds
    ds.ingest(paths, store)
    ds.register(store, reference="auto", model="homography", distortion=False)
    ds.integrate(store, rejection="winsorized", low=4.0, high=3.0, ...)
    ds.drizzle(store, scale=2.0, pixfrac=0.9, kernel="square", roi=None, output="drizzle.fits")
    ds.open_stack(store)
    ds.drizzle_array(data, pixmap, out_shape, kernel="square", pixfrac=1.0, weights=None)
    ds.reject_stack(stack, method="sigma", low=3.0, high=3.0)
    ds.advise(store)                      # will drizzle help? which scale and pixfrac?

The other functions are imported on first use, so the CLI starts faster.
"""

from ._version import __version__
from ._warnings import DrizzlestackError, DrizzlestackWarning, StoreError

# These share their names with submodules (drizzlestack.ingest, .simulate, .advise):
# importing the submodule would rebind the package attribute to the module, so they
# are bound eagerly, after their submodules load. ``drizzle`` is the sub-package itself,
# which runs the step when called (drizzlestack/drizzle/__init__.py), so that both
# ``ds.drizzle(store)`` and ``import drizzlestack.drizzle.kernels`` work.
from .ingest import ingest  # noqa: E402
from .simulate import simulate  # noqa: E402
from . import drizzle  # noqa: E402
from .advise import advise  # noqa: E402

_LAZY = {
    "open_stack": ("drizzlestack.store", "open_stack"),
    "register": ("drizzlestack.registration", "register"),
    "integrate": ("drizzlestack.integration", "integrate"),
    "reject_stack": ("drizzlestack.integration.rejection", "reject_stack"),
    "drizzle_array": ("drizzlestack.drizzle.array", "drizzle_array"),
    "write_report": ("drizzlestack.report", "write_report"),
}

__all__ = ["__version__", "DrizzlestackError", "DrizzlestackWarning", "StoreError", "ingest", "simulate",
           "drizzle", "advise", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'drizzlestack' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
