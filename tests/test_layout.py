"""The package's layer rules (docs/design.md §2.1), checked on the imports of every module:
each layer imports only the layers below it, so the import graph has no circle and no upward arrow."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dist_cacheaug"

# layer -> the layers (top-level names under dist_cacheaug) it may import besides itself
_FOUNDATION = {"errors", "config", "data", "distributed", "resources", "core", "variants"}
ALLOWED = {
    "errors": set(),  # UserError, the base every layer's own error subclasses
    "config": {"errors"},
    "data": {"errors"},
    "distributed": {"errors"},
    "resources": {"errors"},
    "core": {"errors", "config"},
    "variants": {"errors", "config", "core"},
    "train": _FOUNDATION,
    "evaluation": _FOUNDATION,
    "demo": _FOUNDATION | {"train", "evaluation"},
    "cli": _FOUNDATION | {"train", "evaluation", "demo"},
    "__init__": {"errors", "config", "core"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_layers(path: Path) -> set[str]:
    """Top-level dist_cacheaug names a module imports (absolute or relative, anywhere in the file)."""
    rel = path.relative_to(PKG)
    package = list(rel.parts[:-1])  # the module's package, relative to dist_cacheaug
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # `from . import x` at the top: x itself is the layer
                    found.update(a.name.split(".")[0] for a in node.names)
                else:
                    found.add(parts[0])
            elif node.module and node.module.split(".")[0] == "dist_cacheaug":
                parts = node.module.split(".")[1:]
                found.update([parts[0]] if parts else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "dist_cacheaug" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        extra = _imported_layers(path) - ALLOWED[layer] - {layer}
        if extra:
            wrong.append(f"{path.relative_to(PKG)} ({layer}) imports {sorted(extra)}")
    assert not wrong, "\n".join(wrong)


def test_every_module_belongs_to_a_known_layer():
    assert {_layer(p) for p in PKG.rglob("*.py")} <= set(ALLOWED)
