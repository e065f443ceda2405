"""Module boundaries read from the source (``ast``): no module of crossent imports a private
name (``_name``) of another module. Private modules of a package (``from . import _args``)
are modules, not names, and may be imported by their package's modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "crossent"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source(module: str, level: int, name: str | None, package: bool) -> str:
    base = module.split(".") if package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_module(dotted: str) -> bool:
    path = ROOT.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def private_imports() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            src = _source(module, node.level, node.module, path.name == "__init__.py")
            if not node.level and not (node.module or "").startswith("crossent"):
                continue
            if not node.level:
                src = node.module or ""
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__"):
                    if not _is_module(f"{src}.{name}"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {src}.{name}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports() == []


def test_the_scan_sees_a_private_import(tmp_path: Path) -> None:
    # the scan itself: a private name is reported, a private module is not
    assert _is_module("crossent._args") and not _is_module("crossent._args.check_tensor")
    assert _source("crossent.backends.cpu._lanes", 1, "_math", False) == (
        "crossent.backends.cpu._math"
    )
    assert _source("crossent.distributed", 1, "functional", False) == "crossent.functional"
