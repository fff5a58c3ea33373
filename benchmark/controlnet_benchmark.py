#!/usr/bin/env python
"""The ControlNet miniature: does Diff-Tuning make a ControlNet converge faster (the paper's 24%)?

Base model: the tiny text-to-image model (benchmark/emoji_text2image_model, a Stable Diffusion stand-in
pre-trained on Twemoji + Noto Emoji by benchmark/pretrain_text2image.py). ControlNet task: OpenMoji
(a style the base never saw) conditioned on edge maps computed from the images themselves (Sobel
magnitude of the grey image > 0.15, white edges on black), captioned with OpenMoji's names. The edge
maps of 64 held-out images (from the OpenMoji FID reference split, never trained on) with their names
are the fidelity set.

Every arm is one `train_controlnet_difftuning.py` run (the real script) with the same steps, batch and
seed, saving upstream's `checkpoint-N/controlnet` every ``--eval_every`` steps. Each checkpoint then
generates the fidelity set at fixed sampling noise; **control fidelity** is the F1 between the edges of
the generated image and the condition's (1-pixel tolerance), averaged over the set. A run has
**converged** at the first evaluated step from which its fidelity stays at or above ``--f1_threshold``
(the "sudden convergence" of ControlNet training). The final checkpoint also gets an image-quality
figure: FID in the OpenMoji feature space against the held-out images of the same conditions.

    python -m benchmark.controlnet_benchmark --output_dir outputs/controlnet_benchmark      # full table
    python -m benchmark.controlnet_benchmark --arms none replay --seeds 0 --max_train_steps 200 ...

Finished runs are reused (their settings are checked), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import numpy as np
import torch

from benchmark import runner
from benchmark.runner import ROOT
from difftuning_common import ConfigError, atomic_write_json
from training_plumbing import run_cli

ARMS: dict[str, list[str]] = {
    "none": [],  # upstream's ControlNet training: uniform timesteps, no retention
    "psi_only": ["--difftuning", "--retention", "none"],
    "replay": ["--difftuning", "--retention", "replay"],
    "distill": ["--difftuning", "--retention", "distill"],
}
RUN_SETTINGS = ("base_model", "max_train_steps", "train_batch_size", "learning_rate", "eval_every",
                "num_eval_pairs", "knowledge_bank_size", "knowledge_bank_num_inference_steps",
                "num_inference_steps", "guidance_scale", "extra_flags")
EDGE_THRESHOLD = 0.15


# ----------------------------------------------------------------------------------------------
# Edges and control fidelity
# ----------------------------------------------------------------------------------------------


def sobel_edges(images: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Edge maps bool [N, H, W] of uint8 images [N, H, W, 3]: Sobel gradient magnitude of the grey image
    (in [0, 1], normalised by the kernel's weight 8) above ``threshold``. numpy only."""
    grey = images.astype(np.float32).mean(-1) / 255.0
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = 2 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) + (p[:, :-2, 2:] - p[:, :-2, :-2]) + (p[:, 2:, 2:] - p[:, 2:, :-2])
    gy = 2 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) + (p[:, 2:, :-2] - p[:, :-2, :-2]) + (p[:, 2:, 2:] - p[:, :-2, 2:])
    return np.hypot(gx, gy) / 8 > threshold


def _dilate(edges: np.ndarray, radius: int) -> np.ndarray:
    out = edges.copy()
    padded = np.pad(edges, ((0, 0), (radius, radius), (radius, radius)))
    h, w = edges.shape[1:]
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[:, dy:dy + h, dx:dx + w]
    return out


def edge_f1(generated: np.ndarray, condition: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """F1 [N] of generated edge maps against condition edge maps (bool [N, H, W]): a generated edge pixel
    counts as correct within ``tolerance`` pixels of a condition edge, and a condition edge pixel as
    found within ``tolerance`` pixels of a generated one. 0 when either map is empty."""
    precision_hits = (generated & _dilate(condition, tolerance)).sum((1, 2))
    recall_hits = (condition & _dilate(generated, tolerance)).sum((1, 2))
    precision = precision_hits / np.maximum(generated.sum((1, 2)), 1)
    recall = recall_hits / np.maximum(condition.sum((1, 2)), 1)
    return np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)


def steps_to_convergence(steps: list[int], f1: list[float], threshold: float) -> int | None:
    """The first evaluated step from which every later evaluation is >= ``threshold``; None if never."""
    converged = None
    for step, value in zip(steps, f1, strict=True):
        if value >= threshold:
            converged = step if converged is None else converged
        else:
            converged = None
    return converged


# ----------------------------------------------------------------------------------------------
# Data: OpenMoji pairs
# ----------------------------------------------------------------------------------------------


def write_pairs(output_dir: str, num_eval_pairs: int) -> tuple[str, str]:
    """(training folder, fidelity-set json). Training pairs: every OpenMoji image outside the FID
    reference split, as an imagefolder with metadata.jsonl (image, conditioning_image, text). Fidelity
    set: ``num_eval_pairs`` images of the reference split (a seeded, class-balanced choice)."""
    from PIL import Image

    from benchmark import emoji_data, evaluate

    folder, eval_path = os.path.join(output_dir, "openmoji-edges"), os.path.join(output_dir, "fidelity_set.json")
    eval_folder = os.path.join(output_dir, "fidelity_conditions")  # not inside the imagefolder: no split there
    if os.path.isdir(folder) and os.path.exists(eval_path):
        return folder, eval_path
    emoji = emoji_data.load_openmoji()
    images, labels = evaluate.openmoji_arrays()
    splits = evaluate.openmoji_splits(labels, 0, evaluate.TARGETS["openmoji"].default_shots)
    reference = splits["reference"]
    rng = np.random.default_rng(0)
    held_out = np.sort(np.concatenate([rng.permutation(reference[labels[reference] == c])[
        :num_eval_pairs // len(evaluate.OPENMOJI_CLASSES) + (c < num_eval_pairs % len(evaluate.OPENMOJI_CLASSES))]
        for c in range(len(evaluate.OPENMOJI_CLASSES))]))
    train = np.setdiff1d(np.arange(len(images)), reference)
    edges = sobel_edges(images)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "conditioning_images"):
        os.makedirs(os.path.join(tmp, sub))
    rows = []
    for i in train.tolist():
        Image.fromarray(images[i]).save(os.path.join(tmp, "images", f"{i:04d}.png"))
        Image.fromarray((edges[i] * 255).astype(np.uint8)).convert("RGB").save(
            os.path.join(tmp, "conditioning_images", f"{i:04d}.png"))
        rows.append({"file_name": f"images/{i:04d}.png", "conditioning_image_file_name":
                     f"conditioning_images/{i:04d}.png", "text": emoji.names[i]})
    with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.makedirs(eval_folder, exist_ok=True)
    fidelity = []
    for i in held_out.tolist():
        condition = os.path.join(eval_folder, f"{i:04d}.png")
        Image.fromarray((edges[i] * 255).astype(np.uint8)).convert("RGB").save(condition)
        fidelity.append({"index": i, "prompt": emoji.names[i], "condition": condition})
    os.replace(tmp, folder)
    atomic_write_json(eval_path, {"pairs": fidelity, "edge_threshold": EDGE_THRESHOLD, "num_train": len(train)})
    return folder, eval_path


# ----------------------------------------------------------------------------------------------
# Sampling and scoring a ControlNet
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(base_model: str, controlnet_dir: str, pairs: list[dict], steps: int, guidance: float,
             seed: int = 1234) -> np.ndarray:
    """uint8 images [N, 32, 32, 3] for the fidelity set, the same initial and sampler noise for every
    ControlNet (a paired comparison across checkpoints and arms)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one pipeline per checkpoint: no loading bars in the log
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    with runner.MODEL_LOAD_LOCK:  # parallel runs are threads of this process
        controlnet = ControlNetModel.from_pretrained(controlnet_dir)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(base_model, controlnet=controlnet,
                                                                 safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    conditions = [Image.open(p["condition"]).convert("RGB") for p in pairs]
    images = pipe([p["prompt"] for p in pairs], conditions, height=32, width=32, num_inference_steps=steps,
                  guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def score(images: np.ndarray, pairs: list[dict]) -> float:
    """Mean control fidelity (edge F1) of generated ``images`` against the pairs' conditions."""
    from PIL import Image

    conditions = np.stack([np.asarray(Image.open(p["condition"]).convert("L")) > 127 for p in pairs])
    return float(edge_f1(sobel_edges(images), conditions).mean())


def quality(images: np.ndarray, pairs: list[dict]) -> dict:
    """FID/KID in the OpenMoji feature space of ``images`` against the real held-out images of the same
    pairs (small sets: compare arms with each other, not with other FIDs)."""
    from benchmark import emoji_data, evaluate

    real_u8, labels = evaluate.openmoji_arrays()
    index = [p["index"] for p in pairs]
    with runner.MODEL_LOAD_LOCK:
        classifier, _ = evaluate.load_or_train_classifier(target="openmoji")
    metrics = evaluate.compute_metrics(emoji_data.to_model_range(images), labels[index],
                                       emoji_data.to_model_range(real_u8[index]), classifier, bootstrap=0,
                                       kid_subset_size=min(50, len(index)))
    return {k: metrics[k] for k in ("fid", "kid_mean", "accuracy")}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_model", default=os.path.join(ROOT, "benchmark", "emoji_text2image_model"))
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "controlnet_benchmark"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--eval_every", type=int, default=100, help="Checkpoint and evaluate every N steps.")
    parser.add_argument("--num_eval_pairs", type=int, default=64, help="Held-out (condition, prompt) pairs.")
    parser.add_argument("--knowledge_bank_size", type=int, default=1000)
    parser.add_argument("--knowledge_bank_num_inference_steps", type=int, default=50)
    parser.add_argument("--num_inference_steps", type=int, default=20, help="UniPC steps when evaluating.")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--f1_threshold", type=float, default=None,
                        help="Convergence threshold of the control fidelity; default: half-way from the untrained "
                             "ControlNet's fidelity to the mean final fidelity of the 'none' arm, fixed once "
                             "and stored in the output folder.")
    parser.add_argument("--other_thresholds", type=float, nargs="*", default=[],
                        help="Also tabulate steps to converge at these thresholds: how much the verdict depends on "
                             "where the line is drawn (the main threshold stays the stated one).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel, one CPU thread each.")
    parser.add_argument("--table", default=None, help="Also write the markdown table here.")
    parser.add_argument("--summarize_only", action="store_true", help="Train nothing: tabulate finished runs.")
    parser.add_argument("--extra_flags", nargs=argparse.REMAINDER, default=[],
                        help="Flags passed on to every training run (last on the line).")
    args = parser.parse_args(argv)
    runner.refuse_secret_flags(parser, args.extra_flags)
    for flag in ("max_train_steps", "train_batch_size", "eval_every", "num_eval_pairs", "knowledge_bank_size",
                 "knowledge_bank_num_inference_steps", "num_inference_steps", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if not args.summarize_only and not os.path.isfile(os.path.join(args.base_model, "model_index.json")):
        parser.error(f"--base_model {args.base_model} is not a pipeline folder (no model_index.json); make it with "
                     "`python -m benchmark.pretrain_text2image`.")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    return runner.run_settings(args, RUN_SETTINGS, "base_model")


def train_and_evaluate(args: argparse.Namespace, arm: str, seed: int, data: str, pairs: list[dict]) -> dict:
    """One arm = one run of the real script, then every checkpoint's fidelity and the final quality."""
    out = runner.start_run(args.output_dir, arm, seed, run_settings(args))
    result_path = os.path.join(out, "result.json")
    if os.path.exists(result_path):
        return json.load(open(result_path))
    cmd = [*runner.script_command("train_controlnet_difftuning.py"), "--pretrained_model_name_or_path",
           args.base_model, "--train_data_dir", data, "--output_dir", out, "--resolution", "32", "--seed", str(seed),
           "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
           "--learning_rate", str(args.learning_rate), "--checkpointing_steps", str(args.eval_every),
           "--report_to", "tensorboard", "--num_validation_images", "1",
           "--knowledge_bank_dir", os.path.join(args.output_dir, f"bank-seed{seed}"),
           "--knowledge_bank_size", str(args.knowledge_bank_size),
           "--knowledge_bank_num_inference_steps", str(args.knowledge_bank_num_inference_steps),
           *ARMS[arm], *args.extra_flags]
    runner.train_once(cmd, out, "diffusion_pytorch_model.safetensors",
                      f"train_controlnet_difftuning.py for {arm} seed {seed}")
    torch.set_num_threads(1)
    curve_path = os.path.join(out, "curve.json")
    curve = json.load(open(curve_path)) if os.path.exists(curve_path) else {}
    checkpoints = sorted((int(d.split("-")[1]), os.path.join(out, d, "controlnet")) for d in os.listdir(out)
                         if d.startswith("checkpoint-") and not d.endswith(".tmp"))
    for step, folder in checkpoints:
        if str(step) not in curve:
            curve[str(step)] = score(generate(args.base_model, folder, pairs, args.num_inference_steps,
                                              args.guidance_scale), pairs)
            atomic_write_json(curve_path, curve)
        shutil.rmtree(os.path.dirname(folder))  # the optimizer state is not needed once scored
    final = generate(args.base_model, out, pairs, args.num_inference_steps, args.guidance_scale)
    result = {"arm": arm, "seed": seed, "curve": {int(k): v for k, v in sorted(curve.items(), key=lambda kv:
                                                                            int(kv[0]))},
              "final_f1": score(final, pairs), **quality(final, pairs),
              "train_seconds": runner.train_seconds(out)}
    np.savez_compressed(os.path.join(out, "final_samples.npz"), images=final)
    atomic_write_json(result_path, result)
    print(f"[controlnet benchmark] {arm} seed {seed}: final fidelity {result['final_f1']:.3f}, FID "
          f"{result['fid']:.1f}", flush=True)
    return result


def untrained_fidelity(args: argparse.Namespace, pairs: list[dict]) -> float:
    """The fidelity of a ControlNet fresh from the UNet (zero convolutions: it changes nothing)."""
    path = os.path.join(args.output_dir, "untrained_fidelity.json")
    if os.path.exists(path):
        return json.load(open(path))["f1"]
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from train_controlnet_difftuning import conditioning_channels_for

    folder = os.path.join(args.output_dir, "untrained_controlnet")
    vae = AutoencoderKL.from_pretrained(args.base_model, subfolder="vae")
    ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(args.base_model, subfolder="unet"),
                              conditioning_embedding_out_channels=conditioning_channels_for(vae)).save_pretrained(folder)
    f1 = score(generate(args.base_model, folder, pairs, args.num_inference_steps, args.guidance_scale), pairs)
    atomic_write_json(path, {"f1": f1})
    return f1


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def convergence_threshold(args: argparse.Namespace, results: dict[str, dict[int, dict]], untrained: float) -> float:
    """--f1_threshold, or half-way from the untrained fidelity to the 'none' arm's mean final fidelity;
    fixed at first use and stored, so later arms and reruns are measured against the same line."""
    path = os.path.join(args.output_dir, "threshold.json")
    if os.path.exists(path):
        stored = json.load(open(path))
        if args.f1_threshold is None or args.f1_threshold == stored["f1_threshold"]:
            return stored["f1_threshold"]
    if args.f1_threshold is not None:
        threshold, how = args.f1_threshold, "--f1_threshold"
    else:
        if "none" not in results:
            raise ConfigError("The default --f1_threshold needs the 'none' arm: run it, or pass --f1_threshold.")
        final = statistics.mean(r["final_f1"] for r in results["none"].values())
        threshold, how = untrained + 0.5 * (final - untrained), f"half-way from {untrained:.3f} to {final:.3f}"
    atomic_write_json(path, {"f1_threshold": threshold, "how": how})
    return threshold


def summarize(results: dict[str, dict[int, dict]], threshold: float, untrained: float,
              other_thresholds: list[float] = ()) -> str:
    def fmt(values: list[float], digits: int = 3) -> str:
        if not values:
            return "—"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = ["| arm | seeds | steps to converge ↓ (per seed) | vs none | final fidelity ↑ | FID ↓ | "
             "class accuracy ↑ | train (s) |", "|---|---|---|---|---|---|---|---|"]
    converge: dict[str, list] = {}
    for arm, by_seed in results.items():
        converge[arm] = [steps_to_convergence(list(r["curve"]), list(r["curve"].values()), threshold)
                         for r in (by_seed[s] for s in sorted(by_seed))]
    for arm, by_seed in results.items():
        seeds = sorted(by_seed)
        steps = converge[arm]
        reached = [s for s in steps if s is not None]
        per_seed = ", ".join("never" if s is None else str(s) for s in steps)
        change = "—"
        if arm != "none" and "none" in converge and all(s is not None for s in steps + converge["none"]):
            change = f"{100 * (statistics.mean(steps) / statistics.mean(converge['none']) - 1):+.0f}%"
        lines.append(f"| {arm} | {len(seeds)} | {fmt(reached, 0) if len(reached) == len(steps) else 'not all'} "
                     f"({per_seed}) | {change} | {fmt([by_seed[s]['final_f1'] for s in seeds])} | "
                     f"{fmt([by_seed[s]['fid'] for s in seeds], 1)} | {fmt([by_seed[s]['accuracy'] for s in seeds])} "
                     f"| {fmt([by_seed[s]['train_seconds'] for s in seeds], 0)} |")
    notes = (f"\nControl fidelity: edge F1 (1-pixel tolerance) of the generated images against their conditions, "
             f"mean over the fidelity set; an untrained ControlNet scores {untrained:.3f}. Converged: the first "
             f"evaluated step from which fidelity stays >= {threshold:.3f}. FID/KID: OpenMoji classifier features, "
             "generated vs the real held-out images of the same conditions (64 images: compare arms, not with other "
             "FIDs). vs none: change of the mean steps to converge (negative = faster).\n")
    if other_thresholds:
        notes += ("\nSteps to converge at other thresholds (mean over seeds, per seed, change vs none; "
                  "'never' = not reached to the end):\n\n| arm | " + " | ".join(f">= {t:.3f}" for t in other_thresholds)
                  + " |\n|---|" + "---|" * len(other_thresholds) + "\n")
        by_threshold = {t: {arm: [steps_to_convergence(list(r["curve"]), list(r["curve"].values()), t)
                                  for r in (by_seed[s] for s in sorted(by_seed))] for arm, by_seed in results.items()}
                        for t in other_thresholds}
        for arm in results:
            cells = []
            for t in other_thresholds:
                steps, base = by_threshold[t][arm], by_threshold[t].get("none", [])
                if None in steps:
                    cells.append(f"not all ({', '.join('never' if s is None else str(s) for s in steps)})")
                    continue
                change = (f", {100 * (statistics.mean(steps) / statistics.mean(base) - 1):+.0f}%"
                          if arm != "none" and base and None not in base else "")
                cells.append(f"{statistics.mean(steps):.0f} ({', '.join(map(str, steps))}{change})")
            notes += f"| {arm} | " + " | ".join(cells) + " |\n"
    return "\n".join(lines) + "\n" + notes


def plot_curves(results: dict[str, dict[int, dict]], threshold: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for arm, by_seed in results.items():
        steps = sorted(set.intersection(*(set(r["curve"]) for r in by_seed.values())))
        mean = [statistics.mean(r["curve"][s] for r in by_seed.values()) for s in steps]
        ax.plot(steps, mean, marker=".", label=f"{arm} ({len(by_seed)} seeds)")
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="convergence threshold")
    ax.set_xlabel("training step")
    ax.set_ylabel("control fidelity (edge F1)")
    ax.set_title("ControlNet on OpenMoji edges: fidelity over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=120)
    os.replace(f"{path}.tmp.png", path)


def collect_results(output_dir: str) -> tuple[dict[str, dict[int, dict]], dict]:
    """The finished runs (their fidelity curves keyed by step) and the settings they share."""
    results, settings = runner.collect_results(output_dir, ARMS, "result.json")
    for runs in results.values():
        for result in runs.values():
            result["curve"] = {int(k): v for k, v in result["curve"].items()}
    return results, settings


def main(args: argparse.Namespace) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    data, eval_path = write_pairs(args.output_dir, args.num_eval_pairs)
    pairs = json.load(open(eval_path))["pairs"]
    if not args.summarize_only:
        settings = run_settings(args)
        for arm in args.arms:  # fail fast, before any work, on a finished run with other settings
            for seed in args.seeds:
                runner.check_run_settings(os.path.join(args.output_dir, "runs", f"{arm}-seed{seed}"), settings)
        print(f"[controlnet benchmark] {len(args.arms) * len(args.seeds)} runs of {args.max_train_steps} steps, "
              f"{args.jobs} at a time; fidelity every {args.eval_every} steps on {len(pairs)} held-out pairs",
              flush=True)
        # One bank-building run per seed first: the replay arms of a seed share its bank.
        first = [("replay", seed) for seed in args.seeds] if "replay" in args.arms else []
        jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
        runner.run_all(lambda arm, seed: train_and_evaluate(args, arm, seed, data, pairs), first, args.jobs)
        runner.run_all(lambda arm, seed: train_and_evaluate(args, arm, seed, data, pairs), jobs, args.jobs)
    results, stored_settings = collect_results(args.output_dir)
    untrained = untrained_fidelity(args, pairs)
    threshold = convergence_threshold(args, results, untrained)
    table = summarize(results, threshold, untrained, args.other_thresholds)
    settings = stored_settings if args.summarize_only else run_settings(args)
    header = (f"Base {os.path.relpath(settings['base_model'], ROOT)}; ControlNet on OpenMoji edge maps, "
              f"{settings['max_train_steps']} steps, batch {settings['train_batch_size']}, lr "
              f"{settings['learning_rate']}, fidelity every {settings['eval_every']} steps on "
              f"{settings['num_eval_pairs']} held-out pairs (UniPC {settings['num_inference_steps']} steps, guidance "
              f"{settings['guidance_scale']})"
              + ("" if args.summarize_only else f"; wall time {time.time() - start:.0f} s") + ".\n\n")
    plot_curves(results, threshold, os.path.join(args.output_dir, "fidelity_curves.png"))
    for path in filter(None, [os.path.join(args.output_dir, "results.md"), args.table]):
        with open(path, "w") as f:
            f.write(header + table)
    atomic_write_json(os.path.join(args.output_dir, "results.json"),
                      {"settings": settings, "threshold": threshold, "untrained_f1": untrained,
                       "results": {a: {str(s): r for s, r in v.items()} for a, v in results.items()}})
    print(header + table)


if __name__ == "__main__":
    run_cli(main, parse_args)
