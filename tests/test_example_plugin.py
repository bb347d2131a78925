"""The worked example of a third-party plugin package, installed for real (with pip, into a
temporary target directory put on the path) and used by ``skipnets fit`` from a config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import skipnets.plugins as plugins
from skipnets.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "skipnets-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("example")
    source = root / "source"  # pip builds in the source tree: keep the repository clean
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True,
    )  # fmt: skip
    return target


def test_fit_with_the_example_plugin(installed: Path, tmp_path: Path, skipnets_cli) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 0
            model:
              arch: example_resmlp          # from the skipnets.models entry point
              arch_kwargs: {{depth: 3, width: 32}}
            data:
              class_path: Digits
              init_args: {{image_size: null, batch_size: 128}}
            trainer:
              max_epochs: 1
              accelerator: cpu
              logger: false
              enable_progress_bar: false
              default_root_dir: {tmp_path / "run"}
              callbacks:
                - class_path: BlockCensus   # from the skipnets.plugins entry point
                - class_path: StochasticDepth
                  init_args: {{survival_prob: 0.8}}
            """
        )
    )
    env = {"PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}  # a tiny MLP needs one thread
    result = skipnets_cli("fit", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    census = json.loads((tmp_path / "run" / "census" / "blocks.json").read_text())
    assert [b["name"] for b in census["blocks"]] == [f"model.blocks.{i}" for i in range(3)]
    assert {b["kind"] for b in census["blocks"]} == {"residual"}
    assert census["blocks"][0]["parameters"] == 32 * 2 + 32 * 64 + 64 + 64 * 32 + 32
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_listed_by_skipnets_plugins(
    installed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(installed))
    try:
        main(["plugins"])
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    finally:
        monkeypatch.undo()
        plugins.discover_plugins(refresh=True)
    assert rows["BlockCensus"].split()[1:4] == [
        "skipnets_example_plugin.callbacks.BlockCensus",
        "skipnets-example-plugin",
        "0.1.0",
    ]
    assert "Writes ``<run dir>/census/blocks.json``" in rows["BlockCensus"]
