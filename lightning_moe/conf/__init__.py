"""The Hydra configs (`pkg://lightning_moe.conf`); importing this package registers their schemas."""

from lightning_moe.config import register_configs

register_configs()
