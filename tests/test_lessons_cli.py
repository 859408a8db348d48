"""``ppl-vae lessons`` lists the notebooks in reading order with their titles and opens them
in JupyterLab, or says what to install."""

import json

import pytest

from ppl_vae.cli import lessons, main

ROOT = lessons.default_folder()


def _title(path):
    cells = json.loads(path.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return None


def test_lessons_are_listed_in_reading_order_with_their_titles(capsys):
    assert main(["lessons"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:2].isdigit()]
    expected = sorted(ROOT.glob("[0-9][0-9]_*.ipynb"))
    assert [line.split()[0] for line in lines] == [p.name[:2] for p in expected]
    for line, path in zip(lines, expected, strict=True):
        assert _title(path) in line and str(path) in line


def test_a_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["lessons", "--dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no lessons folder" in err


def test_open_without_jupyterlab_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(lessons, "_installed", lambda module: module != "jupyterlab")
    assert main(["lessons", "--open"]) == 2
    err = capsys.readouterr().err
    assert "jupyterlab missing" in err and "ppl-vae[lessons]" in err


@pytest.mark.parametrize("text", ["", "not json"])
def test_an_unreadable_notebook_is_a_clear_error(tmp_path, text, capsys):
    (tmp_path / "01_broken.ipynb").write_text(text)
    assert main(["lessons", "--dir", str(tmp_path)]) == 2
    assert "01_broken.ipynb is not a readable notebook" in capsys.readouterr().err
