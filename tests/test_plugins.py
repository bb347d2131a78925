"""Plugin discovery through the ``skipnets.plugins`` entry-point group: the first-party plugins,
an extra installed distribution, broken entry points, short names in configs, and the switch
that turns autoloading off. Extra distributions are dist-info folders in a temporary directory
on the path, the way pip leaves them, so nothing is installed into the environment."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

import skipnets.plugins as plugins
from skipnets.cli import main
from skipnets.errors import ConfigError
from skipnets.lightning_cli import SkipnetsCLI

ENTRY_POINTS = """\
[skipnets.plugins]
Probe = probe_plugin:Probe
Broken = broken_plugin_module:Broken
NotACallback = json:dumps
"""


def make_distribution(root: Path) -> Path:
    """A distribution 'probe-plugins 1.2' with one working, one unimportable and one wrong
    entry point, laid out as an installed package."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "probe_plugin.py").write_text(
        textwrap.dedent(
            '''
            from lightning.pytorch.callbacks import Callback

            class Probe(Callback):
                """Probes nothing; proves that discovery found it.

                More text that the summary leaves out.
                """

                def __init__(self, level: int = 1):
                    self.level = level
            '''
        )
    )
    info = root / "probe_plugins-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugins\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def extra_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = make_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    yield root
    monkeypatch.undo()
    plugins.discover_plugins(refresh=True)


def by_name(found: list[plugins.Plugin]) -> dict[str, plugins.Plugin]:
    return {p.name: p for p in found}


def test_discovery(extra_plugins: Path) -> None:
    with pytest.warns(plugins.PluginLoadWarning) as warned:
        found = by_name(plugins.discover_plugins(refresh=True))
    messages = " | ".join(str(w.message) for w in warned)
    assert "'Broken'" in messages and "No module named 'broken_plugin_module'" in messages

    for name in ("Lesion", "StochasticDepth"):  # first-party, through the same group
        plugin = found[name]
        assert plugin.loaded and issubclass(plugin.cls, Callback)
        assert plugin.distribution == "skipnets-plugins"
        assert (
            plugin.class_path
            == f"skipnets_plugins.{plugin.cls.__module__.rpartition('.')[2]}.{name}"
        )

    probe = found["Probe"]
    assert probe.cls.__name__ == "Probe" and probe.source == "probe-plugins 1.2"
    assert probe.summary == "Probes nothing; proves that discovery found it."
    assert found["Broken"].cls is None
    assert found["Broken"].error.startswith("ModuleNotFoundError")
    assert found["NotACallback"].error == "json:dumps is not a lightning.pytorch.Callback subclass"


def test_plugins_command(extra_plugins: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins"]) == 1  # one failed to load
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "class", "from", "summary"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert "skipnets_plugins.lesion.Lesion" in rows["Lesion"]
    assert "skipnets-plugins 0.1.0" in rows["Lesion"]
    assert rows["Probe"].split()[1:4] == ["probe_plugin.Probe", "probe-plugins", "1.2"]
    assert rows["Probe"].endswith("Probes nothing; proves that discovery found it.")
    assert "FAILED: ModuleNotFoundError: No module named 'broken_plugin_module'" in rows["Broken"]


def test_short_and_full_class_paths(extra_plugins: Path, tmp_path: Path) -> None:
    with pytest.warns(plugins.PluginLoadWarning):
        plugins.discover_plugins(refresh=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            """
            model: {arch: resnet20}
            data: {class_path: Digits, init_args: {image_size: 8}}
            trainer:
              logger: false
              callbacks:
                - {class_path: Probe, init_args: {level: 3}}
                - {class_path: Lesion, init_args: {split: train, max_deletions: 2}}
                - class_path: skipnets_plugins.stochastic_depth.StochasticDepth
            """
        )
    )
    cli = SkipnetsCLI(
        args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    found = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert found["Probe"].level == 3
    assert found["Lesion"].split == "train" and found["Lesion"].max_deletions == 2
    assert found["StochasticDepth"].rule == "linear"


def test_naming_a_broken_plugin_is_an_error(extra_plugins: Path, tmp_path: Path) -> None:
    with pytest.warns(plugins.PluginLoadWarning):
        plugins.discover_plugins(refresh=True)
    config = tmp_path / "broken.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: Broken\n")
    with pytest.raises(
        ConfigError, match=r"plugin 'Broken' .* failed to load: ModuleNotFoundError"
    ):
        plugins.check_config_names(["fit", "--config", str(config)])
    with pytest.raises(ConfigError, match=r"uses broken_plugin_module\.Broken"):
        plugins.check_config_names(["fit", "--trainer.callbacks+=broken_plugin_module.Broken"])
    with pytest.raises(ConfigError, match="uses Broken"):
        plugins.check_config_names(["--trainer.callbacks", '[{"class_path": "Broken"}]'])
    # a config that does not name it only gets the warning
    plugins.check_config_names(["fit", "--trainer.callbacks+=Probe", "--model.arch=Broken"])


def test_cli_exits_2_with_the_import_error(tmp_path: Path, skipnets_cli) -> None:
    site = make_distribution(tmp_path / "site")
    config = tmp_path / "broken.yaml"
    config.write_text("trainer:\n  callbacks:\n    - {class_path: Broken, init_args: {x: 1}}\n")
    result = skipnets_cli(
        "fit",
        "--config",
        str(config),
        "--trainer.logger=false",
        env={"PYTHONPATH": str(site)},
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("skipnets: error: the config uses Broken, but plugin 'Broken'")
    assert "No module named 'broken_plugin_module'" in last
    assert "could not be loaded and is skipped" in result.stderr  # the discovery warning


def test_autoload_off(extra_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.modules.pop("probe_plugin", None)
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    found = by_name(plugins.discover_plugins())
    assert "probe_plugin" not in sys.modules  # nothing imported
    assert not found["Probe"].loaded and found["Probe"].error is None
    assert found["Probe"].source == "probe-plugins 1.2"
    assert plugins.load_plugin("Probe").__name__ == "Probe"  # asked for by name: imported
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "0")
    assert plugins.autoload_enabled()


def test_load_plugin_errors(extra_plugins: Path) -> None:
    with pytest.raises(ConfigError, match="no installed plugin provides the 'Nope' entry point"):
        plugins.load_plugin("Nope")
    with pytest.raises(ConfigError, match=r"plugin 'Broken' .* failed to load"):
        plugins.load_plugin("Broken")


def test_a_misspelled_plugin_gets_did_you_mean(capsys: pytest.CaptureFixture) -> None:
    from skipnets.cli import main

    args = ["fit", "--model.arch=plain_mlp", "--data=TwoSpirals", "--trainer.logger=false"]
    assert main([*args, "--trainer.callbacks+=NormRatoi"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "skipnets: error: unknown callback or class 'NormRatoi'; did you mean 'NormRatio'? "
        "(`skipnets plugins` lists the installed plugins)"
    )


def test_a_plugin_that_fails_in_its_constructor_gets_one_line(skipnets_cli) -> None:
    result = skipnets_cli(
        "fit",
        "--model.arch=plain_mlp",
        "--data=TwoSpirals",
        "--trainer.logger=false",
        "--trainer.callbacks+=tests.run_probes.FailsToStart",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "skipnets: error: could not create tests.run_probes.FailsToStart: RuntimeError: "
        "this callback needs a newer driver (level 1)"
    )
    assert "Traceback" not in result.stderr
