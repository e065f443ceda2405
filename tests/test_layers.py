"""Module boundaries read from the source (``ast``): no module of crossent imports a private
name (``_name``) of another module, nor reaches one through a module it imported; and every
import, at module level or inside a function, goes down the layer order (:data:`LAYERS`).
Private modules of a package (``from . import _args``) are modules, not names, and may be
imported by their package's modules."""

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


# Lowest first; a module imports modules of lower layers only. Imports made for type checking
# alone (under ``if TYPE_CHECKING:``) are not dependencies and are not read.
LAYERS: list[set[str]] = [
    # leaves: the float64 oracle, test helpers, docstrings, the call-path predicates, the CPU
    # kernels' building blocks, the buffer cache
    {"reference", "testing", "_docs", "_transforms", "backends", "backends.buffers",
     "backends.cpu._math", "backends.cpu._runtime", "backends.triton._common",
     "backends.triton._scale", "bench.memory", "integrations"},  # fmt: skip
    {"backends.cpu._lanes", "backends.cpu._sums", "backends.triton._ce", "backends.triton._partial",
     "backends.triton._softmax"},  # fmt: skip
    {"backends.cpu._memory"},
    {"backends.cpu._kernels"},
    {"backends.base"},  # the primitives' interface, the formula, partial statistics' merge
    # backends: none imports another
    {"backends.torch", "backends.cpu", "backends.reference", "backends.triton",
     "backends.vocab_parallel"},  # fmt: skip
    {"dispatch"},  # the one place that chooses and composes backends
    {"_args", "_composite"},
    {"_autograd"},
    {"_linear"},
    {"_ops"},  # custom operators over the autograd layer's computations
    {"_calls"},  # composite / compiled / autograd: which path a call takes
    {"distributed"},
    {"functional"},
    {"nn", "integrations.transformers", "integrations.trl"},
    {""},  # the package: crossent/__init__.py
    {"warmup", "check", "demo", "bench.providers", "bench.gpu"},
    {"bench.cases"},
    {"bench.logits"},
    {"bench.linear", "bench.llama"},
    {"bench.worker", "bench.report"},
    {"bench.runner"},
    {"bench"},
    {"bench.__main__", "cli"},
    {"__main__"},
]


def _short(dotted: str) -> str:
    return dotted[len("crossent.") :] if dotted.startswith("crossent.") else ""


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def dependencies() -> dict[str, set[str]]:
    """module (short name, "" for the package) -> the crossent modules it imports."""
    deps: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("crossent"))
            elif isinstance(node, ast.ImportFrom):
                src = _source(module, node.level, node.module, path.name == "__init__.py")
                if not node.level:
                    src = node.module or ""
                if not src.startswith("crossent"):
                    continue
                for alias in node.names:  # a submodule, or a name of the module src
                    sub = f"{src}.{alias.name}"
                    found.add(sub if _is_module(sub) else src)
        deps[_short(module)] = {_short(d) for d in found} - {_short(module)}
    return deps


def test_every_module_has_a_layer() -> None:
    listed = [m for layer in LAYERS for m in layer]
    assert len(listed) == len(set(listed)), "a module listed twice"
    assert set(dependencies()) == set(listed)


def test_imports_go_down_the_layers() -> None:
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    wrong = [
        f"{mod or 'crossent'} (layer {rank[mod]}) imports {dep or 'crossent'} (layer {rank[dep]})"
        for mod, ds in dependencies().items()
        for dep in sorted(ds)
        if rank[dep] >= rank[mod]
    ]
    assert wrong == []


def test_the_layer_scan_sees_an_upward_import() -> None:
    deps = dependencies()
    # lazy imports inside functions count: warmup imports dispatch in a function
    assert "dispatch" in deps["warmup"] and "backends.base" in deps["warmup"]
    assert "_ops" in deps["functional"] and "_linear" in deps["_ops"]
    assert "bench.runner" not in deps["bench.report"]  # a TYPE_CHECKING import only


def private_attributes() -> list[str]:
    """``module._name`` where ``module`` was bound by importing a crossent module."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        tree = ast.parse(path.read_text())
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _source(module, node.level, node.module, path.name == "__init__.py")
                src = src if node.level else node.module or ""
                for alias in node.names:
                    if src.startswith("crossent") and _is_module(f"{src}.{alias.name}"):
                        bound[alias.asname or alias.name] = f"{src}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("crossent") and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not _is_module(f"{bound[node.value.id]}.{node.attr}")
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_another_modules_private_names() -> None:
    assert private_attributes() == []
