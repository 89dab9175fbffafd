"""RemoteExpert: an expert on another computer, called like a local nn.Module."""

from __future__ import annotations

import json
import secrets
from typing import Any, Sequence

import torch
from torch import nn

from lightning_moe import auth, wire
from lightning_moe.net import http_client

DEFAULT_TIMEOUT = 30.0
MAX_RETRY_AFTER = 60.0  # seconds; a host's Retry-After is believed up to this
WARM_CONNECTIONS = 4  # connections opened to a host after its /info, ahead of the calls
_host_ids: dict[str, str] = {}  # endpoint -> the host_id its /info gave (private swarms sign requests for it)


class RemoteExpertError(RuntimeError):
    """A call to a remote expert failed; names the uid, the endpoint and the host's message."""

    def __init__(self, uid: str, endpoint: str, message: str, status: int | None = None, retry_after: float | None = None):
        self.uid, self.endpoint, self.message, self.status, self.retry_after = uid, endpoint, message, status, retry_after
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"expert {uid!r} at {endpoint} failed ({where}): {message}")


def fetch_info(endpoint: str, secret: bytes | None, timeout: float | None = DEFAULT_TIMEOUT) -> dict:
    """The host's ``/info`` (raises RemoteExpertError with uid ``"*"``); remembers its host_id for signing.

    Opens a few connections to the host ahead of the expert calls that follow.
    """
    try:
        response = http_client.request(endpoint, "GET", "/info", headers=http_client.signed(secret, "GET", "/info", b""), timeout=timeout)
    except http_client.TransportError as e:
        raise RemoteExpertError("*", endpoint, f"info: {e}") from e
    if response.status != 200:
        raise RemoteExpertError("*", endpoint, f"info: {error_message(response)}", response.status)
    try:
        info = json.loads(response.body)
    except ValueError as e:
        raise RemoteExpertError("*", endpoint, f"info: not JSON: {e}", response.status) from e
    if not isinstance(info, dict):
        raise RemoteExpertError("*", endpoint, "info: not a JSON object", response.status)
    if isinstance(info.get("host_id"), str):
        _host_ids[endpoint] = info["host_id"]
    http_client.warm_up(endpoint, WARM_CONNECTIONS, timeout)
    return info


def host_id(endpoint: str, secret: bytes | None, timeout: float | None = DEFAULT_TIMEOUT, refresh: bool = False) -> str:
    """The host_id of the host at ``endpoint`` (from its /info, fetched once; again with ``refresh``)."""
    if secret is None:
        return ""
    if refresh or endpoint not in _host_ids:
        fetch_info(endpoint, secret, timeout)
    return _host_ids.get(endpoint, "")


def call_expert(
    uid: str,
    endpoint: str,
    method: str,
    tensors: list[torch.Tensor],
    compression: str = "none",
    timeout: float | None = DEFAULT_TIMEOUT,
    secret: bytes | None = None,
    keep: str | None = None,
    handle: http_client.CallHandle | None = None,
    stochastic: bool | Sequence[bool] = False,
) -> list[torch.Tensor]:
    """POST tensors to ``/{method}/{uid}`` and return the decoded answer (CPU tensors).

    ``handle`` lets another thread give the call up (:meth:`http_client.CallHandle.cancel`).
    ``stochastic`` (one flag or one per tensor) rounds int8/int4 values unbiased: for gradients.

    ``keep`` (a request id, see :func:`new_keep_id`) asks the host to keep a forward for its backward,
    and names the kept forward in a backward that sends only the output gradients.

    ``secret`` signs the request for a private swarm's hosts, bound to the host instance (its
    host_id from /info, fetched once per endpoint; fetched again, and the call retried once, if the
    host refuses the signature: it restarted). Raises RemoteExpertError for any failure: no
    connection, timeout, HTTP error, bad answer.
    """
    path = f"/{method}/{uid}" if keep is None else f"/{method}/{uid}?keep={keep}"
    try:
        response = post(endpoint, path, wire.serialize(tensors, compression, stochastic), compression, timeout, secret,
                        handle)
    except http_client.TransportError as e:
        raise RemoteExpertError(uid, endpoint, f"{method}: {e}") from e
    except RemoteExpertError as e:
        raise RemoteExpertError(uid, endpoint, f"{method}: {e.message}", e.status) from e
    if response.status != 200:
        message = error_message(response)  # the host's message usually names the direction already
        raise RemoteExpertError(uid, endpoint, message if message.startswith(f"{method}:") else f"{method}: {message}",
                                response.status, retry_after(response) if response.status == 503 else None)
    try:
        return wire.deserialize(response.body)
    except wire.WireError as e:
        raise RemoteExpertError(uid, endpoint, f"{method}: malformed answer: {e}", response.status) from e


def post(endpoint: str, path: str, body: bytes | bytearray, compression: str, timeout: float | None,
         secret: bytes | None, handle: http_client.CallHandle | None = None) -> http_client.Answer:
    """POST a wire ``body`` to ``path``, signed in a private swarm for the host instance (its host_id from /info, fetched
    once per endpoint; fetched again, and the request made once more, if the host refuses the signature: it restarted).
    Raises TransportError, or RemoteExpertError (uid ``"*"``) if /info could not be read."""
    target = host_id(endpoint, secret, timeout)
    for attempt in range(2):
        headers = {"Content-Type": "application/octet-stream", "X-Compression": compression}
        headers.update(http_client.signed(secret, "POST", path, body, compression, target))
        response = http_client.request(endpoint, "POST", path, body, headers, timeout, handle)
        if response.status != 401 or secret is None or attempt == 1:
            break
        renewed = host_id(endpoint, secret, timeout, refresh=True)
        if renewed == target:
            break
        target = renewed
    return response


def error_message(response: http_client.Answer) -> str:
    """The host's message in an error answer (its JSON ``error``, else the start of the body)."""
    try:
        return str(json.loads(response.body)["error"])
    except (ValueError, KeyError, TypeError):
        return response.body[:500].decode("utf-8", "replace") or response.reason or "empty answer"


def retry_after(response: http_client.Answer) -> float | None:
    """A 503's Retry-After in seconds (delta-seconds form only), at most MAX_RETRY_AFTER; None if absent or not a number."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if seconds == seconds else None


def new_keep_id() -> str:
    """A fresh request id under which a host keeps a forward for its backward (unguessable by other peers)."""
    return secrets.token_hex(16)


def call_backward(
    uid: str,
    endpoint: str,
    keep: str | None,
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    compression: str = "none",
    timeout: float | None = DEFAULT_TIMEOUT,
    secret: bytes | None = None,
    handle: http_client.CallHandle | None = None,
) -> list[torch.Tensor]:
    """The input gradients of a forward: sent with only ``grad_outputs`` if the host kept the forward under ``keep``;
    with the inputs as well if it was not kept or the host no longer keeps it (it answers 409).

    With int8 or int4 compression the gradients are rounded stochastically (unbiased; the inputs to
    nearest): see :mod:`lightning_moe.codecs` for why, and why not error feedback."""
    if keep is not None:
        try:
            return call_expert(uid, endpoint, "backward", list(grad_outputs), compression, timeout, secret, keep, handle,
                               stochastic=True)
        except RemoteExpertError as e:
            if e.status != 409:
                raise
    return call_expert(uid, endpoint, "backward", [*inputs, *grad_outputs], compression, timeout, secret, handle=handle,
                       stochastic=[False] * len(inputs) + [True] * len(grad_outputs))


class _RemoteCall(torch.autograd.Function):
    """Forward and backward of one remote expert. With grad enabled the host keeps the forward's graph for the backward
    (KeptForwards, within its memory budget), so the backward sends only the output gradients; a host that no longer
    keeps it answers 409, and the inputs are sent again for it to recompute the forward (:func:`call_backward`)."""

    @staticmethod
    def forward(ctx: Any, expert: "RemoteExpert", *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.expert = expert
        ctx.keep = new_keep_id() if any(ctx.needs_input_grad) else None  # no backward will come otherwise
        ctx.save_for_backward(*inputs)
        outputs = call_expert(expert.uid, expert.endpoint, "forward", expert.as_host_dtypes(inputs, "args_schema"),
                              expert.compression, expert.forward_timeout, expert.secret, keep=ctx.keep)
        like = inputs[0]
        return tuple(out.to(device=like.device, dtype=like.dtype if out.is_floating_point() else out.dtype) for out in outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        expert: RemoteExpert = ctx.expert
        inputs = ctx.saved_tensors
        grads = call_backward(expert.uid, expert.endpoint, ctx.keep, expert.as_host_dtypes(inputs, "args_schema"),
                              expert.as_host_dtypes(grad_outputs, "outputs_schema"), expert.compression,
                              expert.backward_timeout, expert.secret)
        if len(grads) != len(inputs):
            raise RemoteExpertError(expert.uid, expert.endpoint, f"backward: {len(grads)} gradients for {len(inputs)} inputs")
        return (None, *(g.to(device=x.device, dtype=x.dtype) for g, x in zip(grads, inputs)))


class RemoteExpert(nn.Module):
    """An expert served by an ExpertHost at ``endpoint``; gradients flow through it to the host.

    Args:
        uid: the expert's uid on the host, e.g. ``"ffn.3.14"``.
        endpoint: the host's ``"host:port"``.
        forward_timeout: seconds to wait for a forward answer (None: forever).
        backward_timeout: seconds to wait for a backward answer (None: forever).
        compression: wire compression of activations and gradients: none, float16, uint8, int8 or int4.
        secret: a private swarm's shared secret (default: the LIGHTNING_MOE_SECRET environment variable).
    """

    def __init__(
        self,
        uid: str,
        endpoint: str,
        forward_timeout: float | None = DEFAULT_TIMEOUT,
        backward_timeout: float | None = DEFAULT_TIMEOUT,
        compression: str = "none",
        secret: str | bytes | None = None,
    ):
        super().__init__()
        if compression not in wire.COMPRESSIONS:
            raise ValueError(f"compression must be one of {wire.COMPRESSIONS}, got {compression!r}")
        self.uid, self.endpoint, self.compression = uid, endpoint, compression
        self.secret = auth.resolve_secret(secret)
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self._info: dict | None = None  # the host's /info about this expert, fetched on first use

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = _RemoteCall.apply(self, *inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def as_host_dtypes(self, tensors: Sequence[torch.Tensor], schema: str) -> list[torch.Tensor]:
        """``tensors`` on the CPU in the dtypes of the host's ``args_schema`` or ``outputs_schema``."""
        if self._info is None:
            self._info = self.info(timeout=self.forward_timeout)
        dtypes = [wire.parse_dtype(entry["dtype"]) for entry in self._info[schema]]
        if len(dtypes) != len(tensors):
            raise RemoteExpertError(self.uid, self.endpoint, f"the expert takes {len(dtypes)} tensors in its {schema}, got {len(tensors)}")
        return [t.detach().to(device="cpu", dtype=dtype) for t, dtype in zip(tensors, dtypes)]

    def info(self, timeout: float | None = DEFAULT_TIMEOUT) -> dict:
        """The host's description of this expert (schemas, max batch size)."""
        try:
            experts = fetch_info(self.endpoint, self.secret, timeout).get("experts", {})
        except RemoteExpertError as e:
            raise RemoteExpertError(self.uid, self.endpoint, e.message, e.status) from e
        if not isinstance(experts, dict) or self.uid not in experts:
            raise RemoteExpertError(self.uid, self.endpoint, "info: the host does not serve this expert", 404)
        return experts[self.uid]

    def extra_repr(self) -> str:
        return f"uid={self.uid!r}, endpoint={self.endpoint!r}, compression={self.compression!r}"
