"""The package's layout (DESIGN.md § Layout): layers that import only downward, no import circles
(counting imports anywhere in a file, function bodies too), options and the merge path importable
without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom; a module belongs to the first layer one of whose prefixes it starts with. Modules
# of one layer may import each other (never in a circle).
LAYERS = [
    ["cairn.cli"],
    ["cairn.api"],
    ["cairn.sweep", "cairn.tuning"],
    ["cairn.experiment"],
    ["cairn.report", "cairn.config"],
    ["cairn.strategies"],
    ["cairn.workspace"],
    ["cairn.contributions"],
    ["cairn.methods"],
    ["cairn.training", "cairn.checkpoints"],
    ["cairn.speedups"],
    ["cairn.evaluation"],
    ["cairn.models"],
    ["cairn.weights"],
    ["cairn.data"],
    ["cairn.store"],
    ["cairn.manifest", "cairn.model_card"],
    ["cairn.options"],
    ["cairn.io", "cairn.errors", "cairn.distributed", "cairn.validation", "cairn.tracking", "cairn.run_folder", "cairn.progress"],
]


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "cairn").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the Cairn modules it imports anywhere in its file (`from cairn.x import name`
    counts as importing cairn.x.name where that is a module, else cairn.x)."""
    def known(name: str) -> str:
        while name not in found:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in found.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.startswith("cairn.")}
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    source = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([source] if source else []))
                if source == "cairn" or source.startswith("cairn."):
                    deps |= {known(f"{source}.{a.name}") if f"{source}.{a.name}" in found else known(source) for a in node.names}
        graph[module] = deps - {module, "cairn"}
    return graph


def layer(module: str) -> int:
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return depth
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other_even_inside_a_function():
    graph = imports(modules())
    assert graph["cairn.experiment"] >= {"cairn.strategies", "cairn.workspace"}  # the graph sees imports at all
    assert cycles(graph) == []


def test_every_module_imports_only_from_its_own_layer_or_below():
    graph = imports(modules())
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m != "cairn" for d in deps if layer(d) < layer(m))
    assert upward == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_options_configs_the_cli_and_the_merge_path_import_without_torch():
    # `cairn merge` streams tensors with numpy: torch's import would be most of a small merge's time.
    light = "cairn.config, cairn.options, cairn.cli, cairn.contributions, cairn.methods.merge.streaming, cairn.methods.merge.mergekit"
    script = f"import sys, {light}; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
