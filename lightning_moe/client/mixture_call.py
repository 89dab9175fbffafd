"""RemoteMixtureCall: the autograd Function of a DecentralizedMoE layer; its forward and backward are a
:class:`~lightning_moe.client.dispatch.Dispatcher`'s calls to the experts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable


class RemoteMixtureCall(torch.autograd.Function):
    """The chosen experts' outputs for each sample's ``k_best`` slots, computed remotely by a
    :class:`~lightning_moe.client.dispatch.Dispatcher`.

    Forward calls the experts (``Dispatcher.forward``) and returns ``(outputs, mask, coords)``; only ``outputs``
    has a gradient. Backward sends each expert that answered its rows' output gradients (the host kept the forward's
    graph; one that no longer keeps it gets the inputs again) and adds up the input gradients.

    ``anchor`` is an empty tensor that requires grad exactly when grad is enabled: then backward reaches the
    hosts (whose experts learn) even when ``x`` itself needs no gradient, e.g. when the layer sees the data directly.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        dispatcher: Any,
        chosen: list[list[tuple[str, str]]],
        scores: Sequence[torch.Tensor],
        deadline: float | None,
        anchor: torch.Tensor,
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_host = dispatcher.host_inputs(x, deadline)
        backward_comes = ctx.needs_input_grad[4]  # anchor requires grad: grad was enabled at the call
        outputs, mask, coords, ctx.calls = dispatcher.forward(x_host, chosen, scores, deadline, keep=backward_comes)
        ctx.dispatcher, ctx.stats, ctx.out_dtype, ctx.x_like = dispatcher, dispatcher.stats, outputs.dtype, (x.device, x.dtype)
        ctx.save_for_backward(x_host)
        ctx.mark_non_differentiable(mask, coords)
        return outputs, mask, coords

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_outputs: torch.Tensor, _mask: Any, _coords: Any) -> tuple[torch.Tensor | None, ...]:
        (x_host,) = ctx.saved_tensors
        grad_x = ctx.dispatcher.backward(ctx.calls, ctx.stats, x_host, grad_outputs.to(ctx.out_dtype))
        device, dtype = ctx.x_like
        return None, None, None, None, None, grad_x.to(device=device, dtype=dtype) if ctx.needs_input_grad[5] else None
