#!/usr/bin/env python
"""A premise check cheap enough to run before training: does the source model denoise the target's images at
the low-noise end as well as it denoises its own?

Diff-Tuning's retention objective rests on the premise that the pre-trained model's low-noise (small t)
denoising carries over to the target. The chain-of-forgetting gate measures it after a plain fine-tune (hand
t < 100 of a fine-tuned model's sampling chain back to the source and see what FID does). This tool asks the
same question without any fine-tune: the source model's epsilon-prediction loss at t < ``--max_timestep`` on
the few-shot target images, over its loss on its own samples (what a knowledge bank holds) at the same noise
and timesteps. A ratio near 1 says the low-noise denoiser suits the target; a large ratio says it does not.
Every image is conditioned on the null label (the target's classes are not the source's).

    python -m benchmark.premise_check --miniature fashion_a_to_b          # about a minute on one thread
    python -m benchmark.premise_check --all --output_json docs/measurements/premise_check.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmark.run_benchmark import MINIATURES
from difftuning_common import atomic_write_json, derive_seed
from training_plumbing import run_cli

# The chain-of-forgetting gate of each pair as results.md reports it: FID change when the source model
# denoises t < 100 of a plain fine-tune's chain (what the premise check tries to predict without training).
GATES = {"mnist": 22.0, "emoji": 21.4, "emoji_heldout": -6.2, "fashion_a_to_b": 40.6, "fashion_b_to_a": 75.2,
         "digits_a_to_b": 12.1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--miniature", choices=list(MINIATURES), nargs="+", default=["fashion_a_to_b"])
    parser.add_argument("--all", action="store_true", help="Every miniature (overrides --miniature).")
    parser.add_argument("--max_timestep", type=int, default=100, help="Timesteps drawn uniformly below this.")
    parser.add_argument("--num_own_samples", type=int, default=256, help="Source samples to compare with.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDPM steps of those samples.")
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--noise_draws", type=int, default=8, help="(noise, t) draws per image.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    if args.all:
        args.miniature = list(MINIATURES)
    for flag in ("max_timestep", "num_own_samples", "num_inference_steps", "noise_draws"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    return args


@torch.no_grad()
def low_noise_loss(transformer: torch.nn.Module, scheduler, latents: torch.Tensor, max_timestep: int,
                   draws: int, seed: int) -> float:
    """Mean epsilon MSE over ``draws`` (noise, t < max_timestep) per latent, the null label, batches of 256.
    The same seed gives every latent set the same draws, so two sets are compared at the same noise."""
    null = transformer.config.num_embeds_ada_norm
    channels = latents.shape[1]
    total, count = 0.0, 0
    for draw in range(draws):
        gen = torch.Generator().manual_seed(derive_seed(seed, "premise", draw))
        for start in range(0, len(latents), 256):
            x0 = latents[start:start + 256]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, max_timestep, (len(x0),), generator=gen)
            noisy = scheduler.add_noise(x0, noise, t)
            eps = transformer(noisy, timestep=t, class_labels=torch.full_like(t, null)).sample[:, :channels]
            total += torch.nn.functional.mse_loss(eps, noise, reduction="sum").item() / eps[0].numel()
            count += len(x0)
    return total / count


def check(miniature: str, args: argparse.Namespace) -> dict:
    from diffusers import DDPMScheduler, DiTPipeline

    from benchmark import evaluate
    from training_plumbing import sample_dit_latents

    setting = MINIATURES[miniature]
    pipe = DiTPipeline.from_pretrained(setting["source_model"])
    transformer, vae = pipe.transformer.eval(), pipe.vae.eval()
    learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **(
        {"variance_type": "learned_range"} if learned_sigma else {}))
    target = evaluate.TARGETS[setting["target"]]
    images, _ = target.split("train", 0, setting["shots"])  # the few-shot set a user would fine-tune on
    with torch.no_grad():
        target_latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    source_classes = sorted(set(pipe.labels.values())) or list(range(transformer.config.num_embeds_ada_norm))
    gen = torch.Generator().manual_seed(derive_seed(args.seed, "premise-own"))
    picks = torch.randint(0, len(source_classes), (args.num_own_samples,), generator=gen)
    own = torch.cat([sample_dit_latents(transformer, scheduler, [source_classes[i] for i in chunk.tolist()],
                                        args.guidance_scale, args.num_inference_steps, gen,
                                        transformer.config.num_embeds_ada_norm) for chunk in picks.split(128)])
    losses = {name: low_noise_loss(transformer, scheduler, latents, args.max_timestep, args.noise_draws, args.seed)
              for name, latents in (("target", target_latents), ("own_samples", own))}
    result = {"miniature": miniature, "num_target_images": len(target_latents), "loss": losses,
              "ratio": losses["target"] / losses["own_samples"], "gate_fid_change_percent": GATES.get(miniature)}
    gate = GATES.get(miniature)
    print(f"[premise] {miniature}: low-noise loss ratio target / own samples = {result['ratio']:.3f} (gate: "
          + (f"{gate:+.1f}% FID)" if gate is not None else "not measured yet)"), flush=True)
    return result


def main(args: argparse.Namespace) -> None:
    from scipy import stats

    torch.manual_seed(args.seed)
    results = [check(name, args) for name in args.miniature]
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("output_json", "all")}, "pairs": results}
    scored = [r for r in results if r["gate_fid_change_percent"] is not None]
    if len(scored) >= 3:
        rho = stats.spearmanr([r["ratio"] for r in scored], [r["gate_fid_change_percent"] for r in scored])
        report["spearman_ratio_vs_gate"] = {"rho": float(rho.statistic), "p": float(rho.pvalue), "pairs": len(scored)}
        print(f"[premise] rank correlation of the ratio with the gate over {len(scored)} pairs: "
              f"rho {rho.statistic:+.2f} (p {rho.pvalue:.3f})")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        atomic_write_json(args.output_json, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    run_cli(main, parse_args)
