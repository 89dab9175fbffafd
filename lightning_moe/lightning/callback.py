"""ExpertHostCallback: any Lightning process becomes a volunteer that hosts experts for the swarm."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_moe.server import ExpertHost
from lightning_moe.swarm import ExpertFactory, OptimizerFactory, choose_cells, grid_uids, make_backends

logger = logging.getLogger(__name__)


class ExpertHostCallback(Callback):
    """Hosts experts of a DecentralizedMoE grid while this process trains (or validates, or tests).

    On ``setup`` it builds the experts, starts an :class:`~lightning_moe.server.ExpertHost` with a
    DHT node joined to ``initial_peers`` and declares the experts; on ``teardown`` and on
    exceptions it shuts both down. Its ``state_dict`` carries the hosted experts' weights and
    optimizer states, so ``trainer.fit(ckpt_path=...)`` resumes a volunteer with the experts it had.

    Args:
        uid_prefix: the grid's uid prefix (the DecentralizedMoE layer's ``uid_prefix``).
        grid_size: the grid (the layer's ``grid_size``).
        expert: factory of one expert module (e.g. a Hydra ``_partial_`` config, instantiated).
        optimizer: factory ``params -> Optimizer`` for each expert; None keeps the experts frozen.
        in_features: the experts' input size.
        cells: the uids to host, or a number N: N grid cells that no one declares in the DHT yet
            (random busy cells too, if fewer are free).
        initial_peers: ``"host:port"`` of DHT nodes of the swarm; empty starts a new DHT.
        max_batch_size: rows per batch the host forms.
        update_every: 0 steps each expert's optimizer after every backward batch; N accumulates N samples.
        device: where the experts compute; None uses the trainer's root device.
        host: interface the HTTP server and the DHT node bind.
        port: HTTP port (0: any free port). ``dht_port`` likewise for the DHT node.
        announce_host: address peers should use when it differs from ``host``.
        update_period: seconds between DHT declarations (records live two periods).
        log_every_n_steps: how often the host's counters go to the trainer's logger.
        seed: seeds the experts' initial weights.
        compression: how the host compresses its answers (``none``, ``float16``, ``uint8``); None
            answers each request in the compression the trainer chose for it.
        secret: a private swarm's shared secret for requests and DHT records (default: the
            ``LIGHTNING_MOE_SECRET`` environment variable; neither: a public swarm).
    """

    def __init__(
        self,
        uid_prefix: str,
        grid_size: Sequence[int],
        expert: ExpertFactory,
        optimizer: OptimizerFactory | None,
        in_features: int,
        cells: int | Sequence[str] = 4,
        initial_peers: Sequence[str] = (),
        max_batch_size: int = 1024,
        update_every: int = 0,
        device: str | torch.device | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        dht_port: int = 0,
        announce_host: str | None = None,
        update_period: float = 10.0,
        log_every_n_steps: int = 50,
        seed: int | None = None,
        compression: str | None = None,
        secret: str | None = None,
    ):
        super().__init__()
        self.uid_prefix, self.grid_size = uid_prefix, tuple(grid_size)
        all_uids = set(grid_uids(uid_prefix, self.grid_size))
        if not isinstance(cells, int):
            unknown = [uid for uid in cells if uid not in all_uids]
            if unknown:
                raise ValueError(f"cells {unknown} are not in the grid {uid_prefix}{list(self.grid_size)}")
        elif not 1 <= cells <= len(all_uids):
            raise ValueError(f"cells must be between 1 and {len(all_uids)}, got {cells}")
        self.expert, self.optimizer, self.in_features, self.cells = expert, optimizer, in_features, cells
        self.initial_peers, self.max_batch_size, self.update_every = list(initial_peers), max_batch_size, update_every
        self.device, self.host, self.port, self.dht_port = device, host, port, dht_port
        self.announce_host, self.update_period = announce_host, update_period
        self.log_every_n_steps, self.seed, self.secret = log_every_n_steps, seed, secret
        self.compression = compression
        self.dht: Any = None
        self.expert_host: ExpertHost | None = None
        self._pending_state: dict | None = None
        self._device = torch.device("cpu")
        self.hosted_uids: list[str] = []
        self.final_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return f"ExpertHostCallback[{self.uid_prefix}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.expert_host is not None:
            return
        from lightning_moe.dht import DHT

        self._device = torch.device(self.device) if self.device is not None else trainer.strategy.root_device
        self.dht = DHT(initial_peers=self.initial_peers, host=self.host, port=self.dht_port, announce_host=self.announce_host,
                       secret=self.secret)
        try:
            state, self._pending_state = self._pending_state, None
            cells = self.cells if not isinstance(self.cells, int) else choose_cells(self.dht, self.uid_prefix, self.grid_size, self.cells, self.seed)
            self._start_host(sorted(state) if state else list(cells), state)
        except BaseException:
            self._shutdown()
            raise

    def _start_host(self, uids: list[str], state: dict | None) -> None:
        backends = make_backends(uids, self.expert, self.optimizer, self.in_features, self.max_batch_size,
                                 self.update_every, seed=self.seed)
        host = ExpertHost(backends, host=self.host, port=self.port, device=self._device,
                          announce_host=self.announce_host, dht=self.dht, update_period=self.update_period, secret=self.secret,
                          compression=self.compression)
        if state:
            host.load_state_dict(state)
        self.expert_host = host.start()
        self.hosted_uids = list(uids)
        logger.info("volunteer hosts %d experts at %s; DHT node at %s", len(uids), host.endpoint, self.dht.address)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.expert_host is None or trainer.logger is None or trainer.global_step % self.log_every_n_steps:
            return
        trainer.logger.log_metrics(self.host_metrics(), step=trainer.global_step)

    def host_metrics(self) -> dict[str, float]:
        """The host's counters over all its experts: requests, samples, batch sizes, queue wait, errors."""
        metrics: dict[str, float] = {}
        per_expert = self.expert_host.stats().values()
        for direction in ("forward", "backward"):
            rows = [expert[direction] for expert in per_expert]
            for counter in ("requests", "samples", "batches", "errors", "failed_batches"):
                metrics[f"volunteer/{direction}/{counter}"] = float(sum(row[counter] for row in rows))
            batches = metrics[f"volunteer/{direction}/batches"]
            metrics[f"volunteer/{direction}/mean_batch_size"] = metrics[f"volunteer/{direction}/samples"] / max(batches, 1.0)
            metrics[f"volunteer/{direction}/max_queue_wait"] = float(max((row["max_queue_wait"] for row in rows), default=0.0))
        metrics["volunteer/updates"] = float(sum(expert["updates"] for expert in per_expert))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        if self.expert_host is None:
            return {"experts": self._pending_state or {}}
        return {"experts": self.expert_host.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the hosted experts; Lightning calls this after ``setup``, so the host restarts
        with the checkpoint's uids if they differ from the cells it chose."""
        experts = state_dict.get("experts", {})
        if not experts:
            return
        if self.expert_host is None:
            self._pending_state = experts
        elif set(experts) == set(self.expert_host.backends):
            self.expert_host.load_state_dict(experts)
        else:
            self.expert_host.shutdown()
            self.expert_host = None
            self._start_host(sorted(experts), experts)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._shutdown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self.expert_host is not None:
            self.final_metrics = self.host_metrics()
            self.expert_host.shutdown()
            self.expert_host = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

