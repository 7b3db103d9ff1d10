"""Imports run one way (DESIGN.md, "Growing the design"): every module of the package, parsed (not
imported), imports only its own layer or those below, and no import circle joins two packages or
two modules. Imports inside functions count: a late import hides a circle, it does not remove it.

A recipe is validated as strictly whatever was imported before it (checked in a fresh process
that imports nothing but the loader)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "vitdistill"

# Bottom to top. A module may import its own layer or a lower one; a unit is a subpackage or a
# top-level module of vitdistill ("" is the package's own __init__).
LAYERS: list[tuple[str, set[str]]] = [
    # the recipe schema and small helpers that anything may use
    ("bottom", {"config", "errors", "rng", "device", "formatting", "atomic", "figures", "progress", "signals", "lock", "fill"}),
    ("data", {"data"}),  # sources, records, batching
    ("augment", {"augment"}),  # seeded views
    ("models", {"models"}),  # timm models behind one forward; below targets, which run teacher models
    # what a teacher gives: the teacher sources (online, store, label maps) and the offline formats
    ("targets", {"targets"}),
    # the writers of offline targets (`vitdistill cache`, `vitdistill labelmaps`): they run a teacher
    ("writers", {"store", "labelmaps"}),
    ("objective", {"objective"}),
    ("engine", {"engine"}),
    # a run from a recipe; a recipe checked against every registry; a finished run read back (and run on images)
    ("runner", {"runner", "validate", "run_folder", "inference"}),
    # what works on runs: diagnostics, exports, benchmarks, the demo
    ("tools", {"analysis", "export", "bench", "demo"}),
    ("cli", {"cli", "__main__", ""}),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
LAYER_OF = {unit: name for name, units in LAYERS for unit in units}


def module_name(path: Path) -> str:
    parts = ["vitdistill", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(module: str) -> list[tuple[int, str]]:
    """(line, imported vitdistill module) of every import in the module, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "vitdistill"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "vitdistill":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return [(line, target) for line, target in found if target != module]


EDGES = [(src, line, dst) for src in MODULES for line, dst in dict.fromkeys(imports(src))]  # one per line and target


def where(src: str, line: int, dst: str) -> str:
    return f"{MODULES[src].relative_to(ROOT)}:{line}: {src} -> {dst}"


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_parsed_and_every_unit_has_a_layer():
    assert "vitdistill.data.source" in MODULES and "vitdistill.engine.trainer" in MODULES and "vitdistill" in MODULES
    assert any(dst == "vitdistill.targets.online" for _, _, dst in EDGES)  # relative imports resolve
    missing = sorted({unit(m) for m in MODULES} - set(RANK))
    assert not missing, f"give these a layer in LAYERS: {missing}"


def test_no_import_against_the_direction():
    wrong = [
        f"{where(src, line, dst)}  ({LAYER_OF[unit(src)]} imports {LAYER_OF[unit(dst)]}, a higher layer)"
        for src, line, dst in EDGES
        if dst in MODULES and RANK.get(unit(dst), -1) > RANK.get(unit(src), len(LAYERS))  # a unit without a layer: the test above
    ]
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, _, dst in EDGES:
        if unit(src) != unit(dst):
            graph.setdefault(unit(src), set()).add(unit(dst))
    found = [
        "circle "
        + " <-> ".join(sorted(component))
        + ":\n  "
        + "\n  ".join(where(src, line, dst) for src, line, dst in EDGES if unit(src) != unit(dst) and {unit(src), unit(dst)} <= component)
        for component in cycles(graph)
    ]
    assert not found, "\n".join(found)


def test_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for src, _, dst in EDGES:
        graph.setdefault(src, set()).add(dst)
    found = [
        "circle "
        + " <-> ".join(sorted(component))
        + ":\n  "
        + "\n  ".join(where(src, line, dst) for src, line, dst in EDGES if src in component and dst in component)
        for component in cycles(graph)
    ]
    assert not found, "\n".join(found)


def test_the_walker_sees_a_violation_and_a_circle():
    """The checks above would fail on a wrong import: the layer table and the circle finder, on
    made-up edges."""
    assert RANK["targets"] > RANK["models"] > RANK["augment"] > RANK["data"] > RANK["config"]
    assert RANK["runner"] > RANK["engine"] > RANK["objective"] > RANK["targets"] and RANK["cli"] > RANK["analysis"] > RANK["runner"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


# ---------------------------------------------------------------------------- validation
CHECK_ALONE = f"""
import importlib.util, sys
# the package without running its __init__ (which imports the runner, and with it every
# registry): only what the loader itself imports is loaded
spec = importlib.util.spec_from_file_location("vitdistill", {str(PACKAGE / "__init__.py")!r}, submodule_search_locations=[{str(PACKAGE)!r}])
sys.modules["vitdistill"] = importlib.util.module_from_spec(spec)
from vitdistill.errors import ConfigError
from vitdistill.validate import load_recipe
assert "vitdistill.runner" not in sys.modules and "vitdistill.cli" not in sys.modules
for override in ("objective.0.term=nope", "model.name=no_such_model", "optim.opt=nope", "augment.rand_augment=nope-m9"):
    try:
        load_recipe("demo_teacher", [override])
    except ConfigError as err:
        print(err)
    else:
        print("accepted", override)
print(load_recipe("deit_tiny_distilled_cifar10").objective[1])
"""


def test_a_recipe_is_validated_in_full_whatever_was_imported_before():
    done = subprocess.run([sys.executable, "-c", CHECK_ALONE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stdout
    assert lines[0].startswith("objective.0.term: unknown term 'nope'")
    assert lines[1].startswith("model.name: unknown timm model 'no_such_model'")
    assert lines[2].startswith("optim.opt: unknown optimizer 'nope'")
    assert lines[3].startswith("augment.rand_augment:")
    assert lines[4] == str({"term": "kd_hard", "weight": 0.5, "head": "dist", "smoothing": 0.0})  # term defaults filled in
