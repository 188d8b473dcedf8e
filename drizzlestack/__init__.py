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

Every function is imported on first use: ``import drizzlestack`` (and the CLI) loads
only what a command needs (``python -X importtime -c "import drizzlestack.cli"``).
"""

import sys as _sys
import types as _types

from ._version import __version__
from ._warnings import DrizzlestackError, DrizzlestackWarning, StoreError
from . import _numba_cache

_numba_cache.configure()  # before any kernel module imports numba: a writable cache directory

_LAZY = {
    "ingest": ("drizzlestack.ingest", "ingest"),
    "simulate": ("drizzlestack.simulate", "simulate"),
    # The sub-package itself, which runs the step when called (drizzle/__init__.py): a
    # function of that name would make ``import drizzlestack.drizzle.kernels`` fail.
    "drizzle": ("drizzlestack.drizzle", None),
    "advise": ("drizzlestack.advise", "advise"),
    "open_stack": ("drizzlestack.store", "open_stack"),
    "register": ("drizzlestack.registration", "register"),
    "integrate": ("drizzlestack.integration", "integrate"),
    "reject_stack": ("drizzlestack.integration.rejection", "reject_stack"),
    "drizzle_array": ("drizzlestack.drizzle.array", "drizzle_array"),
    "write_report": ("drizzlestack.report", "write_report"),
}
# Functions that share their names with submodules (drizzlestack.ingest, .simulate,
# .advise).
_SHADOWED = ("ingest", "simulate", "advise")

__all__ = ["__version__", "DrizzlestackError", "DrizzlestackWarning", "StoreError", *_LAZY]


class _Package(_types.ModuleType):
    """The package module. Importing a submodule binds it as an attribute of its
    package, which would replace the functions ``ingest``, ``simulate`` and ``advise``
    by their modules; this keeps the functions (the modules stay in ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'drizzlestack' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
