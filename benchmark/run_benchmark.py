#!/usr/bin/env python
"""The CPU miniatures of the paper's DiT transfer experiment, run through the real training script.

Two miniatures (``--miniature``), each a source DiTPipeline pre-trained by benchmark/pretrain_source.py
and a few-shot target:

* ``mnist``: Fashion-MNIST source (benchmark/source_model) -> MNIST, 10 images per digit;
* ``emoji``: Twemoji + Noto Emoji source (benchmark/emoji_source_model) -> OpenMoji, a style the source
  never saw, 16 images per group (9 groups);
* ``emoji_heldout``: the same source without the animals-nature and food-drink groups
  (benchmark/emoji_heldout_source_model) -> those groups' 11 sub-categories in the same styles, about
  10 images each: new classes in a style the source knows, as in the paper's ImageNet -> Food101.

Every arm is one `train_dit_difftuning.py` run with the same steps, batch and seed; each is evaluated
on the same sampling noise (paired comparison) with FID/KID in the feature space of a small classifier
trained on held-out target images, plus that classifier's accuracy on the samples.

    python -m benchmark.run_benchmark --output_dir outputs/benchmark            # full table
    python -m benchmark.run_benchmark --miniature emoji --arms standard difftuning --seeds 0 ...

Finished runs are skipped, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from benchmark import runner
from benchmark.runner import ROOT
from difftuning_common import ConfigError, atomic_write_json
from training_plumbing import run_cli

# Arm name -> extra flags of train_dit_difftuning.py. PEFT arms use the higher lr PEFT needs (DiffFit: 1e-3).
# The *_authors arms take the authors' EMA (a constant decay from the first step, from the pre-trained
# weights; its value: --authors_ema_decay) and no gradient clipping; their flags come after the runner's own
# --ema_decay, so theirs wins.
AUTHORS = ["--authors_recipe", "--no-ema_warmup", "--max_grad_norm", "0"]
# What the authors' EMA (0.9999 every step for 24k steps) keeps of the pre-trained weights at the end.
AUTHORS_PRETRAINED_SHARE = 0.9999 ** 24000
ARMS: dict[str, list[str]] = {
    "standard": [],
    "difftuning": ["--difftuning"],
    "psi_only": ["--difftuning", "--retention_ratio", "0"],
    "bank_only": ["--difftuning", "--difftuning_tau", "0"],
    "difftuning_rawbank": ["--difftuning", "--knowledge_bank_replay", "latents"],
    "standard_authors": AUTHORS,
    "difftuning_authors": AUTHORS + ["--difftuning"],
    "lora": ["--finetune", "lora", "--rank", "8", "--learning_rate", "1e-3"],
    "lora_difftuning": ["--finetune", "lora", "--rank", "8", "--learning_rate", "1e-3", "--difftuning"],
    "difffit": ["--finetune", "difffit", "--learning_rate", "1e-3"],
    "difffit_difftuning": ["--finetune", "difffit", "--learning_rate", "1e-3", "--difftuning"],
}
BASELINE_OF = {"difftuning": "standard", "psi_only": "standard", "bank_only": "standard",
               "difftuning_rawbank": "standard", "standard_authors": "standard",
               "difftuning_authors": "standard_authors", "lora_difftuning": "lora",
               "difffit_difftuning": "difffit"}
# Source model, target domain, shots and data flags of each miniature (digits must not be flipped).
MINIATURES = {
    "mnist": {"source_model": os.path.join(ROOT, "benchmark", "source_model"), "target": "mnist", "shots": 10,
              "flags": ["--no-random_flip"]},
    "emoji": {"source_model": os.path.join(ROOT, "benchmark", "emoji_source_model"), "target": "openmoji",
              "shots": 16, "flags": ["--random_flip"]},
    "emoji_heldout": {"source_model": os.path.join(ROOT, "benchmark", "emoji_heldout_source_model"),
                      "target": "emoji_heldout", "shots": 10, "flags": ["--random_flip"]},
}
# Fashion-MNIST split by class: each half's source model -> 10-shot of the other half's classes, scored in two
# feature spaces (a CNN of the target's five classes, and one of all ten).
for _source, _target in (("a", "b"), ("b", "a")):
    MINIATURES[f"fashion_{_source}_to_{_target}"] = {
        "source_model": os.path.join(ROOT, "benchmark", f"fashion_{_source}_source_model"),
        "target": f"fashion_{_target}", "second": f"fashion_{_target}_wide", "shots": 10,
        "flags": ["--no-random_flip"]}
# The third decision pair: MNIST digits 0-4's source -> 10-shot 5-9 (benchmark/data.py DIGIT_HALVES).
MINIATURES["digits_a_to_b"] = {"source_model": os.path.join(ROOT, "benchmark", "digits_a_source_model"),
                               "target": "digits_b", "second": "digits_b_wide", "shots": 10,
                               "flags": ["--no-random_flip"]}
# The flags that define a run. A finished run is reused only with the same values, so a table never
# mixes runs of different lengths or sample counts without saying so.
RUN_SETTINGS = ("miniature", "source_model", "shots_per_class", "max_train_steps", "train_batch_size",
                "learning_rate", "ema_decay", "knowledge_bank_size", "knowledge_bank_num_inference_steps",
                "num_samples", "num_inference_steps", "guidance_scale", "authors_ema_decay", "extra_flags",
                "eval_every", "val_samples", "val_inference_steps")
# Settings added later: runs made before them were made with these values.
SETTING_DEFAULTS = {"eval_every": 0, "val_samples": 500, "val_inference_steps": 50}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a Diff-Tuning CPU miniature benchmark.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--miniature", choices=list(MINIATURES), default="mnist",
                        help="mnist: Fashion-MNIST -> MNIST; emoji: Twemoji + Noto -> OpenMoji; emoji_heldout: "
                             "Twemoji + Noto without animals and food -> animals and food; fashion_a_to_b / "
                             "fashion_b_to_a: one half of Fashion-MNIST's classes -> the other half; digits_a_to_b: "
                             "MNIST digits 0-4 -> 5-9.")
    parser.add_argument("--source_model", default=None, help="Default: the miniature's shipped source model.")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmark"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots_per_class", type=int, default=None, help="Default: MNIST 10, OpenMoji 16.")
    parser.add_argument("--authors_ema_decay", default="matched",
                        help="EMA decay of the *_authors arms: a number (the authors': 0.9999), or 'matched': the "
                             "constant decay that leaves the pre-trained weights the same share of the EMA at the end "
                             "of this run as 0.9999 leaves after the authors' 24k steps (9%%).")
    parser.add_argument("--extra_flags", nargs=argparse.REMAINDER, default=[],
                        help="Flags passed on to every training run (last on the line): e.g. a sensitivity sweep "
                             "--extra_flags --retention_weight 0.5. They are part of the run's settings.")
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--ema_decay", type=float, default=0.999, help="Short runs: 0.9999 would barely move.")
    parser.add_argument("--knowledge_bank_size", type=int, default=1000)
    parser.add_argument("--knowledge_bank_num_inference_steps", type=int, default=100)
    parser.add_argument("--num_samples", type=int, default=1000, help="Class-balanced samples per run.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Ancestral DDPM steps for evaluation.")
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--eval_every", type=int, default=0,
                        help="Early stopping: keep a checkpoint every this many steps, score each on the target's "
                             "validation split (disjoint from the reference set) and also report the run at its "
                             "validation-chosen checkpoint. 0: only the final model.")
    parser.add_argument("--score_steps", type=int, nargs="+", default=[],
                        help="Also score these kept checkpoints like the final model (fixed training lengths to "
                             "compare with early stopping); finished runs gain them without training again.")
    parser.add_argument("--val_samples", type=int, default=500, help="Samples per checkpoint scored on validation.")
    parser.add_argument("--val_inference_steps", type=int, default=50, help="DDPM steps of those samples.")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel, one CPU thread each.")
    parser.add_argument("--table", default=None, help="Also write the markdown table here (e.g. docs/...).")
    parser.add_argument("--summarize_only", action="store_true",
                        help="Train nothing: tabulate every finished run in --output_dir/runs.")
    parser.add_argument("--baseline_dir", default=None,
                        help="Another benchmark's --output_dir to take each arm's baseline from when this one has "
                             "none: a sweep made with --extra_flags or another bank size, paired with the plain "
                             "runs. Its runs must share every other setting.")
    args = parser.parse_args(argv)
    runner.refuse_secret_flags(parser, args.extra_flags)
    miniature = MINIATURES[args.miniature]
    if args.authors_ema_decay != "matched":
        try:
            decay = float(args.authors_ema_decay)
        except ValueError:
            parser.error(f"--authors_ema_decay must be a number or 'matched', got {args.authors_ema_decay!r}.")
        if not 0 <= decay < 1:
            parser.error(f"--authors_ema_decay must be in [0, 1), got {decay}.")
    args.source_model = args.source_model or miniature["source_model"]
    args.shots_per_class = args.shots_per_class or miniature["shots"]
    # Checked here, before any folder is written: a run directory records its settings on creation.
    for flag in ("shots_per_class", "max_train_steps", "train_batch_size", "knowledge_bank_size",
                 "knowledge_bank_num_inference_steps", "num_inference_steps", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.eval_every < 0 or (args.eval_every and args.max_train_steps % args.eval_every):
        parser.error(f"--eval_every must divide --max_train_steps ({args.max_train_steps}), got {args.eval_every}.")
    for step in args.score_steps:
        if not args.eval_every or step % args.eval_every or not 0 < step <= args.max_train_steps:
            parser.error(f"--score_steps {step} is not a kept checkpoint: give multiples of --eval_every "
                         f"({args.eval_every}) up to --max_train_steps ({args.max_train_steps}).")
    if args.val_samples < 2 or args.val_inference_steps < 1:
        parser.error("--val_samples must be >= 2 and --val_inference_steps >= 1.")
    if args.num_samples < 2 or args.learning_rate <= 0 or not 0 <= args.ema_decay < 1:
        parser.error("--num_samples must be >= 2, --learning_rate > 0 and --ema_decay in [0, 1).")
    if args.baseline_dir and not os.path.isdir(os.path.join(args.baseline_dir, "runs")):
        parser.error(f"--baseline_dir {args.baseline_dir} has no runs/ folder: give another benchmark's --output_dir.")
    if not args.summarize_only and not os.path.isfile(os.path.join(args.source_model, "model_index.json")):
        parser.error(f"--source_model {args.source_model} is not a pipeline folder (no model_index.json).")
    return args


def write_target_folder(args: argparse.Namespace) -> str:
    """The few-shot training set as an imagefolder of 32x32 PNGs (MNIST padded like the source data), one
    folder per class, named as the target's classes ("0".."9", or OpenMoji's groups)."""
    from PIL import Image

    from benchmark import evaluate

    target = evaluate.TARGETS[MINIATURES[args.miniature]["target"]]
    folder = os.path.join(args.output_dir, f"{target.name}-{args.shots_per_class}shot")
    if os.path.isdir(folder):
        return folder
    images, labels = target.split("train", 0, args.shots_per_class)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    # A temporary folder of this process's own: two benchmarks started on one --output_dir (one queue per thread)
    # both write the set, and the first rename wins.
    os.makedirs(args.output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", dir=args.output_dir)
    for i, label in enumerate(labels.tolist()):
        name = target.class_names[label]
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        image = pixels[i][..., 0] if pixels.shape[-1] == 1 else pixels[i]
        Image.fromarray(image).save(os.path.join(tmp, name, f"{i:05d}.png"))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process wrote the same set first
        shutil.rmtree(tmp)
        if not os.path.isdir(folder):
            raise
    return folder


def authors_ema(args: argparse.Namespace, arm: str) -> list[str]:
    """The --ema_decay of an *_authors arm (see --authors_ema_decay); nothing for the other arms."""
    if not arm.endswith("_authors"):
        return []
    decay = (AUTHORS_PRETRAINED_SHARE ** (1 / args.max_train_steps) if args.authors_ema_decay == "matched"
             else float(args.authors_ema_decay))
    return ["--ema_decay", f"{decay:.8f}"]


def run_settings(args: argparse.Namespace) -> dict:
    """The values of RUN_SETTINGS, as stored in each run's settings.json."""
    return runner.run_settings(args, RUN_SETTINGS, "source_model")


def collect_results(output_dir: str) -> tuple[dict[str, dict[int, dict]], dict]:
    """Every finished run under ``output_dir/runs``, in ARMS order, and the settings they share."""
    return runner.collect_results(output_dir, ARMS, "metrics.json", SETTING_DEFAULTS)


def train_and_evaluate(args: argparse.Namespace, arm: str, seed: int, data: str) -> dict:
    """One arm = one run of the real script, then its evaluation; both skipped when already done."""
    out = runner.start_run(args.output_dir, arm, seed, run_settings(args), SETTING_DEFAULTS)
    metrics_path = os.path.join(out, "metrics.json")
    # Same --seed for every arm: the same sampling noise, a paired comparison.
    evaluate_cmd = [*runner.tool_command("evaluate"), "--pipeline", out,
                    "--guidance_scale", str(args.guidance_scale), "--seed", "1234", "--batch_size", "250",
                    "--shots_per_class", str(args.shots_per_class), "--reference", MINIATURES[args.miniature]["target"],
                    *(["--second_reference", MINIATURES[args.miniature]["second"]] if "second" in MINIATURES[
                        args.miniature] else [])]
    full = ["--num_samples", str(args.num_samples), "--num_inference_steps", str(args.num_inference_steps)]
    if os.path.exists(metrics_path):
        return score_fixed_steps(args, arm, seed, out, evaluate_cmd + full, json.load(open(metrics_path)))
    cmd = [*runner.script_command("train_dit_difftuning.py"), "--pretrained_model_name_or_path", args.source_model,
           "--train_data_dir", data, "--output_dir", out, "--seed", str(seed),
           "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
           "--learning_rate", str(args.learning_rate), "--center_crop", "--use_ema", "--ema_decay", str(args.ema_decay),
           "--checkpointing_steps", str(args.eval_every or 100000),
           "--report_to", "tensorboard", "--num_validation_images", "2", "--validation_num_inference_steps", "50",
           "--knowledge_bank_dir", os.path.join(args.output_dir, f"bank-seed{seed}"),
           "--knowledge_bank_size", str(args.knowledge_bank_size),
           "--knowledge_bank_num_inference_steps", str(args.knowledge_bank_num_inference_steps),
           *ARMS[arm], *MINIATURES[args.miniature]["flags"], *authors_ema(args, arm), *args.extra_flags]
    bank = " (builds the seed's knowledge bank first)" if "--difftuning" in ARMS[arm] and not os.path.exists(
        os.path.join(args.output_dir, f"bank-seed{seed}", "manifest.json")) else ""
    runner.train_once(cmd, out, "model_index.json", f"train_dit_difftuning.py for {arm} seed {seed}{bank}")
    if not os.path.exists(metrics_path + ".eval"):
        runner.run_step(evaluate_cmd + full + ["--output_json", metrics_path + ".eval", "--save_grid",
                                               os.path.join(out, "eval_grid.png")], out + ".eval.log",
                        f"evaluate.py for {arm} seed {seed}")
    metrics = json.load(open(metrics_path + ".eval"))
    metrics["train_seconds"] = runner.train_seconds(out)
    if args.eval_every:
        metrics["early_stopped"], metrics["val_curve"] = early_stopped(args, arm, seed, out, evaluate_cmd + full,
                                                                       metrics)
    atomic_write_json(metrics_path, metrics)
    return score_fixed_steps(args, arm, seed, out, evaluate_cmd + full, metrics)


def score_fixed_steps(args: argparse.Namespace, arm: str, seed: int, out: str, evaluate_cmd: list[str],
                      metrics: dict) -> dict:
    """``--score_steps``: those checkpoints scored like the final model, into ``metrics["at_step"]``; a finished
    run gains them without training again."""
    if not args.score_steps:
        return metrics
    at_step = metrics.setdefault("at_step", {})
    chosen = metrics.get("early_stopped", {}).get("step")
    for step in args.score_steps:
        if str(step) in at_step:
            continue
        if step == args.max_train_steps:  # already scored: the final model
            at_step[str(step)] = final_scores(metrics)
            continue
        # the validation-chosen checkpoint is already scored too
        path = os.path.join(out, "metrics_early.json" if step == chosen else f"metrics_step{step}.json")
        if not os.path.exists(path):
            runner.run_step(evaluate_cmd + ["--load_checkpoint", os.path.join(out, f"checkpoint-{step}"),
                                            "--output_json", path], out + f".step{step}.log",
                            f"evaluate.py for {arm} seed {seed} at the fixed step {step}")
        at_step[str(step)] = json.load(open(path))
    atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def final_scores(metrics: dict) -> dict:
    """The final model's own scores in a run's metrics.json, without what was added beside them."""
    return {k: v for k, v in metrics.items() if k not in ("early_stopped", "val_curve", "at_step")}


def early_stopped(args: argparse.Namespace, arm: str, seed: int, out: str, evaluate_cmd: list[str],
                  final: dict) -> tuple[dict, list[dict]]:
    """The run at its validation-chosen checkpoint: every kept checkpoint scored on the validation split (the
    first feature space chooses), then the chosen one scored like the final model. Returns its metrics (with
    ``step``) and the validation curve."""
    checkpoints = sorted((os.path.join(out, name) for name in os.listdir(out) if name.startswith("checkpoint-")
                          and not name.endswith(".tmp")), key=lambda p: int(p.rsplit("-", 1)[1]))
    curve_path = os.path.join(out, "curve_val.json")
    if not os.path.exists(curve_path):
        runner.run_step(evaluate_cmd[:evaluate_cmd.index("--num_samples")] + [
            "--num_samples", str(args.val_samples), "--num_inference_steps", str(args.val_inference_steps),
            "--reference_split", "val", "--checkpoints", *checkpoints, "--output_json", curve_path],
            out + ".curve.log", f"validation curve for {arm} seed {seed}")
    curve = json.load(open(curve_path))["curve"]
    best = min(curve, key=lambda point: point["fid"])["step"]
    if best == args.max_train_steps:  # the final model is the last checkpoint's EMA
        return {"step": best, **final_scores(final)}, curve
    chosen_path = os.path.join(out, "metrics_early.json")
    if not os.path.exists(chosen_path):
        runner.run_step(evaluate_cmd + ["--load_checkpoint", os.path.join(out, f"checkpoint-{best}"),
                                        "--output_json", chosen_path], out + ".early.log",
                        f"evaluate.py for {arm} seed {seed} at step {best}")
    return {"step": best, **json.load(open(chosen_path))}, curve


def run_arms(args: argparse.Namespace, data: str) -> dict[str, dict[int, dict]]:
    """Train and evaluate every (arm, seed), ``--jobs`` at a time; returns metrics by arm and seed."""
    from benchmark import evaluate

    settings = run_settings(args)
    for arm in args.arms:  # fail fast, before any work, on a finished run with other settings
        for seed in args.seeds:
            runner.check_run_settings(os.path.join(args.output_dir, "runs", f"{arm}-seed{seed}"), settings,
                                      SETTING_DEFAULTS)
    # train/cache the feature classifier once, before the pool
    print(f"[benchmark] {len(args.arms) * len(args.seeds)} runs, {args.jobs} at a time; feature classifier of "
          f"{MINIATURES[args.miniature]['target']}: loading (training it takes a few minutes the first time)",
          flush=True)
    evaluate.load_or_train_classifier(target=MINIATURES[args.miniature]["target"])
    # Arms of one seed share that seed's knowledge bank: one bank-building run per seed goes first, beside the
    # runs that need no bank (plain, psi only), so a pool of two never waits on one bank with a core idle.
    uses_bank = [a for a in args.arms if "--difftuning" in ARMS[a] and "--retention_ratio" not in ARMS[a]]
    first = [(uses_bank[0], seed) for seed in args.seeds] if uses_bank else []
    first += [(arm, seed) for arm in args.arms if arm not in uses_bank for seed in args.seeds]
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]  # arms in the order given
    runner.run_all(lambda arm, seed: train_and_evaluate(args, arm, seed, data), first, args.jobs)
    metrics = runner.run_all(lambda arm, seed: train_and_evaluate(args, arm, seed, data), jobs, args.jobs)
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for (arm, seed), result in zip(jobs, metrics, strict=True):
        results[arm][seed] = result
        print(f"[benchmark] {arm} seed {seed}: FID {result['fid']:.2f}, KID {result['kid_mean']:.1f}, "
              f"accuracy {result['accuracy']:.3f}", flush=True)
    return results


def summarize(results: dict[str, dict[int, dict]], settings: dict | None = None,
              baselines: dict[str, dict[int, dict]] | None = None, baselines_from: str = "") -> str:
    """Markdown table: mean ± std over seeds, and the paired FID change against each arm's baseline.

    A baseline arm missing from ``results`` is looked up in ``baselines`` (another folder's runs, named
    ``baselines_from`` in the table), so a sweep is compared seed by seed with the plain runs it varies.
    """
    def fmt(values: list[float], digits: int = 2) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = ["| arm | seeds | FID ↓ | FID at the validation-chosen step ↓ | KID ↓ | accuracy ↑ | copy rate ↓ | NN "
             "ratio ↑ | FID vs baseline: mean change (each seed's) | train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, by_seed in results.items():
        seeds = sorted(by_seed)
        fid = [by_seed[s]["fid"] for s in seeds]
        kid = [by_seed[s]["kid_mean"] for s in seeds]
        acc = [by_seed[s]["accuracy"] for s in seeds]
        secs = [by_seed[s]["train_seconds"] for s in seeds]
        copies = [by_seed[s].get("copy_rate", float("nan")) for s in seeds]
        ratio = [by_seed[s].get("nn_train_ref_ratio_median", float("nan")) for s in seeds]
        base = BASELINE_OF.get(arm)
        change = "—"
        base_runs, where = (results[base], "") if base in results else ((baselines or {}).get(base), baselines_from)
        if base_runs:
            paired = [s for s in seeds if s in base_runs]
            if paired:
                def relative(run: dict, base_run: dict) -> float:
                    return 100 * (run["fid"] - base_run["fid"]) / base_run["fid"]

                def cell(rel: list[float], label: str = "") -> str:  # the mean change, then each seed's
                    return f"{statistics.mean(rel):+.1f}%{label} ({', '.join(f'{r:+.1f}%' for r in rel)})"

                change = cell([relative(by_seed[s], base_runs[s]) for s in paired],
                              f" vs {base}{' in ' + where if where else ''}")
                if all("second_space" in by_seed[s] and "second_space" in base_runs[s] for s in paired):
                    change += "; second space " + cell([relative(by_seed[s]["second_space"],
                                                                 base_runs[s]["second_space"]) for s in paired])
        early = [by_seed[s]["early_stopped"] for s in seeds if "early_stopped" in by_seed[s]]
        stopped = (f"{fmt([e['fid'] for e in early])} (steps {', '.join(str(e['step']) for e in early)})"
                   if len(early) == len(seeds) else "—")
        fid_cell, acc_cell, copy_cell = fmt(fid), fmt(acc, 3), fmt(copies, 3)
        if all("second_space" in by_seed[s] for s in seeds):  # the decision pairs: (the second space) beside
            second = [by_seed[s]["second_space"] for s in seeds]
            fid_cell += f" ({fmt([x['fid'] for x in second])})"
            acc_cell += f" ({fmt([x['accuracy'] for x in second], 3)})"
            copy_cell += f" ({fmt([x['copy_rate'] for x in second], 3)})"
        lines.append(f"| {arm} | {len(seeds)} | {fid_cell} | {stopped} | {fmt(kid, 1)} | {acc_cell} | "
                     f"{copy_cell} | {fmt(ratio)} | {change} | {fmt(secs, 0)} |")
    settings = settings or {}
    from benchmark import evaluate

    target = MINIATURES[settings.get("miniature", "mnist")]["target"]
    floor = evaluate.real_vs_real(target, settings.get("shots_per_class"))
    notes = (f"\nFID/KID: the feature space of a small {target} classifier (KID in its raw units), against "
             f"{floor['num_reference']} held-out {target} images. Real vs real (its {floor['num_real']} held-out "
             f"check images against the same reference): FID {floor['fid']:.1f}, KID {floor['kid_mean']:.1f}. "
             "Copy rate: share of samples closer to a few-shot training image than 95% of unseen real images are "
             "(unseen real images: about 0.05; copies of the training set: 1.0). NN ratio: median distance to the "
             "nearest training image over distance to the nearest reference image (copies: 0; higher = farther "
             "from the training images). Train (s): wall seconds of the training run, knowledge-bank build "
             "included. A difference of a few percent on one seed is within the noise: compare means over seeds "
             "and look at the per-seed signs.\n")
    if "second" in MINIATURES[settings.get("miniature", "mnist")]:
        notes += (f"In parentheses: the second feature space, a CNN of all ten classes ({target}_wide; other data, "
                  "other weights). A conclusion counts only where both spaces agree.\n")
    return "\n".join(lines) + "\n" + notes


def load_baselines(baseline_dir: str, settings: dict, arms: list[str]) -> dict[str, dict[int, dict]]:
    """The finished runs of ``baseline_dir``, refused in one sentence unless paired with ``settings``.

    The swept settings (extra flags, bank size) may differ; the authors' EMA decay only matters when an
    ``*_authors`` arm is the baseline.
    """
    baselines, base_settings = collect_results(baseline_dir)
    free = {"extra_flags", "knowledge_bank_size"}
    if not any(BASELINE_OF.get(arm, "").endswith("_authors") for arm in arms):
        free.add("authors_ema_decay")
    for name in RUN_SETTINGS:
        if name not in free and base_settings.get(name) != settings.get(name):
            raise ConfigError(f"--baseline_dir {baseline_dir} was run with --{name} {base_settings.get(name)}, "
                              f"not {settings.get(name)}: its runs are not paired with these.")
    return baselines


def main(args: argparse.Namespace) -> None:
    start = time.time()
    if args.summarize_only:
        results, settings = collect_results(args.output_dir)
        baselines = load_baselines(args.baseline_dir, settings, list(results)) if args.baseline_dir else None
        wall = ""
    else:
        settings = run_settings(args)
        # Checked before anything is written or trained.
        baselines = load_baselines(args.baseline_dir, settings, args.arms) if args.baseline_dir else None
        os.makedirs(args.output_dir, exist_ok=True)
        results = run_arms(args, write_target_folder(args))
        wall = f"; wall time {time.time() - start:.0f} s"
    baselines_from = args.baseline_dir or ""
    table = summarize(results, settings, baselines, baselines_from)
    extra = f"; extra flags {' '.join(settings['extra_flags'])}" if settings.get("extra_flags") else ""
    header = (f"Source {os.path.relpath(settings['source_model'], ROOT)}; target "
              f"{MINIATURES[settings.get('miniature', 'mnist')]['target']} "
              f"{settings['shots_per_class']}-shot; {settings['max_train_steps']} steps, batch "
              f"{settings['train_batch_size']}, lr {settings['learning_rate']} (PEFT arms 1e-3), knowledge bank "
              f"{settings['knowledge_bank_size']}; "
              f"{settings['num_samples']} samples, {settings['num_inference_steps']} DDPM steps, guidance "
              f"{settings['guidance_scale']}{extra}{wall}.\n\n")
    for path in filter(None, [os.path.join(args.output_dir, "results.md"), args.table]):
        with open(path, "w") as f:
            f.write(header + table)
    atomic_write_json(os.path.join(args.output_dir, "results.json"), {"settings": settings, "results": results})
    print(header + table)


if __name__ == "__main__":
    run_cli(main, parse_args)
