"""Every import in skipnets points down: the import graph (function-level imports included) has
no cycle, the registry never imports the zoo or plugin discovery, and the zoo reaches the
registry through the ``skipnets.models`` entry point, as other packages' architectures do."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skipnets"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def _resolve(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the skipnets modules it imports anywhere in its source."""
    graph = {}
    for module, path in MODULES.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {_resolve(a.name) for a in node.names if a.name.startswith("skipnets")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skipnets"):
                for alias in node.names:  # `from skipnets.models import resnet` is a module
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in MODULES else _resolve(node.module))
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_a_package_above_it():
    # The top package is the public face (``skipnets.create_model``, ``__version__``).
    for module, targets in import_graph().items():
        above = {t for t in targets if t != "skipnets" and module.startswith(f"{t}.")}
        assert not above, f"{module} imports {above}"


def test_the_registry_imports_neither_the_zoo_nor_plugin_discovery():
    imported = import_graph()["skipnets.registry"]
    assert imported == {"skipnets.autoload", "skipnets.errors", "skipnets.papers"}


def run_fresh(code: str, env: dict[str, str] | None = None) -> list[str]:
    """What a fresh interpreter prints running ``code``, then the skipnets modules it holds."""
    code += "\nimport sys\nprint(*sorted(m for m in sys.modules if m.startswith('skipnets')))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_importing_a_layer_loads_nothing_above_it():
    # registry, nn and the papers, on their own: no zoo, no plugins, no Lightning module
    loaded = set(run_fresh("import skipnets.registry, skipnets.nn, skipnets.papers")[-1].split())
    assert not {m for m in loaded if m.startswith(("skipnets.models", "skipnets.plugins"))}
    assert "skipnets.module" not in loaded and "skipnets.cli" not in loaded


MODELS_ENTRY_POINT = """\
[skipnets.models]
probe = probe_models:register
"""


@pytest.fixture
def third_party(tmp_path: Path) -> Path:
    """An installed distribution (a dist-info folder, as pip leaves it) that registers a model."""
    (tmp_path / "probe_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from skipnets import register_model

            def register():
                @register_model(family="probe", has_skip=False)
                def probe_net(num_classes: int = 2, in_channels: int = 3) -> nn.Module:
                    return nn.Linear(in_channels, num_classes)
            """
        )
    )
    info = tmp_path / "probe_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(MODELS_ENTRY_POINT)
    return tmp_path


@pytest.mark.parametrize("autoload", ["", "1"])
def test_the_zoo_comes_through_the_entry_point_and_the_switch_keeps_others_out(
    third_party: Path, autoload: str
):
    listing = "import skipnets\nnames = skipnets.list_models()\nprint('resnet20' in names, 'probe_net' in names)"
    env = {
        "PYTHONPATH": os.pathsep.join([str(third_party), os.environ.get("PYTHONPATH", "")]),
        "SKIPNETS_NO_PLUGIN_AUTOLOAD": autoload,
    }
    listed, loaded = run_fresh(listing, env)
    assert listed == ("True False" if autoload else "True True")
    assert "skipnets.models.resnet" in loaded.split()  # loaded by the registry's entry point
