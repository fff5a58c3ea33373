#!/usr/bin/env python
"""The DreamBooth miniature: does Diff-Tuning's timestep split beat diffusers' prior preservation?

Base model: the tiny text-to-image model (benchmark/emoji_text2image_model, Twemoji + Noto Emoji with
their CLDR names), or its flow-matching counterpart (``--base_model benchmark/emoji_sd3_model``, SD3-shaped,
made by ``pretrain_text2image.py --family sd3``), where Diff-Tuning's split is over sigma. Subject
(``--subject``, SUBJECTS): nine images of one kind of emoji in a style the base never saw, by default
OpenMoji's nine cat faces (black outlines, flat fills): five train the LoRA ("sks cat face"), two choose
each run's checkpoint, two are the fidelity reference. Class prompt: "cat face", a 🐱 the base model draws
in its own styles. ``--base_only`` scores the base model itself against a subject (its fidelity before
training), and every run records that point too: ``dreambooth_frontier`` draws each run's curve from it.

Every arm is one ``train_dreambooth_lora_difftuning.py`` run (the real script) with the same steps,
batch, learning rate and seed, saving a LoRA checkpoint every ``--eval_every`` steps. Each checkpoint
then samples, from the same initial noise in every arm (DPM-Solver++ for SD, the pipeline's own Euler
sampler for SD3: both deterministic), K images of the subject prompt, of the class prompt and of each
unrelated prompt. Metrics, in two feature spaces (the penultimate layers of the OpenMoji CNN and of the
held-out emoji CNN; cosine similarity):

* ``fidelity``: subject samples against the two reference images (DreamBooth's DINO / CLIP-I role);
* ``val_fidelity``: the same against the two validation images: it picks the checkpoint (early stopping);
* ``pres``: class-prompt samples against the subject's nine images (DreamBooth's PRES; lower = the class
  did not collapse onto the subject);
* ``prior_kept``: class-prompt samples against the base model's at the same noise (higher = kept);
* ``drift``: 1 - the same paired similarity on unrelated prompts (lower = less forgetting);
* ``div``: mean pairwise distance among subject samples (DreamBooth's DIV).

Arms are compared at their validation-chosen checkpoint, paired by seed (mean difference, paired t-test).

    python -m benchmark.dreambooth_benchmark --output_dir outputs/dreambooth --seeds 0 1 2 3 4
    python -m benchmark.dreambooth_benchmark --base_model benchmark/emoji_sd3_model \
        --output_dir outputs/dreambooth_sd3 --seeds 0 1 2 3 4

Finished runs are reused (their settings are checked), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from dataclasses import dataclass

import numpy as np
import torch

import model_families as mf
from benchmark import runner
from benchmark.runner import ROOT
from difftuning_common import ConfigError, atomic_write_json
from training_plumbing import run_cli

UNRELATED_PROMPTS = ("grinning face", "red heart", "dog face", "pizza", "rocket", "sun")


@dataclass(frozen=True)
class Subject:
    """A DreamBooth subject: nine images of one kind of emoji in one vendor's style, split by SUBJECT_SPLIT."""

    vendor: str  # "openmoji", or a key of emoji_data.ICONIFY_PACKAGES
    names: tuple[str, ...]  # the nine images: OpenMoji's CLDR names, or the Iconify set's icon names
    class_prompt: str  # a name the base model was trained on; the instance prompt is "sks <class prompt>"

    @property
    def instance_prompt(self) -> str:
        return f"sks {self.class_prompt}"


CATS = ("grinning cat", "grinning cat with smiling eyes", "cat with tears of joy", "smiling cat with heart-eyes",
        "cat with wry smile", "kissing cat", "weary cat", "crying cat", "pouting cat")  # in OpenMoji's order
MOONS = ("new moon", "waxing crescent moon", "first quarter moon", "waxing gibbous moon", "full moon",
         "waning gibbous moon", "last quarter moon", "waning crescent moon", "crescent moon")
CLOCKS = ("one o’clock", "two o’clock", "three o’clock", "four o’clock", "five o’clock", "six o’clock",
          "seven o’clock", "eight o’clock", "nine o’clock")

HANDS = ("OK hand", "pinched fingers", "pinching hand", "victory hand", "crossed fingers",
         "hand with index finger and thumb crossed", "love-you gesture", "sign of the horns", "call me hand")


def slugs(names: tuple[str, ...]) -> tuple[str, ...]:
    """CLDR names as Iconify icon names ("cat with wry smile" -> "cat-with-wry-smile")."""
    return tuple(n.lower().replace("’", "").replace(" ", "-") for n in names)


# The candidates the frontier's subjects were registered from (docs/results.md, "DreamBooth frontier").
SUBJECTS: dict[str, Subject] = {
    "openmoji_cat_face": Subject("openmoji", CATS, "cat face"),  # the miniature's first subject
    "openmoji_moon": Subject("openmoji", MOONS, "moon"),
    "openmoji_clock": Subject("openmoji", CLOCKS, "clock"),
    "fluent_flat_cat_face": Subject("fluent_flat", slugs(CATS), "cat face"),
    "fluent_flat_moon": Subject("fluent_flat", slugs(MOONS), "moon"),
    "fluent_flat_clock": Subject("fluent_flat", slugs(CLOCKS), "clock"),
    "emojione_v1_cat_face": Subject("emojione_v1", (  # Unicode's names, as this set spells them
        "grinning-cat-face", "grinning-cat-face-with-smiling-eyes", "cat-face-with-tears-of-joy",
        "smiling-cat-face-with-heart-eyes", "cat-face-with-wry-smile", "kissing-cat-face", "weary-cat-face",
        "crying-cat-face", "pouting-cat-face"), "cat face"),
    "openmoji_hand": Subject("openmoji", HANDS, "hand"),
    "fluent_flat_hand": Subject("fluent_flat", slugs(HANDS), "hand"),
    "emojione_v1_moon": Subject("emojione_v1", slugs(MOONS), "moon"),
    "emojione_v1_clock": Subject("emojione_v1", slugs(CLOCKS), "clock"),
}
DEFAULT_SUBJECT = "openmoji_cat_face"  # what runs made before subjects were named ran with
# The arms' flags; "{class_prompt}" is the subject's.
PRIOR = ["--with_prior_preservation", "--class_prompt", "{class_prompt}"]
ARMS: dict[str, list[str]] = {
    "plain": [],  # DreamBooth LoRA without prior preservation
    "prior": PRIOR,  # diffusers' prior preservation: class samples at the subject's uniform timesteps
    "difftuning_class": ["--difftuning", *PRIOR],  # subject at psi, class-prompt bank at xi
    "difftuning_empty": ["--difftuning", "--with_prior_preservation", "--class_prompt", ""],  # empty-prompt bank
    "psi_only": ["--difftuning"],  # subject at psi, no bank
}
BASELINES = ("prior", "plain")
SETTING_DEFAULTS = {"subject": DEFAULT_SUBJECT}  # of settings added after older runs were made
METRICS = {"fidelity": "higher", "pres": "lower", "prior_kept": "higher", "drift": "lower", "div": "higher"}
FEATURE_SPACES = ("openmoji", "emoji_heldout")
BASE_SAMPLE_SETTINGS = ("base_model", "subject", "samples_per_prompt", "num_inference_steps", "guidance_scale")
RUN_SETTINGS = ("base_model", "subject", "max_train_steps", "train_batch_size", "learning_rate", "rank", "eval_every",
                "num_class_images", "samples_per_prompt", "num_inference_steps", "guidance_scale", "extra_flags")
SUBJECT_SPLIT = {"train": [0, 2, 4, 6, 8], "val": [1, 5], "reference": [3, 7]}  # of the nine, in OpenMoji order
# Evaluation sampling per base pipeline, the defaults of --num_inference_steps and --guidance_scale. SD: DPM-Solver++
# (second order). SD3: the pipeline's flow-matching Euler sampler, first order, so twice the steps; the same
# guidance as SD (the SD3 miniature's sample grid is drawn at 4 too).
SAMPLING_DEFAULTS = {"StableDiffusionPipeline": {"num_inference_steps": 10, "guidance_scale": 4.0},
                     "StableDiffusion3Pipeline": {"num_inference_steps": 20, "guidance_scale": 4.0}}


# ----------------------------------------------------------------------------------------------
# Subject, sampling, features
# ----------------------------------------------------------------------------------------------


@functools.cache
def subject_images(name: str = DEFAULT_SUBJECT) -> np.ndarray:
    """The subject's nine images, uint8 [9, 32, 32, 3] on white, in the order of its names."""
    from benchmark import emoji_data

    subject = SUBJECTS[name]
    if subject.vendor != "openmoji":
        return emoji_data.load_iconify(subject.vendor, list(subject.names))
    openmoji = emoji_data.load_openmoji()
    return openmoji.images[[openmoji.names.index(n) for n in subject.names]]


def write_instance_folder(output_dir: str, name: str = DEFAULT_SUBJECT) -> str:
    """The five training images of the subject as a flat image folder (DreamBooth's --instance_data_dir)."""
    from PIL import Image

    folder = os.path.join(output_dir, "subject")
    if not os.path.isdir(folder):
        tmp = folder + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        for i in SUBJECT_SPLIT["train"]:
            Image.fromarray(subject_images(name)[i]).save(os.path.join(tmp, f"{name}-{i}.png"))
        os.replace(tmp, folder)
    return folder


def eval_prompts(name: str = DEFAULT_SUBJECT) -> list[str]:
    """The subject's instance prompt, its class prompt, then the unrelated prompts of ``drift``."""
    subject = SUBJECTS[name]
    return [subject.instance_prompt, subject.class_prompt, *UNRELATED_PROMPTS]


def arm_flags(arm: str, name: str = DEFAULT_SUBJECT) -> list[str]:
    """The training flags of ``arm`` for subject ``name``."""
    return [flag.format(class_prompt=SUBJECTS[name].class_prompt) for flag in ARMS[arm]]


@torch.no_grad()
def generate(pipe, lora_dir: str | None, args: argparse.Namespace) -> np.ndarray:
    """uint8 [P, K, 32, 32, 3]: K samples of each evaluation prompt, from the same initial noise whatever the
    LoRA (``None``: the base model), so every comparison is paired."""
    if lora_dir is not None:
        with runner.MODEL_LOAD_LOCK:  # see runner.MODEL_LOAD_LOCK: parallel runs are threads
            pipe.load_lora_weights(lora_dir)
    prompts, k = eval_prompts(args.subject), args.samples_per_prompt
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    shape = (k, denoiser.config.in_channels, 8, 8)
    # SD3: T5's length (the zeros in its place) as the DreamBooth script trains and samples its class images
    call_kwargs = mf.family_class(type(pipe).__name__)(pipe).call_kwargs
    images = []
    for p, prompt in enumerate(prompts):
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + p))
        out = pipe([prompt] * k, latents=latents, height=32, width=32, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, output_type="np", **call_kwargs).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    if lora_dir is not None:
        pipe.unload_lora_weights()
    return np.stack(images)


def pipeline_class_name(base_model: str) -> str:
    """The base model's pipeline class, from its ``model_index.json``."""
    with open(os.path.join(base_model, "model_index.json")) as f:
        return json.load(f)["_class_name"]


def load_pipeline(base_model: str):
    """The base pipeline with its evaluation sampler: DPM-Solver++ for SD, SD3's own (flow-matching Euler)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    with runner.MODEL_LOAD_LOCK:
        if pipeline_class_name(base_model) == "StableDiffusion3Pipeline":  # saved without T5, as the miniature is
            pipe = StableDiffusion3Pipeline.from_pretrained(base_model, text_encoder_3=None, tokenizer_3=None)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def feature_model(space: str):
    """The feature CNN of ``space``, loaded once per process (under ``runner.MODEL_LOAD_LOCK``)."""
    from benchmark import evaluate

    with runner.MODEL_LOAD_LOCK:
        return evaluate.load_or_train_classifier(target=space)[0]


def features(images: np.ndarray, space: str) -> torch.Tensor:
    """L2-normalised penultimate features [..., 64] of uint8 images [..., 32, 32, 3]."""
    from benchmark import emoji_data, evaluate

    flat = images.reshape(-1, *images.shape[-3:])
    feats = evaluate.classify(feature_model(space), emoji_data.to_model_range(flat))[0]
    return torch.nn.functional.normalize(feats, dim=1).reshape(*images.shape[:-3], -1)


def metrics(samples: np.ndarray, base: np.ndarray, space: str, name: str = DEFAULT_SUBJECT) -> dict[str, float]:
    """The miniature's metrics (see the module docstring) of ``samples`` [P, K, ...] in one feature space."""
    f, b, subject = features(samples, space), features(base, space), features(subject_images(name), space)
    mean_sim = lambda x, y: (x @ y.T).mean().item()  # noqa: E731
    subject_f, class_f = f[0], f[1]
    k = subject_f.shape[0]
    pairwise = subject_f @ subject_f.T
    return {"fidelity": mean_sim(subject_f, subject[SUBJECT_SPLIT["reference"]]),
            "val_fidelity": mean_sim(subject_f, subject[SUBJECT_SPLIT["val"]]),
            "pres": mean_sim(class_f, subject),
            "prior_kept": (class_f * b[1]).sum(-1).mean().item(),
            "drift": 1 - (f[2:] * b[2:]).sum(-1).mean().item(),
            "div": 1 - ((pairwise.sum() - pairwise.diagonal().sum()) / (k * (k - 1))).item()}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_model", default=os.path.join(ROOT, "benchmark", "emoji_text2image_model"))
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "dreambooth_benchmark"))
    parser.add_argument("--subject", choices=list(SUBJECTS), default=DEFAULT_SUBJECT,
                        help="The subject (SUBJECTS): nine images of one kind of emoji in one vendor's style.")
    parser.add_argument("--base_only", action="store_true",
                        help="Train nothing: the base model's own metrics for the subject (its fidelity before "
                             "training) and the subject's ceiling, into <output_dir>/base_metrics.json.")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--train_batch_size", type=int, default=4, help="Subject images per step (upstream's 4).")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--eval_every", type=int, default=50, help="Checkpoint and evaluate every N steps.")
    parser.add_argument("--num_class_images", type=int, default=100, help="Class samples (upstream's 100).")
    parser.add_argument("--samples_per_prompt", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Sampling steps when evaluating; default by base pipeline: 10 DPM-Solver++ steps for SD, "
                             "20 Euler steps for SD3 (SAMPLING_DEFAULTS).")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Guidance when evaluating; default 4.0 for SD and SD3 (SAMPLING_DEFAULTS).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs in parallel, one CPU thread each.")
    parser.add_argument("--table", default=None,
                        help="Where the markdown table goes (default: <output_dir>/results.md).")
    parser.add_argument("--summarize_only", action="store_true", help="Train nothing: tabulate finished runs.")
    parser.add_argument("--records_json", default=None,
                        help="The per-run records as one file: written after the runs; with --summarize_only, the "
                             "runs are read from it instead of --output_dir (a committed table re-derived).")
    parser.add_argument("--extra_flags", nargs=argparse.REMAINDER, default=[],
                        help="Flags passed on to every training run (last on the line).")
    args = parser.parse_args(argv)
    runner.refuse_secret_flags(parser, args.extra_flags)
    if args.summarize_only and args.records_json and not os.path.isfile(args.records_json):
        parser.error(f"--records_json {args.records_json} does not exist (with --summarize_only it is read).")
    has_model = os.path.isfile(os.path.join(args.base_model, "model_index.json"))
    if not args.summarize_only and not has_model:
        parser.error(f"--base_model {args.base_model} is not a pipeline folder (no model_index.json); make it with "
                     "`python -m benchmark.pretrain_text2image` (--family sd3 for the flow-matching one).")
    # --summarize_only without the model: SD's (the settings matter only to runs that start)
    kind = pipeline_class_name(args.base_model) if has_model else "StableDiffusionPipeline"
    if kind not in SAMPLING_DEFAULTS:
        parser.error(f"--base_model {args.base_model} is a {kind}; this benchmark runs "
                     f"{' and '.join(SAMPLING_DEFAULTS)}.")
    for name, value in SAMPLING_DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag in ("max_train_steps", "train_batch_size", "rank", "eval_every", "num_class_images",
                 "samples_per_prompt", "num_inference_steps", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.samples_per_prompt < 2:
        parser.error("--samples_per_prompt must be >= 2 (diversity compares samples with each other).")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    return runner.run_settings(args, RUN_SETTINGS, "base_model")


def base_samples(args: argparse.Namespace, pipe) -> np.ndarray:
    """The base model's samples, made once per output folder with the settings beside them
    (``base_samples.json``); samples made with other settings are refused, not compared against."""
    path, settings_path = (os.path.join(args.output_dir, f"base_samples.{ext}") for ext in ("npz", "json"))
    settings = {name: getattr(args, name) for name in BASE_SAMPLE_SETTINGS}
    settings["base_model"] = os.path.abspath(settings["base_model"])
    if os.path.exists(path):
        if os.path.exists(settings_path):
            stored = {"subject": DEFAULT_SUBJECT, **json.load(open(settings_path))}  # kept before subjects had names
            if stored != settings:
                differ = ", ".join(f"--{k} {stored.get(k)}" for k in settings if stored.get(k) != settings[k])
                raise ConfigError(f"{path} was made with {differ}: use another --output_dir or the same settings.")
        elif type(pipe).__name__ != "StableDiffusionPipeline":  # made before the settings were kept: SD's
            raise ConfigError(f"{path} holds another base model's samples (made before {settings_path} was kept): "
                              "use another --output_dir.")
    else:
        np.savez_compressed(path + ".tmp.npz", images=generate(pipe, None, args))
        atomic_write_json(settings_path, settings)
        os.replace(path + ".tmp.npz", path)
    return np.load(path)["images"]


def base_metrics(args: argparse.Namespace, base: np.ndarray) -> dict:
    """The base model's own metrics for the subject (``base``: at step 0 every run starts here: its fidelity is
    what the subject prompt draws before training) and the subject's ``ceiling`` (its training images scored as
    samples would be: mean similarity to the two reference images), per feature space; kept in
    ``base_metrics.json``."""
    path = os.path.join(args.output_dir, "base_metrics.json")
    if os.path.exists(path):
        return json.load(open(path))
    images = subject_images(args.subject)
    report = {"subject": args.subject, "base": {space: metrics(base, base, space, args.subject)
                                                for space in FEATURE_SPACES}, "ceiling": {}}
    for space in FEATURE_SPACES:
        f = features(images, space)
        report["ceiling"][space] = {
            "fidelity": (f[SUBJECT_SPLIT["train"]] @ f[SUBJECT_SPLIT["reference"]].T).mean().item(),
            "val_fidelity": (f[SUBJECT_SPLIT["train"]] @ f[SUBJECT_SPLIT["val"]].T).mean().item()}
    atomic_write_json(path, report)
    return report


def train_and_evaluate(args: argparse.Namespace, arm: str, seed: int, subject: str) -> dict:
    """One arm = one run of the real script, then the metrics of every checkpoint and the chosen one."""
    out = runner.start_run(args.output_dir, arm, seed, run_settings(args), SETTING_DEFAULTS)
    result_path = os.path.join(out, "result.json")
    if os.path.exists(result_path):
        return json.load(open(result_path))
    bank = "class" if "{class_prompt}" in ARMS[arm] else "empty"
    cmd = [*runner.script_command("train_dreambooth_lora_difftuning.py"), "--pretrained_model_name_or_path",
           args.base_model, "--instance_data_dir", subject, "--instance_prompt", SUBJECTS[args.subject].instance_prompt,
           "--output_dir", out,
           "--resolution", "32", "--random_flip", "--seed", str(seed), "--max_train_steps",
           str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size), "--learning_rate",
           str(args.learning_rate), "--lr_warmup_steps", "0", "--rank", str(args.rank), "--checkpointing_steps",
           str(args.eval_every), "--num_class_images", str(args.num_class_images), "--report_to", "none",
           "--num_validation_images", "2", *arm_flags(arm, args.subject), *args.extra_flags]
    if "--with_prior_preservation" in ARMS[arm]:
        cmd += ["--class_data_dir", os.path.join(args.output_dir, "banks", f"{bank}-seed{seed}")]
    runner.train_once(cmd, out, "pytorch_lora_weights.safetensors",
                      f"train_dreambooth_lora_difftuning.py for {arm} seed {seed}")
    torch.set_num_threads(1)
    pipe = load_pipeline(args.base_model)
    base = base_samples(args, pipe)
    curve_path = os.path.join(out, "curve.json")
    curve = json.load(open(curve_path)) if os.path.exists(curve_path) else {}
    checkpoints = sorted(int(d.split("-")[1]) for d in os.listdir(out)
                         if d.startswith("checkpoint-") and not d.endswith(".tmp"))
    for step in checkpoints:
        if str(step) not in curve:
            samples = generate(pipe, os.path.join(out, f"checkpoint-{step}"), args)
            np.savez_compressed(os.path.join(out, f"samples-{step}.npz"), images=samples)
            curve[str(step)] = {space: metrics(samples, base, space, args.subject) for space in FEATURE_SPACES}
            atomic_write_json(curve_path, curve)
    # Early stopping: the checkpoint whose subject samples are closest to the validation images (first space).
    chosen = max(curve, key=lambda s: (curve[s][FEATURE_SPACES[0]]["val_fidelity"], -int(s)))
    result = {"arm": arm, "seed": seed, "subject": args.subject, "chosen_step": int(chosen), "chosen": curve[chosen],
              "final": curve[str(max(checkpoints))], "curve": curve, "base": base_metrics(args, base)["base"],
              "train_seconds": runner.train_seconds(out)}
    atomic_write_json(result_path, result)
    chosen_metrics = result["chosen"][FEATURE_SPACES[0]]
    print(f"[dreambooth benchmark] {arm} seed {seed}: step {chosen} chosen, fidelity {chosen_metrics['fidelity']:.3f}, "
          f"prior kept {chosen_metrics['prior_kept']:.3f}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def paired_tests(results: dict[str, dict[int, dict]], arm: str, baseline: str, metric: str,
                 at: str = "chosen") -> dict[str, dict]:
    """Per feature space: arm - baseline paired by seed, and the paired t-test's p (``dreambooth_frontier.paired``)."""
    from benchmark.dreambooth_frontier import paired

    return {space: paired({s: r[at][space][metric] for s, r in results.get(arm, {}).items()},
                          {s: r[at][space][metric] for s, r in results.get(baseline, {}).items()})
            for space in FEATURE_SPACES}


def records_to_results(runs: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """A records file's ``{"ARM-seedN": result}`` as {arm: {seed: result}}, arms in ARMS order."""
    results: dict[str, dict[int, dict]] = {}
    for arm in ARMS:
        for name, result in sorted(runs.items()):
            if (seed := runner.run_seed(name, arm)) is not None:
                results.setdefault(arm, {})[seed] = result
    return results


def summarize(results: dict[str, dict[int, dict]], at: str = "chosen") -> str:
    """Markdown: per arm and feature space, mean ± std over seeds of each metric; then each arm against
    prior preservation and plain DreamBooth (difference, paired p)."""
    lines = []
    for space in FEATURE_SPACES:
        lines += [f"**{space} features** ({'validation-chosen checkpoint' if at == 'chosen' else 'last checkpoint'})",
                  "", "| arm | seeds | step | " + " | ".join(f"{m} ({d})" for m, d in METRICS.items()) + " |",
                  "|---|---|---|" + "---|" * len(METRICS)]
        for arm, runs in results.items():
            cells = []
            for metric in METRICS:
                values = [r[at][space][metric] for r in runs.values()]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
            steps = statistics.mean(r["chosen_step"] for r in runs.values()) if at == "chosen" else "last"
            lines.append(f"| {arm} | {len(runs)} | {steps} | " + " | ".join(cells) + " |")
        lines.append("")
    from benchmark.dreambooth_frontier import format_test, verdict

    for baseline in (b for b in BASELINES if b in results):
        lines += [f"Against `{baseline}` (mean paired difference, paired t-test p, in the {' / '.join(FEATURE_SPACES)} "
                  "feature spaces; a verdict (higher / lower) needs p < 0.05 in both spaces with one sign):", "",
                  "| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for arm in results:
            if arm == baseline:
                continue
            cells = []
            for metric in METRICS:
                tests = paired_tests(results, arm, baseline, metric, at)
                cells.append(" / ".join(format_test(t) for t in tests.values()) + f": {verdict(tests, 0.05)}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    if args.base_only:
        torch.set_num_threads(1)
        report = base_metrics(args, base_samples(args, load_pipeline(args.base_model)))
        for space in FEATURE_SPACES:
            print(f"[dreambooth benchmark] {args.subject}, {space} features: the base model's fidelity "
                  f"{report['base'][space]['fidelity']:.3f} (validation {report['base'][space]['val_fidelity']:.3f}); "
                  f"the subject's own training images {report['ceiling'][space]['fidelity']:.3f}", flush=True)
        return
    if not args.summarize_only:
        subject = write_instance_folder(args.output_dir, args.subject)
        base_samples(args, load_pipeline(args.base_model))  # once, before the parallel runs
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
        runner.run_all(lambda arm, seed: train_and_evaluate(args, arm, seed, subject), jobs, args.jobs)
    if args.summarize_only and args.records_json:
        results = records_to_results(json.load(open(args.records_json))["runs"])
    else:
        results, _ = runner.collect_results(args.output_dir, ARMS, "result.json", SETTING_DEFAULTS)
        if args.records_json:
            atomic_write_json(args.records_json, {
                "command": "python -m benchmark.dreambooth_benchmark " + " ".join(sys.argv[1:]),
                "base_model": os.path.relpath(args.base_model, ROOT),
                "runs": {f"{arm}-seed{seed}": result for arm, runs in results.items()
                         for seed, result in runs.items()}})
    table = summarize(results) + "\n" + summarize(results, at="final")
    print(table)
    with open(args.table or os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    run_cli(main, parse_args)
