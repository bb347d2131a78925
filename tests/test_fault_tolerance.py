"""Runs survive faults: SIGKILL at random steps and resume, SIGTERM, a kill while saving, a full
disk, two runs into one directory, a diverging loss, bad checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_skipnets
from run_probes import wandb_records

from skipnets.cli import main
from skipnets.data import TwoSpirals
from skipnets.data.base import ResumableLoader

if str(ROOT) not in sys.path:  # the runs name probe callbacks as tests.run_probes.*
    sys.path.insert(0, str(ROOT))

# 194 training points in batches of 40: 5 steps per epoch, 20 in all. Noise drawn from the
# global RNG on every batch and a cosine schedule make any slip in resuming show in the weights.
EVERY = 3
STEPS_PER_EPOCH, TOTAL = 5, 20
RUN = [
    "fit",
    "--seed_everything=0",
    "--model.arch=plain_mlp",
    "--model.arch_kwargs.depth=4",
    "--model.arch_kwargs.width=16",
    "--data.class_path=TwoSpirals",
    "--data.init_args.batch_size=40",
    "--lr_scheduler.class_path=torch.optim.lr_scheduler.CosineAnnealingLR",
    "--lr_scheduler.init_args.T_max=4",
    "--trainer.max_epochs=4",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.callbacks+=tests.run_probes.NoisyInputs",
    "--test_after_fit=false",
    f"--last_checkpoint_every_n_steps={EVERY}",
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@contextlib.contextmanager
def _running_until(marker: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """``skipnets fit`` of RUN with ``extra`` in a subprocess, handed over once ``marker``
    exists (a probe callback writes it); killed on the way out if it still runs."""
    command = [sys.executable, "-m", "skipnets", *RUN, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), process.stderr.read()[-3000:] if process.poll() else "no marker"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        process.stderr.close()


def _fit(root: Path, *extra: str):
    return run_skipnets(*RUN, f"--trainer.default_root_dir={root}", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights RUN ends with when nothing stops it: what every interrupted run must match."""
    root = tmp_path_factory.mktemp("uninterrupted")
    reference = _fit(root)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return _weights(root / "checkpoints" / "last.ckpt")


WITH_WANDB = [
    "--trainer.logger=WandbLogger",
    "--trainer.logger.init_args.project=skipnets",
    "--trainer.log_every_n_steps=1",
]
#: Each: SIGKILL at these steps, one after the other, resuming with ``--ckpt_path last`` each
#: time, and the steps last.ckpt is then from (None: any). Steps 9 and 11: killed in the middle
#: of epoch 1 as step 9's save was about to go into place (last.ckpt from step 6, and a side file
#: left behind), then at the end of epoch 2 (step 10). Then one random step for each of three
#: seeds; a failure names its plan, to rerun it alone.
KILL_PLANS: dict[str, tuple[list[int], list[int] | None]] = {
    "steps 9, 11": ([9, 11], [6, 10]),
    **{f"seed {s}": ([random.Random(s).randint(1, TOTAL - 1)], None) for s in (0, 1, 2)},
}


def _fit_with_wandb(root: Path, *extra: str) -> subprocess.CompletedProcess:
    """``_fit`` with W&B, its output written to a file rather than a pipe: W&B's service, which
    a killed run leaves behind until it notices, would hold a pipe open."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "stderr.txt"
    command = [sys.executable, "-m", "skipnets", *RUN, f"--trainer.default_root_dir={root}"]
    with open(log, "w") as stderr:
        done = subprocess.run(
            [*command, *WITH_WANDB, *extra],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=300,
        )
    done.stderr = log.read_text()
    return done


def _newest_last(root: Path) -> Path | None:
    found = list(root.glob("skipnets/*/checkpoints/last.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _logged(root: Path) -> tuple[set[int], set[int]]:
    """The steps with training metrics and the epochs with validation metrics in the W&B run
    files under ``root``, as far as they have been written."""
    trained: set[int] = set()
    validated: set[int] = set()
    for run_file in root.glob("wandb/offline-run-*/run-*.wandb"):
        for record in wandb_records(run_file, timeout=0):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            if "train/loss" in row:
                trained.add(json.loads(row["trainer/global_step"]))
            if "val/acc" in row:
                validated.add(json.loads(row["epoch"]))
    return trained, validated


def _kill_and_resume(plan: str, root: Path, expected: dict[str, torch.Tensor]) -> None:
    kills, saves = KILL_PLANS[plan]
    saved, kept = 0, []
    for step in kills:
        killed = _fit_with_wandb(
            root,
            "--ckpt_path=last",
            "--trainer.callbacks+=tests.run_probes.KillAt",
            f"--trainer.callbacks.step={step}",
        )
        assert killed.returncode == -signal.SIGKILL, f"{plan}: {killed.stderr[-2000:]}"
        last = _newest_last(root)
        saved = _step(last) if last is not None else 0
        kept.append(saved)
        assert step - saved <= EVERY, f"{plan}: killed at step {step}, last.ckpt from {saved}"
        # W&B's files hold every metric logged for the steps the checkpoint covers.
        trained, validated = _logged(root)
        lost = sorted(set(range(saved)) - trained)
        lost_epochs = sorted(set(range(saved // STEPS_PER_EPOCH)) - validated)
        assert not lost and not lost_epochs, (
            f"{plan}: killed at step {step}, last.ckpt is from step {saved}, but W&B's files "
            f"lack the training metrics of steps {lost} and the validation of epochs {lost_epochs}"
        )
    assert saves is None or kept == saves, f"{plan}: last.ckpt from steps {kept}"
    finished = _fit_with_wandb(root, "--ckpt_path=last")
    assert finished.returncode == 0, f"{plan}: {finished.stderr[-2000:]}"
    last = _newest_last(root)
    assert last is not None and _step(last) == TOTAL, plan
    weights = _weights(last)
    assert weights.keys() == expected.keys(), plan
    differ = [name for name, tensor in expected.items() if not torch.equal(weights[name], tensor)]
    assert not differ, f"{plan}: the resumed run ends with other weights ({', '.join(differ)})"
    assert _logged(root) == (set(range(TOTAL)), set(range(TOTAL // STEPS_PER_EPOCH))), plan
    # The side files of the saves that the kills cut short are gone.
    assert not list(last.parent.glob("*.partial")), plan


def test_runs_killed_at_any_step_resume_exactly_and_keep_their_wandb_history(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """SIGKILL at the steps of each of KILL_PLANS and resume, as a cluster that loses nodes
    would: every run ends bit-identical to an uninterrupted one, and after each kill W&B's
    offline files hold the metrics of every step and epoch that last.ckpt covers. The plans run
    side by side."""
    with ThreadPoolExecutor(len(KILL_PLANS)) as pool:
        runs = [
            pool.submit(_kill_and_resume, plan, tmp_path / f"plan{i}", uninterrupted)
            for i, plan in enumerate(KILL_PLANS)
        ]
    for run in runs:
        run.result()


# Lightning's note on the test's set-up: a bare Trainer resumed without skipnets' callbacks.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_kill_while_saving_leaves_the_previous_checkpoint(tmp_path: Path, caplog) -> None:
    marker = tmp_path / "saving"
    checkpoints = tmp_path / "checkpoints"
    with _running_until(
        marker,
        f"--trainer.default_root_dir={tmp_path}",
        "--last_checkpoint_every_n_steps=1",
        "--trainer.callbacks+=tests.run_probes.StallOnSave",
        "--trainer.callbacks.save=3",
        f"--trainer.callbacks.marker={marker}",
    ) as process:
        # The third save is under way: its bytes go to a side file, the old one is untouched.
        assert list(checkpoints.glob("last.ckpt.*.partial"))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert _step(checkpoints / "last.ckpt") == 2

    # The run resumes from it.
    resumed = [*RUN, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1"]
    with caplog.at_level("INFO"):
        assert main([*resumed, "--ckpt_path=last"]) == 0
    restored = f"Restored all states from the checkpoint at {checkpoints / 'last.ckpt'}"
    assert any(restored in record.getMessage() for record in caplog.records)
    assert _step(checkpoints / "last.ckpt") == 5


def test_nonfinite_loss_stops_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(
        [
            *RUN,
            f"--trainer.default_root_dir={tmp_path}",
            "--last_checkpoint_every_n_steps=1",
            "--optimizer.class_path=torch.optim.SGD",
            "--optimizer.init_args.lr=1e12",
        ]
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert message.startswith("skipnets: error: training diverged: the loss became")
    assert "at step " in message and "learning rate" in message and "depth" in message
    step = int(message.split("at step ")[1].split()[0])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert str(last) in message
    # The last checkpoint holds the last good step, with finite weights.
    assert _step(last) == step
    assert all(torch.isfinite(t).all() for t in _weights(last).values())


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good")
    assert main([*RUN, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"]) == 0
    return root / "checkpoints" / "last.ckpt"


def _bad(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "damaged-pickle":  # a pickle that refers to an object it never stored
        path.write_bytes(b"\x80\x02h\x34" + bytes(100))
    elif kind == "not-lightning":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickle":
        checkpoint = torch.load(good, weights_only=True)
        checkpoint["extra"] = Path("objects beyond tensors")
        torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("truncated", "not a readable checkpoint"),
        ("garbage", "not a readable checkpoint"),
        ("damaged-pickle", "not a readable checkpoint"),
        ("not-lightning", "not a Lightning checkpoint"),
        ("pickle", "--weights_only false"),
        ("missing", "no checkpoint at"),
    ],
)
def test_unusable_checkpoints_are_refused(
    kind: str, expected: str, good_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    path = _bad(kind, good_checkpoint, tmp_path)
    status = main([*RUN, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("skipnets: error: ") and expected in err[-1]


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_checks_its_checkpoint(
    subcommand: str, good_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    options = RUN[1:]
    truncated = _bad("truncated", good_checkpoint, tmp_path)
    assert main([subcommand, *options, f"--ckpt_path={truncated}"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    # Another architecture: a different depth.
    other = [a.replace("depth=4", "depth=6") for a in options]
    assert main([subcommand, *other, f"--ckpt_path={good_checkpoint}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a plain_mlp {'depth': 4, 'width': 16} model" in err
    assert "'depth': 6" in err


def test_an_unsafe_checkpoint_loads_when_trusted(good_checkpoint: Path, tmp_path: Path) -> None:
    trusted = _bad("pickle", good_checkpoint, tmp_path)
    options = RUN[1:]
    args = [
        f"--ckpt_path={trusted}",
        "--weights_only=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert main(["validate", *options, *args]) == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_resumes_mid_epoch_without_loading_skipped_batches(workers: int) -> None:
    data = TwoSpirals(batch_size=40, num_workers=workers)
    data.setup()
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    loader.sampler.set_epoch(3)
    full = [x for x, _ in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}

    fresh = TwoSpirals(batch_size=40, num_workers=workers)
    fresh.setup()
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, full[2:]))
    # Only the interrupted epoch is shortened; a new epoch has a new order.
    resumed.sampler.set_epoch(4)
    next_epoch = [x for x, _ in resumed]
    assert len(next_epoch) == len(full)
    assert not torch.equal(torch.cat(next_epoch), torch.cat(full))
    resumed.sampler.set_epoch(3)  # (persistent workers reuse their index stream)
    assert torch.equal(torch.cat([x for x, _ in resumed]), torch.cat(full))


@pytest.mark.parametrize(("every_n_epochs", "saves"), [(1, 3), (2, 2), (0, 1)])
def test_last_checkpoint_every_n_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_n_epochs: int, saves: int
) -> None:
    """Epoch-end saves of last.ckpt every N epochs; the last epoch's state is always saved."""
    from skipnets.checkpoints import LastCheckpoint

    steps: list[int] = []
    original = LastCheckpoint._save_last_checkpoint

    def counted(self, trainer, candidates):
        steps.append(trainer.global_step)
        return original(self, trainer, candidates)

    monkeypatch.setattr(LastCheckpoint, "_save_last_checkpoint", counted)
    args = [
        *RUN,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=3",
        "--last_checkpoint_every_n_steps=0",
        f"--last_checkpoint_every_n_epochs={every_n_epochs}",
    ]
    assert main(args) == 0
    assert len(steps) == saves
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == steps[-1]


def test_sigterm_saves_the_current_step_and_exits_143(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """SLURM's notice before pre-emption: last.ckpt at the step training stopped at, one line
    saying where it is, exit status 143; the resumed run ends where an uninterrupted one does."""
    root = tmp_path / "stopped"
    last = root / "checkpoints" / "last.ckpt"
    stopped = _fit(
        root, "--trainer.callbacks+=tests.run_probes.TermAt", "--trainer.callbacks.step=7"
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    message = stopped.stderr.strip().splitlines()[-1]
    assert message == (
        f"skipnets: stopped by SIGTERM; last.ckpt at step 8 is {last}: resume with --ckpt_path last"
    )
    assert _step(last) == 8  # not the step-6 save: no step lost
    resumed = _fit(root, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, tensor in _weights(last).items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_a_full_disk_stops_the_run_with_one_line_and_leaves_no_partial_file(tmp_path: Path):
    result = _fit(
        tmp_path,
        "--last_checkpoint_every_n_steps=1",
        "--trainer.callbacks+=tests.run_probes.DiskFullAt",
        "--trainer.callbacks.save=3",
    )
    assert result.returncode == 74, result.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"skipnets: error: could not write the checkpoint {last}: ")
    assert "No space left on device; the previous last.ckpt there is intact" in message
    assert "Traceback" not in result.stderr
    assert not list(last.parent.glob("*.partial"))
    assert _step(last) == 2  # the last save that succeeded


def test_a_running_run_is_never_resumed_or_overwritten(tmp_path: Path) -> None:
    """While one run trains into a directory, a second run there is refused with one line, and
    ``--ckpt_path last`` passes the running run over."""
    first_root, marker = tmp_path / "busy", tmp_path / "started"
    with _running_until(
        marker,
        f"--trainer.default_root_dir={first_root}",
        "--trainer.callbacks+=tests.run_probes.SlowSteps",
        "--trainer.callbacks.seconds=3",
        f"--trainer.callbacks.marker={marker}",
    ) as first:
        config = (first_root / "config.yaml").read_bytes()

        # Another run into the same directory (no logger: the directory is the root).
        second = _fit(first_root)
        assert second.returncode == 2
        assert f"the run directory {first_root} is in use by process {first.pid}" in second.stderr
        assert (first_root / "config.yaml").read_bytes() == config

        # --ckpt_path last in the same root, once the running run has a last.ckpt: it is
        # passed over, and there is no other.
        last, deadline = first_root / "checkpoints" / "last.ckpt", time.monotonic() + 120
        while not last.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert last.exists() and first.poll() is None
        third = _fit(first_root, "--ckpt_path=last")
        assert third.returncode == 2
        assert "every run under" in third.stderr and "is still running" in third.stderr
    # Once it has stopped, it can be resumed.
    assert _fit(first_root, "--ckpt_path=last").returncode == 0


def test_resuming_with_changed_settings_is_refused_or_allowed_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = [*RUN, f"--trainer.default_root_dir={tmp_path}"]
    assert main([*base, "--trainer.max_epochs=1"]) == 0
    changed = [*base, "--ckpt_path=last", "--data.init_args.batch_size=20"]
    changed += ["--optimizer.class_path=torch.optim.SGD", "--optimizer.init_args.lr=0.05"]
    capsys.readouterr()
    assert main(changed) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the checkpoint was trained with other settings (" in message
    assert "batch size: 40 -> 20" in message
    assert "optimizer: the default -> SGD(lr=0.05" in message
    assert "--allow_resume_changes=true" in message
    with pytest.warns(UserWarning, match=r"resuming with changed settings \(batch size: 40 -> 20"):
        assert main([*changed, "--allow_resume_changes=true"]) == 0
    assert _step(tmp_path / "checkpoints" / "last.ckpt") > 5


def test_out_of_memory_and_an_unwritable_root_end_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = [*RUN, f"--trainer.default_root_dir={tmp_path / 'run'}"]
    status = main(
        [*base, "--trainer.callbacks+=tests.run_probes.OutOfMemoryAt", "--trainer.callbacks.step=2"]
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 3
    assert message.startswith("skipnets: error: out of memory with batch_size=40 (CUDA out of")
    assert "--data.init_args.batch_size=20, and --trainer.accumulate_grad_batches=2" in message

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert main([*RUN, f"--trainer.default_root_dir={blocked / 'run'}"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (
        f"skipnets: error: cannot write to the run's root {blocked / 'run'} (Not a directory): "
        "choose another --trainer.default_root_dir"
    )


def test_an_endless_run_says_so_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    endless = _fit(
        tmp_path,
        "--trainer.max_epochs=-1",
        "--trainer.callbacks+=tests.run_probes.TermAt",
        "--trainer.callbacks.step=12",
    )
    assert endless.returncode == 143, endless.stderr[-3000:]
    assert "trainer.max_epochs=-1 and no max_steps or max_time: training goes on" in endless.stderr
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 13


def test_the_best_checkpoint_breaks_a_tie_in_accuracy_by_the_validation_loss() -> None:
    from types import SimpleNamespace

    from skipnets.checkpoints import BestCheckpoint

    best = BestCheckpoint(monitor="val/acc", mode="max")
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    trainer = SimpleNamespace(strategy=strategy, callback_metrics={})
    assert best.check_monitor_top_k(trainer, torch.tensor(1.0))  # nothing kept yet
    best.best_k_models = {"epoch=1.ckpt": torch.tensor(1.0)}
    best.kth_best_model_path, best.best_tie_value = "epoch=1.ckpt", 0.11
    for acc, loss, replaces in [
        (1.0, 0.05, True),  # as accurate, lower loss
        (1.0, 0.2, False),  # as accurate, higher loss
        (0.9, 0.01, False),  # less accurate, whatever the loss
        (1.1, 0.5, True),  # more accurate
    ]:
        trainer.callback_metrics = {"val/loss": torch.tensor(loss)}
        assert best.check_monitor_top_k(trainer, torch.tensor(acc)) is replaces, (acc, loss)
    state = best.state_dict()
    again = BestCheckpoint(monitor="val/acc", mode="max")
    again.load_state_dict(state)
    assert again.best_tie_value == 0.11  # a resumed run breaks ties the same way
