"""The layout's one rule about tooling: the library (minisafe/) imports nothing from tools/."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "minisafe"


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in a file, function-local imports included."""
    packages = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            packages.add(node.module.split(".")[0])
    return packages


def test_the_library_imports_nothing_from_tools():
    offenders = sorted(p.name for p in LIBRARY.rglob("*.py") if "tools" in imported_packages(p))
    assert offenders == []
