"""The fast paths compute what the plain paths compute: batched in-memory loading (alone and
under DDP's sampler), the cheap accuracy metric, channels-last, and a compiled network with an
observer attached to its skip blocks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from skipnets.data import Digits
from skipnets.errors import ConfigError
from skipnets.module import Classifier, TopKAccuracy
from skipnets.nn import skip_blocks


@pytest.fixture(scope="module")
def digits() -> Digits:
    data = Digits(image_size=None, batch_size=100, seed=3)
    data.setup("fit")
    return data


def _per_sample_batches(dataset: TensorDataset, indices: list[int], batch_size: int):
    """What a DataLoader over the dataset yields for these indices: one sample at a time,
    stacked by the default collate."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices)
    return list(loader)


def test_in_memory_loader_gives_the_per_sample_batches(digits: Digits) -> None:
    loader = digits.train_dataloader()
    assert type(loader.dataset).__name__ == "InMemoryDataset"
    loader.sampler.set_epoch(2)
    order = list(loader.sampler)
    batches = list(loader)
    expected = _per_sample_batches(digits.train_set, order, digits.batch_size)
    assert len(batches) == len(expected) == len(loader)
    for (x, y), (x_ref, y_ref) in zip(batches, expected):
        assert x.dtype == x_ref.dtype and y.dtype == y_ref.dtype
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    # Validation keeps its order.
    x_val, y_val = next(iter(digits.val_dataloader()))
    assert torch.equal(x_val, digits.val_set.tensors[0][:100])
    assert torch.equal(y_val, digits.val_set.tensors[1][:100])


def test_in_memory_loader_under_ddp_sampler_shards_the_data(digits: Digits) -> None:
    """Lightning swaps in a DistributedSampler under DDP (by ``_update_dataloader``): each rank
    gets its own half, batched exactly as the per-sample path would batch it."""
    n = len(digits.train_set)
    seen = []
    for rank in range(2):
        loader = digits.train_dataloader()
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, seed=5)
        sampler.set_epoch(1)
        loader = _update_dataloader(loader, sampler)
        indices = list(sampler)
        batches = list(loader)
        expected = _per_sample_batches(digits.train_set, indices, digits.batch_size)
        assert len(batches) == len(expected)
        for (x, y), (x_ref, y_ref) in zip(batches, expected):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        seen.append(set(indices))
    assert n % 2 == 0  # so the sampler pads nothing
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))


def test_topk_accuracy_equals_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(0)
    ours = TopKAccuracy((1, 5))
    top1 = MulticlassAccuracy(10, top_k=1, average="micro")
    top5 = MulticlassAccuracy(10, top_k=5, average="micro")
    for _ in range(5):
        logits = torch.randn(33, 10, generator=generator)
        logits[:4] = 0.0  # ties: argmax takes the first class, as torchmetrics does
        target = torch.randint(0, 10, (33,), generator=generator)
        for metric in (ours, top1, top5):
            metric.update(logits, target)
    result = ours.compute()
    assert result["acc"] == top1.compute()
    assert result["acc_top5"] == top5.compute()


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(
    model: Classifier, data: Digits, steps: int, *callbacks: L.Callback, precision: str = "32"
) -> list[float]:
    losses = _Losses()
    trainer = quiet_trainer(
        max_steps=steps, precision=precision, limit_val_batches=0, callbacks=[losses, *callbacks]
    )
    trainer.fit(model, datamodule=data)
    return losses.losses


def test_channels_last_computes_what_the_default_layout_computes() -> None:
    torch.manual_seed(0)
    plain = Classifier("resnet20", num_classes=10, input_shape=(1, 8, 8))
    fast = Classifier("resnet20", num_classes=10, input_shape=(1, 8, 8), channels_last=True)
    fast.load_state_dict(plain.state_dict())
    fast.setup("fit")  # what Lightning calls before training
    conv = fast.model.stem[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    layouts = []
    conv.register_forward_pre_hook(
        lambda module, args: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for model in (plain, fast):
        F.cross_entropy(model(x), y).backward()
    assert layouts == [True]  # the network converts its NCHW input itself
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # And it trains through the Trainer, starting from the same loss.
    torch.manual_seed(0)
    losses = _fit(fast, Digits(image_size=8, batch_size=16), 2)
    torch.manual_seed(0)
    reference = _fit(plain, Digits(image_size=8, batch_size=16), 2)
    assert losses[0] == pytest.approx(reference[0], rel=1e-5)


class _ObserveStep(L.Callback):
    """Observes every skip block on one training step only, as NormRatio does: the compiled
    network meets a new observer (and loses it again) in the middle of training."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.handles: list = []
        self.norms: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _, block in skip_blocks(pl_module.model):
                self.handles.append(block.observe(self._observe))

    def _observe(self, block, x, out) -> None:
        self.norms.append(out.detach().norm() / x.detach().norm())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def test_compiled_model_with_an_observer_matches_eager() -> None:
    # aot_eager: dynamo's tracing and AOT autograd, where hooks and observers are decided; the
    # default inductor backend generates C++ for the same graph (minutes on a small CPU).
    results = {}
    for compile in (False, {"backend": "aot_eager"}):
        torch.manual_seed(0)
        model = Classifier(
            "plain_mlp",
            {"depth": 5, "width": 16},
            num_classes=10,
            input_shape=(64,),
            compile=compile,
        )
        observer = _ObserveStep(step=1)
        losses = _fit(model, Digits(image_size=None, batch_size=64), 4, observer)
        results[bool(compile)] = (losses, [float(n) for n in observer.norms])
        # Compiled in place: a checkpoint has the same keys either way.
        assert not any("_orig_mod" in key for key in model.state_dict())
    (eager_losses, eager_norms), (compiled_losses, compiled_norms) = results[False], results[True]
    assert len(eager_norms) == len(compiled_norms) == 3  # three skip blocks, observed once
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_norms == pytest.approx(eager_norms, rel=1e-5)


def test_bf16_mixed_precision_trains_with_an_observer_attached() -> None:
    runs = {}
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        model = Classifier("resnet20", num_classes=10, input_shape=(1, 8, 8))
        observer = _ObserveStep(step=0)
        losses = _fit(model, Digits(image_size=8, batch_size=16), 2, observer, precision=precision)
        runs[precision] = (losses, observer.norms)
    (losses32, norms32), (losses16, norms16) = runs["32"], runs["bf16-mixed"]
    assert len(norms16) == len(norms32) == 9
    # bf16 keeps 8 bits of mantissa: the first step, from the same weights, agrees to a percent
    # or so; after that the runs drift apart as any two runs do.
    assert losses16[0] == pytest.approx(losses32[0], rel=0.02)
    assert all(torch.isfinite(torch.tensor(losses16)))
    assert [float(n) for n in norms16] == pytest.approx([float(n) for n in norms32], rel=0.05)


def test_bad_fast_path_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="channels_last applies to image models"):
        Classifier("plain_mlp", num_classes=10, input_shape=(64,), channels_last=True)
    with pytest.raises(ConfigError, match=r"torch\.compile does not take"):
        Classifier("resnet20", num_classes=10, compile={"modes": "max-autotune"})
    with pytest.raises(ConfigError, match="true, false or a dict"):
        Classifier("resnet20", num_classes=10, compile="yes")
