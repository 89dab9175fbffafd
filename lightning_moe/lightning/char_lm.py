"""The example task: character-level language modelling on the Python standard library's own source.

No download: every Python installation carries its data. Text is read as bytes (vocabulary 256).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_moe.client.pipeline import MoEStack, check_micro_batches
from lightning_moe.config import layer_prefixes


def stdlib_text(max_bytes: int, skip_bytes: int = 0) -> bytes:
    """Up to ``max_bytes`` of the standard library's top-level ``.py`` files, in sorted order, after ``skip_bytes``."""
    folder = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= skip_bytes + max_bytes:
            break
    return b"".join(chunks)[skip_bytes : skip_bytes + max_bytes]


class ByteWindows(Dataset):
    """Windows of ``seq_len + 1`` bytes; input is the first ``seq_len``, target the last ``seq_len``."""

    def __init__(self, data: torch.Tensor, seq_len: int, stride: int):
        self.data, self.seq_len = data, seq_len
        self.starts = range(0, len(data) - seq_len - 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[self.starts[index] : self.starts[index] + self.seq_len + 1].long()
        return window[:-1], window[1:]


class StdlibCharData(pl.LightningDataModule):
    """Train on the first ``train_bytes`` of the stdlib's source, validate on the next ``val_bytes``.

    Args:
        train_bytes: bytes of text to train on.
        val_bytes: bytes of text, right after the training text, to validate on.
        seq_len: characters per sequence.
        batch_size: sequences per batch.
        num_workers: DataLoader workers.
        shard / num_shards: train on the ``shard``-th of ``num_shards`` contiguous, disjoint parts of the
            training text (one per trainer of a collaborative run); validation is the same for all.
    """

    def __init__(self, train_bytes: int = 1_000_000, val_bytes: int = 100_000, seq_len: int = 64, batch_size: int = 32,
                 num_workers: int = 0, shard: int = 0, num_shards: int = 1):
        super().__init__()
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"data.shard must be in 0..data.num_shards-1 and data.num_shards at least 1, got {shard} of {num_shards}")
        self.shard, self.num_shards = shard, num_shards
        self.train_bytes, self.val_bytes, self.seq_len = train_bytes, val_bytes, seq_len
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: ByteWindows | None = None
        self.val_set: ByteWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        text = stdlib_text(self.train_bytes + self.val_bytes)
        if len(text) < self.train_bytes + self.val_bytes:
            raise ValueError(f"the standard library holds only {len(text)} bytes of top-level source")
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        size = self.train_bytes // self.num_shards
        self.train_set = ByteWindows(data[self.shard * size : (self.shard + 1) * size], self.seq_len, stride=self.seq_len // 2)
        self.val_set = ByteWindows(data[self.train_bytes :], self.seq_len, stride=self.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class CharLM(pl.LightningModule):
    """A small causal transformer whose feed-forward blocks are mixtures of experts.

    embedding -> causal self-attention block -> ``moe_layers`` mixtures (each residual) -> LayerNorm
    -> next-byte logits. Reports bits per character (``val/bpc``) and the expert calls (``moe/*``,
    summed over the layers, logged after backward so that ``moe/backward_*`` are filled).

    Args:
        moe: a factory ``(uid_prefix=...) -> layer`` (DecentralizedMoE, or LocalMoE as a baseline, as a
            ``functools.partial``) called once per layer; or one layer built by the caller.
        hid_dim: model width (the experts' in/out size).
        seq_len: longest sequence (positional embedding size).
        num_heads: attention heads.
        lr: AdamW learning rate of the model's own parameters (the experts learn on their hosts).
        aux_loss_weight: weight of the layers' load-balancing loss.
        moe_layers: mixture layers; their uid prefixes are ``uid_prefix`` for one layer, else
            ``uid_prefix0 .. uid_prefix{N-1}`` (:func:`lightning_moe.config.layer_prefixes`).
        uid_prefix: the grid prefix the layers' prefixes derive from.
        micro_batches: the batch is split into this many micro-batches that flow through the mixture layers at once
            (:class:`~lightning_moe.client.pipeline.MoEStack`): one micro-batch's expert calls overlap another's.
            Computes the same as 1 (no pipelining). ``"auto"`` (the default): 2 while a layer calls a host over a
            slow link, else 1.
    """

    def __init__(self, moe: nn.Module | Callable[..., nn.Module], hid_dim: int = 64, seq_len: int = 64, num_heads: int = 4,
                 lr: float = 3e-3, aux_loss_weight: float = 0.01, moe_layers: int = 1, uid_prefix: str = "ffn",
                 micro_batches: int | str = "auto"):
        super().__init__()
        self.save_hyperparameters(ignore=["moe"])
        self.embed = nn.Embedding(256, hid_dim)
        self.position = nn.Parameter(torch.zeros(seq_len, hid_dim))
        self.attention = nn.TransformerEncoderLayer(hid_dim, num_heads, 2 * hid_dim, dropout=0.0, batch_first=True, norm_first=True)
        if isinstance(moe, nn.Module):
            if moe_layers != 1:
                raise ValueError(f"moe_layers={moe_layers} needs a factory of layers, not one layer")
            layers = [moe]
        else:
            layers = [moe(uid_prefix=prefix) for prefix in layer_prefixes(uid_prefix, moe_layers)]
        try:
            check_micro_batches(micro_batches)
        except ValueError as e:
            raise ValueError(f"model.{e}") from None
        self.moes = MoEStack(layers, micro_batches=micro_batches)  # parameter names as a ModuleList's: moes.0.proj...
        self.norm = nn.LayerNorm(hid_dim)
        self.head = nn.Linear(hid_dim, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.attention(self.embed(tokens) + self.position[:length], src_mask=mask, is_causal=True)
        return self.head(self.norm(self.moes(h)))

    def _bpc(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)) / math.log(2)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        bpc = self._bpc(batch)
        aux = [moe.aux_loss for moe in self.moes if getattr(moe, "aux_loss", None) is not None]
        loss = bpc + self.hparams.aux_loss_weight * sum(aux) if aux else bpc
        self.log("train/bpc", bpc, prog_bar=True)
        return loss

    def on_after_backward(self) -> None:
        """The last step's expert calls, summed over the layers (backward ones are known only now)."""
        totals: dict[str, float] = {}
        for moe in self.moes:
            for key, value in getattr(moe, "stats", {}).items():
                totals[key] = totals.get(key, 0.0) + value
        if totals:
            self.log_dict({f"moe/{key}": value for key, value in totals.items()})

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/bpc", self._bpc(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
