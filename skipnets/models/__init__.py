"""The first-party zoo; importing this package registers every family.

The registry never imports it by name: skipnets' ``skipnets.models`` entry point names this
package, as another package's entry point names its own architectures.
"""

from skipnets.models import (
    airbench,
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
    "airbench",
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
