"""SwarmAveraging: the trainers of one run keep one model by gossip-averaging their dense parameters."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from lightning_moe import auth
from lightning_moe.config import ConfigError, DHTConfig, to_dataclass
from lightning_moe.net import resolve_binding

from .averager import Averager

logger = logging.getLogger(__name__)


class SwarmAveraging(Callback):
    """Averages the LightningModule's parameters (the dense ones: experts live on hosts) with the other
    trainers of the same run, and starts a joiner from the swarm's model.

    Trainers find each other in the DHT under ``averaging:{run_id}`` (one sub-key per trainer that
    answers, with an expiry, re-declared while it trains). Every ``every_n_steps`` optimizer steps a
    background thread exchanges parameters with one peer picked at random and both move to their mean
    (gossip, not all-reduce); the result is added in place at the next step boundary
    (``on_train_batch_end`` after an optimizer step), so the optimizer's state stays attached to the
    same parameters and no step waits for the network. In ``on_train_start`` (after a checkpoint is
    restored and the optimizer is built) a trainer that finds peers downloads the parameters of the
    most advanced one, and with ``adopt_step`` continues from its global step.

    Args:
        run_id: trainers with the same run id average together.
        every_n_steps: optimizer steps between the exchanges this trainer initiates.
        dht: the swarm (:class:`~lightning_moe.config.DHTConfig` or its mapping); no ``initial_peers``:
            averaging is off (a lone trainer).
        client_mode: behind NAT: initiate exchanges, answer none (no server; not declared in the DHT).
        host / port / announce_host: where the averaging server binds (port 0: a free one) and the
            address peers are told; None: as the DHT node would (``lightning_moe.net.resolve_binding``).
        max_distance: a peer's parameters farther than this from ours (relative norm of the
            difference) are refused and that peer is left out for ``ban_seconds``.
        timeout: seconds one exchange or download may take (a dead peer costs one exchange).
        compression: none or float16 on the wire.
        load_state_from_peers: a joiner downloads the swarm's parameters before its first step.
        adopt_step: the joiner also takes the peer's global step, the run's step (``trainer.global_step``, the
            step its logs report; ``max_steps`` then counts the run's steps, not this trainer's).
        declare_ttl: seconds a DHT declaration lives (renewed every third of it).
        log_every_n_steps: how often ``averaging/*`` metrics go to every logger of the trainer.
        outer_lr / outer_momentum: 1 and 0 (the default): plain averaging. Otherwise a DiLoCo-style outer
            step (Nesterov momentum on the pseudo-gradient ``anchor - pair mean``), e.g. 0.7 and 0.9 with
            ``every_n_steps`` in the tens or hundreds; see examples/collaborative_runs.py for a measurement.
    """

    def __init__(self, run_id: str = "default", every_n_steps: int = 10, dht: DHTConfig | Mapping[str, Any] | None = None,
                 client_mode: bool = False, host: str | None = None, port: int = 0, announce_host: str | None = None,
                 max_distance: float = 0.5, ban_seconds: float = 60.0, timeout: float = 10.0, compression: str = "none",
                 load_state_from_peers: bool = True, adopt_step: bool = True, declare_ttl: float = 30.0,
                 log_every_n_steps: int = 10, outer_lr: float = 1.0, outer_momentum: float = 0.0):
        super().__init__()
        if every_n_steps < 1:
            raise ConfigError(f"swarm_averaging.every_n_steps must be at least 1, got {every_n_steps}")
        if not max_distance > 0:
            raise ConfigError(f"swarm_averaging.max_distance must be positive, got {max_distance}")
        if compression not in ("none", "float16"):
            raise ConfigError(f"swarm_averaging.compression must be none or float16, got {compression!r}")
        if log_every_n_steps < 1:
            raise ConfigError(f"swarm_averaging.log_every_n_steps must be at least 1, got {log_every_n_steps}")
        if not run_id or len(run_id) > 200:
            raise ConfigError(f"swarm_averaging.run_id must be a non-empty string of at most 200 characters, got {run_id!r}")
        self.run_id, self.every_n_steps = str(run_id), int(every_n_steps)
        self.dht_config: DHTConfig = to_dataclass(dht if dht is not None else DHTConfig(), DHTConfig)
        self.client_mode, self.host, self.port, self.announce_host = client_mode, host, port, announce_host
        self.max_distance, self.ban_seconds, self.timeout = max_distance, ban_seconds, timeout
        self.compression, self.load_state_from_peers, self.adopt_step = compression, load_state_from_peers, adopt_step
        self.declare_ttl, self.log_every_n_steps = declare_ttl, log_every_n_steps
        if not outer_lr > 0 or not 0 <= outer_momentum < 1:
            raise ConfigError(f"swarm_averaging.outer_lr must be positive and outer_momentum in [0, 1), got {outer_lr}, {outer_momentum}")
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self.averager: Averager | None = None
        self.loaded_step: int | None = None  # the step of the swarm's model this trainer started from
        self.final_metrics: dict[str, float] = {}
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run_id=self.run_id)

    @property
    def endpoint(self) -> str | None:
        """``host:port`` of this trainer's averaging server (None in client mode or before it starts)."""
        return self.averager.endpoint if self.averager is not None else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averager is not None or not self.dht_config.initial_peers:
            if not self.dht_config.initial_peers:
                logger.info("swarm averaging is off: no dht.initial_peers")
            return
        if trainer.world_size > 1:
            logger.warning("SwarmAveraging under multi-process strategies is not supported; averaging is off")
            return
        from lightning_moe.shared import process_dht

        dht = process_dht(self.dht_config)
        binding = resolve_binding(self.host, self.announce_host, self.dht_config.initial_peers)
        self.averager = Averager(pl_module, self.run_id, dht, client_mode=self.client_mode, host=binding.host, port=self.port,
                                 announce_host=binding.announce, secret=auth.resolve_secret(self.dht_config.secret),
                                 max_distance=self.max_distance, ban_seconds=self.ban_seconds, timeout=self.timeout,
                                 compression=self.compression, declare_ttl=self.declare_ttl, outer_lr=self.outer_lr,
                                 outer_momentum=self.outer_momentum)
        if self.load_state_from_peers:
            self.loaded_step = self.averager.load_from_peers()
            if self.loaded_step is not None and self.adopt_step and self.loaded_step > trainer.global_step:
                _set_global_step(trainer, self.loaded_step)
        self._last_step = trainer.global_step
        self.averager.publish(trainer.global_step)
        if self.loaded_step is not None:
            self._log(trainer, {"averaging/loaded_step": float(self.loaded_step)})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.averager is None or step == self._last_step:
            return  # not started, or accumulating gradients: no optimizer step since the last boundary
        self._last_step = step
        applied = self.averager.step_boundary(step, start_round=step % self.every_n_steps == 0)
        if applied or step % self.log_every_n_steps == 0:
            self._log(trainer, self.averager.metrics())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averager is not None:
            self.averager.step_boundary(trainer.global_step)
            self.averager.publish(trainer.global_step)  # what joiners and late peers get

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for trainer_logger in trainer.loggers:
            trainer_logger.log_metrics(metrics, step=trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._stop()

    def _stop(self) -> None:
        if self.averager is not None:
            self.final_metrics = self.averager.metrics()
            averager, self.averager = self.averager, None
            averager.shutdown()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r}, every_n_steps={self.every_n_steps})"


def _set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Make ``trainer.global_step`` read ``step`` (the optimizer-step counters of Lightning's fit loop)."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        progress = loop.automatic_optimization.optim_progress.optimizer.step
    else:
        progress = loop.manual_optimization.optim_step_progress
    progress.total.ready = progress.total.completed = step
