"""airbench94 through skipnets (Jordan 2024, arXiv:2404.00498): the network and its data-derived
whitening, the data path's reflect translate and alternating flip, the EMA callback (reference
values, lookahead, exact resume), test-time augmentation, decoupled hyperparameters, the
schedule, and the paper config on fake CIFAR-10 files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from datagen import write_cifar10
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from skipnets import Classifier
from skipnets.data import GPUCIFAR10
from skipnets.data.gpu import alternating_flips, augment
from skipnets.ema import EMA
from skipnets.errors import ConfigError
from skipnets.registry import create_model
from skipnets.schedulers import LinearWarmupDecayLR

TINY = {"widths": [4, 8, 8]}
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=12, test_size=10)


def _trainer(**kwargs) -> L.Trainer:
    return quiet_trainer(num_sanity_val_steps=0, **kwargs)


# -- the network ------------------------------------------------------------------------------


def test_parameter_count_is_the_papers_architecture():
    model = create_model("airbench94")
    whiten = 24 * 3 * 2 * 2 + 24  # 12 eigenvectors and their negatives over 2x2x3 patches, bias

    def block(c_in: int, c_out: int) -> int:  # two 3x3 convs without bias, two BatchNorms
        return 9 * c_in * c_out + 9 * c_out * c_out + 2 * (2 * c_out)

    head = 256 * 10  # no bias
    total = whiten + block(24, 64) + block(64, 256) + block(256, 256) + head
    assert sum(p.numel() for p in model.parameters()) == total == 1_972_792
    frozen = 24 * 3 * 2 * 2 + 2 * (64 + 256 + 256)  # whitening weights, BatchNorm scales
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == frozen


def test_batchnorm_uses_airbenchs_momentum_convention_and_no_trained_scale():
    model = create_model("airbench94", **TINY)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    for norm in norms:
        assert norm.momentum == pytest.approx(0.4) and norm.eps == 1e-12
        assert not norm.weight.requires_grad and norm.bias.requires_grad
    # From zero, one training batch leaves 0.4 of its mean in the running mean (0.6 of the old).
    norm = norms[0]
    x = torch.randn(16, 4, 5, 5) + 3.0
    norm(x)
    torch.testing.assert_close(norm.running_mean, 0.4 * x.mean(dim=(0, 2, 3)))


def test_same_shape_convolutions_start_as_the_identity_and_are_plain_skip_blocks():
    from skipnets.nn import skip_blocks

    model = create_model("airbench94", **TINY)
    blocks = list(skip_blocks(model))
    assert [(b.kind, b.stage) for _, b in blocks] == [("plain", 0), ("plain", 1), ("plain", 2)]
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(blocks[1][1].conv(x), x)
    blocks[1][1].lesioned = True
    assert blocks[1][1](x) is x


def test_whitening_layer_whitens_the_patches_it_was_initialised_from():
    torch.manual_seed(0)
    # Images whose 2x2 patches are strongly correlated: a smooth base plus small noise.
    base = F.interpolate(torch.randn(64, 3, 8, 8), size=32, mode="bilinear")
    images = base * 3 + 0.3 * torch.randn(64, 3, 32, 32)
    model = create_model("airbench94", **TINY)
    default = model.whiten.weight.clone()
    model.init_from_data(images)
    weight = model.whiten.weight
    assert not torch.allclose(weight, default) and not weight.requires_grad
    assert model.whiten.bias.abs().sum() == 0
    torch.testing.assert_close(weight[12:], -weight[:12])  # the negatives follow
    out = F.conv2d(images, weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = out.T @ out / len(out)
    # Whitened: unit variance where the eigenvalue dwarfs eps, no correlation, largest first.
    eigenvalues = torch.linalg.eigvalsh(
        (lambda p: p.T @ p / len(p))(
            images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        )
    ).flip(0)
    torch.testing.assert_close(
        covariance, torch.diag(eigenvalues / (eigenvalues + 5e-4)), atol=2e-3, rtol=1e-3
    )
    with pytest.raises(ConfigError, match="shape"):
        model.init_from_data(torch.randn(2, 1, 32, 32))


def test_bad_network_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="three"):
        create_model("airbench94", widths=[64, 256])
    with pytest.raises(ConfigError, match="batchnorm_momentum"):
        create_model("airbench94", batchnorm_momentum=1.5)


# -- the data path ------------------------------------------------------------------------------


def test_reflect_translate_crops_a_reflect_padded_copy():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    ours = augment(images, torch.Generator().manual_seed(5), 2, padding_mode="reflect")
    generator = torch.Generator().manual_seed(5)  # the same draws: top, then left
    top = torch.randint(0, 5, (64,), generator=generator)
    left = torch.randint(0, 5, (64,), generator=generator)
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    expected = torch.stack(
        [p[:, t : t + 32, s : s + 32] for p, t, s in zip(padded, top.tolist(), left.tolist())]
    )
    torch.testing.assert_close(ours * 255, expected)
    assert len(set(zip(top.tolist(), left.tolist()))) > 15  # offsets vary over the 5 x 5
    zeros = augment(images, torch.Generator().manual_seed(5), 2)
    assert not torch.equal(zeros, ours)  # the default pads with black, as before


def test_alternating_flip_is_a_fixed_half_that_alternates_each_epoch():
    indices = torch.arange(100_000)
    first = alternating_flips(0, indices, epoch=0)
    assert abs(first.float().mean().item() - 0.5) < 0.01
    assert torch.equal(alternating_flips(0, indices, epoch=1), ~first)
    assert torch.equal(alternating_flips(0, indices, epoch=6), first)
    other = alternating_flips(1, indices, epoch=0)
    assert abs((other == first).float().mean().item() - 0.5) < 0.01  # another seed, another half


def _flip_states(plain: GPUCIFAR10, alternate: GPUCIFAR10, epoch: int) -> dict[bytes, bool]:
    """Whether each training image (by content) was served mirrored in ``epoch``."""
    loaders = plain.train_dataloader(), alternate.train_dataloader()
    for loader in loaders:
        loader.sampler.set_epoch(epoch)
    states = {}
    for (x, y), (x_alt, y_alt) in zip(*loaders):
        assert torch.equal(y, y_alt)  # the same order: augmentation does not change it
        for image, served in zip(x, x_alt):
            mirrored = torch.equal(served, image.flip(-1))
            assert mirrored or torch.equal(served, image)
            states[image.numpy().tobytes()] = mirrored
    return states


def test_gpu_data_alternating_flip_mirrors_each_image_every_other_epoch(cifar_root: Path):
    common = dict(root=str(cifar_root), val_size=20, batch_size=8, seed=3)
    plain = GPUCIFAR10(augment=False, **common)
    alternate = GPUCIFAR10(crop_padding=0, flip="alternate", **common)
    plain.setup("fit"), alternate.setup("fit")
    epochs = [_flip_states(plain, alternate, epoch) for epoch in range(3)]
    assert len(epochs[0]) == 40 and epochs[0].keys() == epochs[1].keys()
    assert 0 < sum(epochs[0].values()) < 40
    assert all(epochs[1][k] != epochs[0][k] for k in epochs[0])
    assert epochs[2] == epochs[0]


def test_bad_data_options_are_config_errors(cifar_root: Path):
    with pytest.raises(ConfigError, match="padding_mode"):
        GPUCIFAR10(root=str(cifar_root), padding_mode="edge")
    with pytest.raises(ConfigError, match="flip"):
        GPUCIFAR10(root=str(cifar_root), flip="sometimes")
    with pytest.raises(ConfigError, match="below the image size"):
        GPUCIFAR10(root=str(cifar_root), crop_padding=32, padding_mode="reflect")


# -- the EMA callback ---------------------------------------------------------------------------


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(_floats(self))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def _floats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


class Record(L.Callback):
    """The module's float tensors at the end of each training batch (after the optimizer)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, trainer.current_epoch, _floats(pl_module)))


def test_ema_matches_a_reference_computed_by_hand():
    torch.manual_seed(0)
    module = Tiny()
    ema = EMA(decay=0.9, every_n_steps=2, decay_power=1.0, start_epoch=1)
    before = Record()  # listed first: sees the weights before the EMA's update
    trainer = _trainer(max_epochs=3, callbacks=[before, ema], limit_val_batches=1)
    trainer.fit(module, _loader(), _loader())
    total = 12  # 3 epochs of 4 steps
    reference = None
    for step, epoch, weights in before.steps:
        if step % 2 or epoch < 1:
            continue
        if reference is None:
            reference = weights
            continue
        rho = 0.9**2 * (step / total) ** 1.0
        reference = {k: rho * reference[k] + (1 - rho) * w for k, w in weights.items()}
    assert reference is not None and set(reference) == set(ema.averaged)
    for name, value in ema.averaged.items():
        torch.testing.assert_close(value, reference[name])
    # use_at_eval: validation ran on the average, and the module keeps it after fit.
    assert not torch.equal(before.steps[-1][2]["net.0.weight"], reference["net.0.weight"])
    torch.testing.assert_close(
        module.seen_in_validation[-1]["net.0.weight"], reference["net.0.weight"]
    )
    torch.testing.assert_close(
        _floats(module)["net.1.running_mean"], reference["net.1.running_mean"]
    )


# Lightning's note on the test's set-up: a bare Trainer without validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_lookahead_sets_the_weights_to_the_average():
    torch.manual_seed(0)
    module = Tiny()
    ema = EMA(decay=0.8, every_n_steps=3, lookahead=True, use_at_eval=False)
    after = Record()  # listed after the EMA: sees what it left
    trainer = _trainer(max_epochs=2, callbacks=[ema, after])
    trainer.fit(module, _loader())
    updates = [weights for step, _, weights in after.steps if step % 3 == 0]
    others = [weights for step, _, weights in after.steps if step % 3]
    assert len(updates) == 2
    for name, value in ema.averaged.items():
        torch.testing.assert_close(updates[-1][name], value)  # the last update set the weights
        torch.testing.assert_close(_floats(module)[name], value)  # and so did the epoch's end
    assert not torch.equal(others[-1]["net.0.weight"], ema.averaged["net.0.weight"])


def _fit_ema(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None):
    torch.manual_seed(0)
    module = Tiny()
    ema = EMA(decay=0.7, every_n_steps=3, use_at_eval=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(
        max_epochs=max_epochs, callbacks=[ema, checkpoints], enable_checkpointing=True
    )
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return module, ema


# Lightning's note on the test's set-up: a bare Trainer without validation data, resumed into another folder.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:The dirpath has changed from")
def test_ema_resumes_exactly_and_checkpoints_hold_the_average(tmp_path: Path):
    full_module, full_ema = _fit_ema(tmp_path / "full", max_epochs=3)
    first = sorted((tmp_path / "full").glob("epoch=0-*.ckpt"))[0]
    checkpoint = torch.load(first, weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("EMA"))
    for name, value in state["average"].items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value)
    assert not torch.equal(state["weights"]["net.0.weight"], state["average"]["net.0.weight"])
    resumed_module, resumed_ema = _fit_ema(tmp_path / "resumed", 3, ckpt_path=str(first))
    for name, value in full_ema.averaged.items():
        torch.testing.assert_close(resumed_ema.averaged[name], value, rtol=0, atol=0)
    for name, value in _floats(full_module).items():
        torch.testing.assert_close(_floats(resumed_module)[name], value, rtol=0, atol=0)


def test_ema_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ConfigError, match="every_n_steps"):
        EMA(every_n_steps=0)
    with pytest.raises(ConfigError, match="nothing uses"):
        EMA(lookahead=False, use_at_eval=False)


# -- the Classifier's options -----------------------------------------------------------------


def test_mirror_translate_tta_averages_six_views_as_airbench_does():
    torch.manual_seed(0)
    model = Classifier("airbench94", TINY, num_classes=10, input_shape=(3, 32, 32))
    model.hparams.tta = "mirror_translate"
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    net = model.model

    def mirrored(v):
        return (net(v) + net(v.flip(-1))) / 2

    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (mirrored(padded[..., :32, :32]) + mirrored(padded[..., 2:, 2:])) / 2
    expected = ((mirrored(x) + shifted) / 2).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(model.predict_step(x, 0), expected)
        model.hparams.tta = "mirror"
        torch.testing.assert_close(model.predict_step(x, 0), model.predict_step(x.flip(-1), 0))
        model.hparams.tta = "none"
        assert not torch.allclose(model.predict_step(x, 0), model.predict_step(x.flip(-1), 0))
    with pytest.raises(ConfigError, match="tta"):
        Classifier("airbench94", tta="flip")
    with pytest.raises(ConfigError, match="vectors"):
        Classifier("plain_mlp", tta="mirror")


def _airbench_fit(root: Path, max_epochs: int = 1, callbacks=(), **options) -> L.Trainer:
    data = GPUCIFAR10(root=str(root), val_size=20, batch_size=8, crop_padding=2, flip="alternate")
    arch_kwargs = {**TINY, **options.pop("arch_kwargs", {})}
    model = Classifier(
        "airbench94", arch_kwargs, num_classes=10, input_shape=(3, 32, 32), **options
    )
    trainer = _trainer(max_epochs=max_epochs, callbacks=list(callbacks), limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    return trainer


def test_decoupled_hyperparameters_give_airbenchs_sgd_groups(cifar_root: Path):
    optimizer = {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 11.5, "momentum": 0.85, "nesterov": True, "weight_decay": 0.0153},
    }
    trainer = _airbench_fit(
        cifar_root,
        optimizer=optimizer,
        norm_bias_lr_scale=64.0,
        decoupled_per_examples=1024,
        lr_scheduler={"class_path": "skipnets.schedulers.LinearWarmupDecayLR"},
        lr_scheduler_interval="step",
    )
    module = trainer.lightning_module
    groups = trainer.optimizers[0].param_groups
    bias_ids = {id(m.bias) for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)}
    (scaled,) = [g for g in groups if {id(p) for p in g["params"]} == bias_ids]
    (rest,) = [g for g in groups if g is not scaled]
    assert any(p is module.model.whiten.bias for p in rest["params"])  # not a norm bias
    # airbench94.py: lr = 11.5 / (1024 * (1 + 1 / (1 - 0.85))) for a summed loss; a mean over 8.
    lr = 11.5 * 8 / (1024 * (1 + 1 / 0.15))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 5  # 40 images in batches of 8, filled in from the run
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    assert rest["lr"] == pytest.approx(lr * factor) and scaled["lr"] == pytest.approx(
        64 * lr * factor
    )
    assert rest["weight_decay"] == pytest.approx(0.0153 / 11.5)
    assert scaled["weight_decay"] == pytest.approx(0.0153 / 11.5 / 64)
    # The decay per step is airbench's 0.0153 * 8 / (1024 * (1 + 1 / 0.15)) in both groups.
    decay = 0.0153 * 8 / (1024 * (1 + 1 / 0.15)) * factor
    assert rest["lr"] * rest["weight_decay"] == pytest.approx(decay)
    assert scaled["lr"] * scaled["weight_decay"] == pytest.approx(decay)


def test_decoupled_options_that_cannot_work_are_config_errors():
    with pytest.raises(ConfigError, match="SGD"):
        Classifier(
            "airbench94",
            optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}},
            decoupled_per_examples=1024,
        )
    with pytest.raises(ConfigError, match="OneCycleLR"):
        Classifier(
            "airbench94",
            norm_bias_lr_scale=64.0,
            lr_scheduler={"class_path": "torch.optim.lr_scheduler.OneCycleLR"},
        )
    with pytest.raises(ConfigError, match="positive"):
        Classifier("airbench94", decoupled_per_examples=0)


class Whitening(L.Callback):
    """The whitening layer's weights and bias at the start of training and after each epoch."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(pl_module)

    def _record(self, pl_module):
        whiten = pl_module.model.whiten
        self.weights.append(whiten.weight.detach().clone())
        self.biases.append(whiten.bias.detach().clone())


def _whitening_bias_trained_for_one_epoch(cifar_root: Path, callbacks=(), **options) -> tuple:
    """Two epochs with ``whiten_bias_epochs=1``: the trainer and the whitening layer's record,
    after checking that its bias trained in the first epoch and stayed as it was in the second."""
    record = Whitening()
    trainer = _airbench_fit(
        cifar_root,
        max_epochs=2,
        callbacks=[*callbacks, record],
        optimizer=SGD,
        arch_kwargs={"whiten_bias_epochs": 1},
        **options,
    )
    start, after_first, after_second = record.biases
    assert not torch.equal(after_first, start)  # trained in epoch 0
    assert torch.equal(after_second, after_first)  # not in epoch 1
    return trainer, record


def test_whitening_is_initialised_from_training_images_and_its_bias_trains_for_n_epochs(
    cifar_root: Path,
):
    torch.manual_seed(0)
    default = create_model("airbench94", **TINY).whiten.weight.detach().clone()
    trainer, record = _whitening_bias_trained_for_one_epoch(cifar_root)
    # Initialised at fit start from the 40 training images without augmentation.
    data = trainer.datamodule
    images = torch.cat([x for x, _ in data.analysis_split("train")])
    reference = create_model("airbench94", **TINY)
    reference.init_from_data(images)
    assert not torch.allclose(record.weights[0], default)
    torch.testing.assert_close(record.weights[0], reference.whiten.weight)
    assert all(torch.equal(w, record.weights[0]) for w in record.weights)  # never trained
    assert not trainer.lightning_module.model.whiten.bias.requires_grad


def test_linear_warmup_decay_schedule():
    optimizer = torch.optim.SGD(
        [
            {"params": [nn.Parameter(torch.zeros(1))]},
            {"params": [nn.Parameter(torch.zeros(1))], "lr": 6.4},
        ],
        lr=0.1,
    )
    scheduler = LinearWarmupDecayLR(optimizer, total_steps=100)
    rates = []
    for _ in range(101):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx([0.02, 1.28])  # 0.2x, each group its own rate
    assert rates[23] == pytest.approx([0.1, 6.4])  # the peak at 23 % of the run
    assert rates[100] == pytest.approx([0.007, 0.448])  # 0.07x at the end
    assert rates[60][0] == pytest.approx(0.1 * (1 - 0.93 * 37 / 77))
    with pytest.raises(ConfigError, match="total_steps"):
        LinearWarmupDecayLR(optimizer)


def test_a_compiled_network_stops_the_whitening_bias_without_compiling_again(cifar_root: Path):
    """Switching ``requires_grad`` would make a compiled network compile again (about 10 s on
    an H100): compiled, the bias keeps requiring a gradient and its gradient is dropped before
    the optimizer step instead, which leaves it as unchanged as the switch does."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer, _ = _whitening_bias_trained_for_one_epoch(cifar_root, compile={"backend": "eager"})
    assert trainer.lightning_module.model.whiten.bias.requires_grad
    # One graph for the training forward pass, traced once: nothing recompiled at epoch 1.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_from_cuda_graphs_the_whitening_bias_stops_without_a_new_recording(
    cifar_root: Path, graphs_on_the_cpu
):
    """Graphs repeat the backward pass they recorded, the bias's gradient included: with
    ``cuda_graphs`` the bias keeps requiring a gradient, which is dropped before the optimizer
    step, and the graphs recorded at the first step serve both epochs."""
    trainer, _ = _whitening_bias_trained_for_one_epoch(
        cifar_root, [SwitchedOffByAnEarlierFit()], cuda_graphs=True
    )
    assert trainer.lightning_module.model.whiten.bias.requires_grad
    assert graphs_on_the_cpu.records == [(8, 3, 32, 32)]


class SwitchedOffByAnEarlierFit(L.Callback):
    """The bias as a fit without graphs leaves it after its epochs: not requiring a gradient.
    A new fit trains it again in its first epochs (its optimizer takes it, and its graphs
    record it as trained)."""

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.model.whiten.bias.requires_grad_(False)


def test_a_new_fit_trains_the_whitening_bias_again_in_its_first_epochs(cifar_root: Path):
    _whitening_bias_trained_for_one_epoch(cifar_root, [SwitchedOffByAnEarlierFit()])
