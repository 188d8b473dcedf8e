"""Where a stack store lives: a local directory or an fsspec URL (``s3://``, ``gs://``, ...).

Every step passes the store's *location* -- a plain string, picklable, the same on every
worker -- and opens the zarr store from it here: a local path as zarr's ``LocalStore``
(where :mod:`.chunkio` may bypass zarr for speed), a URL as zarr's ``FsspecStore``.

A URL is never turned into a :class:`pathlib.Path`: ``Path("s3://bucket/stack.zarr")``
is the local folder ``s3:/bucket/stack.zarr``, and the steps once "succeeded" writing a
whole store there, next to the user, with nothing reaching the bucket.

Credentials and endpoints come from the environment or fsspec's configuration, never
from the command line, so every Dask worker (a SLURM job included) finds them the same
way: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` for ``s3://``,
or any ``FSSPEC_<PROTOCOL>_<OPTION>`` variable (e.g. ``FSSPEC_S3_ANON=true``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ._warnings import StoreError

#: zarr's concurrent requests per read or write of many chunks, for remote stores
#: (zarr's default, 10, leaves an object store's latency unhidden; S3 serves thousands
#: of requests per second per prefix). An explicit zarr setting is kept.
REMOTE_CONCURRENCY = 64

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(location) -> bool:
    """Whether ``location`` is an fsspec URL (``protocol://...``) rather than a local path."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def normalize(location) -> str:
    """The store's location as tasks receive it: a URL without its trailing slash, or an
    absolute local path (``file://`` URLs included)."""
    if isinstance(location, str) and location.startswith("file://"):
        location = location[len("file://"):]
    if is_url(location):
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def display(location):
    """``location`` as shown in messages and kept in ``StackStore.path``: a URL stays a
    string, a local path becomes a :class:`~pathlib.Path` (as given, not resolved)."""
    if isinstance(location, str) and location.startswith("file://"):
        location = location[len("file://"):]
    return location.rstrip("/") if is_url(location) else Path(location)


def filesystem(url: str):
    """The fsspec filesystem and path of ``url``.

    Raises
    ------
    StoreError
        The protocol is unknown, or its implementation is not installed (the message
        names the package, e.g. ``s3fs`` for ``s3://``).
    """
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise StoreError(f"{url}: stores at a URL need the package 'fsspec' (and one for {protocol}://, "
                         f"e.g. s3fs): pip install 'drizzlestack[s3]'") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        spec = known_implementations.get(protocol, {})
        package = spec.get("class", protocol).split(".")[0]
        extra = " (or pip install 'drizzlestack[s3]')" if protocol in ("s3", "s3a") else ""
        raise StoreError(f"{url}: the {protocol}:// protocol needs the package '{package}', which is not "
                         f"installed: pip install {package}{extra}") from None
    except ValueError:
        raise StoreError(f"{url}: unknown protocol {protocol}:// (fsspec knows "
                         f"{', '.join(sorted(known_implementations)[:12])}, ...)") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:  # a dependency of the implementation itself is missing
        raise StoreError(f"{url}: the {protocol}:// protocol cannot be used ({exc})") from None
    # zarr writes through its own (asynchronous) instance: listings cached by this one
    # would say a store just written is not there.
    fs.invalidate_cache()
    return fs, path


def _configure_remote_io() -> None:
    import zarr

    if zarr.config.get("async.concurrency") == 10 and "ZARR_ASYNC__CONCURRENCY" not in os.environ:
        zarr.config.set({"async.concurrency": REMOTE_CONCURRENCY})


def zarr_store(location: str, name: str | None = None, read_only: bool = False):
    """The zarr store (or store root) for ``location``, optionally at sub-path ``name``:
    a path string for a local store, an ``FsspecStore`` for a URL."""
    if not is_url(location):
        return os.path.join(location, name) if name else location
    from zarr.storage import FsspecStore

    filesystem(location)  # a clear error for a missing protocol
    _configure_remote_io()
    url = f"{location.rstrip('/')}/{name}" if name else location
    return FsspecStore.from_url(url, read_only=read_only)


def exists(location: str) -> bool:
    """Whether anything is at ``location`` (a URL prefix with objects under it counts)."""
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(location)
    return bool(fs.exists(path))


def is_file(location: str) -> bool:
    if not is_url(location):
        return Path(location).is_file()
    fs, path = filesystem(location)
    return bool(fs.isfile(path))


def is_empty(location: str) -> bool:
    """Whether ``location`` is absent or an empty directory (nothing under a URL prefix)."""
    if not is_url(location):
        p = Path(location)
        return not p.exists() or (p.is_dir() and not any(p.iterdir()))
    fs, path = filesystem(location)
    if fs.isfile(path):
        return False
    try:
        return not fs.ls(path, detail=False)
    except FileNotFoundError:
        return True


def modified(location: str, name: str) -> int | None:
    """Modification time (ns) of ``name/zarr.json`` in a local store: it changes when
    the array is rewritten; ``None`` when it cannot be had."""
    try:
        return os.stat(os.path.join(location, name, "zarr.json")).st_mtime_ns
    except OSError:
        return None
