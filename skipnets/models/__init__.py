"""The first-party zoo; importing this package registers every family."""

from skipnets.models import cascade, densenet, highway, mlp, resnet, speedrun

__all__ = ["cascade", "densenet", "highway", "mlp", "resnet", "speedrun"]
