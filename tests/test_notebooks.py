"""The example notebooks run top to bottom, in their small setting (FEDFM_NOTEBOOK_SMALL=1).

Each notebook is executed with nbclient in a fresh `python3` kernel of this
interpreter, from its own folder (as Jupyter opens it), with every run written
under the test's temporary folder. A failing cell fails the test with the
cell's source and the error.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "examples" / "notebooks"
CELL_TIMEOUT_S = 600  # a cell that runs a federation takes 20-60 s in small mode on 2 cores


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One folder for the module: a notebook may reuse a run an earlier one finished with the same settings.
    return tmp_path_factory.mktemp("notebook-runs")


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    """The kernel inherits this environment: small mode, runs under the test's folder, this venv's kernel."""
    monkeypatch.setenv("FEDFM_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("FEDFM_NOTEBOOK_OUT", str(run_dir))
    monkeypatch.setenv("FEDFM_PROGRESS", "off")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    # The kernelspec `python3` of this environment first, before any user-wide one of the same name.
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(Path(sys.prefix) / "share" / "jupyter"),
                                                                      os.environ.get("JUPYTER_PATH")])))


def test_the_python3_kernel_is_this_interpreter(kernel_env: None) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    # jupyter_client launches a spec whose argv[0] is `python` with sys.executable.
    assert spec.argv[0] in {"python", "python3", sys.executable}, spec.argv


def _execute(path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(path.parent)}})  # runs where Jupyter would
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        code = [c for c in notebook.cells if c.cell_type == "code"]
        failed = next((c for c in code if any(o.get("output_type") == "error" for o in c.outputs)), None)
        if failed is None:  # timed out or the kernel died: the first cell that did not finish
            failed = next((c for c in code if c.get("execution_count") is None), None)
        source = failed.source if failed is not None else "(unknown cell)"
        pytest.fail(f"{path.name}: a cell failed\n--- cell ---\n{source}\n--- error ---\n{err}", pytrace=False)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_top_to_bottom(name: str, kernel_env: None) -> None:
    start = time.perf_counter()
    _execute(NOTEBOOKS / name)
    print(f"{name}: {time.perf_counter() - start:.1f} s")


def test_notebooks_are_committed_without_outputs() -> None:
    import nbformat

    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert len(paths) == 7, [p.name for p in paths]
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"
