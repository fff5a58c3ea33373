"""Latents: VAE encoding (per step, cached posteriors, image files), decoding, the knowledge bank's set-up,
and the DiT sampler the bank and the benchmark share."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from difftuning_common import ConfigError

from .data import StepGenerator, convert_image, resize_crop_flip, to_model_tensor
from .distributed import is_main_process


def latent_shift(vae: torch.nn.Module) -> float:
    """The VAE's latent shift (SD3 and Flux: model latents = (z - shift_factor) * scaling_factor; 0 for SD/DiT)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def encode_latents(vae: torch.nn.Module, pixel_values: torch.Tensor, step_rng: StepGenerator) -> torch.Tensor:
    """VAE posterior sample x scaling factor, float32; the sample's noise comes from ``step_rng``
    (not the global RNG) so resumed runs are exact."""
    posterior = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    noise = step_rng.randn(posterior.mean.shape, posterior.mean.device, posterior.mean.dtype)
    return ((posterior.mean + posterior.std * noise).float() - latent_shift(vae)) * vae.config.scaling_factor


def batch_latents(vae: torch.nn.Module | None, batch: dict, step_rng: StepGenerator) -> torch.Tensor:
    """The target latents of a batch: a posterior sample of its cached posteriors (--cache_latents:
    ``latent_mean``/``latent_std``, scaled) or of the VAE's encoding of its ``pixel_values``."""
    if "latent_mean" in batch:
        mean = batch["latent_mean"]
        return mean + batch["latent_std"] * step_rng.randn(mean.shape, mean.device)
    return encode_latents(vae, batch["pixel_values"], step_rng)


@torch.no_grad()
def cache_posteriors(vae: torch.nn.Module, images: torch.utils.data.Dataset, flips: bool, batch_size: int,
                     num_workers: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """--cache_latents: the scaled VAE posterior (mean, std) of every image, each [N, V, C, h, w] float32
    on the CPU, V = 2 (the image and its mirror) with ``flips``, else 1. ``images[i]`` is the
    deterministically pre-processed image i ([C, H, W] in [-1, 1], no flip)."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    means, stds = [], []
    for pixels in tqdm(loader, desc="Caching latents", disable=not is_main_process()):
        mean, std = scaled_posterior(vae, pixels.to(device), flips)
        means.append(mean)
        stds.append(std)
    return torch.cat(means), torch.cat(stds)


def scaled_posterior(vae: torch.nn.Module, pixels: torch.Tensor, flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled VAE posterior (mean, std) of ``pixels`` [B, C, H, W], each [B, V, C, h, w] float32 on the CPU,
    V = 2 (the image and its mirror) with ``flips``, else 1."""
    pixels = pixels.to(vae.dtype)
    views = torch.stack([pixels, pixels.flip(-1)], 1).flatten(0, 1) if flips else pixels
    posterior = vae.encode(views).latent_dist
    num_views = 2 if flips else 1
    mean = ((posterior.mean.float() - latent_shift(vae)) * vae.config.scaling_factor).unflatten(0, (-1, num_views))
    return mean.cpu(), (posterior.std.float() * vae.config.scaling_factor).unflatten(0, (-1, num_views)).cpu()


@torch.no_grad()
def encode_image_files(vae: torch.nn.Module, paths: list[str], resolution: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Class images as upstream's DreamBooth reads them (EXIF rotation applied, RGB), the short side resized to
    ``resolution`` and centre-cropped (as --cache_latents does), encoded with their mirror images: the scaled
    posterior (mean, std), each [B, 2, C, h, w], and each image's (height, width). What dt.class_image_bank
    caches."""
    pixels, sizes = [], []
    for path in paths:
        try:
            with Image.open(path) as file:
                file.load()
                image = convert_image(ImageOps.exif_transpose(file), "RGB")
        except (OSError, ValueError) as err:  # (PIL's UnidentifiedImageError is an OSError)
            raise ConfigError(f"--class_data_dir: {path} is not a readable image ({err}).") from err
        sizes.append((image.height, image.width))
        pixels.append(to_model_tensor(resize_crop_flip(image, resolution, True, False, None)[0]))
    mean, std = scaled_posterior(vae, torch.stack(pixels).to(device), flips=True)
    return mean, std, sizes


@torch.no_grad()
def reencode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The knowledge bank's re-encoding: decode scaled ``latents`` [B,C,H,W] to images, quantise them
    to 8 bits (what saving a PNG does), and return the scaled VAE posterior (mean, std) of each image
    unflipped and flipped, each [B, 2, C, H, W] float32: what encoding the saved image (or its
    mirror) gives at every later step, computed once."""
    scale, shift = vae.config.scaling_factor, latent_shift(vae)
    images = vae.decode((latents / scale + shift).to(vae.device, vae.dtype)).sample.float()
    images = ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    views = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
    posterior = vae.encode(views.to(vae.dtype)).latent_dist
    mean = (posterior.mean.float().unflatten(0, (latents.shape[0], 2)) - shift) * scale
    std = posterior.std.float().unflatten(0, (latents.shape[0], 2)) * scale
    return mean, std


def set_up_knowledge_bank(args: argparse.Namespace, accelerator: Accelerator, *, bank_dir: str,
                          sample_fn: Callable, conditions: Sequence[int] | Sequence[str], build_batch_size: int,
                          vae: torch.nn.Module, fingerprint: str, vae_fingerprint: str, scheduler_name: str,
                          guidance_scale: float | None, latent_shape: list[int], rows_per_step: int,
                          random_flip: bool, extra_identity: dict | None = None, autocast: bool = True
                          ) -> tuple[Any, Any]:
    """The knowledge bank of every script: build it once with the frozen base model (``sample_fn`` draws
    latents for a batch of ``conditions``), load and check it, write its preview, and return the bank and
    its replay stream (``rows_per_step`` rows a step). Its identity (what a later run must match to reuse
    it) is the base model, the sampler settings, ``extra_identity`` and --knowledge_bank_seed."""
    import difftuning_utils as dt

    settings = {"base_model": args.pretrained_model_name_or_path, "revision": args.revision,
                "fingerprint": fingerprint, "vae_fingerprint": vae_fingerprint, "scheduler": scheduler_name,
                "num_inference_steps": args.knowledge_bank_num_inference_steps, "guidance_scale": guidance_scale,
                **(extra_identity or {})}
    with accelerator.autocast() if autocast else contextlib.nullcontext():
        dt.build_knowledge_bank(bank_dir, sample_fn, conditions, build_batch_size, args.knowledge_bank_seed,
                                settings, reencode_fn=lambda z: reencode_latents(vae, z))
    bank = dt.load_knowledge_bank(bank_dir, fingerprint, latent_shape)
    preview = os.path.join(bank_dir, "preview.png")
    if accelerator.is_main_process and not os.path.exists(preview):
        dt.save_bank_preview(bank.latents[:16], lambda z: decode_latents(vae, z), preview)
    return bank, dt.BankReplay(bank, args.knowledge_bank_replay, random_flip, rows_per_step, args.seed,
                               accelerator.process_index, accelerator.device, bank_dir)


@torch.no_grad()
def sample_dit_latents(transformer: torch.nn.Module, scheduler: Any, class_labels: list[int],
                       guidance_scale: float, num_inference_steps: int, generator: torch.Generator,
                       null_class: int) -> torch.Tensor:
    """Final latents [B, C, H, W] of DiT's ancestral sampler with classifier-free guidance.

    DiTPipeline always decodes with the VAE and drops the learned variance; the knowledge bank
    wants latents, and DiT's own sampler uses the learned variance, so this is the short loop
    both need. Guidance is applied to the noise half, as DiTPipeline does.
    """
    config = transformer.config
    device, dtype = transformer.device, transformer.dtype
    channels, size = config.in_channels, config.sample_size
    batch = len(class_labels)
    latents = torch.randn((batch, channels, size, size), generator=generator).to(device, dtype)
    labels = torch.tensor(class_labels, device=device)
    if guidance_scale > 1:
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
    learned_sigma = config.out_channels == 2 * channels
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if guidance_scale > 1 else latents
        timesteps = t.expand(model_input.shape[0]).to(device)
        output = transformer(model_input, timestep=timesteps, class_labels=labels).sample
        eps, rest = output[:, :channels], output[:, channels:]
        if guidance_scale > 1:
            cond_eps, uncond_eps = eps.chunk(2)
            eps, rest = uncond_eps + guidance_scale * (cond_eps - uncond_eps), rest.chunk(2)[0]
        model_output = torch.cat([eps, rest], dim=1) if learned_sigma and scheduler.config.variance_type in (
            "learned", "learned_range") else eps
        latents = scheduler.step(model_output, t, latents, generator=generator).prev_sample
    return latents


def disable_per_block_label_dropout(transformer: torch.nn.Module) -> None:
    """diffusers gives every DiT block its own LabelEmbedding with dropout 0.1, and in train mode
    each block drops labels independently: almost every sample then sees the null label in some
    blocks. Turn that off; we drop labels once at the input instead, so all blocks agree."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """VAE latents (scaled) -> PIL images, e.g. for the knowledge-bank preview."""
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():
        images = vae.decode((latents / vae.config.scaling_factor + latent_shift(vae)).to(vae.device, vae.dtype)
                            ).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return VaeImageProcessor.numpy_to_pil(images)
