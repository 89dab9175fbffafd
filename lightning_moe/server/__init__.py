"""The expert host: backends, task pools, the runtime thread and the HTTP server."""

from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.experts import EXPERTS, make_expert, register_expert
from lightning_moe.server.host import ExpertHost
from lightning_moe.server.runtime import HostShutdownError, Runtime
from lightning_moe.server.task_pool import PoolClosedError, TaskPool

__all__ = [
    "EXPERTS",
    "ExpertBackend",
    "ExpertHost",
    "HostShutdownError",
    "PoolClosedError",
    "Runtime",
    "TaskPool",
    "make_expert",
    "register_expert",
]
