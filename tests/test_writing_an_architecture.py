"""The README's "Writing an architecture" section runs as written, and the skip-block behaviour it
promises (lesioning, the observer's semantics, the error for a module assigned to ``branch``) is
what ``SkipBlock`` does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import skipnets
from skipnets import registry
from skipnets.nn import SkipBlock, skip_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


@pytest.fixture
def readme(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The namespace left by the section's code blocks, run in order into a scratch registry."""
    skipnets.list_models()  # the zoo and entry points first, so the copy holds them
    monkeypatch.setattr(registry, "_models", dict(registry._models))
    namespace: dict[str, Any] = {"__name__": "readme_architecture"}
    blocks = python_blocks("Writing an architecture")
    assert len(blocks) == 4
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    return namespace


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
