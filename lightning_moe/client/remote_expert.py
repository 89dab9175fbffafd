"""RemoteExpert: an expert on another computer, called like a local nn.Module."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Sequence

import requests
import torch
from torch import nn

from lightning_moe import auth, wire

DEFAULT_TIMEOUT = 30.0
_sessions: dict[tuple[int, int], requests.Session] = {}
_sessions_lock = threading.Lock()
_host_ids: dict[str, str] = {}  # endpoint -> the host_id its /info gave (private swarms sign requests for it)


class RemoteExpertError(RuntimeError):
    """A call to a remote expert failed; names the uid, the endpoint and the host's message."""

    def __init__(self, uid: str, endpoint: str, message: str, status: int | None = None):
        self.uid, self.endpoint, self.message, self.status = uid, endpoint, message, status
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"expert {uid!r} at {endpoint} failed ({where}): {message}")


def get_session() -> requests.Session:
    """The HTTP session of this process and thread: keep-alive connections, reused across calls.

    Keyed by pid so that a forked child never shares its parent's sockets.
    """
    key = (os.getpid(), threading.get_ident())
    session = _sessions.get(key)
    if session is None:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=32, max_retries=0)
        session.mount("http://", adapter)
        with _sessions_lock:
            _sessions[key] = session
    return session


def auth_headers(
    secret: bytes | None, method: str, path: str, body: bytes, compression: str = "none", host_id: str = ""
) -> dict[str, str]:
    """Headers that authenticate a request to the host instance ``host_id`` of a private swarm (none without a
    secret). ``host_id`` comes from the host's ``/info``; ``GET /info`` itself may be signed with an empty one."""
    return auth.request_headers(secret, method, path, body, compression, host_id)


def fetch_info(endpoint: str, secret: bytes | None, timeout: float | None = DEFAULT_TIMEOUT) -> dict:
    """The host's ``/info`` (raises RemoteExpertError with uid ``"*"``); remembers its host_id for signing."""
    try:
        response = get_session().get(f"http://{endpoint}/info", timeout=timeout, headers=auth_headers(secret, "GET", "/info", b""))
    except requests.RequestException as e:
        raise RemoteExpertError("*", endpoint, f"info: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise RemoteExpertError("*", endpoint, f"info: {_error_message(response)}", response.status_code)
    try:
        info = response.json()
    except ValueError as e:
        raise RemoteExpertError("*", endpoint, f"info: not JSON: {e}", response.status_code) from e
    if not isinstance(info, dict):
        raise RemoteExpertError("*", endpoint, "info: not a JSON object", response.status_code)
    if isinstance(info.get("host_id"), str):
        _host_ids[endpoint] = info["host_id"]
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
) -> list[torch.Tensor]:
    """POST tensors to ``/{method}/{uid}`` and return the decoded answer (CPU tensors).

    ``secret`` signs the request for a private swarm's hosts, bound to the host instance (its
    host_id from /info, fetched once per endpoint; fetched again, and the call retried once, if the
    host refuses the signature: it restarted). Raises RemoteExpertError for any failure: no
    connection, timeout, HTTP error, bad answer.
    """
    path = f"/{method}/{uid}"
    try:
        body = wire.serialize(tensors, compression)
        target = host_id(endpoint, secret, timeout)
        for attempt in range(2):
            headers = {"Content-Type": "application/octet-stream", "X-Compression": compression}
            headers.update(auth_headers(secret, "POST", path, body, compression, target))
            response = get_session().post(f"http://{endpoint}{path}", data=body, headers=headers, timeout=timeout)
            if response.status_code != 401 or secret is None or attempt == 1:
                break
            renewed = host_id(endpoint, secret, timeout, refresh=True)
            if renewed == target:
                break
            target = renewed
    except requests.RequestException as e:
        raise RemoteExpertError(uid, endpoint, f"{method}: {type(e).__name__}: {e}") from e
    except RemoteExpertError as e:
        raise RemoteExpertError(uid, endpoint, f"{method}: {e.message}", e.status) from e
    if response.status_code != 200:
        message = _error_message(response)  # the host's message usually names the direction already
        raise RemoteExpertError(uid, endpoint, message if message.startswith(f"{method}:") else f"{method}: {message}",
                                response.status_code)
    try:
        return wire.deserialize(bytearray(response.content))
    except wire.WireError as e:
        raise RemoteExpertError(uid, endpoint, f"{method}: malformed answer: {e}", response.status_code) from e


def _error_message(response: requests.Response) -> str:
    try:
        return str(json.loads(response.content)["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason or "empty answer"


class _RemoteCall(torch.autograd.Function):
    """Forward and backward of one remote expert; the host recomputes forward in backward."""

    @staticmethod
    def forward(ctx: Any, expert: "RemoteExpert", *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.expert = expert
        ctx.save_for_backward(*inputs)
        outputs = call_expert(expert.uid, expert.endpoint, "forward", expert.as_host_dtypes(inputs, "args_schema"),
                              expert.compression, expert.forward_timeout, expert.secret)
        like = inputs[0]
        return tuple(out.to(device=like.device, dtype=like.dtype if out.is_floating_point() else out.dtype) for out in outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        expert: RemoteExpert = ctx.expert
        inputs = ctx.saved_tensors
        tensors = [*expert.as_host_dtypes(inputs, "args_schema"), *expert.as_host_dtypes(grad_outputs, "outputs_schema")]
        grads = call_expert(expert.uid, expert.endpoint, "backward", tensors, expert.compression, expert.backward_timeout,
                            expert.secret)
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
        compression: wire compression of activations and gradients: none, float16 or uint8.
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
