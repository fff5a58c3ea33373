"""Losses and throughput, read every --logging_steps: the non-finite-loss stop, images per second and
model FLOPs utilisation (one FLOP counter for every script)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from difftuning_common import ConfigError, atomic_write_json, disk_space_guard

from .checkpoints import CHECKPOINT_PATTERN, list_checkpoints

logger = get_logger(__name__)


def log_throughput(accelerator: Accelerator, log: TrainingLog, global_step: int, args: argparse.Namespace) -> dict:
    """Log the steady-state throughput of the run (see :class:`TrainingLog`) to the console and the
    trackers, and write it to ``<output_dir>/<logging_dir>/throughput.json`` for tools to read."""
    summary = log.summary()
    if accelerator.is_main_process:
        folder = os.path.join(args.output_dir, args.logging_dir)
        os.makedirs(folder, exist_ok=True)
        with disk_space_guard(folder, "throughput.json"):
            atomic_write_json(os.path.join(folder, "throughput.json"), {
                **summary, "images_per_step": log.images_per_step, "flops_per_image": log.flops_per_image,
                "peak_flops": log.peak, "mixed_precision": accelerator.mixed_precision,
                "num_processes": accelerator.num_processes, "global_step": global_step,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
    if summary:
        accelerator.log(summary, step=global_step)
        tflops = f", {summary['steady_model_tflops']:.3g} model TFLOP/s" if "steady_model_tflops" in summary else ""
        mfu = f" ({100 * summary['steady_mfu']:.1f}% of the GPU's peak)" if "steady_mfu" in summary else ""
        logger.info(f"Steady-state throughput: {summary['steady_images_per_sec']:.1f} images/s{tflops}{mfu} over "
                    f"{summary['steady_steps']} steps (warm-up, validation and checkpoints left out).")
    else:
        logger.info("Too few steps for a steady-state throughput (it skips the first --logging_steps window).")
    return summary


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name, for model FLOPs utilisation.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10G": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(mixed_precision: str) -> float | None:
    """The device's dense half-precision peak, when it is known and training is in bf16/fp16."""
    if not torch.cuda.is_available() or mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A weightless copy of a diffusers model on the meta device: the same architecture (built from its config,
    unquantized), frozen. Model FLOPs are counted on it (:func:`count_flops`: shapes only), so counting takes no
    memory and no computation; a real forward and backward pass before gradient checkpointing is on could be the
    run's peak of memory. Call it inside ``torch.device("meta")`` to add adapters to it."""
    with torch.device("meta"):
        copy = type(model).from_config(model.config)
    return copy.requires_grad_(False)


def count_flops(fn: Any) -> int:
    """FLOPs that ``fn()`` executes (matmuls, convolutions, attention; forward and backward), counted by
    torch's FlopCounterMode (from shapes: ``fn`` may run on meta tensors): what a model FLOPs utilisation is
    computed from."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class NonFiniteLoss(ConfigError):
    """Training diverged: reported as one sentence (exit status 2), like bad input, since a setting caused it."""


class TrainingLog:
    """The losses of each step, added up on the device and read every ``logging_steps`` (one host sync
    there, none in between), and the steady-state throughput.

    A logging window's throughput is its optimizer steps x ``images_per_step`` over its wall time,
    minus the time spent in :meth:`paused` blocks (validation, checkpoints). The first window holds
    the warm-up (first step, allocator, autotuning) and is left out of the steady state. With
    ``flops_per_image`` (the denoiser's forward + backward FLOPs per training image) the log also
    gives model TFLOP/s, and the FLOPs utilisation when ``peak`` is known.
    """

    def __init__(self, accelerator: Accelerator, logging_steps: int, images_per_step: int,
                 flops_per_image: float | None = None, peak: float | None = None,
                 checkpointing_steps: int | None = None, params: Sequence[torch.nn.Parameter] = (),
                 output_dir: str | None = None) -> None:
        self.accelerator, self.logging_steps, self.images_per_step = accelerator, logging_steps, images_per_step
        self.checkpointing_steps = checkpointing_steps  # also read before every checkpoint: never save a NaN model
        self.params = list(params)  # the trained weights, checked finite before each checkpoint and the final save
        self.output_dir = output_dir  # where the checkpoints are, for the advice after a divergence
        self.last_finite_read: int | None = None  # the last step whose losses were read finite
        self.flops_per_image, self.peak = flops_per_image, peak
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.window_steps, self.window_start, self.paused_seconds = 0, time.perf_counter(), 0.0
        self.windows = 0
        self.steady_steps, self.steady_seconds = 0, 0.0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """One micro-batch's detached losses (device tensors): summed, not read."""
        for key, value in logs.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.detach().clone()
        self.count += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in this block (validation, a checkpoint) is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def step(self, global_step: int, lr: float, force: bool = False) -> dict[str, float] | None:
        """Count an optimizer step; every ``logging_steps`` (or when ``force``) read and log the window."""
        self.window_steps += 1
        before_checkpoint = self.checkpointing_steps and global_step % self.checkpointing_steps == 0
        if not (force or before_checkpoint or global_step % self.logging_steps == 0) or not self.count:
            return None
        names = list(self.sums)
        values = (torch.stack([self.sums[k].float() for k in names]) / self.count).tolist()  # the one sync
        bad = [name for name, value in zip(names, values, strict=True) if not math.isfinite(value)]
        if bad:  # stop before a non-finite model is checkpointed, saved or pushed
            raise NonFiniteLoss(f"The loss became non-finite by step {global_step} ({', '.join(bad)} = "
                                f"{values[names.index(bad[0])]}); {self.where_to_resume()}")
        self.last_finite_read = global_step
        if (force or before_checkpoint) and not self.weights_finite():
            raise NonFiniteLoss(f"The trained weights became non-finite at step {global_step} (its loss was still "
                                f"finite); {self.where_to_resume()}")
        seconds = max(time.perf_counter() - self.window_start - self.paused_seconds, 1e-9)
        logs = dict(zip(names, values, strict=True)) | {"lr": lr}
        logs["images_per_sec"] = self.window_steps * self.images_per_step / seconds
        if self.windows > 0:  # the first window holds the warm-up
            self.steady_steps += self.window_steps
            self.steady_seconds += seconds
        if self.flops_per_image:
            logs["model_tflops"] = logs["images_per_sec"] * self.flops_per_image / 1e12
            if self.peak:
                logs["mfu"] = logs["model_tflops"] * 1e12 / self.peak
        self.accelerator.log(logs, step=global_step)
        self.sums, self.count, self.windows = {}, 0, self.windows + 1
        self.window_steps, self.window_start, self.paused_seconds = 0, time.perf_counter(), 0.0
        return logs

    def where_to_resume(self) -> str:
        """The end of the divergence sentence: which checkpoint to resume from. Every checkpoint holds finite weights
        (checked before it is saved), but the loss of a step is computed before its update: checkpoint-N's weights
        first meet the data at step N + 1, so they may already have diverged (Adam moves every weight by about the
        learning rate at once) unless a later loss read was finite. The newest checkpoint before the last finite
        read is the one known to train."""
        lower = "a lower --learning_rate (or set --max_grad_norm)"
        found = list_checkpoints(self.output_dir) if self.output_dir else []
        steps = [int(CHECKPOINT_PATTERN.match(os.path.basename(c))[1]) for c in found]
        good = [c for c, step in zip(found, steps, strict=True)
                if self.last_finite_read is not None and step < self.last_finite_read]
        if not good:
            newest = f" ({os.path.basename(found[-1])} was saved after the last finite loss, so its weights may " \
                     "already have diverged)" if found else ""
            return f"no checkpoint's weights were seen to give a finite loss{newest}; start again with {lower}."
        later = found[found.index(good[-1]) + 1:]
        caveat = (f" ({', '.join(os.path.basename(c) for c in later)} was saved after the last finite loss, so its "
                  "weights may already have diverged)") if later else ""
        return (f"resume from {os.path.basename(good[-1])}, the newest checkpoint whose weights gave a finite loss"
                f"{caveat}, with {lower}: --resume_from_checkpoint {good[-1]}.")

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite on every process (one sync; each process checks its own shards)."""
        if not self.params:
            return True
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        bad = torch.stack([(~p.detach().isfinite()).any() for p in local]).sum().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        return int(bad.item()) == 0

    def summary(self) -> dict[str, float]:
        """Steady-state images/s (and model TFLOP/s, MFU) over every window after the first."""
        if not self.steady_steps:
            return {}
        result = {"steady_images_per_sec": self.steady_steps * self.images_per_step / self.steady_seconds,
                  "steady_steps": self.steady_steps}
        if self.flops_per_image:
            result["steady_model_tflops"] = result["steady_images_per_sec"] * self.flops_per_image / 1e12
            if self.peak:
                result["steady_mfu"] = result["steady_model_tflops"] * 1e12 / self.peak
        return result
