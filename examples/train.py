"""Train the example model with a DecentralizedMoE layer; Hydra composes the run from conf/.

    python examples/train.py                          # a local swarm on this machine trains a char LM
    python examples/train.py +volunteer=true          # ... and this process hosts experts too
    python examples/train.py dht.initial_peers=[203.0.113.5:31337]   # join a swarm elsewhere
    python examples/train.py experiment=baseline      # the same model with a local mixture
    python examples/train.py -m moe.k_best=2,4        # a Hydra multirun sweep
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from lightning_moe import ExpertHostCallback
from lightning_moe.swarm import LocalSwarm

logger = logging.getLogger("train")


def uses_swarm(cfg: DictConfig) -> bool:
    """True when the `moe` group is a layer that finds its experts through the DHT."""
    return "initial_peers" in cfg.moe


def is_volunteer(cfg: DictConfig) -> bool:
    """`+volunteer=true` on the command line; any value but a boolean is an error naming the key."""
    volunteer = cfg.get("volunteer", False)
    if not isinstance(volunteer, bool):
        raise ValueError(f"volunteer must be true or false (as in +volunteer=true), got {volunteer!r}")
    return volunteer


def start_local_swarm(cfg: DictConfig) -> LocalSwarm:
    """A DHT node here and host processes that serve every expert of the grid."""
    return LocalSwarm(
        uid_prefix=cfg.moe.uid_prefix,
        grid_size=cfg.moe.grid_size,
        num_hosts=cfg.local_swarm.num_hosts,
        expert=hydra.utils.instantiate(cfg.host.expert),
        optimizer=hydra.utils.instantiate(cfg.host.optimizer),
        in_features=cfg.model.hid_dim,
        max_batch_size=cfg.host.max_batch_size,
        update_period=cfg.local_swarm.update_period,
        host=cfg.dht.host,
        start_timeout=cfg.local_swarm.start_timeout,
        num_threads=cfg.local_swarm.num_threads,
        host_delays=cfg.local_swarm.host_delays,
        secret=cfg.dht.secret,
    ).start()


def train(cfg: DictConfig, extra_callbacks: Callable[[LocalSwarm | None], list[pl.Callback]] | None = None) -> dict[str, float]:
    """Build everything from ``cfg``, fit, and return the final metrics.

    ``extra_callbacks(swarm)`` adds callbacks that may act on the local swarm (see fault_runs.py).
    """
    pl.seed_everything(cfg.seed, workers=True)
    swarm = None
    if uses_swarm(cfg) and not cfg.dht.initial_peers:
        swarm = start_local_swarm(cfg)
        cfg.dht.initial_peers = swarm.initial_peers
    moe = None
    try:
        datamodule = hydra.utils.instantiate(cfg.data)
        moe = hydra.utils.instantiate(cfg.moe)
        model = hydra.utils.instantiate(cfg.model, moe=moe)
        callbacks = [hydra.utils.instantiate(callback) for callback in cfg.callbacks.values()]
        if is_volunteer(cfg):
            callbacks.append(hydra.utils.instantiate(cfg.host.callback))
        if extra_callbacks is not None:
            callbacks += extra_callbacks(swarm)
        trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        print("final metrics: " + ", ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items())))
        if swarm is not None:
            print(f"swarm: DHT {swarm.initial_peers[0]}, hosts {', '.join(e for e in swarm.endpoints if e)}")
        for callback in callbacks:
            if isinstance(callback, ExpertHostCallback):
                served = callback.final_metrics.get("volunteer/forward/samples", 0)
                print(f"volunteer hosted {len(callback.hosted_uids)} experts and served {served:.0f} forward samples")
        return metrics
    finally:
        if moe is not None and getattr(moe, "_dht", None) is not None:
            moe.dht.shutdown()
        if swarm is not None:
            swarm.shutdown()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    logger.info("config:\n%s", OmegaConf.to_yaml(cfg))
    return train(cfg).get("val/bpc")  # the objective of a multirun sweep


if __name__ == "__main__":
    main()
