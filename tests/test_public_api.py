"""What users read imports the public API only: every ``ppl_vae`` import in the README's
Python blocks, the examples and the notebooks names ``ppl_vae`` itself (or a pair in
``ppl_vae.models`` / ``ppl_vae.guides``), and every name it takes is exported there."""

import ast
import json
import re
from pathlib import Path

import pytest

import ppl_vae

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ("ppl_vae.models", "ppl_vae.guides")


def _sources() -> dict[str, str]:
    """Python text users see: README blocks, example scripts, notebook code cells."""
    out = {}
    readme = (ROOT / "README.md").read_text()
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", readme, re.DOTALL)):
        out[f"README.md block {i + 1}"] = block
    for path in sorted((ROOT / "examples").glob("*.py")):
        out[path.name] = path.read_text()
    for path in sorted((ROOT / "examples" / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        out[path.name] = "\n".join(line for cell in code for line in cell.splitlines()
                                   if not line.startswith(("%", "!")))  # fmt: skip
    return out


def _imports(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppl_vae"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("ppl_vae")]
    return found


SOURCES = _sources()


def test_there_is_user_facing_text_to_check():
    assert any(k.startswith("README") for k in SOURCES) and any(
        k.endswith(".ipynb") for k in SOURCES
    )


@pytest.mark.parametrize("where", sorted(SOURCES))
def test_user_facing_text_imports_the_public_api(where):
    for module, names in _imports(SOURCES[where]):
        pair = (
            module == PAIRS[0]
            or module == PAIRS[1]
            or module.startswith(tuple(p + "." for p in PAIRS))
        )
        assert module == "ppl_vae" or pair, f"{where} imports the deep path {module}"
        if module == "ppl_vae":
            missing = sorted(set(names) - set(ppl_vae.__all__))
            assert not missing, f"{where} imports {missing}, which ppl_vae does not export"


def test_the_public_api_exports_what_it_lists_and_nothing_private():
    for name in ppl_vae.__all__:
        assert not name.startswith("_"), name
        value = getattr(ppl_vae, name)
        module = getattr(value, "__module__", "") or ""
        assert module.startswith("ppl_vae."), f"{name} comes from {module}, not from ppl-vae"


def test_the_checks_see_a_deep_import():
    # The check of the check: a deep path and an unexported name are caught.
    assert _imports("from ppl_vae.training.loop import fit") == [("ppl_vae.training.loop", ["fit"])]
    assert "not_a_name" not in ppl_vae.__all__
