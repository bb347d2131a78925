"""The StochasticDepth plugin in a real Trainer: depth rules, schedules, both scaling rules, both
granularities, skipped computation, determinism at eval, resume, and bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from skipnets_plugins.stochastic_depth import StochasticDepth
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from skipnets.cli import main
from skipnets.errors import ConfigError
from skipnets.module import Classifier
from skipnets.nn import SkipBlock, skip_blocks


class CountingBlock(SkipBlock):
    """``y = x + W x``; counts how often its branch runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.calls = 0

    def branch(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.linear(x)


class Net(L.LightningModule):
    def __init__(self, depth: int = 6, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.Sequential(*(CountingBlock(width) for _ in range(depth)))
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Recorder(L.Callback):
    """Per training step: each block's survival probability and whether its branch ran."""

    def __init__(self) -> None:
        self.probs: list[list[float]] = []
        self.kept: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.probs.append([b.survival_prob for _, b in skip_blocks(pl_module)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.kept.append([float(b.last_kept) for _, b in skip_blocks(pl_module)])


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    return quiet_trainer(callbacks=callbacks, **{"default_root_dir": tmp_path, **kwargs})


def set_up(tmp_path: Path, net: Net, **options) -> StochasticDepth:
    callback = StochasticDepth(**options)
    callback.setup(trainer(tmp_path, [callback]), net, "fit")
    return callback


def test_depth_rules(tmp_path: Path) -> None:
    net = Net(depth=6)
    set_up(tmp_path, net, survival_prob=0.5)
    probs = [b.survival_prob for b in net.blocks]
    assert probs == pytest.approx([1 - d / 6 * 0.5 for d in range(1, 7)])  # Huang's linear decay
    assert probs[-1] == pytest.approx(0.5)

    net = Net(depth=6)
    set_up(tmp_path, net, survival_prob=0.8, rule="uniform")
    assert [b.survival_prob for b in net.blocks] == pytest.approx([0.8] * 6)

    net = Net(depth=3)
    callback = set_up(tmp_path, net, survival_prob=[0.9, 0.6, 0.3])
    assert [b.survival_prob for b in net.blocks] == pytest.approx([0.9, 0.6, 0.3])
    assert callback.expected_blocks == pytest.approx(1.8)
    # every droppable block shares one generator: the decisions every rank must agree on
    assert len({id(b.drop_generator) for b in net.blocks}) == 1


@pytest.mark.parametrize("scaling", ["test", "inverted"])
@pytest.mark.parametrize("drop_mode", ["batch", "sample"])
def test_scaling_rules(tmp_path: Path, scaling: str, drop_mode: str) -> None:
    """A kept branch is used as is (test) or divided by p (inverted) in training; at eval it is
    multiplied by p (test) or used as is (inverted); either way eval gives the training
    expectation."""
    torch.manual_seed(0)
    net = Net(depth=1)
    p = 0.25
    set_up(
        tmp_path, net, survival_prob=p, rule="uniform", scaling=scaling, drop_mode=drop_mode, seed=3
    )
    block = net.blocks[0]
    x = torch.randn(1, 8).expand(4000, 8).contiguous()
    with torch.no_grad():
        branch = block.linear(x)
        kept_output = x + (branch / p if scaling == "inverted" else branch)
        block.train()
        if drop_mode == "batch":
            outputs = torch.stack([block(x[:1])[0] for _ in range(4000)])
        else:
            outputs = block(x)
        block.eval()
        evaluated = block(x[:1])[0]
    dropped = torch.isclose(outputs, x).all(1)
    kept = torch.isclose(outputs, kept_output).all(1)
    assert (dropped | kept).all()  # each output is exactly one of the two
    assert kept.float().mean() == pytest.approx(p, abs=0.03)
    expected_eval = x[0] + (p * branch[0] if scaling == "test" else branch[0])
    torch.testing.assert_close(evaluated, expected_eval)
    torch.testing.assert_close(outputs.mean(0), evaluated, atol=0.1, rtol=0.1)


def test_batch_mode_does_not_compute_dropped_branches(tmp_path: Path) -> None:
    net = Net(depth=6)
    recorder = Recorder()
    callback = StochasticDepth(survival_prob=0.3, seed=0)
    trainer(tmp_path, [callback, recorder], max_epochs=3).fit(net, loader())
    kept = torch.tensor(recorder.kept)
    calls = torch.tensor([b.calls for b in net.blocks], dtype=kept.dtype)
    assert kept.shape == (24, 6)
    assert 0 < kept.sum() < kept.numel()  # some branches dropped, some kept
    torch.testing.assert_close(calls, kept.sum(0))  # exactly the kept ones ran
    logged = net.trainer.callback_metrics
    assert float(logged["stochastic_depth/active_blocks"]) == kept[-1].sum().item()
    assert float(logged["stochastic_depth/expected_blocks"]) == pytest.approx(
        sum(1 - d / 6 * 0.7 for d in range(1, 7))
    )


def test_eval_is_deterministic_and_full_depth(tmp_path: Path) -> None:
    net = Net(depth=6)
    set_up(tmp_path, net, survival_prob=0.2, rule="uniform")
    net.eval()
    x = torch.randn(5, 4)
    before = [b.calls for b in net.blocks]
    torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    assert [b.calls - c for b, c in zip(net.blocks, before)] == [2] * 6


def test_same_seed_same_decisions() -> None:
    """What keeps DDP ranks in step: equal seeds give equal batch-mode decisions."""
    patterns = []
    for _ in range(2):
        net = Net(depth=5)
        callback = StochasticDepth(survival_prob=0.5, seed=11)
        callback.setup(L.Trainer(accelerator="cpu", logger=False), net, "fit")
        net.train()
        pattern = []
        for _ in range(20):
            net(torch.randn(3, 4))
            pattern.append([b.last_kept for b in net.blocks])
        patterns.append(pattern)
    assert patterns[0] == patterns[1]


def test_warmup_schedules_and_resume(tmp_path: Path) -> None:
    """A linear warm-up over 4 epochs; stopped after 2 and resumed, the run goes on exactly as
    the uninterrupted one: the same probabilities and the same drop decisions."""
    options = dict(survival_prob=0.5, rule="uniform", schedule="linear", warmup=4, seed=5)

    def fit(
        epochs: int, ckpt_path: Path | None = None
    ) -> tuple[Recorder, StochasticDepth, L.Trainer]:
        torch.manual_seed(0)
        recorder, callback = Recorder(), StochasticDepth(**options)
        run = trainer(tmp_path, [callback, recorder], max_epochs=epochs)
        run.fit(Net(depth=3), loader(), ckpt_path=ckpt_path)
        return recorder, callback, run

    whole, _, _ = fit(6)
    first, stopped, run = fit(2)
    run.save_checkpoint(tmp_path / "stopped.ckpt")
    second, _, _ = fit(6, tmp_path / "stopped.ckpt")

    probs = torch.tensor(whole.probs)
    # 8 batches an epoch: the drop rate grows by 0.5 / 32 per batch, then stays at 0.5
    expected = [1 - 0.5 * min(1.0, step / 32) for step in range(48)]
    torch.testing.assert_close(probs[:, 0], torch.tensor(expected, dtype=probs.dtype))
    assert first.probs + second.probs == whole.probs
    assert first.kept + second.kept == whole.kept
    assert stopped.state_dict()["survival_probs"] == pytest.approx([1 - 0.5 * 15 / 32] * 3)

    # right after the restore, before any step: the checkpoint's probabilities
    net = Net(depth=3)
    restored = StochasticDepth(**options)
    restored.setup(trainer(tmp_path, [restored]), net, "fit")
    assert [b.survival_prob for b in net.blocks] == [1.0, 1.0, 1.0]
    restored.load_state_dict(
        torch.load(tmp_path / "stopped.ckpt", weights_only=False)["callbacks"]["StochasticDepth"]
    )
    assert [b.survival_prob for b in net.blocks] == pytest.approx(stopped.current)


def test_user_schedule_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_schedules.py").write_text(
        textwrap.dedent(
            """
            def after_two_steps(epoch, step):
                return 0.0 if step < 2 else 1.0

            def too_much(epoch, step):
                return 2.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recorder = Recorder()
    callback = StochasticDepth(
        survival_prob=0.5, rule="uniform", schedule="my_schedules.after_two_steps"
    )
    trainer(tmp_path, [callback, recorder], max_steps=4).fit(Net(depth=2), loader())
    assert [row[0] for row in recorder.probs] == [1.0, 1.0, 0.5, 0.5]

    with pytest.raises(ConfigError, match="must return a fraction"):
        set_up(tmp_path, Net(), schedule="my_schedules:too_much")
    with pytest.raises(ConfigError, match="could not import"):
        StochasticDepth(schedule="my_schedules.missing")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"survival_prob": 0.0}, r"survival_prob must be in \(0, 1\]"),
        ({"survival_prob": 1.5}, r"survival_prob must be in \(0, 1\]"),
        ({"survival_prob": [0.5, -0.1]}, r"survival_prob\[1\] must be in \(0, 1\]"),
        ({"survival_prob": [0.5], "rule": "linear"}, "leave rule unset"),
        ({"schedule": "linear"}, "needs warmup > 0"),
        ({"kinds": ["plain"]}, "never dropped"),
    ],
)
def test_bad_arguments(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StochasticDepth(**options)


def test_bad_models_and_strategies(tmp_path: Path) -> None:
    plain = Classifier("plain_mlp", {"depth": 4}, num_classes=10, input_shape=(64,))
    with pytest.raises(ConfigError, match="'plain_mlp' has only plain blocks"):
        set_up(tmp_path, plain)
    no_blocks = Classifier("plain_mlp", {"depth": 2}, num_classes=10, input_shape=(64,))
    with pytest.raises(ConfigError, match="has no skip blocks"):
        set_up(tmp_path, no_blocks)
    with pytest.raises(ConfigError, match="lists 2 probabilities but the model has 6"):
        set_up(tmp_path, Net(depth=6), survival_prob=[0.5, 0.5])
    # One DDP process: the wrapper DDP puts around the model says what it allows.
    ddp = trainer(tmp_path, [StochasticDepth()], strategy="ddp", devices=1, max_steps=1)
    allowing = "ddp_find_unused_parameters_true"
    try:
        with pytest.raises(ConfigError, match="ddp_find_unused_parameters_true"):
            ddp.fit(Net(), loader())
        trainer(tmp_path, [StochasticDepth()], strategy=allowing, devices=1, max_steps=1).fit(
            Net(), loader()
        )
    finally:
        if torch.distributed.is_initialized():  # the rest of the suite runs without a group
            torch.distributed.destroy_process_group()


def test_cli_rejects_a_bad_probability(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(
        [
            "fit",
            "--model.arch=resnet20",
            "--data=Digits",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=StochasticDepth",
            "--trainer.callbacks.survival_prob=1.5",
        ]
    )
    assert status == 2
    assert "survival_prob must be in (0, 1], got 1.5" in capsys.readouterr().err
