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
    "torch": ("engines/torch.py", "sources/", "backbones/", "demo/synth.py"),
    "ray": ("distributed/", "serve/ray_serve.py"),
    "nncf": ("engines/nncf_quant.py",),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: imports for annotations, never executed."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports anywhere (function-level imports too;
    relative imports resolved; ``if TYPE_CHECKING:`` imports left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_only(tree)
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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


def _import_graph() -> dict[str, set[str]]:
    """module -> the arcdeploy modules it imports (a package's ``__init__`` and its own
    submodules importing each other is how packages work, so those edges are left out)."""
    names = {_module_name(p): p for p in MODULES}
    graph = {}
    for name, path in names.items():
        deps = set()
        for imported in _imports(path):
            # "a.b.c" may be a module or a name inside module "a.b"
            while imported and imported not in names:
                imported = imported.rpartition(".")[0]
            if not imported or imported == name or not imported.startswith("arcdeploy"):
                continue
            if name.startswith(imported + ".") or imported.startswith(name + "."):
                continue
            deps.add(imported)
        graph[name] = deps
    return graph


@pytest.mark.parametrize("library", sorted(ENGINE_LIBRARIES))
def test_engine_libraries_stay_in_their_modules(library):
    allowed = ENGINE_LIBRARIES[library]
    offenders = []
    for path in MODULES:
        rel = path.relative_to(SRC).as_posix()
        if any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in allowed):
            continue
        if any(name == library or name.startswith(library + ".") for name in _imports(path)):
            offenders.append(rel)
    assert not offenders, f"{library} imported outside {allowed}: {offenders}"


def test_no_import_cycles():
    """No cycle in the import graph, counting imports inside functions: a loop hidden behind a
    function-level import is still two modules that cannot be understood one without the other."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongly_connected(node: str) -> None:  # Tarjan: every cycle lies inside one component
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                strongly_connected(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongly_connected(node)
    assert not cycles, "import cycles (modules that import each other): " + "; ".join(", ".join(c) for c in cycles)


def test_stages_do_not_reach_into_the_demo():
    """The demo is built on the stages, never the reverse: only demo/ and its command import it."""
    offenders = []
    for path in MODULES:
        name = _module_name(path)
        if name.startswith("arcdeploy.demo") or name == "arcdeploy.cli.demo":
            continue
        if any(m == "arcdeploy.demo" or m.startswith("arcdeploy.demo.") for m in _imports(path)):
            offenders.append(name)
    assert not offenders, f"modules outside demo/ importing it: {offenders}"


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


MAX_FUNCTION_LINES = 80


def test_functions_stay_short():
    """A function over 80 lines is split along its seams, or says why it must be one piece (a
    comment starting ``# one piece:`` in its first lines)."""
    offenders = []
    for path in MODULES:
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                head = "\n".join(lines[node.lineno - 1 : node.lineno + 15])
                if length > MAX_FUNCTION_LINES and "# one piece:" not in head:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    assert not offenders, offenders
