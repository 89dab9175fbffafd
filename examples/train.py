"""Train the example model with a DecentralizedMoE layer; Hydra composes the run from lightning_moe/conf.

    python examples/train.py                          # a local swarm on this machine trains a char LM
    python examples/train.py +volunteer=true          # ... and this process hosts experts too
    python examples/train.py dht.initial_peers=[203.0.113.5:31337]   # join a swarm elsewhere
    python examples/train.py experiment=baseline      # the same model with a local mixture
    python examples/train.py -m moe.k_best=2,4        # a Hydra multirun sweep

`lightning-moe train ...` runs the same entry point from an installed package. What happens, in
order (see lightning_moe/lightning/train.py):

1. the config is checked: types by the structured schemas, ranges by ``check_config``;
2. with no ``dht.initial_peers``, a local swarm (a DHT node and host processes) starts;
3. the data, the model (its ``moe`` layer from the `moe` group), callbacks and loggers are built;
4. ``trainer.fit``; the objective (``val/bpc``) is returned for sweeps.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lightning_moe.lightning.train import CONFIG_PATH, train


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return train(cfg, report=print).get(cfg.objective)  # the summary goes to the terminal


if __name__ == "__main__":
    main()
