"""The shape every notebook shares (notebooks/CONVENTIONS.md), checked on the files, without running them."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LESSONS = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00_"))
WITH_QUIZ = LESSONS
SETUP = """# Setup: on Colab, install w8a16 (Colab already has torch and transformers); on Binder or locally it is installed.
import sys
if "google.colab" in sys.modules:
    %pip install --quiet "w8a16 @ git+https://github.com/w8a16/w8a16"
from w8a16.course.notebook import setup
device = setup(seed=0)"""


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _ids(paths):
    return [p.name for p in paths]


@pytest.mark.parametrize("path", [NOTEBOOKS / "00_index.ipynb", *LESSONS], ids=_ids([NOTEBOOKS / "00_index.ipynb", *LESSONS]))
def test_title_badges_setup_and_kernelspec(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    number = path.name[:2]
    title = _source(cells[0])
    assert title.startswith(f"# {number} — "), title[:40]
    assert f"colab.research.google.com/github/w8a16/w8a16/blob/main/notebooks/{path.name}" in title
    assert f"labpath=notebooks%2F{path.name}" in title
    assert _source(cells[1]) == SETUP
    assert nb["metadata"]["kernelspec"] == {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


@pytest.mark.parametrize("path", LESSONS, ids=_ids(LESSONS))
def test_every_lesson_has_a_solution_that_links_back(path):
    solution = NOTEBOOKS / "solutions" / path.name
    assert solution.exists()
    first = _source(_cells(solution)[0])
    assert first.startswith(f"# {path.name[:2]} — ") and ": solutions" in first.splitlines()[0]
    assert f"(../{path.name})" in first


@pytest.mark.parametrize("path", WITH_QUIZ, ids=_ids(WITH_QUIZ))
def test_lessons_link_the_index_and_end_with_quiz_mistakes_references(path):
    cells = _cells(path)
    assert "[↑ Index](00_index.ipynb)" in _source(cells[0])
    text = "\n".join(_source(c) for c in cells)
    module = f"nb{path.name[:2]}"
    assert f"{module}.QUIZ.show()" in text and f'{module}.QUIZ.check(["?", "?", "?"])' in text
    assert "> **Common mistakes**" in text
    refs = next(_source(c) for c in cells if _source(c).startswith("## References"))
    assert len(re.findall(r"<https?://", refs)) >= 2


def test_the_index_links_every_notebook_01_to_09():
    text = "\n".join(_source(c) for c in _cells(NOTEBOOKS / "00_index.ipynb"))
    for path in LESSONS:
        assert f"({path.name})" in text, path.name
    assert "(08_calibration_qat_onnx.ipynb)" in text
    for number in range(1, 10):
        assert re.search(rf"\(0{number}_[a-z0-9_]+\.ipynb\)", text), number


def test_committed_outputs_come_from_one_fresh_run():
    """Execution counts 1, 2, 3, … in order, every code cell executed (nbconvert --execute in a fresh kernel)."""
    for path in [NOTEBOOKS / "00_index.ipynb", *LESSONS, *sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))]:
        counts = [c.get("execution_count") for c in _cells(path) if c["cell_type"] == "code"]
        assert counts == list(range(1, len(counts) + 1)), (path.name, counts)
