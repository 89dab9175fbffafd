"""ExpertHostCallback: any Lightning process becomes a volunteer that hosts experts for the swarm."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from lightning_moe.config import DHTConfig, HostConfig, to_dataclass
from lightning_moe.lightning.step_metrics import log_step_metrics, logs_step_metrics
from lightning_moe.volunteer import CHECKPOINT_FILE, Volunteer, start_volunteer

logger = logging.getLogger(__name__)


class ExpertHostCallback(Callback):
    """Hosts experts of a DecentralizedMoE grid while this process trains (or validates, tests, predicts).

    The host starts in ``on_fit_start``, after Lightning restored the callback's state from
    ``ckpt_path``, so a resumed volunteer serves the experts it had (and the cells it had); in the
    other stages it starts at the stage's start. It stops on ``teardown`` and on exceptions. Its DHT
    node is this process's: the DecentralizedMoE layers of the model use it instead of a node of
    their own. Host counters (``volunteer/*``, :meth:`host_metrics`) are logged with
    ``LightningModule.log`` when Lightning logs its own step metrics (every ``trainer.log_every_n_steps``
    optimizer steps, also under gradient accumulation): every logger gets them, and
    ``trainer.callback_metrics`` holds the latest (ModelCheckpoint may monitor them).

    Args:
        host: what to host and how (:class:`~lightning_moe.config.HostConfig`, or its mapping, e.g.
            the ``host`` group of the Hydra config). ``host.device`` None: the trainer's device.
        dht: where to join the swarm (:class:`~lightning_moe.config.DHTConfig` or its mapping);
            None starts a new DHT.
        all_ranks: under DDP, host on every rank (rank ``r`` adds ``r`` to nonzero ports, its seed,
            and keeps its own ``host.checkpoint_dir`` file; only rank 0's experts go into Lightning
            checkpoints) instead of on global rank 0 only.
    """

    def __init__(self, host: HostConfig | Mapping[str, Any], dht: DHTConfig | Mapping[str, Any] | None = None,
                 all_ranks: bool = False):
        super().__init__()
        self.config: HostConfig = to_dataclass(host, HostConfig)
        self.dht_config: DHTConfig = to_dataclass(dht if dht is not None else DHTConfig(), DHTConfig)
        self.all_ranks = all_ranks
        self.volunteer: Volunteer | None = None
        self._last_step = -1
        self._restored_state: dict | None = None
        self._hosts_here = True
        self._rank = 0
        self._device: Any = "cpu"
        self.final_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(uid_prefix=self.config.uid_prefix, grid_size=list(self.config.grid_size))

    @property
    def hosted_uids(self) -> list[str]:
        """The uids this process hosts (empty before the host starts or on a rank that does not host)."""
        return self.volunteer.hosted_uids if self.volunteer is not None else []

    @property
    def expert_host(self) -> Any:
        """The running :class:`~lightning_moe.server.ExpertHost`, or None."""
        return self.volunteer.host if self.volunteer is not None else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank
        self._hosts_here = self.all_ranks or trainer.global_rank == 0

    # ---- starting, after the checkpoint was restored -----------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer)

    def _start(self, trainer: pl.Trainer) -> None:
        if self.volunteer is not None or not self._hosts_here:
            return
        self._device = self.config.device or trainer.strategy.root_device
        self._launch()

    def _launch(self) -> None:
        rank = self._rank
        config, dht = self.config, self.dht_config
        if rank:
            config = dataclasses.replace(config, port=config.port + rank if config.port else 0,
                                         seed=None if config.seed is None else config.seed + rank)
            dht = dataclasses.replace(dht, port=dht.port + rank if dht.port else 0)
        state, self._restored_state = self._restored_state, None
        self.volunteer = start_volunteer(config, dht, device=self._device, state=state,
                                         checkpoint_name=f"rank{rank}.pt" if rank else CHECKPOINT_FILE)
        if state:
            logger.info("restored %d experts from checkpoint", len(state))

    # ---- logging ------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.volunteer is None or trainer.global_step == self._last_step:
            return  # no host here, or accumulating gradients: no optimizer step since the last call
        self._last_step = trainer.global_step
        if logs_step_metrics(trainer):
            log_step_metrics(pl_module, self.host_metrics(), rank_zero_only=not self.all_ranks)

    def host_metrics(self) -> dict[str, float]:
        """The host's counters over all its experts: requests, samples, batch sizes, queue wait, errors."""
        metrics: dict[str, float] = {}
        per_expert = self.volunteer.host.stats().values()
        for direction in ("forward", "backward"):
            rows = [expert[direction] for expert in per_expert]
            for counter in ("requests", "samples", "batches", "errors", "failed_batches"):
                metrics[f"volunteer/{direction}/{counter}"] = float(sum(row[counter] for row in rows))
            batches = metrics[f"volunteer/{direction}/batches"]
            metrics[f"volunteer/{direction}/mean_batch_size"] = metrics[f"volunteer/{direction}/samples"] / max(batches, 1.0)
            metrics[f"volunteer/{direction}/max_queue_wait"] = float(max((row["max_queue_wait"] for row in rows), default=0.0))
        metrics["volunteer/updates"] = float(sum(expert["updates"] for expert in per_expert))
        return metrics

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.volunteer is None:
            return {"experts": self._restored_state or {}}
        return {"experts": self.volunteer.host.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's experts for the host to start with (Lightning calls this before ``on_fit_start``)."""
        experts = state_dict.get("experts", {})
        if not experts:
            return
        if self.volunteer is None:
            self._restored_state = experts
        elif set(experts) == set(self.volunteer.host.backends):  # a strategy that restores after on_fit_start
            self.volunteer.host.load_state_dict(experts)
        else:
            logger.warning("checkpoint's experts %s differ from the running host's %s; restarting the host with them",
                           sorted(experts), self.volunteer.hosted_uids)
            self._stop()
            self._restored_state = experts
            self._launch()

    # ---- stopping -----------------------------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.volunteer is not None:
            self.final_metrics = self.host_metrics()
            volunteer, self.volunteer = self.volunteer, None
            self._restored_state = volunteer.host.state_dict()  # a later stage (trainer.test) serves the same experts
            volunteer.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.uid_prefix}{list(self.config.grid_size)}, cells={self.config.cells})"
