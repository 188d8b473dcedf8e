"""The notebooks in notebooks/: the saved (executed) files are checked as they are, and
every notebook is executed top to bottom in its fast mode (``DRIZZLESTACK_NOTEBOOK_FAST=1``:
the same cells on a small field), so a change that breaks a notebook fails the suite.

Executing them at full size takes minutes (see notebooks/README.md for how to re-execute
and save them).
"""

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "out_of_core.ipynb"}
MAX_BYTES = 1_500_000  # outputs are kept small (PNG figures at modest dpi, no big printouts)


def _load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_expected_notebooks_present():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure(path):
    nb = _load(path)
    assert nb["nbformat"] == 4
    assert isinstance(nb["cells"], list) and nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown", "raw")
        assert isinstance(cell["source"], (str, list))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat(path):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_in_order(path):
    cells = _code_cells(_load(path))
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: code cells not executed top to bottom in one session "
        f"(execution counts {counts}); re-execute it as notebooks/README.md says")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_errors(path):
    for i, cell in enumerate(_code_cells(_load(path))):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", (
                f"{path.name}, code cell {i}: {out.get('ename')}: {out.get('evalue')}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_images(path):
    images = [out for cell in _code_cells(_load(path)) for out in cell.get("outputs", [])
              if out["output_type"] in ("display_data", "execute_result") and "image/png" in out.get("data", {})]
    assert images, f"{path.name}: no figure in the saved outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_small(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes saved"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executes_without_error_in_fast_mode(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if path.name == "quickstart.ipynb" and not (SHARED_DATA / "hatp32").is_dir():
        pytest.skip("quickstart part 2 needs the real frames (../shared/data/hatp32)")
    monkeypatch.setenv("DRIZZLESTACK_NOTEBOOK_FAST", "1")  # inherited by the kernel
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    outputs = [out for cell in _code_cells(nb) for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out["output_type"] == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{path.name}: no figure"
