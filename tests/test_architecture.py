"""The shape of the code, checked: engines own their libraries, the import graph has no cycles,
library code logs instead of printing, and user-facing text speaks of the product, not of our
planning documents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "arcdeploy"
MODULES = sorted(p for p in SRC.rglob("*.py"))

# library -> the only places that may import it
ENGINE_LIBRARIES = {
    "openvino": ("engines/openvino.py",),
    "onnxruntime": ("engines/onnxruntime.py",),
    "torch": ("engines/torch.py", "exporter.py", "sources/", "backbones/", "demo/synth.py"),
    "ray": ("distributed/",),
    "nncf": ("engines/nncf_quant.py",),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("library", sorted(ENGINE_LIBRARIES))
def test_engine_libraries_stay_in_their_modules(library):
    allowed = ENGINE_LIBRARIES[library]
    offenders = []
    for path in MODULES:
        rel = path.relative_to(SRC).as_posix()
        if any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in allowed):
            continue
        if any(name == library or name.startswith(library + ".") for name in _imports(path, top_level_only=False)):
            offenders.append(rel)
    assert not offenders, f"{library} imported outside {allowed}: {offenders}"


def test_no_import_cycles():
    names = {_module_name(p): p for p in MODULES}
    graph = {}
    for name, path in names.items():
        deps = set()
        for imported in _imports(path, top_level_only=True):
            # "a.b.c" may be a module or a name inside module "a.b"
            while imported and imported not in names:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported.startswith("arcdeploy"):
                deps.add(imported)
        graph[name] = deps
    # a package's __init__ importing its own submodules is how packages work; not a cycle to report
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_library_code_does_not_print():
    offenders = []
    for path in MODULES:
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"print() in library code (log with logging instead): {offenders}"


def test_user_facing_text_names_no_planning_documents():
    pattern = re.compile(r"SPEC section|SPEC sections|\bissue \d|\(issue|SPEC\.md")
    offenders = [
        f"{p.relative_to(SRC)}:{i}"
        for p in MODULES
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_build_stage_is_orchestration_only():
    lines = (SRC / "builder.py").read_text(encoding="utf-8").count("\n")
    assert lines < 300, f"builder.py has {lines} lines: engine work belongs in the engine modules"
