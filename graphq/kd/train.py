"""Train one decoder layer's fake-quant linears (and norms) against the float layer's outputs (torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from graphq.kd.settings import KDSettings
from graphq.memory import return_freed_memory
from graphq.runtimes.torch_model import run_layer


@dataclass
class LayerTraining:
    """What training one decoder layer did: the loss on all its samples before, during (eval_step) and after."""

    loss_start: float
    loss_end: float
    steps: int
    eval_losses: list[float] = field(default_factory=list)


def layer_loss(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict, batch: int,
               skip: int = 0) -> float:
    """Mean squared error of the block's outputs against ``targets`` over every sample and every position from
    ``skip`` on (no gradients)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            out = run_layer(block, inputs[start:start + batch], kwargs)[:, skip:]
            total += float(torch.sum(torch.square(out - targets[start:start + batch, skip:]), dtype=torch.float64))
            count += out.numel()
    return total / max(count, 1)


def layer_outputs(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The block's outputs on ``inputs``, ``batch`` samples at a time (samples are independent), written into
    ``out`` (which may be ``inputs`` itself: each batch is read before its outputs overwrite it)."""
    out = torch.empty_like(inputs) if out is None else out
    with torch.no_grad():
        for s in range(0, inputs.shape[0], batch):
            out[s:s + batch] = run_layer(block, inputs[s:s + batch], kwargs)
    return out


def train_layer(
    block: nn.Module,
    alphas: list[nn.Parameter],
    norms: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict,
    settings: KDSettings,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> LayerTraining:
    """AdamW on ``alphas`` (+ ``norms``) minimising MSE(block(inputs), targets); deterministic given ``seed``.
    The parameters end at the best state seen (``loss_end`` is its loss).

    ``on_step(step, total_steps, running_loss)`` is called every ``settings.logging_step`` optimizer steps."""
    from transformers import get_scheduler

    batch, skip = settings.micro_batch_size, settings.loss_skip_tokens
    loss_start = layer_loss(block, inputs, targets, kwargs, batch, skip)
    micro_steps = math.ceil(inputs.shape[0] / batch)
    steps_per_epoch = math.ceil(micro_steps / settings.gradient_accumulation_steps)
    total_steps = steps_per_epoch * settings.num_epochs
    if total_steps == 0 or not (alphas or norms):
        return LayerTraining(loss_start, loss_start, 0)
    groups = []
    if alphas:
        groups.append({"params": alphas, "weight_decay": settings.weight_decay})
    if norms:
        groups.append({"params": norms, "weight_decay": 0.0,
                       "lr": settings.norm_learning_rate or settings.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    scheduler = get_scheduler(settings.lr_scheduler_type, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=total_steps)
    generator = torch.Generator().manual_seed(seed)
    step, running, eval_losses = 0, [], []
    trained = [*alphas, *norms]
    # The state with the lowest loss over all samples is kept (start or end of an epoch): training never leaves a
    # layer worse than where it started.
    best_loss, best_state = loss_start, [p.detach().clone() for p in trained]
    for _ in range(settings.num_epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        chunks = list(order.split(batch))
        for index, chunk in enumerate(chunks):
            out = run_layer(block, inputs[chunk], kwargs)
            loss = nn.functional.mse_loss(out[:, skip:], targets[chunk][:, skip:])
            (loss / settings.gradient_accumulation_steps).backward()
            running.append(float(loss.detach()))
            if (index + 1) % settings.gradient_accumulation_steps and index + 1 != len(chunks):
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return_freed_memory()  # the step's autograd buffers, or the heap grows with every step's new layout
            step += 1
            if on_step is not None and (step % settings.logging_step == 0 or step == total_steps):
                on_step(step, total_steps, sum(running) / len(running))
                running = []
            if settings.eval_step and step % settings.eval_step == 0:
                eval_losses.append(layer_loss(block, inputs, targets, kwargs, batch, skip))
        epoch_loss = layer_loss(block, inputs, targets, kwargs, batch, skip)
        if epoch_loss < best_loss:
            best_loss, best_state = epoch_loss, [p.detach().clone() for p in trained]
    with torch.no_grad():
        for parameter, value in zip(trained, best_state):
            parameter.copy_(value)
    return LayerTraining(loss_start, best_loss, step, eval_losses)
