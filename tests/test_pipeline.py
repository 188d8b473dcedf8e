"""The four steps together: outliers do not leak into the drizzle, saturated cores stay
intact, runs are resumable, and the demo and `run` commands work."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats

import drizzlestack as ds
from drizzlestack.cli import main as cli_main
from drizzlestack.simulate import simulate
from drizzlestack.store import StackStore


@pytest.fixture(scope="module")
def outlier_field(tmp_path_factory):
    """12 frames with cosmic rays (some spanning two pixels), hot pixels, a satellite
    trail and saturated stars, registered and integrated. The dither (up to 12 px) is
    what lets rejection see a hot pixel: with a dither of a few pixels, three or four
    frames put the same hot pixel on the same sky pixel and no statistic can call it an
    outlier (calibration frames, not rejection, remove those)."""
    d = tmp_path_factory.mktemp("outliers")
    truth = simulate(d / "frames", n_frames=12, shape=(160, 160), n_stars=150, n_galaxies=0, cosmic_rays=50,
                     hot_pixels=25, trail=True, n_saturated=3, max_shift=12.0, seed=33)
    store = d / "s.zarr"
    ds.ingest(truth.files, store)
    ds.register(store)
    ds.integrate(store, output=None)
    return truth, store


def test_no_outlier_leaks_into_the_drizzled_background(outlier_field):
    truth, store = outlier_field
    out = ds.drizzle(store, scale=2.0, pixfrac=0.8, output=None, tile=64)
    img = out.drizzle.values
    # Background pixels: far from every star and galaxy of the catalogue.
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    xr_, yr_ = (xx + 0.5) / 2 - 0.5, (yy + 0.5) / 2 - 0.5
    ref = int(out.attrs["reference"]) if "reference" in out.attrs else int(ds.open_stack(store).attrs["reference"])
    sx, sy = truth.reference_to_frame(ref, np.asarray(truth.stars["x"]), np.asarray(truth.stars["y"]))
    near = np.zeros(img.shape, bool)
    for x, y, f in zip(sx, sy, truth.stars["flux"]):
        radius = 4 + 2 * np.log10(max(f, 10) / 1e3).clip(0)
        near |= (xr_ - x) ** 2 + (yr_ - y) ** 2 < radius ** 2
    # Statistical rejection needs several values: the margins that only 2-3 dithered
    # frames reach are left out (no rejection method can tell an outlier among 3).
    well_covered = out.drizzle_coverage.values >= 6
    assert well_covered.mean() > 0.8
    background = img[~near & np.isfinite(img) & well_covered]
    assert background.size > 0.3 * img.size
    _, med, std = sigma_clipped_stats(background, sigma=3)
    worst = (background.max() - med) / std
    assert worst < 8, f"a background pixel stands {worst:.1f} sigma above the background"
    # Without the rejection flags the same pixels do leak: the test can fail.
    raw = ds.drizzle(store, scale=2.0, pixfrac=0.8, output=None, tile=64, rejection=False).drizzle.values
    leaked = raw[~near & np.isfinite(raw) & well_covered]
    assert (leaked.max() - med) / std > 8


def test_saturated_cores_survive_integration_and_drizzle(outlier_field):
    truth, store = outlier_field
    stack = ds.open_stack(store)
    integ = stack.integration.values
    img = ds.drizzle(store, scale=2.0, pixfrac=0.8, output=None, tile=64).drizzle.values
    sat = truth.config.saturation
    ref = int(stack.attrs["reference"])
    checked = 0
    for s in truth.stars[truth.stars["saturated"]]:
        x, y = truth.reference_to_frame(ref, np.array([s["x"]]), np.array([s["y"]]))
        ix, iy = int(round(x[0])), int(round(y[0]))
        if not (3 <= ix < 157 and 3 <= iy < 157):
            continue
        core = integ[iy - 1:iy + 2, ix - 1:ix + 2]
        assert np.all(np.isfinite(core)) and core.max() >= 0.9 * sat
        dcore = img[2 * iy - 1:2 * iy + 3, 2 * ix - 1:2 * ix + 3]
        assert np.all(np.isfinite(dcore)) and dcore.max() >= 0.9 * sat
        checked += 1
    assert checked >= 1


def test_demo_command_runs_the_pipeline(tmp_path, capsys):
    assert cli_main(["demo", str(tmp_path / "demo"), "--frames", "6", "--size", "128", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "drizzle:" in out and "frames used: 6 of 6" in out
    assert (tmp_path / "demo" / "drizzle.fits").exists()
    # the demo's config reruns as a resumable `run`: nothing changes, nothing is redone
    before = (tmp_path / "demo" / "drizzle.fits").stat().st_mtime_ns
    assert cli_main(["run", str(tmp_path / "demo" / "config.yaml"), "--no-progress"]) == 0
    assert (tmp_path / "demo" / "drizzle.fits").stat().st_mtime_ns == before
    # a changed drizzle parameter reruns only the drizzle
    store = tmp_path / "demo" / "stack.zarr"
    _mark_finished(store)
    assert cli_main(["run", str(tmp_path / "demo" / "config.yaml"), "--set", "drizzle.scale=3",
                     "--no-progress"]) == 0
    from astropy.io import fits

    assert fits.getheader(tmp_path / "demo" / "drizzle.fits")["DRIZSCAL"] == 3.0
    assert _rerun(store) == {"drizzle"}
    # --force STEP reruns that step and every step after it, not the ones before
    _mark_finished(store)
    assert cli_main(["run", str(tmp_path / "demo" / "config.yaml"), "--set", "drizzle.scale=3",
                     "--force", "integrate", "--no-progress"]) == 0
    assert _rerun(store) == {"integrate", "drizzle"}
    # integrate's inputs do not change when register reruns to the same result: only the
    # cascade reruns it
    _mark_finished(store)
    assert cli_main(["run", str(tmp_path / "demo" / "config.yaml"), "--set", "drizzle.scale=3",
                     "--force", "register", "--no-progress"]) == 0
    assert _rerun(store) == {"register", "integrate", "drizzle"}


#: stands in for the completion time of a step (which has a resolution of a second)
MARK = "before-this-run"


def _mark_finished(store):
    """Replace every step's completion stamp by :data:`MARK`: a step that reruns writes
    a new one, a step that is skipped keeps it. (Drizzle counts the upstream stamps
    among its inputs, so after this it always reruns: use it only where it must.)"""
    st = StackStore.open(store)
    st.attrs["steps"] = {name: dict(rec, finished=MARK) if "finished" in rec else rec
                         for name, rec in st.attrs["steps"].items()}


def _rerun(store) -> set:
    return {name for name, rec in StackStore.open(store).attrs["steps"].items()
            if "finished" in rec and rec["finished"] != MARK}


def test_run_with_a_config_elsewhere_writes_outputs_in_the_working_directory(tmp_path, small_sim, monkeypatch,
                                                                            capsys):
    """`drizzlestack run configs/default.yaml --set store=/data/stack.zarr` wrote
    drizzle.fits and integration.fits into configs/, next to the config file."""
    from pathlib import Path

    from drizzlestack.config import RunConfig, dump_config

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default.yaml").write_text(dump_config(RunConfig()))  # relative outputs, as shipped
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    store = tmp_path / "data" / "stack.zarr"
    frames = str(Path(small_sim.files[0]).parent)
    assert cli_main(["run", "../configs/default.yaml", "--set", f"store={store}",
                     "--set", f"ingest.inputs=[{frames}]", "--set", "drizzle.tile=128", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (work / "drizzle.fits").exists() and (work / "integration.fits").exists()
    assert not list(configs.glob("*.fits"))
    for path in (work / "drizzle.fits", work / "integration.fits", store, store.parent / "report" / "report.html"):
        assert str(path) in out, path
        assert path.exists()
