"""The data line is one-way: rayseg/data/ (shards, the Ray Data pipeline, pseudo-label storage)
never imports the training loop, the pseudo-label job or the two-branch model, at module level
or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rayseg

PACKAGE = Path(rayseg.__file__).resolve().parent
FORBIDDEN = ("rayseg.pseudo", "rayseg.train", "rayseg.models.twobranch")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in the tree, function-level ones included; ``from rayseg
    import pseudo`` counts as rayseg.pseudo."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_data_package_imports_nothing_above_it():
    files = sorted((PACKAGE / "data").rglob("*.py"))
    assert PACKAGE / "data" / "pipeline.py" in files and PACKAGE / "data" / "pseudo_store.py" in files
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}"
           for path in files for line, module in _imported_modules(ast.parse(path.read_text(), str(path)))
           if _forbidden(module)]
    assert bad == []
    # no relative imports reaching out of rayseg/data (from .. import pseudo)
    assert not [path for path in files for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level > 1]


def test_the_static_check_sees_function_level_imports():
    tree = ast.parse("def f():\n    from rayseg.pseudo import read_pseudo\n    from rayseg import train\n"
                     "    import rayseg.models.twobranch\n")
    assert [m for _, m in _imported_modules(tree) if _forbidden(m)] == [
        "rayseg.pseudo", "rayseg.pseudo.read_pseudo", "rayseg.train", "rayseg.models.twobranch"]


def test_importing_the_pipeline_and_pseudo_storage_loads_no_trainer():
    code = ("import sys\n"
            "import rayseg.data.pipeline, rayseg.data.pseudo_store\n"
            "print(sorted(m for m in sys.modules if m == 'rayseg.pseudo' or m.startswith('rayseg.train')"
            " or m == 'rayseg.models.twobranch'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]", out
