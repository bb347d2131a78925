"""The papers the zoo implements, each cited once: ``Paper`` and one constant per paper.

A model file imports its citations from here and gives them to ``register_model(paper=...)``;
``skipnets models`` prints them. Constants are named after the first author and the year.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Paper"]  # and the citations below


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    year: int
    arxiv: str | None = None

    def __str__(self) -> str:
        ref = f" (arXiv:{self.arxiv})" if self.arxiv else ""
        return f"{self.authors} {self.year}, {self.title}{ref}"


# -- in order of publication --------------------------------------------------------------------
FUKUSHIMA_1988 = Paper(
    "Neocognitron: A hierarchical neural network capable of visual pattern recognition",
    "Fukushima",
    1988,
)
LANG_WITBROCK_1988 = Paper("Learning to Tell Two Spirals Apart", "Lang, Witbrock", 1988)
LECUN_1998 = Paper(
    "Gradient-Based Learning Applied to Document Recognition",
    "LeCun, Bottou, Bengio, Haffner",
    1998,
)
KRIZHEVSKY_2012 = Paper(
    "ImageNet Classification with Deep Convolutional Neural Networks",
    "Krizhevsky, Sutskever, Hinton",
    2012,
)
LIN_2014 = Paper("Network In Network", "Lin, Chen, Yan", 2014, "1312.4400")
ZEILER_2014 = Paper(
    "Visualizing and Understanding Convolutional Networks", "Zeiler, Fergus", 2014, "1311.2901"
)
RONNEBERGER_2015 = Paper(
    "U-Net: Convolutional Networks for Biomedical Image Segmentation",
    "Ronneberger, Fischer, Brox",
    2015,
    "1505.04597",
)
SIMONYAN_2015 = Paper(
    "Very Deep Convolutional Networks for Large-Scale Image Recognition",
    "Simonyan, Zisserman",
    2015,
    "1409.1556",
)
SRIVASTAVA_2015 = Paper(
    "Training Very Deep Networks", "Srivastava, Greff, Schmidhuber", 2015, "1507.06228"
)
SZEGEDY_2015 = Paper(
    "Going Deeper with Convolutions",
    "Szegedy, Liu, Jia, Sermanet, Reed, Anguelov, Erhan, Vanhoucke, Rabinovich",
    2015,
    "1409.4842",
)
HE_2016 = Paper(
    "Deep Residual Learning for Image Recognition", "He, Zhang, Ren, Sun", 2016, "1512.03385"
)
HE_2016B = Paper(
    "Identity Mappings in Deep Residual Networks", "He, Zhang, Ren, Sun", 2016, "1603.05027"
)
HUANG_2016 = Paper(
    "Deep Networks with Stochastic Depth", "Huang, Sun, Liu, Sedra, Weinberger", 2016, "1603.09382"
)
VEIT_2016 = Paper(
    "Residual Networks Behave Like Ensembles of Relatively Shallow Networks",
    "Veit, Wilber, Belongie",
    2016,
    "1605.06431",
)
ZAGORUYKO_2016 = Paper("Wide Residual Networks", "Zagoruyko, Komodakis", 2016, "1605.07146")
HUANG_2017 = Paper(
    "Densely Connected Convolutional Networks",
    "Huang, Liu, van der Maaten, Weinberger",
    2017,
    "1608.06993",
)
PAGE_2018 = Paper("How to train your ResNet", "Page", 2018)
JORDAN_2024 = Paper("94% on CIFAR-10 in 3.29 Seconds on a Single GPU", "Jordan", 2024, "2404.00498")
