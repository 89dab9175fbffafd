"""`lightning-moe train` (and examples/train.py): build a run from the Hydra config, check it, fit.

The config is checked before anything starts (types by the schemas, ranges here); then, with no
``dht.initial_peers``, a local swarm's DHT node starts, the data, model, callbacks, loggers and
trainer are built, the swarm's hosts start, and the trainer fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

import lightning_moe.conf  # noqa: F401  (registers the config schemas)
from lightning_moe.config import AveragingConfig, CharLMConfig, ConfigError, DHTConfig, HostConfig, LocalSwarmConfig, check_moe, to_dataclass
from lightning_moe.swarm import LocalSwarm

logger = logging.getLogger("lightning_moe.train")

CONFIG_PATH = "pkg://lightning_moe.conf"


def uses_swarm(cfg: DictConfig) -> bool:
    """True when the `moe` group is a layer that finds its experts through the DHT."""
    return "dht" in cfg.moe


def is_volunteer(cfg: DictConfig) -> bool:
    """`+volunteer=true` on the command line; any value but a boolean is an error naming the key."""
    volunteer = cfg.get("volunteer", False)
    if not isinstance(volunteer, bool):
        raise ConfigError(f"volunteer must be true or false (as in +volunteer=true), got {volunteer!r}")
    return volunteer


def check_config(cfg: DictConfig) -> tuple[HostConfig, DHTConfig, LocalSwarmConfig]:
    """Every range and relation of the run's config, before anything starts; errors name the key."""
    is_volunteer(cfg)
    check_moe(cfg.moe)
    if str(cfg.model.get("_target_", "")).endswith("CharLM"):
        to_dataclass(cfg.model, CharLMConfig).check()
    if cfg.get("objective_mode", "min") not in ("min", "max"):
        raise ConfigError(f"objective_mode must be min or max, got {cfg.objective_mode!r}")
    if "swarm_averaging" in (cfg.get("callbacks") or {}):
        to_dataclass(cfg.callbacks.swarm_averaging.config, AveragingConfig)
    return to_dataclass(cfg.host, HostConfig), to_dataclass(cfg.dht, DHTConfig), to_dataclass(cfg.local_swarm, LocalSwarmConfig)


def instantiate_group(cfg: DictConfig, group: str) -> list[Any]:
    """Instantiate every entry of a name -> `_target_` group (`callbacks`, `logger`); errors name the entry."""
    objects = []
    for name, node in (cfg.get(group) or {}).items():
        try:
            objects.append(hydra.utils.instantiate(node))
        except InstantiationException as e:
            cause = e.__cause__
            hint = f" (pip install {cause.name})" if isinstance(cause, ModuleNotFoundError) and cause.name else ""
            raise ConfigError(f"{group}.{name}: cannot instantiate {node.get('_target_')}: {cause or e}{hint}") from e
    return objects


def averaging_callback(cfg: DictConfig) -> pl.Callback:
    """What a `+volunteer=true` trainer joining a swarm gets: the `callbacks/swarm_averaging` preset, i.e. the
    AveragingConfig defaults with the run's id (`+run_id`) and the run's `dht` group."""
    from lightning_moe.averaging import SwarmAveraging

    return SwarmAveraging(AveragingConfig(run_id=str(cfg.get("run_id", "default"))), dht=cfg.dht)


def train(cfg: DictConfig, extra_callbacks: Callable[[LocalSwarm | None], list[pl.Callback]] | None = None,
          report: Callable[[str], None] = logger.info) -> dict[str, float]:
    """Build everything from ``cfg``, fit, and return the final metrics.

    ``extra_callbacks(swarm)`` adds callbacks that may act on the local swarm (see examples/fault_runs.py).
    ``report`` gets the summary lines (final metrics, the swarm, what a volunteer served); the command
    line entry points pass ``print``.
    """
    host, dht, swarm_config = check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    swarm = None
    joins_swarm = bool(cfg.dht.initial_peers)
    if uses_swarm(cfg) and not cfg.dht.initial_peers:
        swarm = LocalSwarm(host, swarm_config, dht).start_dht()
        cfg.dht.initial_peers = swarm.initial_peers
    try:
        datamodule = hydra.utils.instantiate(cfg.data)
        model = hydra.utils.instantiate(cfg.model, moe=hydra.utils.instantiate(cfg.moe, _partial_=True))
        callbacks = instantiate_group(cfg, "callbacks")
        if is_volunteer(cfg):
            callbacks.append(hydra.utils.instantiate(cfg.volunteer_callback))
            from lightning_moe.averaging import SwarmAveraging

            if joins_swarm and not any(isinstance(callback, SwarmAveraging) for callback in callbacks):
                callbacks.append(averaging_callback(cfg))  # many volunteers, one model
        if extra_callbacks is not None:
            callbacks += extra_callbacks(swarm)
        loggers = instantiate_group(cfg, "logger")
        trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        if swarm is not None:
            swarm.start()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        report("final metrics: " + ", ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items())))
        if swarm is not None:
            report(f"swarm: DHT {swarm.initial_peers[0]}, hosts {', '.join(e for e in swarm.endpoints if e)}")
        for callback in callbacks:
            served = getattr(callback, "final_metrics", {}).get("volunteer/forward/samples")
            if served is not None:
                report(f"volunteer served {served:.0f} forward samples")
        return metrics
    finally:
        from lightning_moe.shared import shutdown_process_dht

        shutdown_process_dht()
        if swarm is not None:
            swarm.shutdown()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """`lightning-moe train [overrides]`: returns the objective (for sweeps)."""
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg))
    return train(cfg, report=print).get(cfg.objective)
