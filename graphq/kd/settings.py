"""The ``kd:`` section of a config (the keys of Huawei dopt's ``kd:`` block, plus train_samples/cutoff_len/seed)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graphq.config_schema import check_config
from graphq.errors import GraphqError

LOSSES = ("mse",)
LR_SCHEDULERS = ("cosine", "linear", "constant")
TRAINABLE_KEYS = ("quant_alpha", "norm")


@dataclass
class KDSettings:
    """How each decoder layer is trained.

    quant_alpha: per group and output channel, the fraction of the group's max (and min) kept by the clip; it
    starts at the RTN grid (1) or AWQ's searched clip. norm: the RMSNorm/LayerNorm gains feeding the layer's
    linears. One optimizer step takes micro_batch_size x gradient_accumulation_steps samples; logging_step
    updates the progress bar's loss every that many steps; eval_step > 0 also measures the loss on every training
    sample every that many steps (reported per layer). train_samples / cutoff_len: samples and tokens per sample
    to train on (default: num_samples / seq_len).
    """

    enable: bool = True
    loss: str = "mse"
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    num_epochs: int = 2
    learning_rate: float = 1e-2
    lr_scheduler_type: str = "cosine"
    trainable_keys: list[str] = field(default_factory=lambda: ["quant_alpha", "norm"])
    logging_step: int = 10
    eval_step: int = 0
    train_samples: int | None = 128
    cutoff_len: int | None = 256
    seed: int | None = None
    norm_learning_rate: float | None = 1e-3  # None: learning_rate
    min_alpha: float = 0.3
    # The first position of every sample (BOS) carries the attention sink's massive activations; their squared
    # error would outweigh every other token's from the middle layers on, so the loss leaves them out.
    loss_skip_tokens: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "KDSettings":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GraphqError(f"unknown kd key(s) {', '.join(unknown)}: known kd keys are {', '.join(sorted(known))}")
        settings = cls(**data)
        try:
            check_config(settings)
        except GraphqError as exc:
            raise GraphqError(str(exc).replace("config key '", "config key 'kd.")) from None
        return settings.validate()

    def validate(self) -> "KDSettings":
        if self.loss not in LOSSES:
            raise GraphqError(f"unknown kd.loss '{self.loss}': choose one of {', '.join(LOSSES)}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise GraphqError(f"unknown kd.lr_scheduler_type '{self.lr_scheduler_type}': choose one of "
                              f"{', '.join(LR_SCHEDULERS)}")
        unknown = [key for key in self.trainable_keys if key not in TRAINABLE_KEYS]
        if unknown or not self.trainable_keys:
            raise GraphqError(f"kd.trainable_keys takes a list of {', '.join(TRAINABLE_KEYS)}, got {self.trainable_keys}")
        for name in ("micro_batch_size", "gradient_accumulation_steps", "logging_step"):
            if getattr(self, name) < 1:
                raise GraphqError(f"kd.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_epochs", "eval_step", "loss_skip_tokens"):
            if getattr(self, name) < 0:
                raise GraphqError(f"kd.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "norm_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise GraphqError(f"kd.{name} must be > 0, got {value}")
        if self.weight_decay < 0:
            raise GraphqError(f"kd.weight_decay must be >= 0, got {self.weight_decay}")
        if self.train_samples is not None and self.train_samples < 1:
            raise GraphqError(f"kd.train_samples must be >= 1, got {self.train_samples}")
        if self.cutoff_len is not None and self.cutoff_len < 2:
            raise GraphqError(f"kd.cutoff_len must be >= 2, got {self.cutoff_len}")
        if self.cutoff_len is not None and self.loss_skip_tokens >= self.cutoff_len:
            raise GraphqError(f"kd.loss_skip_tokens {self.loss_skip_tokens} leaves no token of kd.cutoff_len "
                              f"{self.cutoff_len} to train on")
        if not 0 < self.min_alpha <= 1:
            raise GraphqError(f"kd.min_alpha must be in (0, 1], got {self.min_alpha}")
        return self
