import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch import nn

from skipnets import Classifier
from skipnets.data import Digits
from skipnets.errors import ConfigError
from skipnets.module import param_groups


def _trainer(**kwargs):
    return quiet_trainer(**kwargs)


def test_mlp_learns_digits_and_reports_metrics():
    L.seed_everything(0)
    data = Digits(image_size=None, batch_size=64)
    model = Classifier(
        arch="highway_mlp",
        arch_kwargs={"depth": 6, "width": 64},
        num_classes=10,
        input_shape=data.input_shape,
        optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 3e-3}},
        lr_scheduler={
            "class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau",
            "init_args": {"patience": 2},
        },
    )
    trainer = _trainer(max_epochs=6)
    trainer.fit(model, datamodule=data)
    assert {"val/loss", "val/acc", "train/acc", "train/loss"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    assert results["test/acc"] > 0.9
    assert results["test/acc_top5"] >= results["test/acc"]
    assert model.model.blocks[0].gate.in_features == 64  # in_features came from the data


def test_weight_decay_exclusion_groups():
    model = Classifier(arch="resnet20", num_classes=10, input_shape=(3, 32, 32))
    assert len(param_groups(model.model, True)) == 1
    decay, no_decay = param_groups(model.model, False)
    bn_and_bias = [
        p for m in model.model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    ]
    bn_and_bias.append(model.model.fc.bias)
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in bn_and_bias}
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.model.parameters()))
    model = Classifier(
        arch="resnet20",
        num_classes=10,
        input_shape=(3, 32, 32),
        weight_decay_norm_and_bias=False,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "weight_decay": 1e-4}},
        lr_scheduler={
            "class_path": "torch.optim.lr_scheduler.MultiStepLR",
            "init_args": {"milestones": [2]},
        },
    )
    config = model.configure_optimizers()
    groups = config["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_label_smoothing_changes_the_loss():
    torch.manual_seed(0)
    plain = Classifier(arch="plain_mlp", num_classes=10, input_shape=(64,))
    smooth = Classifier(arch="plain_mlp", num_classes=10, input_shape=(64,), label_smoothing=0.2)
    smooth.load_state_dict(plain.state_dict())
    batch = (torch.randn(8, 64), torch.arange(8))
    assert not torch.isclose(plain.training_step(batch, 0), smooth.training_step(batch, 0))
    with pytest.raises(ConfigError, match="label_smoothing"):
        Classifier(arch="plain_mlp", label_smoothing=1.5)


def test_model_and_data_mismatches_are_config_errors():
    with pytest.raises(ConfigError, match="takes images"):
        Classifier(arch="resnet20", num_classes=10, input_shape=(64,))
    with pytest.raises(ConfigError, match="10 classes"):
        Classifier(
            arch="resnet20", arch_kwargs={"num_classes": 3}, num_classes=10, input_shape=(1, 8, 8)
        )


def test_warmup_multistep_schedule():
    from skipnets.schedulers import WarmupMultiStepLR

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = WarmupMultiStepLR(
        optimizer, milestones=[3, 5], gamma=0.1, warmup_epochs=1, warmup_factor=0.1
    )
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(rates, [0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    resumed = WarmupMultiStepLR(optimizer, milestones=[1], warmup_epochs=0)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.milestones == [3, 5] and resumed.last_epoch == 7
    with pytest.raises(ConfigError):
        WarmupMultiStepLR(optimizer, milestones=[1], warmup_factor=0.0)


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


ONE_CYCLE = {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.5}}


# Lightning's note on the test's set-up: stepping per epoch is one of the cases under test.
@pytest.mark.filterwarnings("ignore:A `OneCycleLR` scheduler is using 'interval'")
@pytest.mark.parametrize(("interval", "total"), [("step", 8), ("epoch", 2)])
def test_one_cycle_gets_the_runs_length_and_steps_at_the_interval(interval, total):
    data = Digits(image_size=None, batch_size=64)
    model = Classifier(
        arch="plain_mlp",
        arch_kwargs={"depth": 2, "width": 16},
        num_classes=10,
        input_shape=data.input_shape,
        lr_scheduler=ONE_CYCLE,
        lr_scheduler_interval=interval,
    )
    rates = _LearningRates()
    trainer = _trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=[rates])
    trainer.fit(model, datamodule=data)
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == interval and config.scheduler.total_steps == total
    first_epoch = rates.rates[:4]
    if interval == "step":  # a new rate at every step
        assert len(set(first_epoch)) == 4
    else:
        assert len(set(first_epoch)) == 1 and rates.rates[4] != rates.rates[0]


def test_scheduler_interval_errors_are_config_errors():
    with pytest.raises(ConfigError, match="'epoch' or 'step'"):
        Classifier(arch="plain_mlp", lr_scheduler_interval="batch")
    data = Digits(image_size=None, batch_size=64)
    plateau = Classifier(
        arch="plain_mlp",
        num_classes=10,
        input_shape=data.input_shape,
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"},
        lr_scheduler_interval="step",
    )
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        _trainer(max_steps=2).fit(plateau, datamodule=data)
