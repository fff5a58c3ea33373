#!/usr/bin/env python
"""Pre-train the tiny text-to-image model of the ControlNet miniature: a Stable Diffusion stand-in.

A small ``UNet2DConditionModel`` (8x8x8 latents, cross-attention at the two coarse levels), a
3-layer ``CLIPTextModel`` and an offline CLIP tokenizer whose BPE merges are learned from the
captions, on Twemoji + Noto Emoji (about 3,800 images, both flips) captioned with their CLDR
names ("grinning face", "red heart", "flag: Japan"). The VAE is the emoji DiT source's
near-deterministic VAE (``benchmark/pretrain_source.py --source emoji``), whose cached latents
(posterior means and stds of both flips) are reused. Unlike Stable Diffusion, whose CLIP was
pre-trained elsewhere, the text encoder is trained here together with the UNet. Saved as a
``StableDiffusionPipeline`` folder that ``train_controlnet_difftuning.py`` loads.

    python -m benchmark.pretrain_text2image            # ~1.5 h on one CPU thread

Seeded and resumable (a checkpoint every ``--checkpointing_steps``), so the same command gives the
same model on the same software stack.
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

from benchmark import emoji_data
from benchmark.data import save_grid
from benchmark.tiny_models import train_clip_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("pretrain_text2image")
SAMPLE_PROMPTS = ("grinning face", "red heart", "dog face", "flag: Japan", "pizza", "rocket", "sun", "ghost",
                  "red apple", "snowman", "cat face", "blue circle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="benchmark/emoji_text2image_model", help="The StableDiffusionPipeline.")
    p.add_argument("--work_dir", default="benchmark/emoji_text2image_work", help="Checkpoints and logs.")
    p.add_argument("--vae_work_dir", default="benchmark/emoji_source_model_work",
                   help="pretrain_source.py --source emoji's work folder: vae/, latents.pt, latent_stds.pt.")
    p.add_argument("--samples_path", default="docs/images/emoji_text2image_samples.png")
    p.add_argument("--stage", choices=["all", "train", "sample"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--num_merges", type=int, default=1500, help="BPE merges learned from the captions.")
    p.add_argument("--max_length", type=int, default=32, help="Tokenizer max length (the longest caption: 19).")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 96])
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
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    args = p.parse_args(argv)
    for flag in ("max_train_steps", "train_batch_size", "logging_steps", "checkpointing_steps", "num_threads",
                 "num_inference_steps", "samples_per_prompt", "max_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if not (Path(args.vae_work_dir) / "latents.pt").exists() and args.stage != "sample":
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


def make_noise_scheduler():
    """Stable Diffusion's training schedule (scaled-linear betas 0.00085..0.012, 1,000 steps, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


def train(args: argparse.Namespace, work_dir: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTokenizer

    torch.manual_seed(args.seed)
    source = emoji_data.load_source()
    vae_dir = Path(args.vae_work_dir)
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
    unet, text_encoder = make_models(args, tokenizer, means.shape[1])
    logger.info("UNet %.2fM, text encoder %.2fM parameters, vocabulary %d, %d latents, %d distinct captions",
                sum(p.numel() for p in unet.parameters()) / 1e6,
                sum(p.numel() for p in text_encoder.parameters()) / 1e6,
                len(tokenizer), len(means), len(set(captions)))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    scheduler = make_noise_scheduler()
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0, fused=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps)))
    ema = EMAModel(params, decay=args.ema_decay, foreach=True)
    gen = torch.Generator().manual_seed(args.seed + 1)

    ckpt_path, start_step = work_dir / "checkpoint.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        start_step = ckpt["step"]
        logger.info("resumed from %s at step %d", ckpt_path, start_step)

    unet.train()
    text_encoder.train()
    t0, running = time.time(), []
    for step in range(start_step + 1, args.max_train_steps + 1):
        idx = torch.randint(0, len(means), (args.train_batch_size,), generator=gen)
        latents = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)  # a posterior sample
        drop = torch.rand(len(idx), generator=gen) < args.caption_dropout_prob
        ids = torch.where(drop[:, None], empty_ids, input_ids[idx])
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
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
            state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                     "optimizer": opt.state_dict(),
                     "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict(), "generator": gen.get_state(),
                     "step": step}
            torch.save(state, f"{ckpt_path}.tmp")
            os.replace(f"{ckpt_path}.tmp", ckpt_path)

    ema.copy_to(params)
    vae = AutoencoderKL.from_pretrained(vae_dir / "vae")
    sampler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=sampler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    (work_dir / "train_stats.json").write_text(json.dumps(
        {"steps": args.max_train_steps, "train_seconds_this_run": time.time() - t0, "credits": emoji_data.CREDITS},
        indent=2))
    logger.info("saved StableDiffusionPipeline (EMA weights) to %s", args.output_dir)


@torch.no_grad()
def make_samples(args: argparse.Namespace) -> None:
    """A grid, one row per prompt of :data:`SAMPLE_PROMPTS`, to check the prompts are followed."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.output_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    t0, rows = time.time(), []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        generator = torch.Generator().manual_seed(args.seed + i)
        images = pipe([prompt] * args.samples_per_prompt, height=32, width=32, generator=generator,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale).images
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
