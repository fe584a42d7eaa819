"""The package's shape, held by tests: every module imports on its own, no module-level import cycle, every
module named in ARCHITECTURE.md, every public module with ``__all__``, every error a ``LensError``."""

import ast
import builtins
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lens_plugins
from lens_plugins import errors

PACKAGE = Path(lens_plugins.__file__).parent
ROOT = PACKAGE.parent
# HookedTransformer needs TransformerLens 3.9 (tests/tl3 imports it there); here it must refuse with that hint.
NEEDS_TL3 = {"lens_plugins.models.hooked_transformer"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _import_alone(name: str) -> tuple[str, int, str]:
    run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
    return name, run.returncode, run.stderr[-2000:]


def test_every_module_imports_first_in_a_fresh_process():
    """``python -c "import lens_plugins.x.y"`` succeeds for every module: no import that works only when
    another module happened to be imported first (a partially initialised module in a cycle)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(_import_alone, MODULES))
    failed = {}
    for name, code, stderr in outcomes:
        if name in NEEDS_TL3:
            if code == 0 or "transformer-lens 3.9" not in stderr:
                failed[name] = stderr or "imported without TransformerLens 3.9's HookedTransformer"
        elif code != 0:
            failed[name] = stderr
    assert not failed, "\n\n".join(f"{name}:\n{err}" for name, err in failed.items())


def _module_level_edges(name: str, path: Path) -> set[str]:
    """The package modules that ``name`` imports when it is executed (imports inside functions excluded)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue  # a class body runs at import, but ours import nothing there
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
                      + [h for handler in getattr(node, "handlers", []) for h in handler.body])

    visit(tree.body)
    return {edge for edge in edges if edge in MODULES and edge != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle():
    graph = {name: _module_level_edges(name, path) for name, path in MODULES.items()}
    assert _cycles(graph) == []


def test_architecture_names_every_module():
    page = (ROOT / "ARCHITECTURE.md").read_text()
    missing = [path.relative_to(PACKAGE).as_posix() for path in MODULES.values()
               if path.relative_to(PACKAGE).as_posix() not in page]
    assert not missing, f"ARCHITECTURE.md does not name {missing}"


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") and part != "__init__" for part in name.split("."))


def _declares_all(node) -> bool:
    if isinstance(node, ast.Assign):
        return any(getattr(target, "id", None) == "__all__" for target in node.targets)
    return isinstance(node, ast.ImportFrom) and any(alias.name == "__all__" for alias in node.names)  # a facade


def test_every_public_module_declares_its_surface():
    lacking = [name for name, path in MODULES.items() if _is_public(name)
               and not any(_declares_all(node) for node in ast.parse(path.read_text()).body)]
    assert not lacking, f"no __all__ in {lacking}"


BUILTIN_ERRORS = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)}


def test_every_error_the_package_raises_is_a_lens_error():
    """No ``raise ValueError(...)``: a builtin error class is raised only by ``__getattr__`` (Python's protocol
    needs ``AttributeError``), ``ImportError`` with the install hint and an abstract method's bare
    ``NotImplementedError``; every other raise is a ``LensError``."""
    offenders = []

    def visit(node, function, path):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Raise) and child.exc is not None:
                raised = ast.unparse(child.exc.func if isinstance(child.exc, ast.Call) else child.exc)
                allowed = ((raised == "AttributeError" and function == "__getattr__") or raised == "ImportError"
                           or (raised == "NotImplementedError" and not isinstance(child.exc, ast.Call)))  # abstract
                if raised in BUILTIN_ERRORS and not allowed:
                    offenders.append(f"{path.relative_to(ROOT)}:{child.lineno} raises {raised}")
            visit(child, inner, path)

    for path in MODULES.values():
        visit(ast.parse(path.read_text()), "", path)
    assert not offenders, "\n".join(sorted(set(offenders)))


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_class_is_a_lens_error_and_keeps_its_builtin_base(name):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.LensError)
    if cls is not errors.LensError:
        assert any(base in BUILTIN_ERRORS for base in (b.__name__ for b in cls.__mro__[1:]) if base != "Exception")


def test_both_backends_are_importable_as_modules_and_share_their_verbs():
    import lens_plugins.nnsight as nn
    import lens_plugins.transformer_lens as tl

    shared = {"run_logit_lens", "logit_lens", "run_logit_diff", "logit_diff", "run_attribution", "attribution",
              "run_generation_lens", "run_dola", "run_decoder_lens", "run_patchscope", "run_attention", "attention",
              "decoder_for"}
    assert shared <= set(tl.__all__) and shared <= set(nn.__all__)
    for module in (tl, nn):
        assert all(callable(getattr(module, verb)) for verb in module.__all__ if verb[0].islower())


def test_backend_files_have_the_same_names():
    tl = {p.name for p in (PACKAGE / "backends" / "transformer_lens").glob("*.py")}
    nn = {p.name for p in (PACKAGE / "backends" / "nnsight").glob("*.py")}
    methods = {"lens.py", "attribution.py", "generation.py", "dola.py", "decoder_lens.py", "patchscope.py", "attention.py"}
    assert methods <= tl and methods <= nn


@pytest.mark.parametrize("module, old, new", [
    ("lens_plugins.nnsight", "result", "logit_lens_result"),
    ("lens_plugins.nnsight", "dola_generate", "run_dola"),
    ("lens_plugins.nnsight", "dola_output", "dola_result"),
    ("lens_plugins.nnsight", "patchscope", "run_patchscope"),
    ("lens_plugins.transformer_lens", "dola_generate", "run_dola"),
    ("lens_plugins.transformer_lens", "patchscope", "run_patchscope"),
    ("lens_plugins.methods.attention", "run_transformer_lens", "run_attention"),
    ("lens_plugins.methods.attention", "nnsight_result", "attention_result"),
])
def test_old_names_still_work_and_warn_with_the_replacement(module, old, new):
    import importlib

    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*\.{new}$"):
        value = getattr(mod, old)
    assert value.__name__ == new
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_verb")


def test_backends_of_dispatches_on_the_type_and_refuses_anything_else():
    from lens_plugins import backends

    with pytest.raises(errors.LensTypeError, match="wrap a Hugging Face model with lp.nnsight.wrap_model"):
        backends.of(object())


def test_cache_accessor_methods_carry_the_verbs_signatures_and_docstrings():
    import inspect

    from lens_plugins.backends.transformer_lens.accessor import CacheLens
    from lens_plugins.backends.transformer_lens.attribution import attribution
    from lens_plugins.backends.transformer_lens.lens import logit_lens

    signature = inspect.signature(CacheLens.logit_lens)
    assert list(signature.parameters)[0] == "self" and "top_k" in signature.parameters
    assert "cache" not in signature.parameters
    assert CacheLens.logit_lens.__doc__ == logit_lens.__doc__
    assert "distractor" in inspect.signature(CacheLens.attribution).parameters
    assert CacheLens.attribution.__doc__ == attribution.__doc__
