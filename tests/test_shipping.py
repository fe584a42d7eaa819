"""The shipping rule: ``lens_plugins/core`` (with ``core/trace``) is what may run on an NDIF server,
``core.SHIPPED`` lists the modules of that folder, and every one of them imports only torch, the standard library and core (nnsight, which a
server has, only inside functions), with no decorator but ``dataclass`` and Python's own ``property`` / ``classmethod`` / ``staticmethod``."""

import ast
import sys
from pathlib import Path

import lens_plugins
import lens_plugins.core.readout  # noqa: F401
from lens_plugins import core

CORE = Path(core.__file__).parent
# Decorators that need no module globals on the server (a type checker's would).
BUILTIN_DECORATORS = ("dataclass", "property", "classmethod", "staticmethod")
ROOT = CORE.parent.parent


def _modules():
    """Every module under core/, dotted relative to core (a sub-package by its own name), from the files."""
    names = []
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return sorted(names)


def _path(name):
    path = CORE.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_shipped_is_every_core_module():
    assert sorted(core.SHIPPED) == _modules()
    assert "trace.reader" in core.SHIPPED and "trace.namespace" in core.SHIPPED


def _imports(tree):
    """``(module name, inside a function)`` of every import statement."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append(("." * child.level + (child.module or ""), inside))
            visit(child, inside)

    visit(tree, False)
    return found


def test_core_modules_import_only_torch_and_core():
    for path in [CORE / "__init__.py", *map(_path, _modules())]:
        name = path.relative_to(CORE).as_posix()
        tree = ast.parse(path.read_text())
        for module, in_function in _imports(tree):
            top = module.split(".")[0]
            allowed = (top == "torch" or module.startswith("lens_plugins.core") or top in sys.stdlib_module_names
                       or (top == "nnsight" and in_function))
            assert allowed, f"lens_plugins/core/{name} imports {module!r}: core may import only torch and core"


def test_core_functions_carry_no_decorators():
    for name in _modules():
        for node in ast.walk(ast.parse(_path(name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                for decorator in node.decorator_list:
                    target = decorator.func if isinstance(decorator, ast.Call) else decorator
                    assert ast.unparse(target) in BUILTIN_DECORATORS, f"core/{name}.py: @{ast.unparse(decorator)} on {node.name}"


def test_the_nnsight_adapter_registers_exactly_what_ships():
    from lens_plugins.backends import nnsight as lpn

    assert [m.__name__ for m in lpn.SHIPPED_MODULES] == [f"lens_plugins.core.{n}" for n in core.SHIPPED]


def test_the_docs_list_what_ships():
    page = (ROOT / "docs" / "development.md").read_text()
    line = next(line for line in page.splitlines() if line.startswith("Shipped to NDIF servers"))
    assert [name.strip("`, .") for name in line.split(":", 1)[1].split()] == list(core.SHIPPED)


def test_result_fields_follow_the_table():
    """``LensResult``'s optional fields are exactly the table's outputs; metrics and plot styles come from it."""
    import dataclasses

    from lens_plugins.methods import result
    from lens_plugins.plot import figures
    from lens_plugins.core import reductions

    # token_labels: display names for positions (image patches), set by lp.vision, not a reduction's output
    optional = {f.name for f in dataclasses.fields(result.LensResult) if f.default is None} - {"token_labels"}
    outputs = {field for entry in reductions.TABLE.values() if entry["by"] != "internal" for field in entry["outputs"]}
    assert optional == outputs
    assert result.METRICS == tuple(reductions.METRIC_STYLES)
    assert set(figures._STYLE) == set(result.METRICS)
    assert lens_plugins.core.readout.REDUCTIONS == reductions.READOUT


def test_shipped_code_imports_the_package_only_at_module_level():
    """A server rebuilds each shipped function from its source and cannot import ``lens_plugins``: an import
    of the package inside a function body fails there, and only on the path that reaches it (a discovered
    family's norm fit failed the remote VLM lens this way). Module-level imports of shipped modules are
    resolved by the registration, so they are the only kind allowed."""
    for name in _modules():
        tree = ast.parse(_path(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("lens_plugins"):
                        raise AssertionError(f"core/{name}.py: {node.name} imports {inner.module} in its body")
                    if isinstance(inner, ast.Import) and any(a.name.startswith("lens_plugins") for a in inner.names):
                        raise AssertionError(f"core/{name}.py: {node.name} imports lens_plugins in its body")
