"""Expert modules that hosts serve, and a registry ``name -> factory(hid_dim)`` for configs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

ExpertFactory = Callable[[int], nn.Module]
EXPERTS: dict[str, ExpertFactory] = {}


def register_expert(name: str) -> Callable[[ExpertFactory], ExpertFactory]:
    """Decorator: register a factory ``hid_dim -> nn.Module`` under ``name`` (configs say ``expert_cls: name``)."""

    def decorator(factory: ExpertFactory) -> ExpertFactory:
        if name in EXPERTS and EXPERTS[name] is not factory:
            raise ValueError(f"an expert named {name!r} is already registered")
        EXPERTS[name] = factory
        return factory

    return decorator


def make_expert(name: str, hid_dim: int) -> nn.Module:
    """A new expert of the registered kind ``name`` with hidden size ``hid_dim``."""
    try:
        factory = EXPERTS[name]
    except KeyError:
        raise ValueError(f"unknown expert class {name!r}; registered: {sorted(EXPERTS)}") from None
    return factory(hid_dim)


@register_expert("ffn")
class FeedforwardBlock(nn.Module):
    """hivemind's ``ffn``: Linear(h, 4h) -> tanh-GELU -> Linear(4h, h), residual, LayerNorm."""

    def __init__(self, hid_dim: int):
        super().__init__()
        self.ffn = nn.Linear(hid_dim, 4 * hid_dim)
        self.ffn_output = nn.Linear(4 * hid_dim, hid_dim)
        self.layer_norm = nn.LayerNorm(hid_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.ffn(x), approximate="tanh")
        return self.layer_norm(x + self.ffn_output(hidden))


@register_expert("linear")
class LinearExpert(nn.Module):
    """One Linear(h, h) layer: a small expert for tests and demos."""

    def __init__(self, hid_dim: int):
        super().__init__()
        self.linear = nn.Linear(hid_dim, hid_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@register_expert("nop")
class NopExpert(nn.Module):
    """Returns its input (plus a zero-initialized bias so it has something to train): measures overhead."""

    def __init__(self, hid_dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hid_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias
