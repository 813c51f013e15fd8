"""Build notebooks/*.ipynb from their single source of truth, notebooks/src/*.py (jupytext percent format).

    python notebooks/build.py          # write the notebooks and README's notebook table
    python notebooks/build.py --check  # exit 1 if anything committed differs from what the sources give

The repository address lives in one place, pyproject.toml's [project.urls] Repository; it is written into each
notebook (Colab link, pip install line) and into README's table of "Open in Colab" badges.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "notebooks" / "src"
README = ROOT / "README.md"
START, END = "<!-- notebooks:start -->", "<!-- notebooks:end -->"


def repo_url() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"].rstrip("/")


def colab_url(name: str) -> str:
    slug = repo_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{name}.ipynb"


def render(src: Path) -> str:
    """The .ipynb text for one source file: placeholders filled, no outputs, stable metadata."""
    nb = jupytext.read(src)
    subs = {"{{REPO_URL}}": repo_url(), "{{COLAB_URL}}": colab_url(src.stem), "{{PIP_URL}}": f"git+{repo_url()}"}
    for cell in nb.cells:
        for key, value in subs.items():
            cell.source = cell.source.replace(key, value)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("lines_to_next_cell", None)
        cell.pop("id", None)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"provenance": []}}
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nbformat.writes(nb) + "\n"


def title(src: Path) -> str:
    first = jupytext.read(src).cells[0].source.splitlines()[0]
    return first.lstrip("# ").strip()


def readme_table() -> str:
    rows = ["| Notebook | What it does | Colab |", "|---|---|---|"]
    for src in sorted(SRC.glob("*.py")):
        badge = f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(src.stem)})"
        rows.append(f"| [`{src.stem}.ipynb`](notebooks/{src.stem}.ipynb) | {title(src)} | {badge} |")
    return "\n".join(rows)


def expected() -> dict[Path, str]:
    files = {ROOT / "notebooks" / f"{src.stem}.ipynb": render(src) for src in sorted(SRC.glob("*.py"))}
    text = README.read_text()
    head, rest = text.split(START, 1)
    files[README] = head + START + "\n" + readme_table() + "\n" + END + rest.split(END, 1)[1]
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 on any difference")
    args = parser.parse_args()
    stale = [p for p, text in expected().items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)} (run: python notebooks/build.py)")
        return 1 if stale else 0
    for p, text in expected().items():
        p.write_text(text)
    print(f"wrote {len(stale)} file(s)" if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
