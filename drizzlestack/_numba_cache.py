"""Where numba keeps the compiled kernels (``cache=True``) when next to the sources
will not do.

numba writes its cache into ``__pycache__`` next to the package's modules. On a cluster
the package often sits on a read-only or shared file system (a site-wide install, a
container image, an NFS home): a read-only one makes numba fall back to a directory it
picks, and a shared one is written by every node at once. When ``NUMBA_CACHE_DIR`` is
not set and the package's own ``__pycache__`` cannot be written, this sets it to
``$XDG_CACHE_HOME/drizzlestack/numba`` (``~/.cache/...``), or a directory in ``TMPDIR``
when that is not writable either. Every Dask worker imports the package and so makes
the same choice. To pick the place yourself (e.g. node-local scratch in a SLURM job's
prologue: ``export NUMBA_CACHE_DIR=$TMPDIR/numba``), set ``NUMBA_CACHE_DIR``: it always wins.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (created if missing); a real try,
    since ``os.access`` says yes to root on a read-only mount."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".drizzlestack-probe-"):
            pass
        return True
    except OSError:
        return False


def choose_cache_dir(package_dir, environ=os.environ) -> str | None:
    """The ``NUMBA_CACHE_DIR`` to set, or ``None`` to leave numba alone (the user set it,
    or the package's ``__pycache__`` is writable)."""
    if environ.get("NUMBA_CACHE_DIR"):
        return None
    if _writable(Path(package_dir) / "__pycache__"):
        return None
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for candidate in (base / "drizzlestack" / "numba",
                      Path(tempfile.gettempdir()) / f"drizzlestack-numba-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        if _writable(candidate):
            return str(candidate)
    return None


def configure() -> None:
    """Set ``NUMBA_CACHE_DIR`` for this process if needed (called on import of the package)."""
    path = choose_cache_dir(Path(__file__).resolve().parent)
    if path is None:
        return
    os.environ["NUMBA_CACHE_DIR"] = path
    import sys

    if "numba" in sys.modules:  # numba read its configuration when it was imported
        from numba.core import config

        config.reload_config()
