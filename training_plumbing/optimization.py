"""The optimizer, the training length and the lr schedule, with diffusers' flags and defaults."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.logging import get_logger

from difftuning_common import ConfigError

logger = get_logger(__name__)


def create_optimizer(args: argparse.Namespace, params: Sequence[torch.nn.Parameter] | Sequence[dict]
                     ) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW, or with DreamBooth's --optimizer prodigy, Prodigy) over the trainable
    parameters: a list of them, or parameter groups whose own lr / weight_decay override the flags'."""
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
              "weight_decay": args.adam_weight_decay, "eps": args.adam_epsilon}
    if getattr(args, "optimizer", "adamw") == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as err:
            raise ConfigError("--optimizer prodigy needs prodigyopt: `pip install prodigyopt`.") from err
        if args.use_8bit_adam:
            logger.warning("--use_8bit_adam is ignored with --optimizer prodigy (as upstream).")
        return Prodigy(list(params), beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                       use_bias_correction=args.prodigy_use_bias_correction,
                       safeguard_warmup=args.prodigy_safeguard_warmup, **kwargs)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(list(params), **kwargs)
    # Fused AdamW (CPU and CUDA): one kernel for all tensors instead of a loop of small ones.
    return torch.optim.AdamW(list(params), fused=True, **kwargs)


def resolve_training_length(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_train_epochs) from the per-process dataloader length.

    Computed after ``accelerator.prepare`` so the length is per process; upstream computes it
    before sharding and gets the schedule wrong on several GPUs.
    """
    update_steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * update_steps_per_epoch
    return max_train_steps, math.ceil(max_train_steps / update_steps_per_epoch)


def create_lr_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_processes: int,
                        max_train_steps: int) -> Any:
    """diffusers' ``get_scheduler``; step counts are multiplied by the number of processes
    because the prepared scheduler steps once per process at every optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)
