#!/usr/bin/env python
"""Overhead of Diff-Tuning vs standard fine-tuning: step time, throughput, peak memory and MFU.

    python -m benchmark.overhead --size tiny                       # CPU, seconds (runs in the tests)
    python -m benchmark.overhead --size dit-xl --device cuda --mixed_precision bf16
    python -m benchmark.overhead --size sd15-controlnet --device cuda --mixed_precision bf16

Both arms run the training scripts' own step (``DiTStep.loss`` of train_dit_difftuning.py,
``ControlNetStep.loss`` of train_controlnet_difftuning.py: VAE encode of the target images or a
posterior sample of cached latents, knowledge-bank replay, the losses), then backward, clipping
and the scripts' fused AdamW, on models built from configs with random weights (no download), at
the same global batch. They share one model and optimizer and are timed interleaved (ABBA order,
median of the repeats), so machine noise hits both alike. Reported: DT/standard ratios of step time
and memory. The one-off cost of building the knowledge bank is not part of a step and is not
measured here; the data loader is not timed either.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import difftuning_utils as dt
import training_plumbing as tp
from benchmark.tiny_models import SD_VAE_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
SIZES = ("tiny", "tiny-controlnet", "dit-xl", "sd15-controlnet")
DEFAULT_BATCH = {"tiny": 8, "tiny-controlnet": 8, "dit-xl": 32, "sd15-controlnet": 4}


@dataclass
class Setup:
    """Everything one training step touches; shared by both arms."""

    kind: str  # "dit" or "controlnet"
    model: torch.nn.Module  # the trained module
    vae: torch.nn.Module
    scheduler: object
    resolution: int
    latent_shape: tuple[int, int, int]
    device: torch.device
    weight_dtype: torch.dtype
    unet: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    vb: dt.LearnedSigmaVB | None = None
    params: list = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


def build_setup(size: str, device: torch.device, weight_dtype: torch.dtype, pipeline: str | None = None) -> Setup:
    """Models from configs (random init), or a local DiTPipeline folder; frozen parts in ``weight_dtype``."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit_scheduler = DDPMScheduler(beta_schedule="linear", variance_type="learned_range")
    if pipeline or size == "tiny":
        if pipeline is None:
            from benchmark.tiny_models import make_tiny_dit_pipeline

            pipeline = make_tiny_dit_pipeline(tempfile.mkdtemp(prefix="tiny-dit-"))
        pipe = DiTPipeline.from_pretrained(pipeline)
        model, vae, scheduler = pipe.transformer, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config)
    elif size == "dit-xl":  # DiT-XL/2-256 with an sd-vae-ft-ema-like VAE
        with torch.device(device):
            model = DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2,
                                          sample_size=32, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
            vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=256)
        scheduler = dit_scheduler
    else:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        sd = size == "sd15-controlnet"
        blocks = (320, 640, 1280, 1280) if sd else (32, 64)
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=64 if sd else 8, block_out_channels=blocks, layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1),
                cross_attention_dim=768 if sd else 32, attention_head_dim=8)
            vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=512) if sd else AutoencoderKL(
                block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, sample_size=32)
            # The embedding of the condition image must downsample as much as the VAE (SD: 8x, tiny: 4x).
            embedding = {} if sd else {"conditioning_embedding_out_channels": (8, 16, 32)}
            model = ControlNetModel.from_unet(unet, **embedding)
            # CLIP ViT-L/14's text tower (SD 1.5's), or a tiny one
            text_encoder = CLIPTextModel(CLIPTextConfig(**(
                {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "projection_dim": 768} if sd else
                {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 1,
                 "pad_token_id": 1})))
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        for frozen in (unet, text_encoder):
            frozen.requires_grad_(False)
            tp.cast(frozen, device, weight_dtype)
        setup = Setup("controlnet", model, vae, scheduler, 512 if sd else 32, (4, 64, 64) if sd else (4, 8, 8), device,
                      weight_dtype, unet=unet, text_encoder=text_encoder)
    if size in ("tiny", "dit-xl") or pipeline:
        tp.disable_per_block_label_dropout(model)
        cfg = model.config
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        learned_sigma = cfg.out_channels == 2 * cfg.in_channels
        setup = Setup("dit", model, vae, scheduler, cfg.sample_size * scale,
                      (cfg.in_channels, cfg.sample_size, cfg.sample_size), device, weight_dtype,
                      vb=dt.LearnedSigmaVB(scheduler) if learned_sigma else None)
    # As the scripts do: a float16 VAE gives NaNs, so it stays float32 then; bfloat16 is safe.
    setup.vae = tp.cast(vae.requires_grad_(False), device, torch.float32 if weight_dtype == torch.float16
                        else weight_dtype)
    setup.model = model.to(device).train()
    setup.params = [p for p in model.parameters() if p.requires_grad]
    optimizer_args = argparse.Namespace(use_8bit_adam=False, learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.999,
                                        adam_weight_decay=0.0, adam_epsilon=1e-8)
    setup.optimizer = tp.create_optimizer(optimizer_args, setup.params)  # the scripts' (fused) AdamW
    return setup


def synthetic_bank(size: int, latent_shape: tuple[int, int, int], device: torch.device) -> dt.KnowledgeBank:
    """A knowledge bank of random latents and re-encoded posteriors (format 2), as replay reads it."""
    latents = torch.randn(size, *latent_shape)
    return dt.KnowledgeBank(latents, list(range(size)), {}, torch.randn(size, 2, *latent_shape),
                            torch.rand(size, 2, *latent_shape) * 0.1)


def make_arm(setup: Setup, batch_size: int, difftuning: bool, retention_ratio: float = 0.2,
             retention: str = "replay", bank_size: int = 64, cache_latents: bool = False) -> Callable[[], torch.Tensor]:
    """One training step of an arm as a closure over a fixed batch (the data loader is not timed): the
    script's step object, backward, clipping at 1.0, the optimizer step.

    ``retention`` (ControlNet only, as train_controlnet_difftuning.py's --retention): "replay" =
    bank latents with a zero control; "distill" = the retention rows are training pairs too (VAE
    encoded) and their target is the frozen UNet's prediction without control (one more forward).
    ``cache_latents``: the batch carries cached posteriors instead of pixels (--cache_latents).
    """
    num_target, num_bank = dt.split_batch_size(batch_size, retention_ratio if difftuning else 0.0)
    distill = bool(num_bank) and setup.kind == "controlnet" and retention == "distill"
    num_data = num_target + (num_bank if distill else 0)
    device, num_timesteps = setup.device, setup.scheduler.config.num_train_timesteps
    psi = dt.TimestepSampler(num_timesteps, 1.0 if difftuning else 0.0, "adaptation")
    xi = dt.TimestepSampler(num_timesteps, 1.0, "retention")
    bank = None
    if num_bank and not distill:
        bank = dt.BankReplay(synthetic_bank(bank_size, setup.latent_shape, device), "images", setup.kind == "dit",
                             num_bank, 0, 0, device)
    if cache_latents:
        batch = {"latent_mean": torch.randn(num_data, *setup.latent_shape, device=device),
                 "latent_std": torch.rand(num_data, *setup.latent_shape, device=device) * 0.1}
    else:
        channels = setup.vae.config.in_channels
        batch = {"pixel_values": torch.rand(num_data, channels, setup.resolution, setup.resolution,
                                            device=device) * 2 - 1}
    vae = None if cache_latents else setup.vae
    if setup.kind == "dit":
        from train_dit_difftuning import DiTStep

        batch["class_labels"] = torch.randint(0, 10, (num_target,), device=device)
        step = DiTStep(transformer=setup.model, vae=vae, noise_scheduler=setup.scheduler, vb=setup.vb, psi=psi, xi=xi,
                       null_class=setup.model.config.num_embeds_ada_norm, label_dropout_prob=0.1,
                       retention_weight=0.1, use_weights=False, bank=bank)
    else:
        from train_controlnet_difftuning import ControlNetStep

        vocab, length = setup.text_encoder.config.vocab_size, setup.text_encoder.config.max_position_embeddings
        batch["input_ids"] = torch.randint(0, vocab, (num_data, length), device=device)
        batch["conditioning_pixel_values"] = torch.rand(num_data, 3, setup.resolution, setup.resolution, device=device)
        bank_ids = torch.randint(0, vocab, (bank_size, length), device=device) if bank is not None else None
        step = ControlNetStep(controlnet=setup.model, unet=setup.unet, text_encoder=setup.text_encoder, vae=vae,
                              noise_scheduler=setup.scheduler, psi=psi, xi=xi,
                              empty_ids=torch.zeros(1, length, dtype=torch.long, device=device),
                              proportion_empty_prompts=0.0, retention_weight=0.1, use_weights=False,
                              weight_dtype=setup.weight_dtype, num_retention=num_bank, distill=distill, bank=bank,
                              bank_input_ids=bank_ids)
    step_rng = tp.StepGenerator(0, 0, device)
    autocast = torch.autocast(device.type, dtype=setup.weight_dtype, enabled=setup.weight_dtype != torch.float32)

    def run() -> torch.Tensor:
        with autocast:  # what accelerate's mixed precision wraps the trained model's forward in
            loss, _ = step.loss(batch, step_rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return run


class MemoryProbe:
    """Peak memory of one call. CUDA: ``max_memory_allocated`` (absolute) and its rise during the call.
    CPU: the peak RSS rise (VmHWM reset through /proc/self/clear_refs), with glibc told to return
    large freed blocks to the OS, otherwise freed-but-cached memory hides the next step's use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._trim = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.mallopt(M_MMAP_THRESHOLD, 4096)  # tensors >= 4 KiB are mmapped, so unmapped when freed
                self._trim, self._mallopt = libc.malloc_trim, libc.mallopt
            except (OSError, AttributeError):  # not glibc: no per-step CPU memory
                pass

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def close(self) -> None:
        """Back to a fixed 128 KiB threshold (glibc's starting value) so later code is not slowed."""
        if self._trim is not None:
            self._mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    def measure(self, fn: Callable[[], object]) -> tuple[float, float] | None:
        """(peak MB, rise over the pre-call level MB), or None where it cannot be measured."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            if self._trim is None:
                return None
            try:
                self._trim(0)
                Path("/proc/self/clear_refs").write_text("5")
                before = self._status("VmRSS")
                fn()
                peak = self._status("VmHWM")
            except OSError:
                return None
        return peak / 2**20, (peak - before) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_overhead(size: str = "tiny", batch_size: int | None = None, device: str = "cpu", mixed_precision: str = "no",
                 repeats: int = 10, warmup: int = 2, peak_tflops: float | None = None, retention_ratio: float = 0.2,
                 pipeline: str | None = None, retention: str = "replay", cache_latents: bool = False) -> dict:
    """Time, profile and compare the two arms; returns the JSON-able results (see the module docstring)."""
    device = torch.device(device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    batch_size = batch_size or DEFAULT_BATCH[size]
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = 989.0
    setup = build_setup(size, device, weight_dtype, pipeline)
    arms = {"standard": make_arm(setup, batch_size, False, cache_latents=cache_latents),
            "difftuning": make_arm(setup, batch_size, True, retention_ratio, retention, cache_latents=cache_latents)}
    results: dict = {name: {} for name in arms}
    for name, fn in arms.items():
        for _ in range(warmup):
            fn()
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        results[name]["flops_per_step"] = counter.get_total_flops()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):  # ABBA: drift hits both arms alike
            _sync(device)
            start = time.perf_counter()
            arms[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    probe = MemoryProbe(device)  # after timing: the CPU probe changes the allocator's behaviour
    memory: dict[str, list] = {name: [] for name in arms}
    for r in range(min(3, repeats)):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            memory[name].append(probe.measure(arms[name]))
    probe.close()
    for name in arms:
        res, step_time = results[name], statistics.median(times[name])
        res.update(step_time_s=step_time, step_time_iqr_s=_iqr(times[name]), images_per_s=batch_size / step_time,
                   achieved_tflops=res["flops_per_step"] / step_time / 1e12)
        if peak_tflops:
            res["mfu"] = res["achieved_tflops"] / peak_tflops
        ok = [m for m in memory[name] if m is not None]
        res["peak_memory_mb"] = statistics.median(m[0] for m in ok) if ok else None
        res["step_memory_mb"] = statistics.median(m[1] for m in ok) if ok else None
    std, dtr = results["standard"], results["difftuning"]
    ratios = {"step_time": dtr["step_time_s"] / std["step_time_s"], "images_per_s": dtr["images_per_s"]
              / std["images_per_s"], "flops": dtr["flops_per_step"] / std["flops_per_step"]}
    for key in ("peak_memory_mb", "step_memory_mb"):
        ratios[key.replace("_mb", "")] = dtr[key] / std[key] if std[key] and dtr[key] is not None else None
    num_target, num_bank = dt.split_batch_size(batch_size, retention_ratio)
    return {"config": {"size": pipeline or size, "batch_size": batch_size, "difftuning_split": [num_target, num_bank],
                       "retention": retention if setup.kind == "controlnet" else "replay",
                       "cache_latents": cache_latents,
                       "device": _device_name(device), "mixed_precision": mixed_precision, "repeats": repeats,
                       "peak_tflops": peak_tflops, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "trained_params": sum(p.numel() for p in setup.params),
                       "memory": "max_memory_allocated" if device.type == "cuda" else "RSS (VmHWM)"},
            **results, "ratios": ratios}


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[2] - q[0]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def markdown_table(res: dict) -> str:
    """The results as a markdown table, one row per arm plus the DT/standard ratio."""
    def fmt(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    c = res["config"]
    lines = [f"Overhead, {c['size']}, global batch {c['batch_size']} (DT: {c['difftuning_split'][0]} target + "
             f"{c['difftuning_split'][1]} retention, {c['retention']}), {c['device']}, mixed precision "
             f"{c['mixed_precision']}, median of {c['repeats']} interleaved steps; memory: {c['memory']}.", "",
             "| arm | step time (ms) | images/s | GFLOP/step | MFU | peak memory (MB) | step memory (MB) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("standard", "difftuning"):
        r = res[name]
        lines.append(f"| {name} | {r['step_time_s'] * 1e3:.1f} ± {r['step_time_iqr_s'] * 1e3 / 2:.1f} | "
                     f"{r['images_per_s']:.3g} | {r['flops_per_step'] / 1e9:.2f} | {fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r['peak_memory_mb'], '.0f')} | {fmt(r['step_memory_mb'], '.1f')} |")
    q = res["ratios"]
    lines.append(f"| **DT / standard** | {q['step_time']:.3f} | {q['images_per_s']:.3f} | {q['flops']:.3f} | | "
                 f"{fmt(q['peak_memory'], '.3f')} | {fmt(q['step_memory'], '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--pipeline", default=None, help="Time a local DiTPipeline folder instead (e.g. the source model).")
    p.add_argument("--batch_size", type=int, default=None, help="Global batch; default per size " + str(DEFAULT_BATCH))
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--repeats", type=int, default=10, help="Timed steps per arm, interleaved.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps per arm first.")
    p.add_argument("--retention_ratio", type=float, default=0.2, help="Bank fraction of the batch (authors': 0.2).")
    p.add_argument("--retention", choices=["replay", "distill"], default="replay",
                   help="ControlNet sizes: the Diff-Tuning retention variant (train_controlnet_difftuning.py).")
    p.add_argument("--cache_latents", action="store_true",
                   help="Batches carry cached VAE posteriors (the scripts' --cache_latents): no VAE pass in the step.")
    p.add_argument("--peak_tflops", type=float, default=None, help="Peak FLOP/s for MFU; default 989 on CUDA "
                   "(H100 bf16 dense), none on CPU.")
    p.add_argument("--num_threads", type=int, default=1, help="CPU threads.")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if args.pipeline and not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        p.error(f"--pipeline {args.pipeline} is not a pipeline folder (no model_index.json).")
    if args.repeats < 1 or args.warmup < 0 or (args.batch_size is not None and args.batch_size < 2):
        p.error("--repeats must be >= 1, --warmup >= 0 and --batch_size >= 2 (one target and one bank row).")
    if not 0 < args.retention_ratio < 1:
        p.error(f"--retention_ratio must be in (0, 1), got {args.retention_ratio}.")
    torch.set_num_threads(args.num_threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but no CUDA device is available.")
    res = run_overhead(args.size, args.batch_size, args.device, args.mixed_precision, args.repeats, args.warmup,
                       args.peak_tflops, args.retention_ratio, args.pipeline, args.retention, args.cache_latents)
    print(markdown_table(res))
    if args.output_json:
        dt.atomic_write_json(args.output_json, res)
    return res


if __name__ == "__main__":
    main()
