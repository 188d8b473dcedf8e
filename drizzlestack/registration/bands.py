"""Frames read a band of rows at a time for star detection, and the stamps it gathers.

:mod:`.stars` never holds a frame: it reads bands (:class:`ArrayRows` for an in-memory
frame, :class:`drizzlestack.store.FrameRows` for a stored one) into one set of reused
buffers (:class:`Work`), and keeps only the pixels around the candidates it may fit
(:class:`Gathered`, :class:`Stamps`).
"""

from __future__ import annotations

import numpy as np

#: stamp radius gathered for unsaturated and saturated candidates (the most
#: ``stars._fit_candidates`` uses; ``stars._typical_sigma`` needs 5)
_STAMP_RADIUS = (10, 20)


class ArrayRows:
    """Bands of an in-memory frame (copies: the caller's pixels stay as they are)."""

    def __init__(self, data):
        if np.ndim(data) != 2:
            raise ValueError(f"detect_stars: expected a 2-d frame, got shape {np.shape(data)}")
        self._data = data
        self.shape = tuple(int(n) for n in data.shape)

    def rows(self, y0: int, y1: int, out=None) -> np.ndarray:
        if out is None:
            return np.array(self._data[y0:y1], dtype=np.float32)
        out[...] = self._data[y0:y1]
        return out


class Work:
    """The band-sized buffers of one detection, reused by every band of every pass.

    A new array per band would be freed into the allocator and not returned: glibc's
    mmap threshold rises to the size of the last large block freed, so later blocks of
    that size come from (per-thread) heaps, and two workers ended up holding ~100 MiB
    more than they used.
    """

    def __init__(self, rows: int, nx: int):
        self.d = np.empty((rows, nx), np.float32)
        self.buf = np.empty((rows, nx), np.float32)
        self.nodata = np.empty((rows, nx), bool)
        self.flag = np.empty((rows, nx), bool)
        self.mask = np.empty((rows, nx), np.uint8)

    def view(self, name: str, n: int) -> np.ndarray:
        return getattr(self, name)[:n]


def bands(ny: int, rows: int):
    """``(y0, y1)`` of the bands of ``rows`` rows that cover ``ny`` rows."""
    for y0 in range(0, ny, rows):
        yield y0, min(y0 + rows, ny)


class Gathered:
    """Background-subtracted pixels and mask bits around candidates, gathered during the
    scan, centred on ``floor(x0 + 0.5), floor(y0 + 0.5)`` with indices clipped to the
    frame (as ``stars._measure`` indexes), out to :data:`_STAMP_RADIUS`.

    Only the ``limit`` brightest candidates (by 3x3 sum) are fitted, and which they are
    is known only at the end; a candidate fainter than the ``limit``-th brightest seen so
    far can never be among them, so only the others are gathered (and pruned as
    brighter ones arrive): at most ~1.25 ``limit`` stamps are held.
    """

    def __init__(self, limit, shape):
        self.limit = None if limit is None else int(limit)
        self.shape = shape
        self.threshold = -np.inf
        self.top = np.empty(0)  # the brightest sums seen (at most ``limit`` and ties)
        self.parts: list[dict] = []
        self.held = 0

    def add(self, part, x0, y0, d, mask, row0):
        """Gather from band ``d`` (first row ``row0``) and its ``mask`` the stamps of the
        band's candidates ``part`` (starting positions ``x0, y0``) that may be fitted."""
        flux = part["flux3"]
        if self.limit is not None:
            self.top = np.concatenate([self.top, flux])
            if self.top.size > self.limit:
                self.threshold = max(self.threshold, float(np.partition(self.top, self.top.size - self.limit)[
                    self.top.size - self.limit]))
                self.top = self.top[self.top >= self.threshold]
        sel = np.flatnonzero(flux >= self.threshold)
        if not sel.size:
            return
        ny, nx = self.shape
        cx, cy = np.floor(x0[sel] + 0.5).astype(np.int64), np.floor(y0[sel] + 0.5).astype(np.int64)
        group = part["saturated"][sel].astype(np.int64)
        out = {"kept_index": part["kept_index"][sel], "flux3": flux[sel], "group": group, "cx": cx, "cy": cy}
        for g, r in enumerate(_STAMP_RADIUS):
            k = group == g
            offs = np.arange(-r, r + 1)
            iy = np.clip(cy[k, None] + offs, 0, ny - 1) - row0
            if iy.size and (iy.min() < 0 or iy.max() >= d.shape[0]):
                raise RuntimeError("star detection: a stamp reaches beyond its band's halo")
            ix = np.clip(cx[k, None] + offs, 0, nx - 1)[:, None, :]
            out[f"values{g}"] = d[iy[:, :, None], ix]
            out[f"masks{g}"] = (mask[iy[:, :, None], ix] if mask is not None
                                else np.zeros((int(k.sum()), 2 * r + 1, 2 * r + 1), np.uint8))
        self.parts.append(out)
        self.held += sel.size
        if self.limit is not None and self.held > 1.25 * self.limit + 64:
            self._prune()

    def _prune(self):
        for p in self.parts:
            keep = p["flux3"] >= self.threshold
            for g in range(len(_STAMP_RADIUS)):
                p[f"values{g}"] = p[f"values{g}"][keep[p["group"] == g]]
                p[f"masks{g}"] = p[f"masks{g}"][keep[p["group"] == g]]
            for key in ("kept_index", "flux3", "group", "cx", "cy"):
                p[key] = p[key][keep]
        self.held = sum(len(p["kept_index"]) for p in self.parts)

    def stamps(self, kept_index, x0, y0):
        """:class:`Stamps` of the final candidates (their ``kept_index`` and positions)."""
        return Stamps(self, kept_index, x0, y0)


class Stamps:
    """The final candidates' stamps: ``take(idx, radius)`` cuts those of candidates
    ``idx`` (all unsaturated or all saturated) to ``radius``, with their mask bits."""

    def __init__(self, gathered: Gathered, kept_index, x0, y0):
        cat = {key: np.concatenate([p[key] for p in gathered.parts]) if gathered.parts else np.empty(0, np.int64)
               for key in ("kept_index", "group", "cx", "cy")}
        where = np.full(int(cat["kept_index"].max()) + 1 if cat["kept_index"].size else 0, -1, np.int64)
        where[cat["kept_index"]] = np.arange(cat["kept_index"].size)
        pos = where[kept_index] if kept_index.size else np.empty(0, np.int64)
        if np.any(pos < 0) or np.any(cat["cx"][pos] != np.floor(x0 + 0.5)) or \
                np.any(cat["cy"][pos] != np.floor(y0 + 0.5)):
            raise RuntimeError("star detection: a selected candidate's stamp was not gathered")
        self.group = cat["group"][pos]
        # where each gathered stamp lives: its part, and its rank among the part's stamps
        # of its group (the order the part's arrays hold them)
        part_of = np.concatenate([np.full(len(p["kept_index"]), j) for j, p in enumerate(gathered.parts)]) \
            if gathered.parts else np.empty(0, np.int64)
        rank = np.empty(cat["group"].size, np.int64)
        start = 0
        for p in gathered.parts:
            for g in range(len(_STAMP_RADIUS)):
                k = np.flatnonzero(p["group"] == g)
                rank[start + k] = np.arange(k.size)
            start += len(p["kept_index"])
        self.values, self.masks = [], []
        self.slot = np.empty(len(pos), np.int64)
        for g, r in enumerate(_STAMP_RADIUS):
            mine = np.flatnonzero(self.group == g)
            self.slot[mine] = np.arange(mine.size)
            self.values.append(np.empty((mine.size, 2 * r + 1, 2 * r + 1), np.float32))
            self.masks.append(np.empty((mine.size, 2 * r + 1, 2 * r + 1), np.uint8))
        # filled part by part, each part freed once copied: never two copies of them all
        for j, p in enumerate(gathered.parts):
            for g in range(len(_STAMP_RADIUS)):
                mine = np.flatnonzero((self.group == g) & (part_of[pos] == j))
                if mine.size:
                    self.values[g][self.slot[mine]] = p[f"values{g}"][rank[pos[mine]]]
                    self.masks[g][self.slot[mine]] = p[f"masks{g}"][rank[pos[mine]]]
                p[f"values{g}"] = p[f"masks{g}"] = None
        gathered.parts = []

    def __call__(self, idx, radius):
        g = int(self.group[idx[0]]) if len(idx) else 0
        if np.any(self.group[idx] != g) or radius > _STAMP_RADIUS[g]:
            raise ValueError("stamps of one size and group at a time, within the gathered radius")
        cut = slice(_STAMP_RADIUS[g] - radius, _STAMP_RADIUS[g] + radius + 1)
        slots = self.slot[idx]
        return self.values[g][slots][:, cut, cut], self.masks[g][slots][:, cut, cut]
