"""Distributed runs: 2-process DDP on CPU against one process, distributed sampling, SLURM
requeue and resume, torchrun/srun device counts, synchronised batch norm."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_skipnets
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.utilities.data import _update_dataloader
from run_probes import wandb_history
from torch import nn

from skipnets import create_model
from skipnets.cli import main
from skipnets.data import Digits, TwoSpirals
from skipnets.data.base import ResumableLoader
from skipnets.lightning_cli import SkipnetsCLI
from skipnets.nn import skip_blocks
from skipnets.runs import offline_folders

if str(ROOT) not in sys.path:  # the runs name probe callbacks as tests.run_probes.*
    sys.path.insert(0, str(ROOT))

# Full-batch gradient descent on the bundled digits (1,258 training images as 64-value vectors):
# two ranks with half the batch each average to exactly the single process's gradient, so the
# runs must agree up to float rounding. NormRatio is the plugin riding along.
DDP_RUN = [
    "fit",
    "--seed_everything=0",
    "--model.arch=plain_mlp",
    "--model.arch_kwargs.depth=4",
    "--model.arch_kwargs.width=32",
    "--data.class_path=Digits",
    "--data.init_args.image_size=null",
    "--trainer.max_epochs=2",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.callbacks+=NormRatio",
    "--trainer.callbacks.every_n_steps=1",
    "--trainer.callbacks+=tests.run_probes.RecordBatches",
]


def _rows(tensor: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, tensor.tolist()))


def test_ddp_run_matches_one_process(tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = main(
        [
            *DDP_RUN,
            f"--trainer.default_root_dir={single}",
            "--data.init_args.batch_size=1258",
            f"--trainer.callbacks.folder={single / 'seen'}",
        ]
    )
    assert one == 0
    two = run_skipnets(
        *DDP_RUN,
        f"--trainer.default_root_dir={ddp}",
        "--data.init_args.batch_size=629",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        f"--trainer.callbacks.folder={ddp / 'seen'}",
        env=OWN_WANDB_SERVICE,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed_backend=gloo" in two.stdout + two.stderr

    # Rank zero alone created a W&B run: one offline folder, one run directory.
    folders = list((ddp / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    (run,) = (ddp / "skipnets").iterdir()
    assert folders[0].name.endswith(run.name)
    assert (run / "norm_ratio" / "norm_ratio.csv").exists()

    def validation(root: Path) -> list[dict[str, float]]:
        (log,) = root.glob("wandb/offline-run-*/run-*.wandb")
        rows = [row for row in wandb_history(log) if "val/acc" in row]
        return [{k: row[k] for k in ("epoch", "val/acc", "val/loss")} for row in rows]

    expected, got = validation(single), validation(ddp)
    assert [row["epoch"] for row in got] == [0, 1]
    for mine, theirs in zip(got, expected):
        assert mine["val/acc"] == pytest.approx(theirs["val/acc"], abs=1e-6)
        assert mine["val/loss"] == pytest.approx(theirs["val/loss"], abs=1e-5)
    # The test split has 359 images, which two ranks cannot share evenly: each is counted once
    # (Lightning's sampler would count one twice), so the accuracy is the single process's.
    (test_single,) = [
        r for r in wandb_history(next(single.glob("wandb/*/run-*.wandb"))) if "test/acc" in r
    ]
    (test_ddp,) = [
        r for r in wandb_history(next(ddp.glob("wandb/*/run-*.wandb"))) if "test/acc" in r
    ]
    assert test_ddp["test/acc"] == pytest.approx(test_single["test/acc"], abs=1e-6)

    # Each training image went to exactly one rank in each epoch.
    for epoch in (0, 1):
        whole = torch.load(single / "seen" / f"rank0-epoch{epoch}.pt")
        halves = [torch.load(ddp / "seen" / f"rank{r}-epoch{epoch}.pt") for r in (0, 1)]
        assert [len(h) for h in halves] == [629, 629]
        assert _rows(torch.cat(halves)) == _rows(whole)


@pytest.mark.parametrize("datamodule", [Digits(image_size=None, batch_size=50), TwoSpirals()])
def test_distributed_sampling_covers_each_sample_once(datamodule) -> None:
    # What Lightning's data connector does to a train loader under DDP, for two ranks.
    datamodule.setup()
    n = len(datamodule.train_set)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = datamodule.train_dataloader()
            sampler = _get_distributed_sampler(
                loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank
            )
            loader = _update_dataloader(loader, sampler)
            assert isinstance(loader, ResumableLoader)
            loader.sampler.set_epoch(epoch)
            seen.append(list(loader.sampler))
        assert len(seen[0]) == len(seen[1]) == (n + 1) // 2
        assert set(seen[0]) | set(seen[1]) == set(range(n))
        assert len(set(seen[0]) & set(seen[1])) == (n % 2)  # padding repeats one when odd
    assert seen[0] != list(range(0, n, 2))  # shuffled


# A subprocess started from a process that uses W&B would share its W&B service (WANDB_SERVICE
# is inherited), and a killed run's id would stay registered there; each run gets its own.
OWN_WANDB_SERVICE = {"WANDB_SERVICE": ""}

SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NAME": "skipnets",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "127.0.0.1",
}


def test_slurm_requeue_resumes_from_the_hpc_checkpoint(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {**SLURM_ENV, **OWN_WANDB_SERVICE, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    root = tmp_path / "job"
    run = [
        "fit",
        "--seed_everything=0",
        "--model.arch=plain_mlp",
        "--model.arch_kwargs.depth=4",
        "--model.arch_kwargs.width=16",
        "--data.class_path=TwoSpirals",
        "--data.init_args.batch_size=40",
        "--trainer.max_epochs=3",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}",
        "--test_after_fit=false",
    ]
    first = run_skipnets(
        *run,
        "--trainer.callbacks+=tests.run_probes.RequeueAt",
        "--trainer.callbacks.step=7",
        env=env,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = root / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=True)["global_step"] == 7

    second = run_skipnets(*run, env=env)  # the requeued job: same command, same job id
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {hpc}" in second.stdout + second.stderr
    (run_dir,) = (root / "skipnets").iterdir()  # one run directory: the W&B run continued
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 15
    assert len(offline_folders(root / "wandb", run_dir.name)) == 2


def test_cluster_config_selects_slurm_with_requeue(monkeypatch, tmp_path: Path) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    cli = SkipnetsCLI(
        args=[
            f"--config={ROOT / 'configs' / 'quickstart.yaml'}",
            f"--config={ROOT / 'configs' / 'cluster' / 'multinode.yaml'}",
            # The config's hardware, scaled to this machine; everything else as written.
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.num_nodes=1",
            "--trainer.sync_batchnorm=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    assert cli.config.last_checkpoint_every_n_steps == 200


@pytest.mark.parametrize(
    ("launcher_env", "devices", "nodes"),
    [
        (
            {
                "TORCHELASTIC_RUN_ID": "x",
                "LOCAL_WORLD_SIZE": "2",
                "WORLD_SIZE": "4",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500",
            },
            2,
            2,
        ),
        (
            {
                **SLURM_ENV,
                "SLURM_NTASKS": "6",
                "SLURM_NTASKS_PER_NODE": "3(x2)",
                "SLURM_NNODES": "2",
            },
            3,
            2,
        ),
    ],
)
def test_launchers_set_devices_and_nodes(launcher_env, devices, nodes, monkeypatch, tmp_path):
    for key, value in launcher_env.items():
        monkeypatch.setenv(key, value)
    cli = SkipnetsCLI(
        args=[
            "--data.class_path=TwoSpirals",
            "--model.arch=plain_mlp",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.trainer.num_devices == devices
    assert cli.trainer.num_nodes == nodes


# One model of every family that has both batch norm and skip blocks.
@pytest.mark.parametrize(
    "arch",
    [
        "resnet20",
        "resnet18",
        "plain_cnn",
        "preact_resnet110",
        "wrn_16_8",
        "densenet_bc_100_12",
        "speedrun_resnet9",
    ],
)
def test_sync_batchnorm_conversion_keeps_skip_blocks_working(arch: str) -> None:
    model = create_model(arch).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics to carry over
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    blocks = len(list(skip_blocks(model)))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        for m in synced.modules()
    )
    assert len(list(skip_blocks(synced))) == blocks
    assert torch.allclose(synced(x), before, atol=1e-5)


def test_sync_batchnorm_on_cpu_ddp_is_refused(tmp_path: Path, capsys) -> None:
    status = main(
        [
            "fit",
            "--data.class_path=TwoSpirals",
            "--model.arch=plain_mlp",
            "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.sync_batchnorm=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert status == 2
    assert "sync_batchnorm" in capsys.readouterr().err.splitlines()[-1]
