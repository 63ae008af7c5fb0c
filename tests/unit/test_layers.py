"""The package's layers, read from its source: server -> api -> engine -> model -> base
(settings, errors, env_values). Nothing imports upward, nothing imports in a circle (imports
inside functions count), and the API layer runs without torch or Flask."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sagellm"
LAYERS = {"base": 0, "model": 1, "engine": 2, "api": 3, "server": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS else "base"


def imports(module: str) -> set[str]:
    """The sagellm modules `module` imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: the package uses absolute imports only"
            base = node.module
            # `from pkg import submodule` imports the submodule; `from module import name` the module.
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            found.update(subs or [base])
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_the_walk_sees_the_layers():
    assert {layer(m) for m in MODULES} == set(LAYERS)
    assert "sagellm.engine.client" in GRAPH["sagellm.api.context"]
    assert "sagellm.model.loader" in GRAPH["sagellm.engine.distributed"]  # an import inside a function


def test_nothing_imports_upward():
    upward = [f"{m} ({layer(m)}) imports {dep} ({layer(dep)})" for m, deps in sorted(GRAPH.items())
              for dep in sorted(deps) if LAYERS[layer(dep)] > LAYERS[layer(m)]]
    assert upward == []


def test_no_import_circles():
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_api_layer_imports_neither_torch_nor_flask():
    api = sorted(m for m in MODULES if layer(m) == "api")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in api) +
            "print(sorted({'torch', 'flask'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
