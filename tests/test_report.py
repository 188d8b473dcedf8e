"""The quality report: an HTML page with valid PNG plots for a store at any stage, the
dither phases on transforms with known offsets, and previews that never load a whole image."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack._warnings import DrizzlestackWarning
from drizzlestack.cli import main as cli_main
from drizzlestack.geometry import similarity, translation
from drizzlestack.report import (dither_phases, dither_verdict, downsample, phase_occupancy, stretch,
                                 write_report)

from conftest import raise_if_dask_computes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: a file name that HTML must escape (ingest takes any name)
ODD_NAME = 'frame <2> & "b".fits'


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same tiny observation at three stages: ingested, registered, and (if those
    steps work in this tree) integrated and drizzled. Each store has its own directory,
    so the default report directories (next to the store) do not collide."""
    from drizzlestack.simulate import simulate

    root = tmp_path_factory.mktemp("report")
    truth = simulate(root / "frames", n_frames=5, shape=(96, 96), n_stars=60, seed=3)
    files = [Path(f) for f in truth.files]
    odd = files[2].with_name(ODD_NAME)
    files[2].rename(odd)
    files[2] = odd

    result = {}
    store = root / "full" / "stack.zarr"
    ds.ingest([str(f) for f in files], store)
    result["ingested"] = root / "ingested" / "stack.zarr"
    shutil.copytree(store, result["ingested"])
    ds.register(store)
    result["registered"] = root / "registered" / "stack.zarr"
    shutil.copytree(store, result["registered"])
    with warnings.catch_warnings():
        # too few photometry stars in so small a field: expected, not the subject here
        warnings.simplefilter("ignore", DrizzlestackWarning)
        ds.integrate(store, output=None)
        ds.drizzle(store, output=None, tile=64)
    result["full"] = store  # a step that breaks fails these tests: it never skips them
    return result


def _full(stores):
    return stores["full"]


def _preview_values(png: Path, kind: str) -> np.ndarray:
    """The values a preview shows, decoded from its pixels: grey level for "sky"
    previews, position in the viridis colour map for "map" previews (0..1); NaN where
    the preview shows no data. Rows in the data's order (the previews are y up)."""
    import matplotlib
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    nodata = np.all(np.abs(rgb - [0x40, 0x20, 0x20]) < 2, axis=-1)
    if kind == "sky":
        values = rgb[..., 0] / 255
    else:
        lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255
        nearest = np.argmin(((rgb[..., None, :] - lut[None, None]) ** 2).sum(-1), axis=-1)
        values = nearest / 255
    return np.where(nodata, np.nan, values)[::-1]


def _rank_correlation(a, b):
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    return spearmanr(a[ok], b[ok]).statistic


def _check_images(page: Path) -> list[str]:
    """Every <img> of the page is a relative link to a valid PNG; returns the links."""
    text = page.read_text(encoding="utf-8")
    srcs = re.findall(r"<img[^>]*\bsrc='([^']+)'", text)
    assert srcs, "the report has no image"
    for src in srcs:
        assert "://" not in src and not src.startswith("/"), f"{src}: not a relative link"
        png = page.parent / src
        assert png.is_file(), f"{src}: referenced but not written"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, f"{src}: not a PNG"
        from PIL import Image

        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            w, h = im.size
        assert w >= 16 and h >= 16
    return srcs


def test_report_of_a_full_store(stores):
    store = _full(stores)
    page = write_report(store)
    assert page == store.resolve().parent / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    srcs = _check_images(page)
    for png in ("integration.png", "drizzle.png", "drizzle_weights.png", "frames.png", "dither.png"):
        assert png in srcs
    # every step's parameters, as tables
    for step in ("ingest", "register", "integrate", "drizzle"):
        assert f"<h3>{step} " in text
    for param in ("pixfrac", "kernel", "rejection", "winsorized", "min_matches"):
        assert f"<td>{param}</td>" in text or f"<td>{param}<" in text
    # names from the store are escaped: never raw markup
    assert "frame &lt;2&gt; &amp; &quot;b&quot;.fits" in text
    assert ODD_NAME not in text and "<2>" not in text
    assert "Sub-pixel phases occupy" in text
    assert "<pre>" in text and "rms[px]" in text  # the per-frame table
    assert "No drizzle result" not in text


@pytest.mark.parametrize("var, kind", [("integration", "sky"), ("drizzle", "sky"), ("drizzle_weights", "map"),
                                       ("drizzle_coverage", "map")])
def test_report_previews_show_the_stores_images(stores, var, kind):
    """Each preview is the image it names, not a blank or a shuffled one: its pixels,
    decoded, rise and fall with the store's values (rank correlation), and it is not
    uniform."""
    store = _full(stores)
    page = write_report(store)
    data = ds.open_stack(store)[var].values.astype(np.float64)
    shown = _preview_values(page.parent / f"{var}.png", kind)
    assert shown.shape == data.shape  # small images are previewed pixel for pixel
    assert np.nanstd(shown) > 0.02, f"{var}.png is blank"
    assert np.isnan(shown).sum() == np.isnan(data).sum()
    assert _rank_correlation(shown, data) > 0.8  # 8-bit grey levels, clipped percentiles: ties
    assert _rank_correlation(shown[::-1], data) < 0.5  # the test can tell a wrong orientation


def test_report_of_a_registered_store_omits_later_sections(stores, tmp_path):
    from drizzlestack.store import StackStore

    store = tmp_path / "stack.zarr"
    shutil.copytree(stores["registered"], store)
    StackStore.open(store).set_frame_values("status", 1, "unregistered: <3 stars> & no match")
    page = write_report(store, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    text = page.read_text(encoding="utf-8")
    srcs = _check_images(page)
    assert set(srcs) == {"frames.png", "dither.png"}
    assert "No integration in this store yet" in text and "No drizzle result" in text
    assert "Sub-pixel phases occupy" in text
    assert "frame &lt;2&gt; &amp; &quot;b&quot;.fits" in text and ODD_NAME not in text
    assert "unregistered: &lt;3 stars&gt; &amp; no match" in text and "<3 stars>" not in text
    assert "1 excluded" in text


def test_report_of_an_ingested_store_via_cli(stores, capsys):
    store = stores["ingested"]
    assert cli_main(["report", str(store)]) == 0
    page = store.parent / "report" / "report.html"
    assert str(page) in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    assert "<img" not in text  # nothing to plot yet, and no broken links
    assert "No registration yet" in text and "No per-frame measurements yet" in text
    assert "<h3>ingest " in text
    assert "frame &lt;2&gt; &amp; &quot;b&quot;.fits" in text and ODD_NAME not in text


def test_dither_phases_of_known_offsets():
    shape = (101, 120)  # centre pixel (60, 50)
    offsets = [(0.0, 0.0), (3.25, -1.75), (-0.5, 0.4), (10.9, 7.1)]
    transforms = [translation(dx, dy) for dx, dy in offsets]
    # rotation about the centre pixel, then a shift: the centre moves by the shift alone
    transforms.append(similarity(1.0, 2.0, 4.3, -2.8, center=(60, 50)))
    transforms.append(np.full((3, 3), np.nan))  # unregistered
    phases = dither_phases(np.array(transforms), shape)
    expected = np.array([(0.0, 0.0), (0.25, 0.25), (0.5, 0.4), (0.9, 0.1), (0.3, 0.2)])
    np.testing.assert_allclose(phases[:5], expected, atol=1e-9)
    assert np.isnan(phases[5]).all()
    assert np.all((phases[:5] >= 0) & (phases[:5] < 1))


def test_phase_occupancy_ignores_where_the_grid_starts():
    spread = np.array([(0.2, 0.2), (0.7, 0.2), (0.2, 0.7), (0.7, 0.7)])
    assert phase_occupancy(spread, 2) == 1.0
    # a fixed grid would call 0.99 and 0.01, or 0.49 and 0.51, spread: they are not
    assert phase_occupancy([(0.99, 0.01), (0.01, 0.99), (0.0, 0.0)], 2) == 0.25
    assert phase_occupancy([(0.49, 0.51), (0.51, 0.49)], 2) == 0.25
    nine = np.array([(i / 3 + 0.05, j / 3 + 0.1) for i in range(3) for j in range(3)])
    assert phase_occupancy(nine, 3) == 1.0
    assert phase_occupancy(np.full((3, 2), np.nan), 2) == 0.0
    assert "well spread" in dither_verdict(spread, scale=2.0)
    assert "clustered" in dither_verdict(np.zeros((6, 2)) + 0.3, scale=2.0)
    assert "one registered frame" in dither_verdict([(0.1, 0.2), (np.nan, np.nan)])


def test_preview_is_a_block_mean_and_computes_once():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(700, 460)).astype(np.float32)
    a[:6, :6] = np.nan  # whole blocks without data stay NaN
    a[10, 10] = np.nan  # a partial block is the mean of its finite pixels
    lazy = da.from_array(a, chunks=(128, 100))
    with raise_if_dask_computes(max_computes=1):
        image, k = downsample(lazy, max_size=300)
    assert k == 3 and image.shape == (233, 153)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(a[:699, :459].reshape(233, 3, 153, 3), axis=(1, 3))
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(image[:2, :2]).all()
    small, k1 = downsample(a[:50, :40], max_size=300)
    assert k1 == 1 and small.shape == (50, 40)
    s = stretch(image)
    assert np.nanmin(s) >= 0 and np.nanmax(s) <= 1 and np.isnan(s[0, 0])


def test_report_marks_the_frame_whose_outlier_tolerance_was_widened(stores, tmp_path):
    """Issue 10 (bad input): a frame whose registration residual exceeds the outlier
    test's tolerance is tested with a proportionally wider tolerance. The report (the
    outlier panel's caption and a table) and ``drizzlestack info`` name that frame, the
    factor (its residual / the tolerance) and the residual, and mark no other frame."""
    from drizzlestack.info import info_table
    from drizzlestack.integration.integrate import OUTLIER_RMS_TOLERANCE
    from drizzlestack.store import StackStore

    store = tmp_path / "stack.zarr"
    shutil.copytree(stores["registered"], store)
    st = StackStore.open(store)
    ref = int(st.attrs["reference"])
    rms = np.asarray(st.group["registration_rms"][:], np.float64)
    assert np.all(rms[np.isfinite(rms)] < OUTLIER_RMS_TOLERANCE)  # the others stay untouched
    bad = next(i for i in range(len(rms)) if i != ref)
    rms[bad] = 3.1 * OUTLIER_RMS_TOLERANCE
    st.group["registration_rms"][:] = rms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DrizzlestackWarning)
        ds.integrate(store, output=None)
    factor = rms[bad] / OUTLIER_RMS_TOLERANCE
    page = write_report(store, tmp_path / "report").read_text()
    assert "frames.png" in _check_images(tmp_path / "report" / "report.html")
    rows = re.findall(r"<tr class='widened' id='widened-(\d+)'>(.*?)</tr>", page)
    assert [int(i) for i, _ in rows] == [bad]
    cells = re.findall(r"<td>(.*?)</td>", rows[0][1])
    assert cells[2] == f"{rms[bad]:.3f}" and cells[3] == f"{OUTLIER_RMS_TOLERANCE:g}"
    assert cells[4] == f"x{factor:.2f}"
    assert "Purple diamonds in the outlier panel" in page

    table = info_table(store).splitlines()
    header = next(line for line in table if line.startswith("#"))
    col = header.index("tol.x")  # columns are padded to a fixed width (file names may hold spaces)
    body = table[table.index(header) + 1:]
    body = body[:body.index("")]
    marks = {int(line.split()[0]): line[col:].split()[0] for line in body}
    assert len(marks) == len(rms)
    assert marks[bad] == f"x{factor:.2f}"
    assert all(v == "-" for i, v in marks.items() if i != bad)
