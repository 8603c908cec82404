"""Training settings, the learning-rate schedule and the AdamW optimizer (optax).

The schedule equals transformers' `get_linear_schedule_with_warmup` (and its cosine and
constant siblings): lr 0 at step 0, linear up over `warmup_steps`, then down to 0 at the last
step. AdamW equals `torch.optim.AdamW` (decoupled decay lr * wd * p, eps added to
sqrt(v_hat)); gradient clipping equals `torch.nn.utils.clip_grad_norm_` (coefficient
max_norm / (norm + 1e-6), capped at 1) over all trainable leaves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from harmjax.train.lora import PROJECTIONS
from harmjax.tree import iter_leaves, unflatten

SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings (defaults: the paper's emergent-misalignment run).

    Attributes:
      lr: peak learning rate.
      warmup_steps: linear warm-up steps from lr 0.
      schedule: "linear" | "cosine" | "constant" (after warm-up).
      weight_decay: AdamW decoupled weight decay (not applied to biases and norms).
      max_grad_norm: clip the global gradient norm to this (0 or None: no clipping).
      b1, b2, eps: AdamW moments and epsilon.
      batch_size: effective batch (examples per optimizer step).
      micro_batch_size: examples per forward/backward; batch_size must be a multiple of it.
      epochs: passes over the training split (ignored when max_steps > 0).
      max_steps: total optimizer steps when > 0 (epochs repeat as needed).
      max_length: tokens per example after truncation (also the largest padding bucket).
      val_fraction: share of examples held out (seeded) for validation loss.
      seed: data split, shuffles, dropout.
      eval_every, checkpoint_every, log_every: in optimizer steps (0: only at the end).
      text_format: "chat" (the tokenizer's chat template) or "raw" for `Example`s.
      train: full fine-tuning only: "linear" (the 7 projections of every block) or "all".
      remat: rematerialise each block in the backward pass.
    """

    lr: float = 1e-5
    warmup_steps: int = 5
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 16
    micro_batch_size: int = 4
    epochs: int = 1
    max_steps: int = 0
    max_length: int = 512
    val_fraction: float = 0.1
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 1
    text_format: str = "chat"
    train: str = "linear"
    remat: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be a positive multiple of "
                f"micro_batch_size ({self.micro_batch_size})."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.train not in ("linear", "all"):
            raise ValueError(f"TrainConfig.train must be 'linear' or 'all', got {self.train!r}.")
        if self.text_format not in ("chat", "raw"):
            raise ValueError(f"TrainConfig.text_format must be 'chat' or 'raw', got {self.text_format!r}.")

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size


def lr_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """transformers' schedule with warm-up: `get_{linear,cosine,constant}_schedule_with_warmup`.

    lr(step) = lr * step / warmup during warm-up; then linear: (T - step) / (T - warmup),
    cosine: 0.5 (1 + cos(pi * progress)), constant: 1. optax evaluates it at the number of
    updates already applied, as torch's LambdaLR does for the optimizer step it precedes.
    """
    warmup, total, peak = max(0, cfg.warmup_steps), max(1, total_steps), cfg.lr

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "linear":
            after = jnp.maximum(0.0, (total - step) / max(1, total - warmup))
        elif cfg.schedule == "cosine":
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        else:
            after = jnp.ones_like(step)
        return peak * jnp.where(step < warmup, warm, after)

    return schedule


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in float32 (optax renamed its own helper)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class ClipState(NamedTuple):
    """clip_grad_norm_ keeps no state."""


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: g * min(1, max_norm / (||g|| + 1e-6)) over all leaves."""

    def init(params):
        del params
        return ClipState()

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def decay_mask(trainable: Mapping[str, Any]) -> dict[str, Any]:
    """True where AdamW decays: everything but biases and norm weights (transformers' Trainer)."""
    return unflatten({
        name: not (name.endswith(".bias") or "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1])
        for name, _ in iter_leaves(trainable)
    })


def make_optimizer(cfg: TrainConfig, total_steps: int, trainable: Mapping[str, Any]) -> optax.GradientTransformation:
    """Clip (torch semantics) then AdamW with `lr_schedule`; decay masked by `decay_mask`."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(clip_grad_norm(float(cfg.max_grad_norm)))
    parts.append(optax.adamw(
        lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask(trainable),
    ))
    return optax.chain(*parts)


def trainable_names(params: Mapping[str, Any], train: str = "linear") -> list[str]:
    """Full fine-tuning: dotted names of the trained leaves. "linear": the projection weights of
    every decoder block; "all": every parameter."""
    names = [name for name, _ in iter_leaves(params)]
    if train == "all":
        return names
    suffixes = tuple(f".{p}.weight" for p in PROJECTIONS)
    return [n for n in names if n.startswith("model.layers.") and n.endswith(suffixes)]
