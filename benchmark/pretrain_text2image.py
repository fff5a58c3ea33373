#!/usr/bin/env python
"""Pre-train the tiny text-to-image models of the ControlNet and DreamBooth miniatures.

Two families (``--family``), both on Twemoji + Noto Emoji (about 3,800 images, both flips) captioned
with their CLDR names ("grinning face", "red heart", "flag: Japan"), both with an offline CLIP
tokenizer whose BPE merges are learned from the captions, both on the emoji DiT source's
near-deterministic VAE (8x8x8 latents). Unlike the real models, whose CLIPs were pre-trained
elsewhere, the text encoders are trained here together with the denoiser.

* ``sd`` (default): the Stable Diffusion stand-in. A small ``UNet2DConditionModel`` (cross-attention
  at the two coarse levels) and a 3-layer ``CLIPTextModel``, DDPM epsilon training on SD's schedule,
  reusing the cached latents of ``pretrain_source.py --source emoji``'s work folder. Saved as a
  ``StableDiffusionPipeline`` (``benchmark/emoji_text2image_model``) that the ControlNet and DreamBooth
  scripts load; 20k steps, 88 min on one CPU thread.
* ``sd3``: the flow-matching stand-in. An ``SD3Transformer2DModel`` (MMDiT, patch 2, 4 joint blocks of
  width 128: 16 image tokens), two 3-layer ``CLIPTextModelWithProjection`` sharing the tokenizer and no
  T5 (the prompt gets zeros in T5's place, as ``StableDiffusion3Pipeline`` does without it). Trained as
  diffusers' SD3 scripts train: sigma drawn by the logit-normal density (0, 1) through the scheduler's
  table, noisy = (1 - sigma) x + sigma noise, the transformer predicting noise - x (no preconditioning;
  the logit-normal scheme weights every sample 1). The scheduler is ``FlowMatchEulerDiscreteScheduler``
  with shift 1.0, not SD3's 3.0: SD3 shifts toward noise for its 1024 px (4,096-token) latents and was
  itself pre-trained unshifted at 256 px (256 tokens); these latents have 16 tokens, fewer still, so
  shifting toward noise would spend the training on levels where little of the image is left. The
  VAE is the shipped emoji VAE with SD3's latent shift added (``shift_factor`` = the mean of the
  posterior means, so model latents are centred; the scale stays 1 / their std); its latents are
  encoded into the work folder once. CLIP prompts are 77 tokens and the zeros in T5's place 77
  tokens too: the DreamBooth script's SD3 defaults (upstream's), so its runs see what pre-training saw;
  sample with ``max_sequence_length=77`` (the pipeline's default is 256). Saved as a
  ``StableDiffusion3Pipeline`` (``benchmark/emoji_sd3_model``: 2.30M transformer + 2 x 0.29M CLIP
  parameters and the 0.96M VAE, 15.7 MB), loaded with ``DiffusionPipeline.from_pretrained(path,
  text_encoder_3=None, tokenizer_3=None)`` as SD3 without T5 is. 7,200 steps of 64: 1.7 s a step
  on one free CPU thread, so about 3.4 h (the shipped model took about 5 h on a shared 2-core machine,
  in three resumed stretches). 3,600 steps were not enough: the grid drew coloured texture for most
  prompts and yellow faces for "cat face". That is 2.8x fewer training images than sd saw; the 154 prompt
  tokens (77 CLIP + 77 zeros) a block attends to cost most of a step. If the sample grid shows prompts not
  followed, raise ``--max_train_steps``.

    python -m benchmark.pretrain_text2image                 # sd: ~1.5 h on one CPU thread
    python -m benchmark.pretrain_text2image --family sd3    # sd3: ~3.4 h on one CPU thread

Seeded and resumable (a checkpoint every ``--checkpointing_steps``; the learning rate is constant after
warm-up, so raising ``--max_train_steps`` later continues exactly), so the same command gives the same
model on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import model_families as mf
from benchmark import emoji_data
from benchmark.data import save_grid
from benchmark.tiny_models import train_clip_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("pretrain_text2image")
SAMPLE_PROMPTS = ("grinning face", "red heart", "dog face", "flag: Japan", "pizza", "rocket", "sun", "ghost",
                  "red apple", "snowman", "cat face", "blue circle")
# SD3's prompt lengths: the DreamBooth script (as upstream's SD3 scripts) pads CLIP prompts to 77 tokens (the
# pipeline: to the tokenizer's length) and puts --max_sequence_length zeros (default 77) in T5's place.
SD3_CLIP_TOKENS = 77
SD3_T5_TOKENS = mf.StableDiffusion3Family.flag_defaults["max_sequence_length"]
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0  # upstream's logit-normal density of the training sigma
# Flags of one family only: None in the other (and refused there when given). The parser's own defaults are
# sd's, those that made the shipped benchmark/emoji_text2image_model; --family sd3 replaces these.
FAMILY_DEFAULTS: dict[str, dict] = {
    "sd": {},
    "sd3": dict(output_dir="benchmark/emoji_sd3_model", work_dir="benchmark/emoji_sd3_work",
                samples_path="docs/images/emoji_sd3_samples.png", vae_work_dir=None, block_out_channels=None,
                max_length=SD3_CLIP_TOKENS, max_train_steps=7200, num_inference_steps=28,
                vae_model="benchmark/emoji_source_model/vae", transformer_layers=4, num_attention_heads=4,
                attention_head_dim=32, shift=1.0),
}
SD_ONLY, SD3_ONLY = ("vae_work_dir", "block_out_channels"), ("vae_model", "transformer_layers",
                                                             "num_attention_heads", "attention_head_dim", "shift")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The parser's defaults in --help, except None (a flag of the other family)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--family", choices=list(FAMILY_DEFAULTS), default="sd",
                   help="sd: UNet + CLIP, DDPM (StableDiffusionPipeline); sd3: MMDiT + two CLIPs, flow matching "
                        "(StableDiffusion3Pipeline). Sets the defaults of the flags below (FAMILY_DEFAULTS; "
                        "--family sd3 --help shows sd3's).")
    p.add_argument("--output_dir", default="benchmark/emoji_text2image_model", help="The pipeline folder.")
    p.add_argument("--work_dir", default="benchmark/emoji_text2image_work", help="Checkpoints and logs.")
    p.add_argument("--vae_work_dir", default="benchmark/emoji_source_model_work",
                   help="sd: pretrain_source.py --source emoji's work folder: vae/, latents.pt, latent_stds.pt.")
    p.add_argument("--vae_model", default=None,
                   help="sd3: the emoji VAE (AutoencoderKL folder); its latents are encoded into --work_dir once.")
    p.add_argument("--samples_path", default="docs/images/emoji_text2image_samples.png")
    p.add_argument("--stage", choices=["all", "train", "sample"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--num_merges", type=int, default=1500, help="BPE merges learned from the captions.")
    p.add_argument("--max_length", type=int, default=32,
                   help="Tokenizer max length (the longest caption: 19); sd3: 77, what the DreamBooth script pads to.")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 96], help="sd: the UNet's levels.")
    p.add_argument("--transformer_layers", type=int, default=None, help="sd3: joint blocks.")
    p.add_argument("--num_attention_heads", type=int, default=None, help="sd3: heads per block.")
    p.add_argument("--attention_head_dim", type=int, default=None, help="sd3: width of a head.")
    p.add_argument("--shift", type=float, default=None,
                   help="sd3: the flow scheduler's shift, in training and sampling (SD3's is 3.0).")
    p.add_argument("--text_hidden_size", type=int, default=64)
    p.add_argument("--text_layers", type=int, default=3)
    p.add_argument("--max_train_steps", type=int, default=20000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=500)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--caption_dropout_prob", type=float, default=0.1, help="Empty prompts, for guidance.")
    p.add_argument("--logging_steps", type=int, default=250)
    p.add_argument("--checkpointing_steps", type=int, default=1000)
    p.add_argument("--num_inference_steps", type=int, default=50, help="sd: DDIM steps; sd3: Euler steps.")
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    family_only = argparse.ArgumentParser(add_help=False)  # read first, so --help shows the family's defaults
    family_only.add_argument("--family", choices=list(FAMILY_DEFAULTS), default="sd")
    family = family_only.parse_known_args(argv)[0].family
    p.set_defaults(**FAMILY_DEFAULTS[family])
    args = p.parse_args(argv)
    for flag in SD3_ONLY if family == "sd" else SD_ONLY:
        if getattr(args, flag) is not None:
            p.error(f"--{flag} is a flag of --family {'sd3' if family == 'sd' else 'sd'}, not {family}.")
    for flag in ("max_train_steps", "train_batch_size", "logging_steps", "checkpointing_steps", "num_threads",
                 "num_inference_steps", "samples_per_prompt", "max_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if family == "sd3":
        for flag in ("transformer_layers", "num_attention_heads", "attention_head_dim"):
            if getattr(args, flag) < 1:
                p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
        if args.max_length != SD3_CLIP_TOKENS:
            p.error(f"--max_length must be {SD3_CLIP_TOKENS} for sd3: the pipeline pads CLIP prompts to the "
                    f"tokenizer's length and the DreamBooth script to {SD3_CLIP_TOKENS}, so only then do they agree.")
        if not args.shift > 0:
            p.error(f"--shift must be > 0, got {args.shift}.")
        if not os.path.isfile(os.path.join(args.vae_model, "config.json")) and args.stage != "sample":
            p.error(f"--vae_model {args.vae_model} is not an AutoencoderKL folder (no config.json).")
    elif not (Path(args.vae_work_dir) / "latents.pt").exists() and args.stage != "sample":
        p.error(f"--vae_work_dir {args.vae_work_dir} has no latents.pt: run "
                "`python -m benchmark.pretrain_source --source emoji --stage vae` first.")
    return args


def make_models(args: argparse.Namespace, tokenizer, latent_channels: int):
    """The UNet (cross-attention where the latents are 4x4 and 2x2) and the text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(args.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=tuple(args.block_out_channels), layers_per_block=1,
                                down_block_types=down,
                                up_block_types=tuple(d.replace("Down", "Up") for d in down[::-1]),
                                cross_attention_dim=args.text_hidden_size, attention_head_dim=8, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_hidden_size, intermediate_size=4 * args.text_hidden_size,
        num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=args.max_length,
        projection_dim=args.text_hidden_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return unet, text_encoder


def make_sd3_models(args: argparse.Namespace, tokenizer, latent_channels: int) -> dict[str, torch.nn.Module]:
    """The MMDiT and its two CLIP encoders with projections (SD3's CLIP-L and CLIP-G roles, one size here).

    The transformer reads the two encoders' penultimate states side by side (``joint_attention_dim`` = their
    widths together, also the width of the zeros in T5's place) and their pooled projections concatenated;
    ``pos_embed_max_size`` is the 4x4 patch grid of 32 px (SD3's 96 would store a 96x96 table, 4.7 MB here)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    width = args.num_attention_heads * args.attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=args.transformer_layers, attention_head_dim=args.attention_head_dim,
        num_attention_heads=args.num_attention_heads, joint_attention_dim=2 * args.text_hidden_size,
        caption_projection_dim=width, pooled_projection_dim=2 * args.text_hidden_size, pos_embed_max_size=4)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_hidden_size, intermediate_size=4 * args.text_hidden_size,
        num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=args.max_length,
        projection_dim=args.text_hidden_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return {"transformer": transformer, "text_encoder": CLIPTextModelWithProjection(config),
            "text_encoder_2": CLIPTextModelWithProjection(config)}


def make_noise_scheduler():
    """Stable Diffusion's training schedule (scaled-linear betas 0.00085..0.012, 1,000 steps, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


def make_flow_scheduler(shift: float):
    """SD3's scheduler (1,000 sigmas from 1 down, Euler sampling) with ``shift``; training and sampling share it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def sd3_latents(args: argparse.Namespace, work_dir: Path) -> Path:
    """``work_dir/latents``: the emoji VAE with SD3's latent shift, and the model latents (posterior means and
    stds of every source image, both flips, in ``latents.pt``'s order) as ``pretrain_source.py`` caches them.

    SD3 pipelines decode ``latents / scaling_factor + shift_factor``; the shift is the mean of the posterior
    means, so the model latents are centred, and the scale stays the VAE's own (1 / their std). Written to a
    temporary folder and renamed, so an interrupted run never leaves a partial cache."""
    import shutil

    from diffusers import AutoencoderKL

    from benchmark.pretrain_source import encode_posteriors

    folder = work_dir / "latents"
    if (folder / "latents.pt").exists():
        return folder
    vae = AutoencoderKL.from_pretrained(args.vae_model).eval()
    images = emoji_data.to_model_range(emoji_data.load_source().images)
    means, stds = encode_posteriors(vae, torch.cat([images, images.flip(-1)]))
    shift, scale = means.mean().item(), vae.config.scaling_factor
    vae.register_to_config(shift_factor=shift)
    tmp = work_dir / "latents.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp / "vae")
    torch.save(((means - shift) * scale).contiguous(), tmp / "latents.pt")
    torch.save((stds * scale).contiguous(), tmp / "latent_stds.pt")
    os.replace(tmp, folder)
    logger.info("encoded %d latents with %s: shift_factor %.4f, scaling_factor %.4f", len(means), args.vae_model,
                shift, scale)
    return folder


def sd_loss_fn(models: dict[str, torch.nn.Module], gen: torch.Generator):
    """Stable Diffusion's training loss: epsilon MSE at a uniform DDPM timestep."""
    scheduler = make_noise_scheduler()
    unet, text_encoder = models["unet"], models["text_encoder"]

    def loss_fn(latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        return torch.nn.functional.mse_loss(pred, noise)

    return loss_fn


def sd3_loss_fn(models: dict[str, torch.nn.Module], gen: torch.Generator, shift: float):
    """diffusers' SD3 training loss: u ~ logit-normal, the scheduler's entry floor(u * 1000) gives the timestep
    and sigma, the transformer predicts noise - latents. The prompt is encoded by the DreamBooth script's own SD3
    code (penultimate CLIP states side by side, zeros in T5's place, pooled projections concatenated), so the
    conditioning the model learns is the one it is fine-tuned and sampled with."""
    from types import SimpleNamespace

    from difftuning_utils import flow_loss_weights

    scheduler = make_flow_scheduler(shift)
    sigma_table, time_table = scheduler.sigmas, scheduler.timesteps
    transformer = models["transformer"]
    encoders = SimpleNamespace(text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
                               text_encoder_3=None, tokenizer=None, tokenizer_2=None, transformer=transformer)
    family = mf.StableDiffusion3Family(encoders, max_sequence_length=SD3_T5_TOKENS)

    def loss_fn(latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(len(latents), generator=gen))
        index = (u * scheduler.config.num_train_timesteps).long()
        sigmas = sigma_table[index].view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * noise
        prompts = family.encode([ids, ids])  # one tokenizer for both encoders
        pred = family.predict(transformer, noisy, time_table[index], prompts, None, torch.float32)
        weights = flow_loss_weights("logit_normal", sigmas.flatten())  # 1 for this scheme, as upstream
        return (weights * ((pred - (noise - latents)) ** 2).mean(dim=(1, 2, 3))).mean()

    return loss_fn


def train(args: argparse.Namespace, work_dir: Path) -> None:
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    torch.manual_seed(args.seed)
    source = emoji_data.load_source()
    vae_dir = Path(args.vae_work_dir) if args.family == "sd" else sd3_latents(args, work_dir)
    means, stds = torch.load(vae_dir / "latents.pt"), torch.load(vae_dir / "latent_stds.pt")
    captions = source.names * (len(means) // len(source))  # latents.pt holds both flips, in order
    if len(captions) != len(means):
        raise RuntimeError(f"{vae_dir}/latents.pt holds {len(means)} latents for {len(source)} source images.")
    tokenizer_dir = work_dir / "tokenizer"
    if not (tokenizer_dir / "vocab.json").exists():
        train_clip_tokenizer(str(tokenizer_dir), source.names, args.num_merges, args.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    input_ids = tokenizer(captions, max_length=args.max_length, padding="max_length", truncation=True,
                          return_tensors="pt").input_ids
    empty_ids = tokenizer([""], max_length=args.max_length, padding="max_length", return_tensors="pt").input_ids
    if args.family == "sd":
        unet, text_encoder = make_models(args, tokenizer, means.shape[1])
        models = {"unet": unet, "text_encoder": text_encoder}
    else:
        models = make_sd3_models(args, tokenizer, means.shape[1])
    logger.info("%s parameters, vocabulary %d, %d latents, %d distinct captions",
                ", ".join(f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for name, m in models.items()),
                len(tokenizer), len(means), len(set(captions)))
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0, fused=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps)))
    ema = EMAModel(params, decay=args.ema_decay, foreach=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    loss_fn = sd_loss_fn(models, gen) if args.family == "sd" else sd3_loss_fn(models, gen, args.shift)

    ckpt_path, start_step = work_dir / "checkpoint.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        for name, model in models.items():
            model.load_state_dict(ckpt[name])
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        start_step = ckpt["step"]
        logger.info("resumed from %s at step %d", ckpt_path, start_step)

    for model in models.values():
        model.train()
    t0, running = time.time(), []
    for step in range(start_step + 1, args.max_train_steps + 1):
        idx = torch.randint(0, len(means), (args.train_batch_size,), generator=gen)
        latents = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)  # a posterior sample
        drop = torch.rand(len(idx), generator=gen) < args.caption_dropout_prob
        ids = torch.where(drop[:, None], empty_ids, input_ids[idx])
        loss = loss_fn(latents, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        lr_sched.step()
        ema.step(params)
        running.append(loss.detach())
        if step % args.logging_steps == 0 or step == start_step + 1:
            elapsed = time.time() - t0
            logger.info("step %d/%d loss %.4f (%.3f s/step, %.1f min)", step, args.max_train_steps,
                        torch.stack(running).mean().item(), elapsed / (step - start_step), elapsed / 60)
            running = []
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            state = {**{name: model.state_dict() for name, model in models.items()}, "optimizer": opt.state_dict(),
                     "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict(), "generator": gen.get_state(),
                     "step": step}
            torch.save(state, f"{ckpt_path}.tmp")
            os.replace(f"{ckpt_path}.tmp", ckpt_path)

    ema.copy_to(params)
    pipe = build_pipeline(args, models, tokenizer, vae_dir / "vae")
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    (work_dir / "train_stats.json").write_text(json.dumps(
        {"steps": args.max_train_steps, "train_seconds_this_run": time.time() - t0, "credits": emoji_data.CREDITS},
        indent=2))
    logger.info("saved %s (EMA weights) to %s", type(pipe).__name__, args.output_dir)


def build_pipeline(args: argparse.Namespace, models: dict[str, torch.nn.Module], tokenizer, vae_dir: Path):
    """The family's pipeline around the trained models (in eval mode) and the VAE of ``vae_dir``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir)
    for model in models.values():
        model.eval()
    if args.family == "sd":
        sampler = DDIMScheduler.from_config(make_noise_scheduler().config, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(vae=vae, text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                       unet=models["unet"], scheduler=sampler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusion3Pipeline(transformer=models["transformer"], scheduler=make_flow_scheduler(args.shift),
                                    vae=vae, text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                    text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


def load_pipeline(args: argparse.Namespace):
    """The saved pipeline, as a user loads it (SD3 without T5: its absent parts passed as None)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    if args.family == "sd":
        return StableDiffusionPipeline.from_pretrained(args.output_dir, safety_checker=None)
    return DiffusionPipeline.from_pretrained(args.output_dir, text_encoder_3=None, tokenizer_3=None)


@torch.no_grad()
def make_samples(args: argparse.Namespace) -> None:
    """A grid, one row per prompt of :data:`SAMPLE_PROMPTS`, to check the prompts are followed."""
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if args.family == "sd" else {"max_sequence_length": SD3_T5_TOKENS}  # the zeros it was trained with
    t0, rows = time.time(), []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        generator = torch.Generator().manual_seed(args.seed + i)
        images = pipe([prompt] * args.samples_per_prompt, height=32, width=32, generator=generator,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                      **extra).images
        rows.append(np.stack([np.asarray(im) for im in images]))
    save_grid(rows, args.samples_path)
    logger.info("sampled %d prompts in %.0f s (rows: %s) -> %s", len(SAMPLE_PROMPTS), time.time() - t0,
                ", ".join(SAMPLE_PROMPTS), args.samples_path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        force=True)
    torch.set_num_threads(args.num_threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("args: %s", json.dumps(vars(args)))
    t0 = time.time()
    if args.stage in ("all", "train"):
        train(args, work_dir)
    if args.stage in ("all", "sample"):
        make_samples(args)
    logger.info("done in %.1f min", (time.time() - t0) / 60)


if __name__ == "__main__":
    main()
