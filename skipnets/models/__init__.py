"""The first-party zoo; importing this package registers every family."""

from skipnets.models import mlp, resnet

__all__ = ["mlp", "resnet"]
