"""The first-party zoo; importing this package registers every family."""

from skipnets.models import (
    alexnet,
    cascade,
    densenet,
    googlenet,
    highway,
    lenet,
    mlp,
    neocognitron,
    nin,
    resnet,
    speedrun,
    unet,
    vgg,
)

__all__ = [
    "alexnet",
    "cascade",
    "densenet",
    "googlenet",
    "highway",
    "lenet",
    "mlp",
    "neocognitron",
    "nin",
    "resnet",
    "speedrun",
    "unet",
    "vgg",
]
