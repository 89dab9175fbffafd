"""How this package's callbacks log step metrics: when Lightning logs its own, through ``LightningModule.log``."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch


def logs_step_metrics(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends step metrics to the loggers at this optimizer step: every ``log_every_n_steps`` optimizer
    steps, and when training stops. Ask in ``on_train_batch_end`` after an optimizer step (``trainer.global_step``
    moved): under gradient accumulation the other batches take none. Public attributes only (Lightning's own check,
    ``trainer._logger_connector.should_update_logs``, counts the same steps for one optimizer)."""
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step % every == 0 or trainer.should_stop)


def log_step_metrics(pl_module: pl.LightningModule, metrics: Mapping[str, float], rank_zero_only: bool) -> None:
    """``pl_module.log`` them for this step: every logger gets them, ``trainer.callback_metrics`` keeps the latest (what
    ModelCheckpoint monitors and `lightning-moe train` prints). float64: counters pass float32's 2**24 quickly."""
    pl_module.log_dict({name: torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()},
                       on_step=True, on_epoch=False, rank_zero_only=rank_zero_only)
