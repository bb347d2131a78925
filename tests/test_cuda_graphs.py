"""``model.cuda_graphs``: the training forward and backward from recorded CUDA graphs.

A CPU cannot record CUDA graphs; these tests run the Classifier's and ``TrainingGraph``'s side of
it against ``conftest.GraphsOnTheCPU``, a stand-in for ``torch.cuda.make_graphed_callables``
with its contract (warm-up passes, a static input, the forward replaced): which steps use the
graphs, that the result is the network's own, and what happens when recording fails or the
run cannot use graphs at all.

On a machine with a GPU, the fits that compare training with and without graphs run there with
the real ``make_graphed_callables``:

    SKIPNETS_TEST_DEVICE=cuda python -m pytest tests/test_cuda_graphs.py
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from conftest import GraphsOnTheCPU, quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from skipnets import Classifier
from skipnets.errors import ConfigError
from skipnets.graphs import TrainingGraph, pinning_conflict
from skipnets.nn import skip_blocks
from skipnets.registry import create_model

SMALL = {"widths": [4, 8, 8, 8]}

#: "cuda": the fits on the first GPU, recording real CUDA graphs.
ON_A_GPU = os.environ.get("SKIPNETS_TEST_DEVICE", "").strip().lower() == "cuda"

# The fits here train without validation data, which Lightning notes once per fit.
pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`"
)


def _loader(images: int = 40, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (images,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Graphs(L.Callback):
    """Keeps the Classifier's TrainingGraph of the fit (it drops it at the end of training)."""

    def __init__(self) -> None:
        self.graph: TrainingGraph | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.graph = pl_module._graph


def _fit(cuda_graphs: bool, callbacks=(), **trainer_options) -> tuple[Classifier, list]:
    torch.manual_seed(0)
    model = Classifier(
        "speedrun_resnet9",
        SMALL,
        num_classes=10,
        input_shape=(3, 32, 32),
        channels_last=True,
        cuda_graphs=cuda_graphs,
    )
    if ON_A_GPU:
        trainer_options = {"accelerator": "cuda", "devices": 1, **trainer_options}
    trainer = quiet_trainer(max_epochs=2, callbacks=list(callbacks), **trainer_options)
    trainer.fit(model, train_dataloaders=_loader())
    return model, [(name, t.cpu()) for name, t in model.state_dict().items()]


@pytest.fixture
def graphs(request: pytest.FixtureRequest) -> GraphsOnTheCPU | None:
    """The CPU stand-in, or None on a GPU (``SKIPNETS_TEST_DEVICE=cuda``): the real graphs."""
    return None if ON_A_GPU else request.getfixturevalue("graphs_on_the_cpu")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_from_graphs_gives_the_networks_own_result(
    graphs: GraphsOnTheCPU | None, precision: str
):
    kept = Graphs()
    _, graphed = _fit(True, [kept], precision=precision)
    _, plain = _fit(False, precision=precision)
    # Weights and running statistics alike: the recording's warm-up passes left no trace.
    assert [name for name, _ in graphed] == [name for name, _ in plain]
    for (name, a), (_, b) in zip(graphed, plain):
        if graphs is not None:
            assert torch.equal(a, b), name
        else:  # the same kernels, but cuDNN's backward may sum in another order
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    # Recorded once, on the first batch; 40 images in batches of 16: the last 8 run as usual.
    if graphs is not None:
        assert graphs.records == [(16, 3, 32, 32)]
    graph = kept.graph
    assert graph.replays == 4
    assert dict(graph.unrecorded) == {
        "a batch of shape (8, 3, 32, 32), not the recorded (16, 3, 32, 32)": 2
    }
    assert "4 training steps ran from CUDA graphs, 2 without" in graph.summary()


def test_steps_a_graph_cannot_repeat_run_the_network(graphs_on_the_cpu: GraphsOnTheCPU):
    network = create_model("speedrun_resnet9", **SMALL).train()
    graph = TrainingGraph(network)
    x = torch.randn(4, 3, 32, 32)
    assert graph(x) is not None and graph.replays == 1
    block = next(b for _, b in skip_blocks(network))

    def without_graph(reason: str) -> None:
        graph.unrecorded.clear()
        assert graph(x) is None
        assert list(graph.unrecorded) == [reason]

    handle = block.observe(lambda *args: None)
    without_graph(f"{type(block).__name__} is lesioned, routed, observed or dropped")
    handle.remove()
    block.survival_prob = 0.5  # stochastic depth decides on the host at every step
    without_graph(f"{type(block).__name__} is lesioned, routed, observed or dropped")
    block.survival_prob = 1.0
    layer = list(network.modules())[-1]
    hook = layer.register_forward_hook(lambda *args: None)
    without_graph(f"a hook is registered on {type(layer).__name__}")
    hook.remove()
    network.eval()
    without_graph(f"{type(network).__name__} is in evaluation mode")
    network.train()
    layer.eval()
    without_graph(f"{type(layer).__name__} is in evaluation mode")
    layer.train()
    norm = next(m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d))
    statistics = norm.running_mean
    norm.running_mean = statistics.clone()  # replaced, as Lightning's SWA does
    without_graph("the network's parameters or buffers changed since the graphs were recorded")
    norm.running_mean = statistics
    norm.weight.requires_grad_(False)
    without_graph("the network's parameters or buffers changed since the graphs were recorded")
    norm.weight.requires_grad_(True)
    graph.unrecorded.clear()
    assert graph(torch.randn(2, 3, 32, 32)) is None
    assert list(graph.unrecorded) == [
        "a batch of shape (2, 3, 32, 32), not the recorded (4, 3, 32, 32)"
    ]
    assert graph(x) is not None and graph.replays == 2
    assert graphs_on_the_cpu.records == [(4, 3, 32, 32)]


def test_recording_lets_its_autograd_graph_go(graphs: GraphsOnTheCPU | None):
    # torch keeps the recorded pass's outputs, and with them that pass's gradient accumulators,
    # made on the recording stream: the training steps' gradients would cross streams every step.
    import skipnets.graphs

    device = "cuda" if ON_A_GPU else "cpu"
    network = create_model("speedrun_resnet9", **SMALL).to(device).train()
    parameters = [p for p in network.parameters() if p.requires_grad]
    grapher = skipnets.graphs._make_graphed_callables  # the stand-in on the CPU

    def marking(*args, **kwargs):  # marks the accumulators alive when recording ends
        graphed = grapher(*args, **kwargs)
        for parameter in parameters:
            parameter.view_as(parameter).grad_fn.next_functions[0][0].metadata["recorded"] = True
        return graphed

    graph = TrainingGraph(network, grapher=marking)
    assert graph(torch.randn(4, 3, 32, 32, device=device)) is not None
    assert graph.released == 1  # the network's one output
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in parameters]
    assert not [a for a in accumulators if "recorded" in a.metadata]


def test_a_failed_recording_warns_and_leaves_the_network_as_it_was(
    graphs_on_the_cpu: GraphsOnTheCPU,
):
    graphs_on_the_cpu.fail = RuntimeError("operation not permitted when stream is capturing")
    with pytest.warns(UserWarning, match="recording the graphs failed: RuntimeError: operation"):
        _, failed = _fit(True)
    _, plain = _fit(False)
    for (name, a), (_, b) in zip(failed, plain):
        assert torch.equal(a, b), name  # the warm-up's statistics were put back


def test_cuda_graphs_is_off_with_a_warning_on_the_cpu():
    with pytest.warns(UserWarning, match="model.cuda_graphs is off: training runs on cpu"):
        model, _ = _fit(True, accelerator="cpu")
    assert model._graph is None and model.trainer.current_epoch == 2


def test_cuda_graphs_and_compile_are_refused_together():
    with pytest.raises(ConfigError, match=r"cuda_graphs and model\.compile"):
        Classifier("speedrun_resnet9", SMALL, num_classes=10, cuda_graphs=True, compile=True)


def test_the_graph_is_not_copied_with_its_module(graphs_on_the_cpu: GraphsOnTheCPU):
    import copy
    import pickle

    model = Classifier("speedrun_resnet9", SMALL, num_classes=10, cuda_graphs=True)
    model._graph = TrainingGraph(model.model)
    assert copy.deepcopy(model)._graph is None
    assert pickle.loads(pickle.dumps(model))._graph is None


def test_a_loader_that_pins_in_a_thread_keeps_graphs_off_where_torch_cannot_record_beside_it():
    dataset = TensorDataset(torch.zeros(4, 3))
    pinning = DataLoader(dataset, num_workers=2, pin_memory=True)
    in_the_step = DataLoader(dataset, num_workers=0, pin_memory=True)  # pins between steps
    workers = DataLoader(dataset, num_workers=2)

    def before(module, sample_args, num_warmup_iters=3, allow_unused_input=False):
        """make_graphed_callables before torch 2.12: no capture_error_mode."""

    def since(module, sample_args, allow_unused_input=False, capture_error_mode="global"):
        """make_graphed_callables from torch 2.12 on."""

    reason = pinning_conflict({"a": [workers, pinning]}, before)
    assert reason is not None and reason.startswith("the training DataLoader pins memory")
    assert pinning_conflict(pinning, since) is None
    assert pinning_conflict([in_the_step, workers], before) is None


def test_steps_that_accumulate_gradients_run_the_network(graphs_on_the_cpu: GraphsOnTheCPU):
    """A backward graph writes each gradient into its own buffer, which becomes the parameter's
    gradient: a second backward before ``zero_grad`` would add that buffer to itself. The
    accumulation a scheduler turns on after training has started runs the network instead."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    kept = Graphs()
    _, graphed = _fit(True, [kept, GradientAccumulationScheduler({1: 2})])
    _, plain = _fit(False, [GradientAccumulationScheduler({1: 2})])
    for (name, a), (_, b) in zip(graphed, plain):
        assert torch.equal(a, b), name
    assert kept.graph.replays == 2  # the first epoch's full batches
    reason = "gradients accumulate over several batches (trainer.accumulate_grad_batches)"
    assert kept.graph.unrecorded[reason] == 3
