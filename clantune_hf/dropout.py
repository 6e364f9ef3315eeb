"""Finding and setting every dropout probability a model reads at run time.

Models read dropout in three ways: `nn.Dropout` modules (GPT-2, BERT's `self.dropout.p`), and float attributes named
`*dropout` that forward passes hand to `nn.functional.dropout` or to the attention kernel (Llama's
`attention_dropout`, BART's `dropout`/`activation_dropout`). A `dropout` gene sets all of them to one value.
"""

from __future__ import annotations

import statistics

from torch import nn


def dropout_sites(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """`(module, attribute)` pairs holding a dropout probability, in module order."""
    sites = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            sites.append((module, "p"))
            continue
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                sites.append((module, name))
    return sites


def mean_dropout(model: nn.Module) -> float:
    """The model's configured dropout, as the starting value of a `dropout` gene."""
    sites = dropout_sites(model)
    if not sites:
        raise ValueError(
            f"`genes` includes 'dropout', but {type(model).__name__} has no dropout (no nn.Dropout module and no "
            "'*dropout' float attribute); remove the 'dropout' gene."
        )
    return statistics.fmean(getattr(module, name) for module, name in sites)


def set_dropout(model: nn.Module, p: float) -> None:
    for module, name in dropout_sites(model):
        setattr(module, name, p)
