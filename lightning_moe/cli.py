"""`lightning-moe host|train|swarm [key=value ...]`: volunteer, train, or look at a swarm; configured from the
package's Hydra configs (lightning_moe/conf), so they work from any directory after `pip install`.

    lightning-moe host                                   # 4 free cells of the default grid, a new DHT
    lightning-moe host dht.initial_peers=[203.0.113.5:31337] host.cells=8 host.port=31338
    lightning-moe train trainer.max_steps=100            # a local swarm trains the example model
    lightning-moe train +volunteer=true dht.initial_peers=[203.0.113.5:31337]
    lightning-moe swarm dht.initial_peers=[203.0.113.5:31337]   # live experts, hosts, their load
    lightning-moe host --help                            # the host.* and dht.* keys
    lightning-moe train --cfg job                        # the composed config (any Hydra flag works)
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import hydra
from omegaconf import DictConfig

import lightning_moe.conf  # noqa: F401  (registers the config schemas)
from lightning_moe.config import ConfigError, DHTConfig, HostConfig, describe, layer_prefixes, to_dataclass

CONFIG_PATH = "pkg://lightning_moe.conf"
COMMANDS = ("host", "train", "swarm")
logger = logging.getLogger("lightning_moe.cli")

HOST_HELP = """usage: lightning-moe host [key=value ...]

Host experts for a swarm until Ctrl-C or SIGTERM: a DHT node joins dht.initial_peers (empty: a new
DHT), the host serves host.cells experts over HTTP and declares them every host.update_period s.
Open host.port (TCP) and dht.port (UDP) to trainers on other machines.

host.* keys (lightning_moe.config.HostConfig):
{host}

dht.* keys (lightning_moe.config.DHTConfig):
{dht}

The experts' size is model.hid_dim; their grid is moe.uid_prefix and moe.grid_size (the trainers'
layer). Hydra's own flags work too: --cfg job prints the composed config, --hydra-help its help."""


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def run_host(cfg: DictConfig) -> None:
    """Serve experts until Ctrl-C or SIGTERM, then save a host checkpoint and shut down cleanly."""
    from lightning_moe.volunteer import start_volunteer

    host, dht = to_dataclass(cfg.host, HostConfig), to_dataclass(cfg.dht, DHTConfig)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    volunteer = start_volunteer(host, dht)
    print(f"serving {len(volunteer.hosted_uids)} experts ({', '.join(volunteer.hosted_uids)}) at {volunteer.endpoint}", flush=True)
    print(f"DHT node at {volunteer.dht.address}; others join with dht.initial_peers=[{volunteer.dht.address}]", flush=True)
    stop.wait()
    stats = volunteer.stop()
    served = sum(expert["forward"]["samples"] for expert in stats.values())
    print(f"stopped; served {served} forward samples", flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def run_swarm(cfg: DictConfig) -> None:
    """Print the layer's live experts, their hosts and each host's load."""
    from lightning_moe import auth
    from lightning_moe.shared import process_dht, shutdown_process_dht
    from lightning_moe.swarm_view import format_survey, survey

    dht = to_dataclass(cfg.dht, DHTConfig)
    if not dht.initial_peers:
        raise ConfigError("dht.initial_peers is empty: name a DHT node of the swarm, e.g. dht.initial_peers=[HOST:PORT]")
    try:
        node = process_dht(dht)
        layers = [(prefix, list(cfg.moe.grid_size)) for prefix in layer_prefixes(cfg.moe.uid_prefix, cfg.model.moe_layers)]
        views, hosts = survey(node, layers, auth.resolve_secret(dht.secret))
        print(format_survey(views, hosts), flush=True)
    finally:
        shutdown_process_dht()


def host_help(overrides: list[str]) -> str:
    """HOST_HELP with each key's value in the composed config (the packaged defaults plus ``overrides``)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    values = {group: OmegaConf.to_container(cfg[group], resolve=False) for group in ("host", "dht")}
    return HOST_HELP.format(host=describe(HostConfig, "host", values["host"]), dht=describe(DHTConfig, "dht", values["dht"]))


def main() -> None:
    """Console entry point: `lightning-moe COMMAND [hydra overrides]`."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nusage: lightning-moe {{{','.join(COMMANDS)}}} [key=value ...]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"lightning-moe {command}"
    if command == "host" and any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(host_help([arg for arg in sys.argv[1:] if not arg.startswith("-")]))
        return
    if command == "swarm":
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if command == "host":
        run_host()
    elif command == "train":
        from lightning_moe.lightning.train import main as run_train

        run_train()
    else:
        run_swarm()


if __name__ == "__main__":
    main()
