"""The package's imports point one way: down the layers

    cli -> runs -> training | vae -> (models, guides) -> elbo | data | checkpoint -> base

and never in a cycle, even through an import inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ppl_vae": ROOT / "ppl_vae", "ppl_vae.models": ROOT / "models",
            "ppl_vae.guides": ROOT / "guides"}  # fmt: skip
# What the pairs in models/ and guides/ may use: the ELBO layer and below, never training,
# runs or commands.
PAIR_LAYER = {"ppl_vae.elbo.beta", "ppl_vae.errors", "ppl_vae.elbo.fastmath"}


# Each layer and the layers it may import (besides itself). "base" is the package's top-level
# modules (errors, atomic files); "pairs" are models/ and guides/.
ALLOWED = {
    "base": set(),
    "elbo": {"base"},
    "data": {"base"},
    "checkpoint": {"base"},
    "pairs": {"elbo", "base"},
    "vae": {"pairs", "elbo", "base"},
    "training": {"elbo", "data", "checkpoint", "base"},
    "runs": {"training", "vae", "pairs", "elbo", "data", "checkpoint", "base"},
    "cli": {"runs", "training", "vae", "pairs", "elbo", "data", "checkpoint", "base"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _layer(module: str) -> str | None:
    """The layer of a package module; None for the package's public API (``ppl_vae``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in ("models", "guides"):
        return "pairs"
    if parts[1] == "__main__":
        return None  # python -m ppl_vae: the command, like the public API
    if parts[1] in ALLOWED:
        return parts[1]
    assert len(parts) == 2, f"{module}: a subpackage with no place in the layers"
    return "base"


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its text (module or function level)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from ppl_vae import report`` imports the submodule, not the package's API.
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = subs + [node.module] * any(sub not in known for sub in subs)
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    # The package's __init__ re-exports the public API: it sits above everything, so edges
    # into it (``from ppl_vae import x``) are the cycle this test is about.
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = {k: v - {"ppl_vae", "ppl_vae.models", "ppl_vae.guides"} for k, v in _graph().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_detector_finds_a_cycle():
    # The check of the check: a made-up graph with a cycle through three modules.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_layers():
    wrong = []
    for name, imports in _graph().items():
        layer = _layer(name)
        if layer is None:
            continue
        for target in sorted(imports):
            to = _layer(target)
            if to is not None and to != layer and to not in ALLOWED[layer]:
                wrong.append(f"{name} ({layer}) imports {target} ({to})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_import():
    # The check of the check: the places the rule gives, and one import against it.
    assert _layer("ppl_vae.models.vae") == "pairs"
    assert _layer("ppl_vae.errors") == "base"
    assert _layer("ppl_vae.elbo.check") == "elbo"
    assert "training" not in ALLOWED["elbo"] and "runs" not in ALLOWED["vae"]


def test_library_modules_do_not_import_the_package_api():
    # ``from ppl_vae import x`` inside the library would make __init__ a hidden hub.
    for name, imports in _graph().items():
        if name != "ppl_vae":
            assert "ppl_vae" not in imports, name


# --- One concept per module: sizes the next reader can hold in mind.

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80  # not counting the docstring
LONG_REASON = "Long because"


def _function_lengths(path: Path) -> list[tuple[str, int, bool]]:
    """(name, lines of code without the docstring, whether the docstring says why it is long)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            doc = ast.get_docstring(node) or ""
            if doc and isinstance(body[0], ast.Expr):
                body = body[1:]
            first = body[0].lineno if body else node.lineno
            # decorators and the signature count, the docstring does not
            size = node.end_lineno - node.lineno + 1 - (first - node.body[0].lineno)
            out.append((node.name, size, LONG_REASON in doc))
    return out


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for fn, size, reason in _function_lengths(path):
            if size > MAX_FUNCTION_LINES and not reason:
                too_long.append(
                    f"{name}.{fn}: {size} lines (at most {MAX_FUNCTION_LINES}, or say "
                    f"'{LONG_REASON} ...' in its docstring)"
                )
    assert not too_long, "\n".join(too_long)


def test_the_size_check_measures_code_not_docstrings(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    doc = '    """' + "\n".join(["doc"] * 200) + '"""\n'
    path = tmp_path / "m.py"
    path.write_text(f"def long():\n{body}\n\n\ndef documented():\n{doc}    return 1\n")
    sizes = {name: size for name, size, _ in _function_lengths(path)}
    assert sizes["long"] == MAX_FUNCTION_LINES + 2 and sizes["documented"] == 2
