#!/usr/bin/env python
"""Chain-of-forgetting analysis: how much of the reverse chain can the pre-trained model do?

For each threshold s, sample with the fine-tuned denoiser for t >= s and the pre-trained one for
t < s, then measure sample quality. s = 0 is the fine-tuned model alone; s = T is the pre-trained
model alone. The paper's observation (its Figure 1): quality stays close to the fine-tuned model's
while the pre-trained model handles the low-noise end, and degrades as it takes over noisier steps,
i.e. low-t knowledge transfers and high-t knowledge does not.

    python -m benchmark.chain_of_forgetting --base benchmark/source_model \\
        --finetuned outputs/benchmark/standard-seed0 --reference mnist --output_dir outputs/cof
    # the gate: does handing t < 100 to the pre-trained model cost more than 10% FID? (plain fine-tunes, 3 seeds)
    python -m benchmark.chain_of_forgetting --base benchmark/source_model --reference mnist --output_dir outputs/gate \
        --finetuned outputs/benchmark/standard-seed0 outputs/benchmark/standard-seed1 outputs/benchmark/standard-seed2 \
        --thresholds 0 100 --gate_threshold 100
    # real models (GPU, online for Inception weights):
    python -m benchmark.chain_of_forgetting --base facebook/DiT-XL-2-256 --finetuned dit-food101 \\
        --reference_dir ./food101/val --inception --device cuda --num_samples 5000
"""

from __future__ import annotations

import argparse
import os

import torch

import difftuning_utils as dt
from training_plumbing import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample with the fine-tuned model above a timestep threshold and "
                                                 "the pre-trained one below it; plot quality against the threshold.")
    parser.add_argument("--base", required=True, help="Pre-trained DiTPipeline (folder or Hub id).")
    parser.add_argument("--finetuned", required=True, nargs="+",
                        help="Fine-tuned DiTPipeline(s) (folder or Hub id); several (plain fine-tunes with other "
                             "seeds) give the gate its spread over training seeds. The curve uses the first.")
    parser.add_argument("--thresholds", type=int, nargs="+", default=[0, 100, 200, 300, 400, 500, 600, 700, 800,
                                                                       900, 1000])
    parser.add_argument("--num_samples", type=int, default=500, help="Class-balanced samples per threshold.")
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="Same noise at every threshold (paired comparison).")
    parser.add_argument("--reference", default=None,
                        choices=["mnist", "openmoji", "emoji_heldout", "fashion_a", "fashion_b", "digits_b"],
                        help="Built-in reference of a CPU miniature (its held-out target images, classifier-feature "
                             "FID/KID).")
    parser.add_argument("--reference_dir", default=None, help="Folder of real target images (Inception FID).")
    parser.add_argument("--inception", action="store_true", help="Standard Inception FID (downloads weights).")
    parser.add_argument("--gate_threshold", type=int, default=None,
                        help="Also give the gate's verdict: does letting the pre-trained model denoise t < this cost "
                             "more than --gate_tolerance in FID, over every --finetuned model, with a bootstrap "
                             "interval? (--reference miniatures only.)")
    parser.add_argument("--gate_tolerance", type=float, default=0.10,
                        help="The relative FID cost the gate allows (0.10: +10%%).")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="Bootstrap resamples (generated and reference images) of the gate's interval.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if (args.reference is None) == (args.reference_dir is None):
        parser.error("give exactly one of --reference (a miniature's target) or --reference_dir.")
    if args.reference_dir is not None and not args.inception:
        parser.error("--reference_dir needs --inception (classifier features exist only for the miniatures).")
    if args.gate_threshold is not None and (args.reference is None or args.gate_threshold < 1):
        parser.error("--gate_threshold must be >= 1 and needs --reference (the bootstrap works in the miniature's "
                     "feature space).")
    if args.bootstrap < 10 or not 0 <= args.gate_tolerance:
        parser.error("--bootstrap must be >= 10 and --gate_tolerance >= 0.")
    if min(args.thresholds) < 0 or args.num_samples < 2 or args.batch_size < 1 or args.num_inference_steps < 1:
        parser.error("--thresholds must be >= 0, --num_samples >= 2, --batch_size and --num_inference_steps >= 1.")
    return args


def load_pipeline(flag: str, name_or_path: str, device: str):
    """A DiTPipeline, or one sentence naming the flag whose folder or Hub id could not be loaded."""
    from diffusers import DiTPipeline

    from training_plumbing import load_pretrained

    return load_pretrained(DiTPipeline.from_pretrained, flag, name_or_path, "a DiTPipeline").to(device)


def load_reference_folder(folder: str, resolution: int, channels: int) -> torch.Tensor:
    """Real images [N, C, H, W] in [-1, 1], centre-cropped to the model's resolution."""
    import numpy as np
    from PIL import Image

    from training_plumbing import preprocess_image

    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")))
    if not paths:
        raise SystemExit(f"error: --reference_dir {folder} holds no images.")
    rng = np.random.default_rng(0)
    return torch.stack([preprocess_image(Image.open(p), resolution, True, False, rng, channels) for p in paths])


def gate_verdict(low: float, high: float, tolerance: float) -> str:
    """PASS when the whole interval of the FID change stays under the tolerance, FAIL when it lies above it,
    else UNDECIDED (more seeds or samples needed)."""
    if high <= tolerance:
        return "PASS"
    if low > tolerance:
        return "FAIL"
    return "UNDECIDED"


def gate(args: argparse.Namespace, models: list, base, labels: list[int], classes: list[int], reference: torch.Tensor,
         classifier) -> dict:
    """The premise check: for each fine-tuned model, FID with the pre-trained model denoising t < --gate_threshold
    against FID of the fine-tuned model alone (same noise), and a bootstrap interval of the mean relative change
    over models (generated images resampled pairwise across the two arms, the reference independently)."""
    from benchmark import evaluate

    ref_features = evaluate.classify(classifier, reference)[0]
    pairs = []
    for model in models:
        arms = [evaluate.sample_pipeline(model, labels, args.seed, args.num_inference_steps, args.guidance_scale,
                                         args.batch_size, base_transformer=base.transformer, switch_timestep=s)
                for s in (0, args.gate_threshold)]
        pairs.append([evaluate.classify(classifier, images)[0] for images in arms])
    ratios = [evaluate._fid(ref_features, mixed) / evaluate._fid(ref_features, alone) - 1 for alone, mixed in pairs]
    generator = torch.Generator().manual_seed(dt.derive_seed(args.seed, "gate-bootstrap"))
    draws = []
    for _ in range(args.bootstrap):
        ref = ref_features[torch.randint(0, len(ref_features), (len(ref_features),), generator=generator)]
        change = []
        for alone, mixed in pairs:
            pick = torch.randint(0, len(alone), (len(alone),), generator=generator)
            change.append(evaluate._fid(ref, mixed[pick]) / evaluate._fid(ref, alone[pick]) - 1)
        draws.append(sum(change) / len(change))
    low, high = (float(v) for v in torch.tensor(draws).quantile(torch.tensor([0.025, 0.975]), dim=0))
    mean = sum(ratios) / len(ratios)
    result = {"threshold": args.gate_threshold, "tolerance": args.gate_tolerance, "fid_change": mean,
              "fid_change_per_model": ratios, "ci95": [low, high], "num_models": len(models),
              "num_samples": len(labels), "bootstrap": args.bootstrap,
              "verdict": gate_verdict(low, high, args.gate_tolerance)}
    seeds_note = "" if len(models) >= 3 else f" (only {len(models)} fine-tuned model(s): give 3 or more seeds)"
    print(f"gate: the pre-trained model denoising t < {args.gate_threshold} changes FID by {100 * mean:+.1f}% "
          f"(95% interval {100 * low:+.1f}% to {100 * high:+.1f}%; per model "
          + ", ".join(f"{100 * r:+.1f}%" for r in ratios) + f"); allowed +{100 * args.gate_tolerance:.0f}%: "
          f"{result['verdict']}{seeds_note}", flush=True)
    return result


def main(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmark import evaluate
    from training_plumbing import quiet_known_warnings

    quiet_known_warnings()
    base = load_pipeline("--base", args.base, args.device)
    models = [load_pipeline("--finetuned", path, args.device) for path in args.finetuned]
    finetuned = models[0]
    os.makedirs(args.output_dir, exist_ok=True)
    if args.reference is not None:
        target = evaluate.TARGETS[args.reference]
        classes = [i % len(target.class_names) for i in range(args.num_samples)]
        labels = [evaluate.class_rows(finetuned, target.class_names)[c] for c in classes]
        classifier, _ = evaluate.load_or_train_classifier(target=args.reference)
        reference, _ = target.split("reference")
        measure = lambda images: evaluate.compute_metrics(images, classes, reference, classifier, bootstrap=0)  # noqa: E731
        if args.gate_threshold is not None:
            verdict = gate(args, models, base, labels, classes, reference, classifier)
            dt.atomic_write_json(os.path.join(args.output_dir, "gate.json"), {**verdict, "base": args.base,
                                                                               "finetuned": args.finetuned})
    else:
        num_classes = len(finetuned.labels) or finetuned.transformer.config.num_embeds_ada_norm
        labels = [i % num_classes for i in range(args.num_samples)]
        vae_scale = 2 ** (len(finetuned.vae.config.block_out_channels) - 1)
        reference = load_reference_folder(args.reference_dir, finetuned.transformer.config.sample_size * vae_scale,
                                          finetuned.vae.config.in_channels)
        measure = lambda images: {"fid": evaluate.inception_fid(images, reference, args.device)}  # noqa: E731

    rows = []
    for threshold in sorted(args.thresholds):
        images = evaluate.sample_pipeline(finetuned, labels, args.seed, args.num_inference_steps,
                                          args.guidance_scale, args.batch_size, base_transformer=base.transformer,
                                          switch_timestep=threshold)
        metrics = measure(images)
        rows.append({"threshold": threshold, **{k: v for k, v in metrics.items() if not isinstance(v, dict)}})
        extra = "".join(f", {k} {rows[-1][k]:.3f}" for k in ("kid_mean", "accuracy") if k in rows[-1])
        print(f"threshold {threshold:4d}: FID {rows[-1]['fid']:.2f}{extra}", flush=True)
    dt.atomic_write_json(os.path.join(args.output_dir, "chain_of_forgetting.json"),
                         {"base": args.base, "finetuned": args.finetuned, "rows": rows, "args": vars(args)})

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["threshold"] for r in rows], [r["fid"] for r in rows], marker="o")
    ax.set_xlabel("threshold s: pre-trained model denoises t < s")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("Chain of forgetting: swapping in the pre-trained denoiser")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plot_path = os.path.join(args.output_dir, "chain_of_forgetting.png")
    fig.savefig(f"{plot_path}.tmp.png", dpi=120)
    os.replace(f"{plot_path}.tmp.png", plot_path)
    print(f"Wrote {args.output_dir}/chain_of_forgetting.(json|png); FID by threshold: "
          + ", ".join(f"{r['threshold']}: {r['fid']:.2f}" for r in rows))


if __name__ == "__main__":
    run_cli(main, parse_args)
