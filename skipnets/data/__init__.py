"""Data modules: bundled digits, generated problems, and torchvision's benchmark datasets."""

from skipnets.data.analysis import AnalysisSplit, Split, analysis_split
from skipnets.data.base import DataModule
from skipnets.data.digits import Digits
from skipnets.data.gpu import GPUCIFAR10, GPUCIFAR100, GPUMNIST
from skipnets.data.imagenet import ImageNet
from skipnets.data.shapes import Shapes
from skipnets.data.spirals import TwoSpirals, two_spirals
from skipnets.data.vision import CIFAR10, CIFAR100, MNIST, TorchvisionData

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "GPUCIFAR10",
    "GPUCIFAR100",
    "GPUMNIST",
    "MNIST",
    "AnalysisSplit",
    "DataModule",
    "Digits",
    "ImageNet",
    "Shapes",
    "Split",
    "TorchvisionData",
    "TwoSpirals",
    "analysis_split",
    "two_spirals",
]
