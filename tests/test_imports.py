"""The package's import graph, read from the source with `ast` (nothing is imported).

- No cycle between modules, counting imports inside functions (a lazy import is still an edge:
  it only moves the cycle from import time to call time).
- `nanovlm/models/` sits at the bottom: it imports the standard library, torch, `nanovlm.config`,
  `nanovlm.runtime` (the machine seam, a layer below) and its own modules; anything else only inside the public entry points of the model classes.

`from nanovlm.x import y` where y is a submodule is an import of `nanovlm.x.y`; a package's
`__init__.py` is the package itself (importing it by name is an edge to it, e.g. a re-export
through `nanovlm`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nanovlm"
ENTRY_POINTS = {"from_pretrained", "save_pretrained", "push_to_hub", "generate", "answer",
                "tokenizer"}  # the property builds cfg.lm_tokenizer's tokenizer on first use
MODELS_MAY_IMPORT = ("torch", "nanovlm.config", "nanovlm.runtime", "nanovlm.models")


def module_name(path: Path) -> str:
    parts = ("nanovlm",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str):
    """(imported module, enclosing function names) for every import statement of a module."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]

    def visit(node, functions):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, functions
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    yield (sub if sub in MODULES else base), functions
            inner = functions + (child.name,) if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else functions
            yield from visit(child, inner)

    yield from visit(tree, ())


def _own(module: str) -> str | None:
    """The nanovlm module an import names (the deepest existing one), or None for a foreign module."""
    while module:
        if module in MODULES:
            return module
        module = module.rpartition(".")[0]
    return None


GRAPH = {name: sorted({own for imported, _ in _imports(name) if (own := _own(imported)) and own != name})
         for name in MODULES}


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle as a path a -> b -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_the_graph_is_read():
    # The reader sees lazy imports and `from package import submodule`.
    assert "nanovlm.models.vision_language_model" in GRAPH["nanovlm"]  # the lazy re-export
    assert "nanovlm.generation" in GRAPH["nanovlm.models.vision_language_model"]  # inside generate()
    assert "nanovlm.train.checkpoint" in GRAPH["nanovlm.train.loop"]  # from nanovlm.train import checkpoint
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) in (["a", "b", "c", "a"],)
    assert _find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_inits_load_only_leaf_modules():
    # Importing nanovlm.a.b first runs nanovlm/__init__.py and nanovlm/a/__init__.py, edges the
    # graph above leaves out. They cannot close a cycle when what a package __init__ imports at
    # import time imports no nanovlm module at import time itself.
    def eager(name):
        return [own for imported, functions in _imports(name) if not functions and (own := _own(imported))]

    for name in MODULES:
        if _is_package(name):
            for loaded in eager(name):
                assert not eager(loaded), (f"{MODULES[name]} imports {loaded} at import time, which imports "
                                           f"{', '.join(eager(loaded))}")


def _allowed_in_models(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names:
        return True
    return any(module == m or module.startswith(m + ".") for m in MODELS_MAY_IMPORT)


@pytest.mark.parametrize("name", [n for n in MODULES if n == "nanovlm.models" or n.startswith("nanovlm.models.")])
def test_models_import_only_torch_and_config(name):
    wrong = [f"{imported} (in {'.'.join(functions) or 'the module body'})"
             for imported, functions in _imports(name)
             if not _allowed_in_models(imported) and not ENTRY_POINTS.intersection(functions)]
    assert not wrong, f"{MODULES[name]} imports {', '.join(wrong)}"


def test_weights_and_generation_never_import_models():
    for name in MODULES:
        if name.startswith("nanovlm.weights") or name == "nanovlm.generation":
            up = [m for m in GRAPH[name] if m.startswith("nanovlm.models")]
            assert not up, f"{MODULES[name]} imports {', '.join(up)}"


def test_no_function_is_longer_than_80_lines():
    """The house rule (issue 15): a function a reader holds in one screen or two."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "nanovlm"
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
