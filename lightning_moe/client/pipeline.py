"""MoEStack: residual DecentralizedMoE layers whose micro-batches flow through the layers at once, so that one
micro-batch's expert calls overlap another's transfers and local compute (GPipe and SWARM pipeline the same way).

What it can and cannot do: within one step, layer ``l``'s gating needs layer ``l-1``'s answers and layer ``l-1``'s
backward needs layer ``l``'s input gradients, so each micro-batch still pays 2 round trips per layer, one after
another. Pipelining hides the rest: while one micro-batch waits for its answers, another sends, receives or computes
locally. On a bandwidth-limited link a step tends to the larger of the round trips and the transfer time, instead of
their sum.

``micro_batches="auto"`` pipelines only where it pays: on loopback and fast links the threads and smaller calls cost
more than they hide (a median 0.89 of the unpipelined speed at 0 ms here), on a slow or long link pipelining is
1.1-1.4x faster. A step runs ``AUTO_MICRO_BATCHES`` micro-batches when the layers' last forward called a host whose
link this process measured slow (:meth:`lightning_moe.client.links.LinkRates.slow`, the rule ``compression="auto"``
uses; never loopback), else one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_moe import config
from lightning_moe.client.call_stats import CallStats
from lightning_moe.client.dispatch import Dispatcher
from lightning_moe.client.gating import load_balancing_loss
from lightning_moe.client.moe import DecentralizedMoE, Routing

#: The most micro-batches of one step (each runs in its own thread while the step runs).
MAX_MICRO_BATCHES = config.MAX_MICRO_BATCHES
#: Micro-batches of a step under ``micro_batches="auto"`` once a slow link was measured (4 cost more than 2 here).
AUTO_MICRO_BATCHES = 2

T = TypeVar("T")


class MoEStack(nn.Module):
    """``h = h + layer(pre(h))`` for each layer in turn (``pre``: an optional local module per layer, e.g. a
    LayerNorm; identity when None), pipelined over ``micro_batches`` micro-batches.

    The batch (the first dimension of the input) is split into ``micro_batches`` parts; each part runs through every
    layer in its own thread, so the parts' expert calls overlap, in the forward and, through one autograd Function,
    in the backward (which runs each part's graph in its own thread and returns the input's gradient). What is
    computed does not change: the outputs, every parameter's gradient, the input's gradient and each layer's
    ``aux_loss`` (computed over the whole batch, as one layer's forward does) equal those of the unpipelined stack
    within float rounding, provided the local modules treat samples independently (no BatchNorm) and the experts do
    (the hosts' experts are per-row). Each layer's ``stats`` after a step add up its micro-batches' calls.

    Failures are handled per micro-batch as a layer handles them: samples re-routed, a ``NotEnoughExpertsError``
    naming the experts raised from the step (after every micro-batch has finished).

    Pipelining applies in training and under ``torch.no_grad`` when every layer is a :class:`DecentralizedMoE`;
    otherwise (e.g. :class:`~lightning_moe.client.local_moe.LocalMoE` layers), or with one micro-batch or one sample,
    the layers run one after another on the whole batch. Gradients reach the parameters through ``loss.backward()``
    (as Lightning calls it), not through ``torch.autograd.grad``, as with reentrant checkpointing. On a non-CPU device
    the backward runs the micro-batches one after another (the autograd engine's device thread runs this backward).

    Args:
        layers: the mixture layers, in order.
        micro_batches: parts the batch is split into (1: no pipelining; at most ``MAX_MICRO_BATCHES``), or
            ``"auto"``: ``AUTO_MICRO_BATCHES`` while the layers call a host over a slow link, else 1 (the module's doc).
        pre: one local module per layer, applied to the residual stream before the layer (None: none).
    """

    def __init__(self, layers: Sequence[nn.Module], micro_batches: int | str = 1,
                 pre: Sequence[nn.Module] | None = None):
        super().__init__()
        check_micro_batches(micro_batches)
        if pre is not None and len(pre) != len(layers):
            raise ValueError(f"pre needs one module per layer: {len(pre)} for {len(layers)} layers")
        for index, layer in enumerate(layers):  # children "0", "1", ...: a ModuleList's parameter names
            self.add_module(str(index), layer)
        self.num_layers = len(layers)
        self.pre = None if pre is None else nn.ModuleList(pre)
        self.micro_batches = micro_batches
        self.last_micro_batches = 0  # the micro-batches of the last forward (0: none yet)

    @property
    def layers(self) -> list[nn.Module]:
        """The mixture layers, in order (also ``stack[i]``, ``len(stack)``, ``iter(stack)``)."""
        return [self._modules[str(index)] for index in range(self.num_layers)]

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]

    def __len__(self) -> int:
        return self.num_layers

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    @property
    def pipelined(self) -> bool:
        """True when the layers can run pipelined (all :class:`DecentralizedMoE`, more than one micro-batch now)."""
        return self.count() > 1 and self._remote()

    def _remote(self) -> bool:
        return all(isinstance(layer, DecentralizedMoE) for layer in self.layers)

    def count(self) -> int:
        """The micro-batches of the next step: ``micro_batches``, or under ``"auto"`` ``AUTO_MICRO_BATCHES`` when a
        layer's last forward called a host over a slow link, else 1."""
        if self.micro_batches != "auto":
            return int(self.micro_batches)
        slow = self._remote() and any(layer.dispatcher.stats.slow_links for layer in self.layers)
        return AUTO_MICRO_BATCHES if slow else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = min(self.count(), len(x))
        pipelined = count > 1 and self._remote()
        self.last_micro_batches = count if pipelined else 1
        if not pipelined:
            for index, layer in enumerate(self.layers):
                x = x + layer(self.local(index, x))
            return x
        if not torch.is_grad_enabled():
            return self._forward_without_grad(x, count)
        anchor = torch.empty(0, requires_grad=True)  # backward runs even when x needs no gradient: the hosts learn
        y, *aux = PipelinedStep.apply(self, count, anchor, x)
        for layer, loss in zip(self.layers, aux):
            layer.aux_loss = loss
        return y

    def local(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s local module applied to ``x`` (``x`` itself without one)."""
        return x if self.pre is None else self.pre[index](x)

    def micro_batch(self, x: torch.Tensor, dispatchers: Sequence[Dispatcher]) -> tuple[torch.Tensor, list[Routing]]:
        """One micro-batch through every layer (layer ``l`` calling through ``dispatchers[l]``): its output and each
        layer's routing."""
        routings = []
        for index, layer in enumerate(self.layers):
            out, routing = layer.mixture(self.local(index, x), dispatchers[index])
            x = x + out
            routings.append(routing)
        return x, routings

    def run_micro_batches(self, inputs: Sequence[torch.Tensor], grad: bool) -> tuple[list[torch.Tensor], list[list[Routing]], list[list[Dispatcher]]]:
        """Every micro-batch of ``inputs`` through the layers at once (grad mode ``grad`` in each thread); returns the
        outputs, the routings (per micro-batch, per layer) and the dispatcher views they called through (per layer, per
        micro-batch)."""
        views = [layer.dispatcher.micro_batch_views(len(inputs)) for layer in self.layers]
        autocast = _autocast_state(inputs[0].device.type)
        inference = torch.is_inference_mode_enabled()  # Lightning validates under inference mode; threads start without

        def run(m: int) -> tuple[torch.Tensor, list[Routing]]:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    torch.autocast(inputs[0].device.type, **autocast):
                return self.micro_batch(inputs[m], [per_layer[m] for per_layer in views])

        try:
            results = in_threads(run, len(inputs))
        finally:
            self.merge_stats(views)
        return [out for out, _ in results], [routings for _, routings in results], views

    def merge_stats(self, views: Sequence[Sequence[Dispatcher]]) -> None:
        """Each layer's ``stats``: its micro-batches' calls added up."""
        for layer, per_layer in zip(self.layers, views):
            layer.dispatcher.stats = CallStats.merged([view.stats for view in per_layer])

    def aux_losses(self, routings: Sequence[Sequence[Routing]], logits: Sequence[Sequence[Sequence[torch.Tensor]]]) -> list[torch.Tensor]:
        """Each layer's load-balancing loss over the whole batch, from the micro-batches' routings with ``logits``
        (per micro-batch, per layer) in place of theirs."""
        losses = []
        for index in range(len(self.layers)):
            parts = [(logits[m][index], routing[index][1], routing[index][2]) for m, routing in enumerate(routings)]
            whole = [torch.cat([part[0][d] for part in parts]) for d in range(len(parts[0][0]))]
            losses.append(load_balancing_loss(whole, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])))
        return losses

    def _forward_without_grad(self, x: torch.Tensor, count: int) -> torch.Tensor:
        outs, routings, _ = self.run_micro_batches(x.tensor_split(count), grad=False)
        for layer, loss in zip(self.layers, self.aux_losses(routings, [[r[0] for r in per] for per in routings])):
            layer.aux_loss = loss
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"micro_batches={self.micro_batches}"


class PipelinedStep(torch.autograd.Function):
    """A :class:`MoEStack`'s pipelined forward and backward. Forward runs each micro-batch's graph in its own thread
    (grad enabled) and keeps the graphs; backward first takes the load-balancing losses' gradients to each
    micro-batch's gating logits (local), then runs every micro-batch's graph backward in its own thread (the remote
    backward calls overlap; gradients accumulate into the shared parameters under the autograd engine's locks) and
    returns the input's gradient. ``anchor`` requires grad, so backward runs even when ``x`` needs none."""

    @staticmethod
    def forward(ctx: Any, stack: MoEStack, count: int, anchor: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        inputs = [part.detach().requires_grad_(ctx.needs_input_grad[3]) for part in x.tensor_split(count)]
        outs, routings, views = stack.run_micro_batches(inputs, grad=True)
        logits = [[tuple(t.detach().requires_grad_() for t in routing[0]) for routing in per] for per in routings]
        with torch.enable_grad():
            aux = stack.aux_losses(routings, logits)
        ctx.stack, ctx.views, ctx.device = stack, views, x.device
        ctx.graph = (inputs, outs, [[r[0] for r in per] for per in routings], logits, aux)
        return (torch.cat([out.detach() for out in outs]), *(loss.detach() for loss in aux))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, *grad_aux: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.graph is None:
            raise RuntimeError("a pipelined MoEStack step is backpropagated once (its micro-batches' graphs are freed); "
                               "retain_graph is not supported")
        inputs, outs, gate_logits, logits, aux = ctx.graph
        ctx.graph = None  # the micro-batches' graphs go with this backward
        pairs = [(loss, grad) for loss, grad in zip(aux, grad_aux) if grad is not None]
        if pairs:
            torch.autograd.backward([loss for loss, _ in pairs], [grad for _, grad in pairs])
        grads = grad_y.tensor_split(len(inputs))

        def run(m: int) -> torch.Tensor | None:
            tensors, tensor_grads = [outs[m]], [grads[m]]
            for layer_logits, layer_leaves in zip(gate_logits[m], logits[m]):
                for logit, leaf in zip(layer_logits, layer_leaves):
                    if leaf.grad is not None:
                        tensors.append(logit)
                        tensor_grads.append(leaf.grad)
            torch.autograd.backward(tensors, tensor_grads)
            return inputs[m].grad

        try:
            if ctx.device.type == "cpu":
                grad_inputs = in_threads(run, len(inputs))
            else:  # this runs in the device's autograd thread: a backward from another thread would wait for it
                grad_inputs = [run(m) for m in range(len(inputs))]
        finally:
            ctx.stack.merge_stats(ctx.views)
        grad_x = torch.cat(grad_inputs) if ctx.needs_input_grad[3] and all(g is not None for g in grad_inputs) else None
        return None, None, None, grad_x


def check_micro_batches(micro_batches: int | str) -> None:
    """Raises ValueError unless ``micro_batches`` is ``"auto"`` or an int in 1..``MAX_MICRO_BATCHES``."""
    if not config.valid_micro_batches(micro_batches):
        raise ValueError(f"micro_batches must be 'auto' or an integer in 1..{MAX_MICRO_BATCHES}, got {micro_batches!r}")


def in_threads(function: Callable[[int], T], count: int) -> list[T]:
    """``[function(0), ..., function(count - 1)]``, each in its own thread (``count`` at most ``MAX_MICRO_BATCHES``);
    once all have finished, the first one's error (by index) is raised."""
    if not 1 <= count <= MAX_MICRO_BATCHES:
        raise ValueError(f"count must be in 1..{MAX_MICRO_BATCHES}, got {count}")
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="lightning_moe-micro-batch") as pool:
        futures = [pool.submit(function, m) for m in range(count)]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


def _autocast_state(device_type: str) -> dict[str, Any]:
    """This thread's autocast settings for ``device_type``, for the micro-batches' threads (threads start without)."""
    try:
        return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type)}
    except (RuntimeError, TypeError):  # a device type without autocast
        return {"enabled": False}
