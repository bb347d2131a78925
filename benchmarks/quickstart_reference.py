"""The quickstart written out by hand: what ``skipnets fit --config configs/quickstart.yaml`` does,
as a plain PyTorch script.

    python -m benchmarks.quickstart_reference                     # the config's recipe
    python -m benchmarks.quickstart_reference --epochs 1 --limit-train-batches 5

It reads the recipe from the same config file (seed, architecture, optimizer, schedule, the
Digits options, epochs) and does the same job: the same network from the registry, the same
tensors (scikit-learn's digits split, shifted, resized and standardised as
``skipnets.data.Digits`` does), the same batch order (the data module's seeded shuffle), SGD and
the schedule stepped per epoch, validation after every epoch, the best weights by validation
accuracy (a tie to the lower validation loss) saved to a file, and at the end the test split evaluated with those weights. It makes
the allocator setting ``skipnets fit`` makes, which speeds a CPU training step up as much here.

It imports torch, scikit-learn, PyYAML and the registry, and nothing of Lightning. The last
line it prints is ``test/acc <value>``; ``benchmarks.bench_quickstart`` times it against
``skipnets fit`` as whole processes.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
#: ``skipnets.data.Digits``' defaults, for options the config leaves out.
DIGITS_DEFAULTS = {
    "image_size": 16,
    "val_fraction": 0.1,
    "test_fraction": 0.2,
    "shift": 0,
    "batch_size": 64,
    "seed": 0,
}


def recipe(path: str | Path = CONFIG) -> dict[str, Any]:
    """What the script needs from a quickstart-style config, with Digits' defaults filled in."""
    config = yaml.safe_load(Path(path).read_text())
    data = config["data"]
    if str(data.get("class_path", "")).rpartition(".")[2] != "Digits":
        raise SystemExit(f"{path}: the hand-written script reads Digits data only")
    model = config.get("model") or {}
    return {
        "seed": config.get("seed_everything"),
        "arch": model.get("arch", "resnet20"),
        "arch_kwargs": dict(model.get("arch_kwargs") or {}),
        "optimizer": config["optimizer"],
        "lr_scheduler": config.get("lr_scheduler"),
        "data": {**DIGITS_DEFAULTS, **(data.get("init_args") or {})},
        "epochs": int(config["trainer"]["max_epochs"]),
    }


def digits_tensors(
    image_size: int | None, val_fraction: float, test_fraction: float, shift: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """Train, validation and test ``(images, labels)``: a seeded permutation cut by the two
    fractions, each training image followed by its copies moved by up to ``shift`` pixels,
    bilinear resizing, standardised by the unshifted training images' mean and deviation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    count = len(labels)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(count * val_fraction), round(count * test_fraction)
    train, val, test = order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]

    def resized(x: Tensor) -> Tensor:
        if image_size and image_size != 8:
            x = F.interpolate(
                x, size=(image_size, image_size), mode="bilinear", align_corners=False
            )
        return x if image_size else x.flatten(1)

    offsets = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    padded = F.pad(images[train], (shift,) * 4)
    moved = [
        padded[..., shift - dy : shift - dy + 8, shift - dx : shift - dx + 8]
        for dy, dx in offsets
        if dy or dx
    ]
    train_images = resized(torch.cat([images[train], *moved]))
    mean, std = train_images[: len(train)].mean(), train_images[: len(train)].std()
    return [
        ((train_images - mean) / std, labels[train].repeat(len(offsets))),
        ((resized(images[val]) - mean) / std, labels[val]),
        ((resized(images[test]) - mean) / std, labels[test]),
    ]


def instantiate(config: dict[str, Any], *args: Any) -> Any:
    module, _, name = config["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(*args, **(config.get("init_args") or {}))


def epoch_order(count: int, seed: int, epoch: int) -> Tensor:
    """The data module's shuffle (``SeededShuffle``): a permutation drawn from ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(hash((seed, epoch)) & (2**63 - 1))
    return torch.randperm(count, generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over ``(x, y)``, in evaluation mode."""
    model.eval()
    loss = correct = 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
    return loss / len(y), correct / len(y)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="a quickstart-style config")
    parser.add_argument("--root", default="runs/quickstart_reference", help="where best.pt goes")
    parser.add_argument("--epochs", type=int, help="instead of the config's trainer.max_epochs")
    parser.add_argument("--limit-train-batches", type=int, help="at most this many per epoch")
    args = parser.parse_args(argv)

    from skipnets import create_model
    from skipnets.allocator import keep_freed_memory

    keep_freed_memory()
    start = time.perf_counter()
    setup = recipe(args.config)
    epochs = args.epochs if args.epochs is not None else setup["epochs"]
    data = setup["data"]
    if setup["seed"] is not None:
        torch.manual_seed(setup["seed"])
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = digits_tensors(
        data["image_size"], data["val_fraction"], data["test_fraction"], data["shift"], data["seed"]
    )
    in_kwargs = {"in_channels": 1} if train_x.ndim == 4 else {"in_features": train_x.shape[1]}
    model = create_model(setup["arch"], num_classes=10, **in_kwargs, **setup["arch_kwargs"])
    optimizer = instantiate(setup["optimizer"], model.parameters())
    scheduler = instantiate(setup["lr_scheduler"], optimizer) if setup["lr_scheduler"] else None
    batch_size = data["batch_size"]
    best_path = Path(args.root) / "best.pt"
    best_path.parent.mkdir(parents=True, exist_ok=True)
    best_acc, best_loss = -1.0, float("inf")
    for epoch in range(epochs):
        model.train()
        order = epoch_order(len(train_y), data["seed"], epoch)
        batches = range(0, len(order), batch_size)
        if args.limit_train_batches is not None:
            batches = batches[: args.limit_train_batches]
        total = torch.zeros(())
        for begin in batches:
            index = order[begin : begin + batch_size]
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        if scheduler is not None:
            scheduler.step()
        val_loss, val_acc = evaluate(model, val_x, val_y, batch_size)
        print(
            f"epoch {epoch}: train/loss {total.item() / max(len(batches), 1):.4f}  "
            f"val/loss {val_loss:.4f}  val/acc {val_acc:.4f}",
            flush=True,
        )
        # The best by validation accuracy, a tie going to the lower validation loss.
        if val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss):
            best_acc, best_loss = val_acc, val_loss
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**state, "epoch": epoch}, best_path)
    model.load_state_dict(torch.load(best_path, weights_only=True)["model"])
    test_loss, test_acc = evaluate(model, test_x, test_y, batch_size)
    print(f"{time.perf_counter() - start:.1f} s after imports; best checkpoint: {best_path}")
    print(f"test/loss {test_loss:.4f}")
    print(f"test/acc {test_acc:.4f}")
    return test_acc


if __name__ == "__main__":
    main()
