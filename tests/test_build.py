"""The committed notebooks and README table match notebooks/src; notebooks carry no outputs."""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_source_has_a_notebook_and_back():
    sources = {p.stem for p in (ROOT / "notebooks" / "src").glob("*.py")}
    assert sources == {p.stem for p in NOTEBOOKS}


def test_committed_files_match_sources():
    result = subprocess.run([sys.executable, str(ROOT / "notebooks" / "build.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_outputs_committed(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_repo_url_in_one_place(path):
    """The notebooks get the address from pyproject.toml; no placeholder survives the build."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    import build

    text = path.read_text()
    assert "{{" not in text.replace("{{'", "")
    assert build.repo_url() in text
    assert build.colab_url(path.stem) in (ROOT / "README.md").read_text()


def test_check_detects_a_stale_notebook(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "notebooks"))
    import build

    nb_path = NOTEBOOKS[0]
    original = nb_path.read_text()
    try:
        nb_path.write_text(original.replace("QLoRA", "QLORA", 1) if "QLoRA" in original else original + " ")
        monkeypatch.setattr(sys, "argv", ["build.py", "--check"])
        assert build.main() == 1
    finally:
        nb_path.write_text(original)
