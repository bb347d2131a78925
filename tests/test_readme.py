"""Every snippet of the README runs as written.

- ``python`` blocks run, each section's blocks in order in one namespace, into a scratch
  registry; a ``print(...)`` followed by comment lines holding a Python value must print that
  value.
- ``yaml`` blocks parse, and a config (or a part of one, on top of ``configs/quickstart.yaml``)
  is built by ``skipnets fit``'s parser: every class in it instantiated, its arguments checked.
  Datasets that are files come from tiny copies in their real formats.
- ``toml`` blocks parse; the example plugin's entry points are the ones its package declares.
- Shell blocks: each command runs (``skipnets ...`` through ``skipnets.cli.main``), unless it is
  listed in ``NOT_RUN`` with the reason, so that a new command is run by default.

The behaviour the "Writing an architecture" section promises (lesioning, the observer's
semantics, the error for a module assigned to ``branch``) is checked on its own code below.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
import yaml
from conftest import ROOT
from datagen import write_cifar10, write_cifar100
from torch import nn

import skipnets
import skipnets.plugins as plugins
from skipnets import registry
from skipnets.cli import main
from skipnets.nn import SkipBlock, skip_blocks

README = ROOT / "README.md"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
EXAMPLE = ROOT / "examples" / "skipnets-example-plugin"

#: Shell commands of the README that are not run here, each with the reason.
NOT_RUN = {
    "make fit": "installs into .venv, then trains for about a minute",
    "make test": "the whole suite, minutes",
    ".venv/bin/skipnets fit --config configs/quickstart.yaml": "a 4-epoch training run",
    "skipnets fit --config configs/quickstart.yaml --model.arch=resnet56": "a training run",
    "skipnets fit --config configs/quickstart.yaml --config my_overrides.yaml": (
        "my_overrides.yaml is the reader's own file"
    ),
    "skipnets validate|test|predict --config ... --ckpt_path path/to.ckpt": "a pattern",
    "skipnets analyse Lesion --config run/config.yaml --ckpt_path run/checkpoints/last.ckpt": (
        "needs a trained run; tests/test_analyse.py runs it on one"
    ),
    "skipnets lesion --config run/config.yaml --ckpt_path run/checkpoints/last.ckpt": (
        "needs a trained run; tests/test_lesion.py runs it on one"
    ),
    "skipnets compare Lesion run_a run_b --out comparisons": (
        "needs trained runs; tests/test_compare.py runs it on some"
    ),
    "skipnets fit --config configs/quickstart.yaml --ckpt_path last": "a training run",
    "skipnets fit --config configs/quickstart.yaml --ckpt_path "
    "runs/quickstart/skipnets/<id>/checkpoints/last.ckpt": "a training run, of a run not there",
    "wandb leet inspect --json wandb/offline-run-<time>-<id>/run-<id>.wandb | grep "
    '"history"': "needs a killed run's W&B file; tests/test_wandb.py reads one this way",
    "skipnets fit --config configs/quickstart.yaml --trainer.devices=4 --trainer.strategy=ddp": (
        "a training run on 4 devices"
    ),
    "torchrun --nproc-per-node=4 -m skipnets fit --config configs/quickstart.yaml": (
        "a training run on 4 processes"
    ),
    "sbatch configs/cluster/sbatch.sh configs/quickstart.yaml": "needs a SLURM cluster",
    "wandb sweep --project skipnets configs/sweeps/depth_study.yaml": "needs W&B's servers",
    "wandb agent <entity>/skipnets/<sweep id>": "needs W&B's servers and a sweep",
    "skipnets models": (
        "builds every registered network to count its parameters (6 s of CPU, a third of this "
        "file's budget); 'skipnets models resnet*' above runs the same code on 13 of them"
    ),
    "skipnets fit --config configs/experiments/lesion_resnet_digits.yaml": "a training run",
    "skipnets fit --config configs/experiments/lesion_plain_digits.yaml": "a training run",
    "skipnets lesion --config runs/lesion_resnet_digits/skipnets/<run id>/config.yaml "
    "--ckpt_path runs/lesion_resnet_digits/skipnets/<run id>/checkpoints/last.ckpt": (
        "needs the run above; tests/test_lesion.py runs the command on a trained run"
    ),
    "skipnets fit --config configs/experiments/effective_paths_resnet110_digits.yaml": (
        "a training run"
    ),
    "skipnets analyse EffectivePaths --config "
    "runs/effective_paths_resnet110_digits/skipnets/<run id>/config.yaml --ckpt_path "
    "runs/effective_paths_resnet110_digits/skipnets/<run id>/checkpoints/last.ckpt": (
        "needs the run above; tests/test_effective_paths.py runs the command on a trained run"
    ),
    "skipnets fit --config configs/experiments/feature_reuse_densenet_digits.yaml": (
        "a training run"
    ),
    "skipnets analyse FeatureReuse --config "
    "runs/feature_reuse_densenet_digits/skipnets/<run id>/config.yaml --ckpt_path "
    "runs/feature_reuse_densenet_digits/skipnets/<run id>/checkpoints/last.ckpt": (
        "needs the run above; tests/test_feature_reuse.py runs the command on a trained run"
    ),
    "skipnets fit --config configs/experiments/occlusion_resnet_digits.yaml": "a training run",
    "skipnets analyse Occlusion --config configs/experiments/occlusion_resnet_digits.yaml "
    "--ckpt_path runs/occlusion_resnet_digits/skipnets/<run id>/checkpoints/last.ckpt": (
        "needs the run above; tests/test_occlusion.py runs the command on a trained run"
    ),
    "skipnets fit --config configs/experiments/linear_regions_spirals.yaml": "a training run",
    **dict.fromkeys(
        [
            "skipnets fit --config configs/experiments/linear_regions_spirals.yaml "
            f"--model.arch_kwargs={{depth: {depth}, width: {width}}} "
            f"--trainer.default_root_dir=runs/linear_regions_{shape}"
            for depth, width, shape in (
                (3, 24, "2x24"),
                (4, 16, "3x16"),
                (5, 12, "4x12"),
                (7, 8, "6x8"),
            )
        ],
        "a training run",
    ),
    "skipnets compare LinearRegions runs/linear_regions_*/skipnets/* --out comparisons": (
        "needs the runs above; tests/test_linear_regions.py compares trained runs"
    ),
    "skipnets fit --config configs/experiments/shattered_gradients_spirals.yaml": "a training run",
    "skipnets fit --config configs/experiments/shattered_gradients_spirals.yaml "
    "--model.arch=residual_mlp --model.arch_kwargs={depth: 24, width: 200} "
    "--trainer.default_root_dir=runs/shattered_gradients_residual24": "a training run",
    "skipnets fit --config configs/experiments/shattered_gradients_spirals.yaml "
    "--model.arch_kwargs={depth: 6, width: 200, norm: true} "
    "--trainer.default_root_dir=runs/shattered_gradients_plain6": "a training run",
    "skipnets compare ShatteredGradients runs/shattered_gradients_*/skipnets/* --out comparisons": (
        "needs the runs above; tests/test_shattered_gradients.py compares trained runs"
    ),
    "skipnets analyse HighwayGates --config <run dir>/config.yaml --ckpt_path "
    "<run dir>/checkpoints/last.ckpt": "needs a trained run; tests/test_analyse.py runs one",
    "skipnets deconvnet --config <run dir>/config.yaml --ckpt_path "
    "<run dir>/checkpoints/last.ckpt": "needs a trained run; tests/test_deconvnet.py runs one",
    "skipnets compare Lesion runs/plain/skipnets/<id> runs/resnet/skipnets/<id> --out "
    "comparisons": "needs trained runs; tests/test_compare.py runs it on some",
    "skipnets fit --config configs/papers/airbench94_cifar10.yaml --data.init_args.root "
    "/path/to/cifar": "needs CIFAR-10 and a GPU",
    "make bench": "every benchmark, minutes",
    "python -m benchmarks --quick": "every benchmark, minutes",
    "python -m benchmarks --only fit,skip --threads 1 --markdown": "benchmarks, minutes",
    "python -m benchmarks --only quickstart": "5 pairs of whole quickstart runs, minutes",
    "python -m benchmarks.bench_quickstart --pairs 3": (
        "3 pairs of whole quickstart runs, minutes; tests/test_bench_quickstart.py runs a short one"
    ),
    "python -m benchmarks --only gpu": (
        "tests/test_bench_gpu.py runs it without CUDA, where it says it is skipped"
    ),
    "python -m benchmarks.bench_gpu --data /path/to/cifar --compile --profile runs/profile "
    "--json gpu.json": "needs CIFAR-10 and a GPU",
    "python -m benchmarks.bench_gpu --profile-first-steps runs/first": (
        "needs a GPU; tests/test_bench_gpu.py profiles the first steps of both sides on the CPU"
    ),
    "python -m benchmarks.bench_gpu --device cpu --epochs 2 --train-size 1024 --batch-size 32 "
    "--width-divisor 16 --precision 32": (
        "a CPU run of minutes; tests/test_bench_gpu.py runs a smaller one"
    ),
}

#: Fenced blocks without a language that are not commands, by their first line.
NOT_COMMANDS = {
    "<default_root_dir>/": "the layout of a run's folder",
    "Run directory: runs/quickstart/skipnets/<id>": "what a run prints at its end",
    "model.cuda_graphs: 1,044 training steps ran from CUDA graphs, 0 without": (
        "what a run with CUDA graphs prints when training ends"
    ),
}

#: What a command's output must show, where the README says so in its comment.
SHOWS = {
    ".venv/bin/skipnets plugins": ["BlockCensus", "skipnets-example-plugin", "0.1.0"],
    ".venv/bin/skipnets models 'example_*'": ["example_resmlp"],
    "skipnets --version": [f"skipnets {skipnets.__version__}"],
    "skipnets models --details resnet50": ["FLOPs", "8.18G"],
}


@dataclass
class Block:
    line: int  # of the opening fence
    language: str
    text: str
    section: str  # the "## " heading it is under

    def __repr__(self) -> str:
        return f"README.md:{self.line} ({self.language or 'shell'}, {self.section})"


def readme_blocks() -> list[Block]:
    """Every fenced block, those indented in a list item too (their indent removed)."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        before = text[: match.start()]
        headings = re.findall(r"^## (.+)$", before, re.M)
        indent = len(match.group(1))
        body = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
        found.append(
            Block(before.count("\n") + 1, match.group(2), body, headings[-1] if headings else "")
        )
    return found


BLOCKS = readme_blocks()


def _of(language: str) -> list[Block]:
    return [block for block in BLOCKS if block.language == language]


# -- python -----------------------------------------------------------------------------------


def _printed_value(lines: list[str], after: int) -> Any:
    """The Python value in the comment lines right after line ``after`` (1-based), if any."""
    comment = []
    for line in lines[after:]:
        if not line.startswith("#"):
            break
        comment.append(line[1:])
    try:
        return ast.literal_eval("".join(comment).strip()) if comment else None
    except (ValueError, SyntaxError):
        return None


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    """Run ``block`` statement by statement in ``namespace``; a statement followed by a comment
    holding a Python value must print that value."""
    lines = block.text.splitlines()
    tree = ast.parse(block.text)
    for statement in tree.body:
        expected = _printed_value(lines, statement.end_lineno)
        module = ast.Module(body=[statement], type_ignores=[])
        ast.increment_lineno(module, block.line)  # tracebacks name the README's lines
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(module, str(README), "exec"), namespace)
        if expected is not None:
            assert ast.literal_eval(output.getvalue().strip()) == expected, (
                f"{block}: line {statement.lineno} prints {output.getvalue().strip()}, "
                f"the README says {expected}"
            )


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry as it is, in a copy that the README's registrations go into."""
    skipnets.list_models()  # the zoo and entry points first, so the copy holds them
    monkeypatch.setattr(registry, "_models", dict(registry._models))


def run_section(section: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"readme_{section.lower().replace(' ', '_')}"}
    for block in _of("python"):
        if block.section == section:
            run_python(block, namespace)
    return namespace


@pytest.mark.parametrize("section", sorted({b.section for b in _of("python")}))
def test_python_blocks_run_in_order(section: str, scratch_registry) -> None:
    run_section(section)


def test_a_printed_value_that_differs_fails(scratch_registry) -> None:
    """The check of printed values is real: a README line that claimed another output fails."""
    wrong = Block(1, "python", "print(sorted([3, 1, 2]))\n# [1, 2]\n", "a test")
    with pytest.raises(AssertionError, match="the README says"):
        run_python(wrong, {})


# -- yaml and toml ----------------------------------------------------------------------------

CONFIG_KEYS = {"model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything"}


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin package installed as the README says, but into a scratch folder."""
    root = tmp_path_factory.mktemp("example")
    source = root / "source"  # pip builds in the source tree: keep the repository clean
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(root / "site"), str(source)],
        check=True,
    )  # fmt: skip
    return root / "site"


@pytest.fixture
def example_plugin(example_site: Path, monkeypatch: pytest.MonkeyPatch, scratch_registry):
    """The example package on the path, its plugin discovered and its model registered."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    plugins.discover_plugins(refresh=True)
    yield
    monkeypatch.undo()
    plugins.discover_plugins(refresh=True)


def _data_root(config: dict[str, Any], tmp_path: Path) -> list[str]:
    """Tiny copies of the dataset files a config reads, and the option that points at them."""
    name = str((config.get("data") or {}).get("class_path", ""))
    if name.endswith("CIFAR10"):
        return [f"--data.init_args.root={write_cifar10(tmp_path / 'data')}"]
    if name.endswith("CIFAR100"):
        return [f"--data.init_args.root={write_cifar100(tmp_path / 'data')}"]
    return []


@pytest.mark.parametrize("block", _of("yaml"), ids=repr)
def test_yaml_blocks_are_valid_configs(block: Block, tmp_path, request) -> None:
    from skipnets.lightning_cli import SkipnetsCLI

    config = yaml.safe_load(block.text)
    assert isinstance(config, dict), block
    if "lines" in config:  # a study file, its base config elided
        check_study_block(block, config, tmp_path)
        return
    assert set(config) <= CONFIG_KEYS, block
    if "BlockCensus" in block.text or "example_" in block.text:
        request.getfixturevalue("example_plugin")
    path = tmp_path / "block.yaml"
    path.write_text(block.text)
    # A part of a config (only trainer callbacks, only data) goes on top of the quickstart's.
    configs = ["--config", str(path)]
    if "model" not in config:
        configs = ["--config", str(QUICKSTART), *configs]
    args = [*configs, *_data_root(config, tmp_path), f"--trainer.default_root_dir={tmp_path}"]
    cli = SkipnetsCLI(args=args, run=False)  # parsed, checked and every class built
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        name = callback["class_path"].rsplit(".", 1)[-1]
        assert any(type(c).__name__ == name for c in cli.trainer.callbacks), name


def check_study_block(block: Block, config: dict[str, Any], tmp_path: Path) -> None:
    """A study file, with the quickstart as its elided base, is read by ``skipnets study`` into
    one run per line and panel value, each a ``skipnets fit`` command."""
    from skipnets.study import load_study

    assert config["base"] == {"...": None}, f"{block}: only the base may be elided"
    config["base"] = str(QUICKSTART)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    study = load_study(path, root=tmp_path / "study")
    panels = len(config.get("panels", {}).get("values", [None]))
    assert len(study.runs) == len(config["lines"]) * panels, block


@pytest.mark.parametrize("block", _of("toml"), ids=repr)
def test_toml_blocks_parse_and_the_example_declares_what_the_readme_shows(block: Block) -> None:
    shown = tomllib.loads(block.text)["project"]["entry-points"]
    if "skipnets_example_plugin" in block.text:
        declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
        for group, entries in shown.items():
            assert entries.items() <= declared["project"]["entry-points"][group].items()


# -- shell ------------------------------------------------------------------------------------


def commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, spaces normalised."""
    text = block.text.replace("\\\n", " ")
    return [" ".join(shlex.split(line, comments=True)) for line in text.splitlines() if line]


def _quoted(command: str) -> str:
    return shlex.join(shlex.split(command))


SHELL = [b for b in _of("") if b.text.splitlines()[0] not in NOT_COMMANDS]


@pytest.mark.parametrize("block", SHELL, ids=repr)
def test_shell_commands_run(block: Block, monkeypatch, capsys, request) -> None:
    monkeypatch.chdir(ROOT)
    for command in commands(block):
        if command in NOT_RUN:
            continue
        if command == ".venv/bin/pip install -e examples/skipnets-example-plugin":
            request.getfixturevalue("example_plugin")  # installed into a scratch folder
            continue
        program, *args = shlex.split(command)
        assert program in ("skipnets", ".venv/bin/skipnets"), (
            f"{block}: {command!r} is not run by this test: run it, or list it in NOT_RUN "
            "with the reason"
        )
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as stop:  # --print_config
            code = stop.code
        output = capsys.readouterr()
        assert code in (0, None), f"{command}: exit {code}\n{output.err[-2000:]}"
        for expected in SHOWS.get(_quoted(command), SHOWS.get(command, [])):
            assert expected in output.out, f"{command}: {expected!r} not in\n{output.out}"


def test_every_listed_command_is_in_the_readme() -> None:
    """NOT_RUN and SHOWS name commands the README has, so that neither outlives its command."""
    present = {command for block in SHELL for command in commands(block)}
    present |= {_quoted(command) for command in present}
    assert set(NOT_RUN) <= present, set(NOT_RUN) - present
    assert set(SHOWS) <= present, set(SHOWS) - present
    assert all(any(b.text.startswith(first) for b in BLOCKS) for first in NOT_COMMANDS)


# -- where runs write -------------------------------------------------------------------------


def test_a_config_without_a_root_runs_under_runs(tmp_path, monkeypatch) -> None:
    """Not in the working directory: from a clone's root, ``skipnets/<run id>`` would be inside
    the package's source."""
    from skipnets.lightning_cli import SkipnetsCLI

    monkeypatch.chdir(tmp_path)
    cli = SkipnetsCLI(args=["--model.arch=plain_mlp", "--data=TwoSpirals"], run=False)
    assert cli.trainer.default_root_dir == "runs" and cli.trainer.logger.save_dir == "runs"
    assert list(tmp_path.iterdir()) == []  # nothing written before the run starts


def test_gitignore_lists_no_tracked_file_and_make_clean_what_runs_write() -> None:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--ignored", "--exclude-standard"],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout + listed.stderr
    clean = re.search(r"^clean:\n\trm -rf (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert clean and {"runs", "wandb", "lightning_logs", "comparisons"} <= set(clean[1].split())


# -- Writing an architecture: what its code promises -------------------------------------------


@pytest.fixture
def readme(scratch_registry) -> dict[str, Any]:
    """The namespace left by the section's code blocks, run in order into a scratch registry."""
    assert len([b for b in _of("python") if b.section == "Writing an architecture"]) == 4
    return run_section("Writing an architecture")


def test_the_example_registers_and_runs(readme: dict[str, Any]) -> None:
    info = skipnets.model_info("tinynet")
    assert (info.alias_of, info.family, info.input_kind, info.paper.year) == (
        "tiny_net",
        "tiny",
        "vector",
        2025,
    )
    assert info.summary == "Four skip blocks, one of each kind, on flat vectors."
    model = skipnets.create_model("tiny_net_32", num_classes=4)
    assert model.stem.out_features == 32 and model(torch.randn(2, 64)).shape == (2, 4)
    assert skipnets.model_info("tiny_net_64").summary == "TinyNet, 64 wide."
    names = [name for name, _ in skip_blocks(model)]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert [block.stage for _, block in skip_blocks(model)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("residual", lambda x: x),
        ("highway", lambda x: x),
        ("plain", lambda x: x),
        ("dense", lambda x: torch.cat([x, torch.zeros(x.shape[0], 8)], dim=1)),
    ],
)
def test_each_kind_lesioned_is_its_identity_path(readme, kind, expected) -> None:
    model = skipnets.create_model("tiny_net").eval()
    block = next(b for _, b in skip_blocks(model) if b.kind == kind)
    x = torch.randn(3, 16)
    block.lesioned = True
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected(x))
        model(torch.randn(3, 64))  # the whole net still runs


def test_highway_example_is_the_highway_formula(readme) -> None:
    layer = readme["Highway"](6)
    x = torch.randn(4, 6)
    h, t = torch.relu(layer.transform(x)), torch.sigmoid(layer.gate(x))
    torch.testing.assert_close(layer(x), t * h + (1 - t) * x)


def test_observer_sees_the_branch_after_stochastic_depth(readme) -> None:
    block = readme["Residual"](4)
    x = torch.randn(64, 4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = block.observe(lambda blk, inp, out: seen.append((inp, out)))
    block.survival_prob = 0.25

    block.eval()  # scaling "test": the branch times its survival probability
    with torch.no_grad():
        y = block(x)
    inp, out = seen.pop()
    assert inp is x
    torch.testing.assert_close(out, 0.25 * block.branch(x))
    torch.testing.assert_close(y, x + out)

    block.train()
    block.drop_mode, block.scaling = "sample", "inverted"  # a mask, and division by p
    torch.manual_seed(0)
    y = block(x).detach()
    out = seen.pop()[1].detach()
    kept = out.abs().sum(dim=1) > 0
    assert 0 < int(kept.sum()) < len(x)
    torch.testing.assert_close(out[kept], block.branch(x)[kept].detach() / 0.25)
    torch.testing.assert_close(y, x + out)

    block.drop_mode = "batch"  # a dropped branch does not run: no call
    calls = 0
    for _ in range(40):
        before = len(seen)
        block(x)
        calls += len(seen) - before
        assert len(seen) - before == int(block.last_kept)
    assert 0 < calls < 40

    block.lesioned = True
    before = len(seen)
    block(x)
    assert len(seen) == before  # lesioned: not called
    handle.remove()
    block.lesioned = False
    block(x)
    assert len(seen) == before


def test_a_module_assigned_to_branch_is_a_clear_error() -> None:
    class FirstGuess(SkipBlock):
        def __init__(self) -> None:
            super().__init__()
            self.branch = nn.Linear(4, 4)

    with pytest.raises(TypeError, match=r"must define the method `def branch\(self, x\)`"):
        FirstGuess()

    class ShortcutModule(SkipBlock):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.shortcut = nn.Linear(4, 4)

        def branch(self, x):
            return self.linear(x)

    with pytest.raises(TypeError, match=r"ShortcutModule.shortcut is a method of SkipBlock"):
        ShortcutModule()
