"""SwarmAveraging: the trainers of one run keep one model by gossip-averaging their dense parameters."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy

from lightning_moe import auth
from lightning_moe.config import AveragingConfig, ConfigError, DHTConfig, to_dataclass
from lightning_moe.lightning.step_metrics import log_step_metrics, logs_step_metrics
from lightning_moe.net import resolve_binding
from lightning_moe.net.addresses import ALL_INTERFACES

import lightning_moe.averaging.state as state
from .averager import Averager

logger = logging.getLogger(__name__)


class SwarmAveraging(Callback):
    """Averages the LightningModule's parameters (the dense ones: experts live on hosts) with the other
    trainers of the same run, and starts a joiner from the swarm's model.

    Trainers find each other in the DHT under ``averaging:{run_id}`` (one sub-key per trainer that
    answers, with an expiry, re-declared while it trains). Every ``every_n_steps`` optimizer steps a
    background thread exchanges parameters with one peer picked at random and both move to their mean
    (gossip, not all-reduce); the result is added in place at the next step boundary (the first
    ``on_train_batch_end`` after an optimizer step), so the optimizer's state stays attached to the
    same parameters and no step waits for the network. In ``on_train_start`` (after a checkpoint is
    restored and the optimizer is built) a trainer that finds peers downloads the parameters of the
    most advanced one.

    The run's step is this trainer's ``global_step`` plus ``step_offset``: with ``adopt_step`` a joiner's
    offset makes it continue from the downloaded step. It is what peers are told and what
    ``averaging/run_step`` logs; ``trainer.global_step`` and ``max_steps`` count this trainer's steps.

    Under DDP the ranks average as one trainer: global rank 0 runs the exchanges, and at the step
    boundary where it applies a result (and after a download) its parameters are broadcast to every
    rank. Strategies that shard the model are refused.

    Metrics ``averaging/*`` (see :meth:`Averager.metrics`, plus ``run_step`` and ``loaded_step``) are
    logged by global rank 0 with ``LightningModule.log`` when Lightning logs its own step metrics
    (every ``trainer.log_every_n_steps`` optimizer steps): every logger gets them, and
    ``trainer.callback_metrics`` holds the latest.
    The state (``state_key`` from the run id) carries the step offset, the loaded step, the exchange
    counters and the outer step's anchor and momentum buffer.

    Args:
        config: :class:`~lightning_moe.config.AveragingConfig` or its mapping (None: the defaults).
        dht: the swarm (:class:`~lightning_moe.config.DHTConfig` or its mapping); no ``initial_peers``:
            averaging is off (a lone trainer).
    """

    def __init__(self, config: AveragingConfig | Mapping[str, Any] | None = None,
                 dht: DHTConfig | Mapping[str, Any] | None = None):
        super().__init__()
        self.config: AveragingConfig = to_dataclass(config if config is not None else AveragingConfig(), AveragingConfig)
        self.dht_config: DHTConfig = to_dataclass(dht if dht is not None else DHTConfig(), DHTConfig)
        self.averager: Averager | None = None  # on global rank 0 while it trains
        self.loaded_step: int | None = None  # the step of the swarm's model this trainer last started from
        self.step_offset = 0  # the run's step minus trainer.global_step
        self.final_metrics: dict[str, float] = {}
        self._active = False  # averaging runs in this fit (on every rank)
        self._last_step = -1
        self._saved: dict[str, Any] = {}  # the averager's state, from a checkpoint or the last fit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run_id=self.config.run_id)

    @property
    def endpoint(self) -> str | None:
        """``host:port`` of this trainer's averaging server (None in client mode or before it starts)."""
        return self.averager.endpoint if self.averager is not None else None

    def run_step(self, trainer: pl.Trainer) -> int:
        """The run's step: ``trainer.global_step + step_offset``."""
        return trainer.global_step + self.step_offset

    # ---- starting --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ConfigError(f"swarm_averaging averages whole models: every rank must hold one (a DDP strategy), "
                              f"got {type(trainer.strategy).__name__}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.dht_config.initial_peers:
            logger.info("swarm averaging is off: no dht.initial_peers")
            return
        self._active = True
        loaded = None
        if trainer.is_global_zero:
            self.averager = self._start_averager(pl_module)
            if self.config.load_state_from_peers:
                loaded = self.averager.load_from_peers()
        loaded = trainer.strategy.broadcast(loaded, src=0)
        if loaded is not None:
            if trainer.world_size > 1:
                self._share_parameters(trainer, pl_module)
            self.loaded_step = loaded
            if self.config.adopt_step and loaded > self.run_step(trainer):
                self.step_offset = loaded - trainer.global_step
        self._last_step = trainer.global_step
        if self.averager is not None:
            self.averager.publish(self.run_step(trainer))

    def _start_averager(self, pl_module: pl.LightningModule) -> Averager:
        from lightning_moe.shared import process_dht

        config, dht = self.config, self.dht_config
        binding = resolve_binding(config.host if config.host is not None else dht.host,
                                  config.announce_host if config.announce_host is not None else dht.announce_host,
                                  dht.initial_peers)
        averager = Averager(pl_module, config.run_id, process_dht(dht), client_mode=bool(config.client_mode), host=binding.host,
                            port=config.port, announce_host=binding.announce, secret=auth.resolve_secret(dht.secret),
                            max_distance=config.max_distance, ban_seconds=config.ban_seconds, timeout=config.timeout,
                            compression=config.compression, declare_ttl=config.declare_ttl, outer_lr=config.outer_lr,
                            outer_momentum=config.outer_momentum, aggregate=config.aggregate, clip_min=config.clip_min,
                            clip_factor=config.clip_factor)
        if config.client_mode is None and binding.host in ALL_INTERFACES and \
                (config.announce_host if config.announce_host is not None else dht.announce_host) is None:
            averager.find_reachability()
        if self._saved:
            averager.load_state_dict(self._saved)
        return averager

    # ---- training --------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self._active or step == self._last_step:
            return  # off, or accumulating gradients: no optimizer step since the last boundary
        self._last_step = step
        self._step_boundary(trainer, pl_module, start_round=step % self.config.every_n_steps == 0)
        if trainer.is_global_zero and logs_step_metrics(trainer):
            metrics = self.averager.metrics() | {"averaging/run_step": float(self.run_step(trainer))}
            if self.loaded_step is not None:
                metrics["averaging/loaded_step"] = float(self.loaded_step)
            log_step_metrics(pl_module, metrics, rank_zero_only=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._step_boundary(trainer, pl_module)
            if self.averager is not None:
                self.averager.publish(self.run_step(trainer))  # what joiners and late peers get

    def _step_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start_round: bool = False) -> None:
        """Apply a finished exchange on rank 0 (and start a round); then every rank holds rank 0's parameters."""
        applied = False
        if self.averager is not None:
            applied = self.averager.step_boundary(self.run_step(trainer), start_round=start_round)
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(applied, all=False):
            self._share_parameters(trainer, pl_module)

    def _share_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Broadcast global rank 0's parameters to every rank (in place: the optimizers keep their state)."""
        layout = state.Layout.of(pl_module)
        flats = trainer.strategy.broadcast(state.snapshot(pl_module, layout) if trainer.is_global_zero else None, src=0)
        if not trainer.is_global_zero:
            state.load(pl_module, layout, flats)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        saved = self.averager.state_dict() if self.averager is not None else self._saved
        return {"step_offset": self.step_offset, "loaded_step": self.loaded_step, **saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's state for the averager (Lightning calls this before ``on_train_start``)."""
        self.step_offset = int(state_dict.get("step_offset", 0))
        self.loaded_step = state_dict.get("loaded_step")
        self._saved = {key: state_dict[key] for key in ("anchor", "momentum_buffer", "stats") if key in state_dict}
        if self.averager is not None:
            self.averager.load_state_dict(self._saved)

    # ---- stopping --------------------------------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._stop()

    def _stop(self) -> None:
        self._active = False
        if self.averager is not None:
            self.final_metrics = self.averager.metrics()
            averager, self.averager = self.averager, None
            self._saved = averager.state_dict()  # a later fit (or a checkpoint after this one) continues from it
            averager.shutdown()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.config.run_id!r}, every_n_steps={self.config.every_n_steps})"
