"""The package's layout follows the method, and imports only run downward: a module may import its own subpackage
or a lower layer, never a higher one, and the imports (including those inside functions) form no cycle. The toy
world is a plug-in at the edge: no library module imports it (it is found through the ``unguide.worlds`` entry
point)."""
import ast
from pathlib import Path

import unguide

SRC = Path(unguide.__file__).parent
# lowest first; modules of one layer may import each other (without cycles)
LAYERS = [("errors", "io"), ("models",), ("sampling",), ("guidance",), ("erasure",), ("generation",), ("evaluation",),
          ("attack",), ("serve",), ("cli",), ("toyworld",)]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of a unguide module in the file, wherever it stands."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "unguide" or target.startswith("unguide."):
                # "from . import mod" imports the submodules it names; anything else imports the module itself
                subs = [f"{target}.{a.name}" for a in node.names
                        if (SRC.parent / Path(*f"{target}.{a.name}".split("."))).with_suffix(".py").exists()]
                found += [(node.lineno, m) for m in subs] if len(subs) == len(node.names) else [(node.lineno, target)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("unguide")]
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def test_every_module_sits_in_a_declared_layer():
    undeclared = sorted(m for m in all_modules() if m != "unguide" and layer(m) is None)
    assert not undeclared, f"add these to LAYERS (or move them into a layer's package): {undeclared}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for mod, path in all_modules().items():
        if mod == "unguide":  # the package facade re-exports the public API
            continue
        for line, target in imports(path):
            if target != "unguide" and layer(target) is not None and layer(target) > layer(mod):
                upward.append(f"{path.relative_to(SRC)}:{line} imports {target}")
            if target == "unguide":
                upward.append(f"{path.relative_to(SRC)}:{line} imports the package facade")
    assert not upward, upward


def test_no_library_module_imports_the_toy_world():
    offenders = [f"{p.relative_to(SRC)}:{line}" for m, p in all_modules().items() if layer(m) != LAYER_OF["toyworld"]
                 for line, target in imports(p) if target.startswith("unguide.toyworld")]
    assert not offenders, offenders


def test_imports_form_no_cycle():
    modules = all_modules()
    graph = {m: {t for _, t in imports(p) if t in modules and t != m} for m, p in modules.items() if m != "unguide"}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_layer_check_reads_relative_imports_inside_functions():
    """The checker itself: an upward import inside a function of a lower module is found and resolved."""
    probe = SRC / "sampling" / "ddim.py"
    found = [t for _, t in imports(probe, "def f():\n    from ..evaluation.report import write_report\n")]
    assert found == ["unguide.evaluation.report"] and layer(found[0]) > layer(module_name(probe))


def test_no_function_over_60_lines_and_no_module_over_400():
    """Small modules, one job each (docs/architecture.md): the sizes a reader can hold at once."""
    import ast
    from pathlib import Path

    import unguide

    root = Path(unguide.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        if source.count("\n") > 400:
            long.append(f"{path.relative_to(root)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long, long
