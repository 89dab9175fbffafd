"""`lightning-moe host [key=value ...]`: a volunteer without data, configured from the same conf/ as training.

    lightning-moe host                                   # 4 free cells of the default grid, a new DHT
    lightning-moe host dht.initial_peers=[10.0.0.5:4000] host.cells=8 host.port=31337
    lightning-moe host --cfg job                         # show the composed config (any Hydra flag works)
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lightning_moe.swarm import HostSpec, serve

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
COMMANDS = ("host",)
logger = logging.getLogger("lightning_moe.cli")


def host_spec(cfg: DictConfig) -> HostSpec:
    """What to host, from the `host`, `dht`, `moe` and `model` groups."""
    cells = cfg.host.cells
    return HostSpec(
        uids=cells if isinstance(cells, int) else list(cells),
        expert=hydra.utils.instantiate(cfg.host.expert),
        optimizer=hydra.utils.instantiate(cfg.host.optimizer),
        in_features=cfg.model.hid_dim,
        initial_peers=list(cfg.dht.initial_peers),
        host=cfg.host.host,
        port=cfg.host.port,
        dht_port=cfg.dht.port,
        announce_host=cfg.host.announce_host,
        max_batch_size=cfg.host.max_batch_size,
        update_period=cfg.host.update_period,
        seed=cfg.host.seed,
        uid_prefix=cfg.moe.uid_prefix,
        grid_size=list(cfg.moe.grid_size),
        secret=cfg.dht.secret,
        compression=cfg.host.compression,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run_host(cfg: DictConfig) -> None:
    """Serve experts until Ctrl-C or SIGTERM, then shut down cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def announce(host, dht) -> None:
        uids = sorted(host.backends)
        print(f"serving {len(uids)} experts ({', '.join(uids)}) at {host.endpoint}", flush=True)
        print(f"DHT node at {dht.address}; others join with dht.initial_peers=[{dht.address}]", flush=True)

    stats = serve(host_spec(cfg), announce, stop)
    served = sum(expert["forward"]["samples"] for expert in stats.values())
    print(f"stopped; served {served} forward samples", flush=True)


def main() -> None:
    """Console entry point: `lightning-moe COMMAND [hydra overrides]`."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nusage: lightning-moe {{{','.join(COMMANDS)}}} [key=value ...]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"lightning-moe {command}"
    if command == "host":
        run_host()


if __name__ == "__main__":
    main()
