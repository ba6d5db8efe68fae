"""Run every notebook in notebooks/ headless in quick mode, and check that each is committed without outputs.

Each notebook runs top to bottom in a fresh "python3" kernel started by nbclient, with the working
directory notebooks/ (where Jupyter starts a notebook opened from that folder), LOFTQ_NOTEBOOK_QUICK=1 and
matplotlib's Agg backend. Cells run on an in-memory copy, so the .ipynb files on disk are never written.
"""

import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager

import loftq_jax

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_PARAMS = [pytest.param(path, id=path.name) for path in NOTEBOOKS]
KERNEL_NAME = "python3"
QUICK_MODE_VARIABLE = "LOFTQ_NOTEBOOK_QUICK"

# Limits for a loaded 2-core machine. A quick-mode cell takes seconds on an idle one; the cell limit only
# keeps a hung kernel from blocking the suite.
CELL_TIMEOUT_S = 600
KERNEL_STARTUP_TIMEOUT_S = 180

ALLOWED_NOTEBOOK_METADATA = {"kernelspec", "language_info"}
# Tags are content that the author chose. Other cell metadata, such as "collapsed", "scrolled" or "execution",
# is state that front ends and runners record.
ALLOWED_CELL_METADATA = {"tags"}


@pytest.fixture
def notebook_kernel(tmp_path, monkeypatch):
    """Make the kernel spec "python3" start this interpreter, and keep Jupyter's and IPython's files in tmp_path.

    ipykernel's wheel installs a "python3" spec into sys.prefix, which nbclient finds without any
    registration step. Outside a virtual environment, though, jupyter_core searches the user's directory
    first, where `python3 -m ipykernel install --user` run from another Python leaves a "python3" spec
    that starts that Python. JUPYTER_PATH comes before both, so the spec written here decides.
    """
    jupyter_dir = tmp_path / "jupyter"
    write_kernel_spec(jupyter_dir / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv(QUICK_MODE_VARIABLE, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    # The kernel runs in notebooks/, so put the loftq_jax that this test imported first on its path.
    package_parent = str(Path(loftq_jax.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert Path(spec.resource_dir) == jupyter_dir / "kernels" / KERNEL_NAME
    assert spec.argv[0] == sys.executable


def test_notebooks_found():
    assert NOTEBOOKS, f"no .ipynb files in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS)
def test_notebook_committed_clean(path):
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)

    assert notebook.nbformat == 4, f"{path.name}: nbformat {notebook.nbformat}; expected 4"
    kernel_name = notebook.metadata.get("kernelspec", {}).get("name")
    assert kernel_name == KERNEL_NAME, f"{path.name}: kernel {kernel_name!r}; expected {KERNEL_NAME!r}"
    extra_metadata = set(notebook.metadata) - ALLOWED_NOTEBOOK_METADATA
    assert not extra_metadata, f"{path.name}: remove notebook metadata {sorted(extra_metadata)}"
    for cell in notebook.cells:
        extra_cell_metadata = set(cell.metadata) - ALLOWED_CELL_METADATA
        assert not extra_cell_metadata, f"{path.name}, cell {cell.id}: remove metadata {sorted(extra_cell_metadata)}"
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}, cell {cell.id}: clear its outputs before committing"
            assert cell.execution_count is None, f"{path.name}, cell {cell.id}: clear its execution count"


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS)
def test_notebook_reads_quick_mode(path):
    notebook = nbformat.read(path, as_version=4)
    first_cell = notebook.cells[0]
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")

    assert first_cell.cell_type == "markdown", f"{path.name}: the first cell should introduce the notebook"
    assert QUICK_MODE_VARIABLE in first_cell.source, f"{path.name}: the first cell should document {QUICK_MODE_VARIABLE}"
    assert QUICK_MODE_VARIABLE in code, f"{path.name}: no code cell reads {QUICK_MODE_VARIABLE}"


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS)
def test_notebook_runs(path, notebook_kernel):
    stored = path.read_bytes()
    notebook = nbformat.reads(stored.decode("utf-8"), as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )

    # Raises CellExecutionError, with the failing cell's source and traceback, on the first error.
    client.execute()

    assert path.read_bytes() == stored, f"{path.name} changed on disk while it ran"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), f"{path.name}: not every code cell ran"
