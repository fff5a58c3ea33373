"""Training plumbing shared by both Diff-Tuning scripts (not the method: see difftuning_utils.py).

Flags common to diffusers' example scripts, accelerator set-up, deterministic data order and
augmentation, atomic checkpoints with exact resume, optimizer/lr schedule, image logging,
model card and Hub upload: written once here, imported by train_dit_difftuning.py and
train_controlnet_difftuning.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import importlib
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import create_repo, upload_folder
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from difftuning_common import ConfigError, atomic_write_json, derive_seed, disk_space_guard

logger = get_logger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Never uploaded: resumable checkpoints, the knowledge bank, half-written files.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "knowledge_bank/**", "class_images/**",
                       "class_images.knowledge_bank/**", "*.tmp*", "step_*", "epoch_*"]
# Flags whose values are secrets: never sent to a tracker, written to a card or a log, or uploaded.
SECRET_FLAGS = ("hub_token",)


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, data_dir_flag: str = "--train_data_dir",
                    data_dir_help: str = "A local folder of training data, read with datasets' 'imagefolder' builder."
                    ) -> None:
    """The flags every diffusers example script has, with upstream names and defaults. The local data
    folder is ``--train_data_dir`` (DreamBooth: ``--instance_data_dir``); either way ``args.train_data_dir``."""
    model = parser.add_argument_group("Model")
    model.add_argument("--revision", type=str, default=None, help="Revision of the pre-trained model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    model.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")

    data = parser.add_argument_group("Data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="Dataset on the Hub (or a local dataset script/folder for datasets.load_dataset).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config name.")
    data.add_argument(data_dir_flag, dest="train_data_dir", type=str, default=None, help=data_dir_help)
    data.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Truncate the training set to this many samples (debugging, quick runs).")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Subprocesses for data loading (kept alive across epochs); 0 loads in the main process.")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Every training image is fully decoded once before the first step. By default an "
                           "unreadable or truncated one stops the run, naming it (a silently smaller dataset is not "
                           "what you asked for); with this flag such rows are left out, each named in a warning.")
    data.add_argument("--cache_latents", action="store_true",
                      help="Encode every training image once (and its mirror image with --random_flip) before "
                           "training and keep the VAE posteriors; each step then draws a posterior sample from them "
                           "(no VAE pass, no image decoding), which is the same distribution as encoding every step.")

    train = parser.add_argument_group("Training")
    train.add_argument("--output_dir", type=str, required=False, help="Where the model and checkpoints are written.")
    train.add_argument("--seed", type=int, default=0,
                       help="The seed of everything random in the run (data order, augmentation, noise, adapter "
                            "initialisation, bank), so the same command trains the same model (DiT's train.py "
                            "defaults its seed to 0 too).")
    train.add_argument("--train_batch_size", type=int, default=4,
                       help="Batch size per device; with --difftuning it includes the knowledge-bank samples "
                            "(--retention_ratio of it).")
    train.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the data, if no --max_train_steps.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches accumulated before each optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Trade compute for memory by recomputing activations in the backward pass.")
    train.add_argument("--learning_rate", type=float, default=5e-6, help="Initial learning rate (after warmup).")
    train.add_argument("--scale_lr", action="store_true",
                       help="Scale the lr by the number of GPUs, accumulation steps and batch size.")
    train.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                       help="The learning-rate schedule (diffusers' get_scheduler).")
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the lr scheduler.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="Gradient clipping norm; 0 turns clipping off (the Diff-Tuning authors do not clip).")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Mixed precision; defaults to accelerate's config.")
    train.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 matmuls and convolutions on Ampere and newer GPUs (the fp32 parts of mixed "
                            "precision and all of fp32 training); --no-allow_tf32 for full fp32.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs xformers and a CUDA GPU; PyTorch SDPA is the default).")
    train.add_argument("--set_grads_to_none", action="store_true", help="Free gradients instead of zeroing them.")
    train.add_argument("--torch_compile", action="store_true",
                       help="Compile the denoiser of the training step (DiT's transformer; the ControlNet and its "
                            "UNet; DreamBooth's UNet or transformer) with torch.compile (inductor): faster steps after "
                            "a one-off compile (a minute or more at full size). Only the training step runs compiled: "
                            "checkpoints, the saved model and validation are unchanged.")
    train.add_argument("--ddp_timeout", type=int, default=1800,
                       help="Seconds a process waits in a collective (a barrier, a gradient all-reduce) before it "
                            "fails with a traceback instead of hanging; multi-process runs only.")

    ckpt = parser.add_argument_group("Checkpoints")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500,
                      help="Save a resumable checkpoint every N optimizer steps.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help='A checkpoint folder, or "latest" for the newest in --output_dir.')

    val = parser.add_argument_group("Validation")
    val.add_argument("--validation_steps", type=int, default=100, help="Run validation every N optimizer steps.")
    val.add_argument("--num_validation_images", type=int, default=4, help="Images generated per validation input.")

    log = parser.add_argument_group("Logging and Hub")
    log.add_argument("--logging_steps", type=int, default=10,
                     help="Read the losses and log them (and throughput) every N optimizer steps; the GPU is not "
                          "synchronised in between.")
    log.add_argument("--report_to", type=str, default="tensorboard", choices=REPORT_TO,
                     help="Where to log (accelerate's trackers): one of them, all installed ones, or none.")
    log.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, under --output_dir.")
    log.add_argument("--tracker_project_name", type=str, default=None, help="Project name passed to the trackers.")
    log.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub.")
    log.add_argument("--hub_token", type=str, default=None,
                     help="Token for the Hub, used only to authenticate: never tracked, logged or written (`hf auth "
                          "login` keeps it off the command line too).")
    log.add_argument("--hub_model_id", type=str, default=None, help="Hub repository; default: output_dir's name.")


class Range(NamedTuple):
    """The values a numeric flag accepts: ``low`` .. ``high`` (None: unbounded), each end closed unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SEED = Range(0, 2**32 - 1)  # numpy's seed range (accelerate's set_seed seeds numpy too)
# Every numeric flag of the three scripts, in one table (a flag a script lacks is skipped). The float flags are
# also refused when non-finite. Checks that need more than the value (a resolution the VAE can divide, a density
# that does not collapse, a batch the data can fill) are made where that is known, still before the model loads.
FLAG_RANGES: dict[str, Range] = {
    # training_plumbing.add_common_args
    "learning_rate": POSITIVE, "seed": SEED, "train_batch_size": AT_LEAST_ONE, "num_train_epochs": AT_LEAST_ONE,
    "max_train_steps": AT_LEAST_ONE, "gradient_accumulation_steps": AT_LEAST_ONE, "lr_warmup_steps": NOT_NEGATIVE,
    "lr_num_cycles": AT_LEAST_ONE, "lr_power": POSITIVE, "adam_beta1": FRACTION, "adam_beta2": FRACTION,
    "adam_weight_decay": NOT_NEGATIVE, "adam_epsilon": POSITIVE, "max_grad_norm": NOT_NEGATIVE,
    "ddp_timeout": AT_LEAST_ONE, "checkpointing_steps": AT_LEAST_ONE, "checkpoints_total_limit": AT_LEAST_ONE,
    "validation_steps": AT_LEAST_ONE, "num_validation_images": AT_LEAST_ONE, "logging_steps": AT_LEAST_ONE,
    "max_train_samples": AT_LEAST_ONE, "dataloader_num_workers": NOT_NEGATIVE, "resolution": Range(8),
    "validation_num_inference_steps": AT_LEAST_ONE,
    # LoRA (add_lora_args; --lora_alpha may be negative, as upstream, and 0 is refused by lora_alpha)
    "rank": AT_LEAST_ONE,
    # Diff-Tuning (difftuning_utils.add_difftuning_args)
    "difftuning_tau": NOT_NEGATIVE, "retention_tau": NOT_NEGATIVE, "retention_ratio": FRACTION,
    "retention_weight": NOT_NEGATIVE, "knowledge_bank_size": AT_LEAST_ONE, "knowledge_bank_batch_size": AT_LEAST_ONE,
    "knowledge_bank_num_inference_steps": AT_LEAST_ONE, "knowledge_bank_guidance_scale": NOT_NEGATIVE,
    "knowledge_bank_seed": SEED,
    # DiT
    "label_dropout_prob": FRACTION, "ema_decay": FRACTION, "validation_guidance_scale": NOT_NEGATIVE,
    # ControlNet
    "proportion_empty_prompts": Range(0, 1),
    # DreamBooth (and its flow-matching flags; --logit_mean is checked with the density it shapes)
    "num_class_images": AT_LEAST_ONE, "prior_loss_weight": NOT_NEGATIVE, "sample_batch_size": AT_LEAST_ONE,
    "snr_gamma": POSITIVE, "validation_epochs": AT_LEAST_ONE, "logit_std": POSITIVE,
    "mode_scale": Range(-1, 1.75),  # beyond, SD3's "mode" quantile 1 - u - s(cos^2(pi u / 2) - 1 + u) folds back
    "max_sequence_length": Range(1, 512), "guidance_scale": NOT_NEGATIVE, "repeats": AT_LEAST_ONE,
    "lora_dropout": FRACTION, "text_encoder_lr": POSITIVE, "adam_weight_decay_text_encoder": NOT_NEGATIVE,
    "prodigy_beta3": FRACTION, "tokenizer_max_length": AT_LEAST_ONE, "local_rank": Range(-1),  # -1: not launched
}
# Enumerations: argparse's choices (so --help lists them and a misspelling is refused as the flags are parsed).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio", "all",
             "none")


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse, naming the flag and the bound it breaks, a value outside :data:`FLAG_RANGES` or a non-finite float."""
    for name, value in vars(args).items():  # inf or nan in any numeric flag: nothing sensible can follow
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}.")
    for name, bounds in FLAG_RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        low, high, low_open, high_open = bounds
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high:
            if low is not None and high is not None:
                allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            elif too_low:
                allowed = f"{'>' if low_open else '>='} {low}"
            else:
                allowed = f"{'<' if high_open else '<='} {high}"
            raise ConfigError(f"--{name} must be {allowed}, got {value}.")


def validate_common_args(args: argparse.Namespace, data_dir_flag: str = "--train_data_dir") -> None:
    """Fail fast, naming the flag, on common settings that cannot work."""
    check_ranges(args)
    if not args.output_dir:
        raise ConfigError("--output_dir is required.")
    if args.dataset_name is None and args.train_data_dir is None:
        raise ConfigError(f"Specify either --dataset_name or {data_dir_flag}.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ConfigError(f"Specify only one of --dataset_name or {data_dir_flag}.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ConfigError(f"{data_dir_flag} {args.train_data_dir} is not a folder.")
    check_output_paths(args, data_dir_flag)
    if args.resolution is not None and args.resolution % 8 != 0:
        raise ConfigError(f"--resolution must be divisible by 8, got {args.resolution}.")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not (is_xformers_available() and torch.cuda.is_available()):
            raise ConfigError("--enable_xformers_memory_efficient_attention needs the xformers package and a CUDA "
                             "GPU; leave the flag out to use PyTorch's scaled-dot-product attention.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from err
    if args.hub_token and args.report_to in ("wandb", "all"):
        raise ConfigError(f"--report_to {args.report_to} with --hub_token would expose the token to wandb (as "
                          "upstream, refused); log in with `hf auth login` instead of passing --hub_token.")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ConfigError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder.")


# Flags that may name a local model folder, which --output_dir must not be: its files (weights, README with the
# licence) would be overwritten.
MODEL_FLAGS = ("pretrained_model_name_or_path", "controlnet_model_name_or_path", "pretrained_vae_model_name_or_path")


def _finished_bank(folder: str) -> bool:
    """Whether ``folder`` holds a finished knowledge bank with its preview: a run that reuses it writes nothing."""
    import json

    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            complete = json.load(f).get("complete")
    except (OSError, ValueError):
        return False
    return bool(complete) and os.path.exists(os.path.join(folder, "preview.png"))


def check_output_paths(args: argparse.Namespace, data_dir_flag: str) -> None:
    """Folders the run writes must be folders (or not exist yet), writable, not inside the training data (where
    the next run would read the model, checkpoints, samples or class images as training images) and not a model's
    folder. (DreamBooth's --class_data_dir may be read-only when it holds enough images; its script says so when
    it would have to write there.)"""
    outputs = {"--output_dir": args.output_dir}
    for flag in ("knowledge_bank_dir", "class_data_dir"):
        if getattr(args, flag, None):
            outputs[f"--{flag}"] = getattr(args, flag)
    data = os.path.realpath(args.train_data_dir) if args.train_data_dir else None
    for flag, path in outputs.items():
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a file; give a folder (new or existing).")
        real = os.path.realpath(path)
        if data and (real == data or real.startswith(data + os.sep)):
            raise ConfigError(f"{flag} {path} is inside {data_dir_flag} {args.train_data_dir}: the next run would "
                              "read what this one writes as training data; write it elsewhere.")
        existing = real
        while not os.path.exists(existing):  # the folder that will hold it, when it does not exist yet
            existing = os.path.dirname(existing)
        if flag == "--class_data_dir" or (flag != "--output_dir" and _finished_bank(path)):
            continue  # only read: a folder of class images with enough of them (as upstream), a finished bank
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path} is not writable ({existing} is read-only for this user); make it "
                              "writable or write elsewhere.")
    for flag in MODEL_FLAGS:
        model = getattr(args, flag, None)
        if model and os.path.isdir(model) and os.path.realpath(model) == os.path.realpath(args.output_dir):
            raise ConfigError(f"--output_dir {args.output_dir} is the folder of --{flag}: the run would overwrite "
                              "that model's files (its README with the licence, its weights); write elsewhere.")


def add_lora_args(group: argparse._ArgumentGroup) -> None:
    """The LoRA flags of diffusers' scripts, with their defaults."""
    group.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    group.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha; default: the rank.")
    group.add_argument("--lora_target_modules", type=str, default="to_k,to_q,to_v,to_out.0",
                       help="Comma-separated module names that get LoRA adapters.")


def lora_config(args: argparse.Namespace, target_modules: str | list[str] | None = None) -> Any:
    """peft's LoraConfig for the LoRA flags (diffusers' choice: Gaussian init, alpha = rank), with DreamBooth's
    --lora_dropout and --use_dora where the script has them. ``target_modules``: other targets than
    --lora_target_modules (the text encoders')."""
    from peft import LoraConfig

    if args.rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {args.rank}.")
    targets = target_modules or args.lora_target_modules
    if isinstance(targets, str):
        targets = [m.strip() for m in targets.split(",")]
    return LoraConfig(r=args.rank, lora_alpha=lora_alpha(args), init_lora_weights="gaussian",
                      target_modules=targets, lora_dropout=getattr(args, "lora_dropout", 0.0),
                      use_dora=getattr(args, "use_dora", False))


def str_to_bool(value: str) -> bool:
    """A boolean flag's value (true/false, yes/no, 1/0): upstream's ``type=bool`` takes any text, 'False'
    included, as True."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def lora_alpha(args: argparse.Namespace) -> int:
    """--lora_alpha, the rank when not given (the LoRA's output is scaled by alpha / rank; a negative alpha flips
    it, as in upstream's scripts); 0, which would silence the adapter, is refused."""
    if args.lora_alpha == 0:
        raise ConfigError("--lora_alpha must not be 0 (the LoRA's output is scaled by alpha / rank); leave it out "
                          "for alpha = rank.")
    return args.rank if args.lora_alpha is None else args.lora_alpha


def check_lora_targets(model: torch.nn.Module, targets: str) -> None:
    """Refuse, before any sample is generated, a --lora_target_modules entry that names no module of ``model`` (peft
    matches a module whose name is the entry or ends with "." + the entry; it fails only when nothing matches, after
    a knowledge bank may have been built, and a misspelt entry among good ones would be silently ignored)."""
    names = [name for name, _ in model.named_modules()]
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not wanted:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora_target_modules: {', '.join(repr(t) for t in missing) or 'nothing'} names no "
                          f"module of the {type(model).__name__} (its linear layers are named e.g. "
                          f"{', '.join(linear[:12])}).")


def run_cli(main: Any, parse_args: Any) -> None:
    """Run ``main(parse_args())``; bad input (a ConfigError) exits with status 2 and one sentence, no
    traceback. Anything else is a bug or an environment problem and keeps its traceback."""
    try:
        main(parse_args())
    except ConfigError as err:
        tqdm.write(f"error: {err}", file=sys.stderr)  # on a line of its own, also under a progress bar
        sys.exit(2)


def claims_output_dir(main: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Decorate a script's ``main``: the run holds an exclusive lock on ``--output_dir`` (an ``flock`` on the folder
    itself, taken by the main process, released when the run ends or dies), so a second run given the same folder
    is refused in one sentence instead of replacing the first run's checkpoints and weights. A folder created for
    the lock is removed again when the run is refused before writing anything into it."""

    @functools.wraps(main)
    def locked(args: argparse.Namespace) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # one lock per run, held by its main process
            return main(args)
        created = not os.path.exists(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        handle = os.open(args.output_dir, os.O_RDONLY)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"--output_dir {args.output_dir} is in use by another run (it holds the folder's "
                                  "lock); wait for that run to end or pass another --output_dir.") from None
            try:
                main(args)
            except ConfigError:
                if created:
                    with contextlib.suppress(OSError):
                        os.rmdir(args.output_dir)  # only when empty: nothing written is ever removed
                raise
        finally:
            os.close(handle)

    return locked


def load_pretrained(loader: Any, flag: str, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``loader(name_or_path, **kwargs)`` (a ``from_pretrained``), or one sentence naming ``flag`` that
    says whether a local folder or the Hub was tried and the innermost cause (diffusers' own message
    says "check the stack trace above", which a one-line error does not show)."""
    try:
        with whole_weights():
            return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        cause: BaseException = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if os.path.isdir(name_or_path):
            where = f"the folder {name_or_path} could not be loaded as {what}"
        elif os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            where = (f"{name_or_path} is not a local folder and the Hub is off (HF_HUB_OFFLINE is set); pass a "
                     f"local {what} folder")
        else:
            where = f"{name_or_path} is not a local folder and could not be loaded from the Hub as {what}"
        raise ConfigError(f"{flag}: {where} ({type(cause).__name__}: {reason}).") from err


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """Models loaded in this block are whole on every process, also under DeepSpeed ZeRO-3. accelerate registers its
    ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, and transformers' ``from_pretrained`` then
    partitions every model it loads (``deepspeed.zero.Init``): the frozen text encoders, never wrapped by a DeepSpeed
    engine, would run on empty shards, and a load on the main process alone would wait for the others. The trained
    model is partitioned by ``accelerator.prepare`` instead."""
    import accelerate.state

    plugin = accelerate.state.AcceleratorState().deepspeed_plugin if accelerate.state.is_initialized() else None
    registered = getattr(plugin, "dschf", None)
    if registered is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


class _DropKnownNoise(logging.Filter):
    """Upstream warnings that every run of these scripts triggers and that say nothing actionable."""

    NOISE = ("Expected types for id2label",  # DiTPipeline's id2label is saved as JSON, so its keys are strings
             "that should be kept in float32: []",  # any .to(dtype) of a model with an empty fp32 list
             "No LoRA keys associated to")  # load_lora_weights of a LoRA without text-encoder weights

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


def quiet_known_warnings() -> None:
    """Filter :class:`_DropKnownNoise` out of diffusers' log handler (its loggers all propagate to it)."""
    import diffusers  # noqa: F401  (configures the "diffusers" logger and its handler)

    for handler in logging.getLogger("diffusers").handlers:
        if not any(isinstance(f, _DropKnownNoise) for f in handler.filters):
            handler.addFilter(_DropKnownNoise())


# ----------------------------------------------------------------------------------------------
# Accelerator, optimizer, lr schedule
# ----------------------------------------------------------------------------------------------


def setup_accelerator(args: argparse.Namespace) -> tuple[Accelerator, torch.dtype]:
    """Accelerator and the dtype of frozen weights (trainable ones stay float32)."""
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # `accelerate launch --cpu --num_processes N` silently runs one process; forcing CPU here when no
        # GPU exists makes `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` or torchrun work.
        cpu=not torch.cuda.is_available(),
    )
    expected = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"WORLD_SIZE is {expected} but accelerate started {accelerator.num_processes} process(es).")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    quiet_known_warnings()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
    # --output_dir was made (empty) for its lock (claims_output_dir), which removes it again when the run is
    # refused before anything is written into it.
    check_sharding(accelerator, args)
    return accelerator, mixed_precision_dtype(accelerator)


def mixed_precision_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of mixed precision (float32 without): the frozen weights' and autocast's."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def create_optimizer(args: argparse.Namespace, params: Sequence[torch.nn.Parameter] | Sequence[dict]
                     ) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW, or with DreamBooth's --optimizer prodigy, Prodigy) over the trainable
    parameters: a list of them, or parameter groups whose own lr / weight_decay override the flags'."""
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
              "weight_decay": args.adam_weight_decay, "eps": args.adam_epsilon}
    if getattr(args, "optimizer", "adamw") == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as err:
            raise ConfigError("--optimizer prodigy needs prodigyopt: `pip install prodigyopt`.") from err
        if args.use_8bit_adam:
            logger.warning("--use_8bit_adam is ignored with --optimizer prodigy (as upstream).")
        return Prodigy(list(params), beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                       use_bias_correction=args.prodigy_use_bias_correction,
                       safeguard_warmup=args.prodigy_safeguard_warmup, **kwargs)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(list(params), **kwargs)
    # Fused AdamW (CPU and CUDA): one kernel for all tensors instead of a loop of small ones.
    return torch.optim.AdamW(list(params), fused=True, **kwargs)


# --quantize_base: name -> (backend package, what it is)
QUANTIZED_BASES = {
    "nf4": ("bitsandbytes", "bitsandbytes 4-bit NormalFloat, CUDA only (diffusers' Flux QLoRA example)"),
    "int8": ("torchao", "torchao int8 weight-only, CPU or GPU"),
    "fp8": ("torchao", "torchao float8 weight-only, CPU or GPU"),
}


def check_quantization_backend(kind: str | None) -> None:
    """Refuse --quantize_base, in one sentence and before any weights load, where its backend cannot run."""
    if kind is None:
        return
    if kind == "nf4" and not torch.cuda.is_available():
        raise ConfigError("--quantize_base nf4 needs a CUDA GPU (bitsandbytes quantizes on it); use int8 or fp8 "
                          "(torchao), which also run on the CPU.")
    package = QUANTIZED_BASES[kind][0]
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(f"--quantize_base {kind} needs {package}: `pip install {package}`.") from err


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """diffusers' quantization config of a --quantize_base kind; ``compute_dtype``: what the layers compute in."""
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())


def resolve_training_length(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_train_epochs) from the per-process dataloader length.

    Computed after ``accelerator.prepare`` so the length is per process; upstream computes it
    before sharding and gets the schedule wrong on several GPUs.
    """
    update_steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * update_steps_per_epoch
    return max_train_steps, math.ceil(max_train_steps / update_steps_per_epoch)


def create_lr_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_processes: int,
                        max_train_steps: int) -> Any:
    """diffusers' ``get_scheduler``; step counts are multiplied by the number of processes
    because the prepared scheduler steps once per process at every optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)


class StepGenerator:
    """The one source of randomness of a training step (noise, timesteps, label dropout).

    Per process: a CPU ``torch.Generator`` for small draws (timesteps, dropout masks) and, on a
    GPU, a device generator for the noise tensors so they are drawn where they are used (no
    host-to-device copy per step). Both states are saved in every checkpoint, so a resumed run
    draws exactly what a straight run would.
    """

    def __init__(self, seed: int, rank: int, device: torch.device | str = "cpu") -> None:
        seed = derive_seed(seed, "step", rank)
        self.generator = torch.Generator().manual_seed(seed)
        device = torch.device(device)
        self.device_generator = (torch.Generator(device).manual_seed(seed + 1) if device.type != "cpu"
                                 else self.generator)

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.device_generator, device=self.device_generator.device,
                           dtype=dtype).to(device)

    def rand(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator).to(device, non_blocking=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "device_generator": self.device_generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.device_generator.set_state(state["device_generator"])


# ----------------------------------------------------------------------------------------------
# Sharding: FSDP2 and DeepSpeed ZeRO (configs/accelerate/*.yaml, docs/sharding.md)
# ----------------------------------------------------------------------------------------------

# The units FSDP shards for models whose diffusers class declares no _no_split_modules (see fsdp_wrap_classes).
FSDP_UNITS = {
    # DiT's forward reads the first block's timestep and label embedding from outside that block, so a whole
    # BasicTransformerBlock cannot be a unit (its shards would not be gathered there): its attention and MLP
    # layers are, and the adaLN modulation layers stay in the root unit.
    "DiTTransformer2DModel": ("Attention", "FeedForward"),
    "ControlNetModel": ("BasicTransformerBlock", "ResnetBlock2D"),
}


def sharded_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the trained model's parameters (FSDP, DeepSpeed ZeRO-3). Then
    reading the weights whole (a checkpoint's inference copy, validation, the final save) is a collective that
    every process must join, and a copy of the parameters (an EMA) is a copy of one shard."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and zero_stage(accelerator) == 3


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage of the run's config."""
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def check_sharding(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Refuse, in one sentence, an accelerate config these scripts cannot honour, before any weights load; fill
    the DeepSpeed entries the flags decide (gradient clipping, left "auto" by configs/accelerate/)."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    kind = accelerator.distributed_type
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(env) and kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            import accelerate

            raise ConfigError(f"The accelerate config asks for {name}, but accelerate {accelerate.__version__} set up "
                              f"{kind.value} ({name} is only turned on for GPUs or other accelerators; torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s)): launch on GPUs, or without the config.")
    configured = accelerator.gradient_accumulation_steps  # accelerate lets its config's value win over ours
    if configured != args.gradient_accumulation_steps:
        raise ConfigError(f"The accelerate config sets gradient_accumulation_steps {configured} but "
                          f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: remove it from the "
                          "config (the flag decides) or pass the same value.")
    if getattr(args, "torch_compile", False):
        if accelerator.state.dynamo_plugin.backend.value != "NO":
            raise ConfigError("--torch_compile and accelerate's dynamo_backend both compile the model: keep one.")
        if kind == DistributedType.DEEPSPEED:
            raise ConfigError("--torch_compile cannot wrap DeepSpeed's engine (it gathers and frees parameters in "
                              "hooks torch.compile does not trace): leave the flag out, or use FSDP or DDP.")
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("The accelerate config uses FSDP1 (fsdp_version: 1); these scripts support FSDP2 "
                          "(fsdp_version: 2, as configs/accelerate/fsdp.yaml), which shards LoRA and frozen weights "
                          "together and clips a subset of parameters by their global norm.")
    if kind != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, ours in (("optimizer", "AdamW from the --adam_* flags"), ("scheduler", "--lr_scheduler")):
        if key in ds:
            raise ConfigError(f"The DeepSpeed config defines its own {key}; these scripts build theirs ({ours}): "
                              "remove it from the config.")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas != "auto" and int(gas) != args.gradient_accumulation_steps:
        raise ConfigError(f"The DeepSpeed config sets gradient_accumulation_steps {gas} but "
                          f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: set it to \"auto\".")
    clipping = ds.get("gradient_clipping", "auto")
    if clipping == "auto":  # DeepSpeed clips inside its own step (0 = off); accelerator.clip_grad_norm_ does not
        ds["gradient_clipping"] = args.max_grad_norm
    elif float(clipping) != args.max_grad_norm:
        raise ConfigError(f"The DeepSpeed config sets gradient_clipping {clipping} but --max_grad_norm is "
                          f"{args.max_grad_norm} (DeepSpeed clips inside its own step): set it to \"auto\".")
    if zero_stage(accelerator) == 3:
        if getattr(args, "use_ema", False):
            raise ConfigError("--use_ema cannot be used with DeepSpeed ZeRO-3, which partitions the parameters "
                              "across processes: use FSDP or ZeRO-2, or leave --use_ema out.")
        if not ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False):
            raise ConfigError("DeepSpeed ZeRO-3 needs zero3_save_16bit_model: true in the accelerate config "
                              "(stage3_gather_16bit_weights_on_model_save): the model is saved from gathered weights.")


def fsdp_wrap_classes(model: torch.nn.Module) -> list[str]:
    """The classes FSDP shards as units of ``model``: one all-gather per block, just before it runs, instead of the
    whole model at once. diffusers declares them in ``_no_split_modules`` for SD3 (JointTransformerBlock), Flux
    (FluxTransformerBlock, FluxSingleTransformerBlock) and the UNet; DiT and ControlNet declare none and take
    :data:`FSDP_UNITS`. Only classes the model has (accelerate refuses others); none leaves one unit, the model."""
    present = {type(module).__name__ for module in model.modules()}
    declared = getattr(model, "_no_split_modules", None) or FSDP_UNITS.get(type(model).__name__, ())
    return [name for name in declared if name in present]


def prepare_training(accelerator: Accelerator, params: list[torch.nn.Parameter], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, dataloader: torch.utils.data.DataLoader, *more: Any
                     ) -> tuple[list, list[torch.nn.Parameter]]:
    """``accelerator.prepare(model, optimizer, dataloader, *more)`` and the trained parameters as the prepared model
    holds them. FSDP2 replaces every parameter by a sharded DTensor, so a list taken before would be stale:
    accelerate's clipping fails on it (mixed Tensor and DTensor) and an EMA of it would never move. Under FSDP
    the blocks to shard are named (:func:`fsdp_wrap_classes`) unless the config lists them; under DeepSpeed a
    fixed micro-batch size in its config must be the loader's (the bank rows a step adds are not counted)."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
            logger.info(f"FSDP shards {type(model).__name__} by {', '.join(plugin.transformer_cls_names_to_wrap)}")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        micro = ds.get("train_micro_batch_size_per_gpu", "auto")
        if micro != "auto" and int(micro) != dataloader.batch_size:
            raise ConfigError(f"The DeepSpeed config sets train_micro_batch_size_per_gpu {micro} but each process "
                              f"loads batches of {dataloader.batch_size} (from --train_batch_size): set it to "
                              "\"auto\" (and train_batch_size too).")
        total = ds.get("train_batch_size", "auto")
        expected = dataloader.batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
        if total != "auto" and int(total) != expected:
            raise ConfigError(f"The DeepSpeed config sets train_batch_size {total} but the run's is {expected} "
                              f"({dataloader.batch_size} per process x {accelerator.gradient_accumulation_steps} "
                              f"accumulation steps x {accelerator.num_processes} processes): set it to \"auto\".")
    prepared = accelerator.prepare(model, optimizer, dataloader, *more)
    if accelerator.distributed_type == DistributedType.FSDP:
        params = [p for p in prepared[0].parameters() if p.requires_grad]
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision in ("bf16", "fp16"):
        cast_io_to_weights(unwrap(accelerator, prepared[0]), mixed_precision_dtype(accelerator))
    return list(prepared), params


def cast_io_to_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 mode casts the trained model's weights to ``dtype`` and runs it without autocast,
    where accelerate's other modes autocast and return float32: so cast its floating-point inputs to its dtype and
    its outputs back to float32, as the loss code expects (what upstream scripts do by hand at each call)."""
    from accelerate.utils.operations import convert_to_fp32, recursively_apply

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    model.register_forward_pre_hook(lambda _m, args, kwargs: (recursively_apply(cast, args),
                                                              recursively_apply(cast, kwargs)), with_kwargs=True)
    model.register_forward_hook(lambda _m, _args, output: convert_to_fp32(output))


def prepare_lr_scheduler(accelerator: Accelerator, scheduler: Any) -> Any:
    """The prepared lr scheduler (built on the prepared optimizer). accelerate wraps and checkpoints a scheduler
    prepared on its own, after the model (the schedule's length needs the per-process loader), except under
    DeepSpeed, where it would return it as is: stepped at every micro-batch instead of once per optimizer step
    (x processes, as elsewhere), and never saved. There it is wrapped as everywhere else and saved with the
    checkpoint's registered objects."""
    from accelerate.scheduler import AcceleratedScheduler
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare(scheduler)
    wrapped = AcceleratedScheduler(scheduler, scheduler.optimizer,
                                   step_with_optimizer=accelerator.step_scheduler_with_optimizer,
                                   split_batches=accelerator.split_batches)
    accelerator.register_for_checkpointing(wrapped)
    return wrapped


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prepared model's whole state dict (plain keys), on the main process. With sharded parameters it is
    gathered (:func:`sharded_parameters`: every process must call this; the others get ``{}``); otherwise it is
    the module's own ``state_dict()``, no copy."""
    if not sharded_parameters(accelerator):
        return unwrap(accelerator, model).state_dict()
    state = accelerator.get_state_dict(model)
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()} if accelerator.is_main_process else {}


def plain_copy(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], torch.nn.Module]
               ) -> torch.nn.Module | None:
    """The trained model as a plain module on the main process, None on the others: the prepared module itself
    (unwrapped) when its parameters are whole; with sharded parameters a module made by ``build`` (the same
    structure: adapters, added parameters) given the gathered weights, a collective every process must join."""
    if not sharded_parameters(accelerator):
        return unwrap(accelerator, model) if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    plain = build()
    plain.load_state_dict(state)
    return plain


def sampling_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to the frozen parts' half precision ``dtype`` while sampling from the trained model (kept in float32,
    or cast by DeepSpeed): ``accelerator.autocast`` is the same thing, except under DeepSpeed, where it does nothing
    and the half-precision VAE would meet float32 latents."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def reshard(model: torch.nn.Module) -> None:
    """Drop the gathered copies FSDP keeps after a forward pass without a backward one (the root unit keeps its
    parameters gathered until the backward pass): weights written into the shards after sampling (an EMA restore)
    would otherwise be ignored by the next training forward, which reuses the gathered copy. No-op unsharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class LocalShardsState:
    """Checkpoint state of an EMA whose shadow parameters are FSDP2 shards (DTensors): each process keeps its own
    local shards in its ``process_<rank>.pt``, since accelerate saves registered objects from the main process only
    (every process would resume with the main process's shards)."""

    def __init__(self, ema: Any) -> None:
        self.ema = ema

    @staticmethod
    def _local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.ema.state_dict())
        state["shadow_params"] = [self._local(p).detach().cpu().clone() for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for shadow, saved in zip(self.ema.shadow_params, state.pop("shadow_params"), strict=True):
            self._local(shadow).copy_(saved)
        self.ema.load_state_dict(state)


def checkpoint_ema(accelerator: Accelerator, ema: Any, per_process_state: dict[str, Any]) -> None:
    """Save ``ema`` with every checkpoint: as one of accelerate's registered objects when it holds whole parameters,
    per process (:class:`LocalShardsState`) when they are sharded."""
    if sharded_parameters(accelerator):
        per_process_state["ema"] = LocalShardsState(ema)
    else:
        accelerator.register_for_checkpointing(ema)


# ----------------------------------------------------------------------------------------------
# Data: loading, deterministic order and augmentation
# ----------------------------------------------------------------------------------------------


def load_train_dataset(args: argparse.Namespace, required_columns: dict[str, str],
                       data_dir_flag: str = "--train_data_dir") -> Any:
    """Load ``--dataset_name`` or ``--train_data_dir`` and check the columns exist.

    ``required_columns`` maps flag names to column names, e.g. {"--image_column": "image"}, so a
    missing column is reported with the flag that names it.
    """
    from datasets import load_dataset

    if args.dataset_name is not None:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    else:
        from datasets.data_files import EmptyDatasetError
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        extensions = tuple(ImageFolder.EXTENSIONS)
        if not any(name.lower().endswith(extensions) for _, _, files in os.walk(args.train_data_dir)
                   for name in files):  # datasets' own error for it is a traceback ("corresponds to no data")
            raise ConfigError(f"{data_dir_flag} {args.train_data_dir} holds no image files.")
        try:
            dataset = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir,
                                   split="train")
        except EmptyDatasetError as err:
            raise ConfigError(f"{data_dir_flag} {args.train_data_dir} holds no image files.") from err
    from datasets import Image as ImageFeature

    for flag, column in required_columns.items():
        if column in dataset.column_names and "image" in flag:
            feature = dataset.features[column]
            # pandas-written parquet keeps images as plain {bytes, path} structs; paths as strings also cast
            if isinstance(feature, dict) and "bytes" in feature or getattr(feature, "dtype", None) == "string":
                dataset = dataset.cast_column(column, ImageFeature())
            elif not isinstance(feature, ImageFeature):
                raise ConfigError(f"{flag} '{column}' holds {feature}, not images.")
        if column not in dataset.column_names:
            layout = ""
            if args.train_data_dir is not None and flag == "--label_column":
                layout = (f" An image folder gets a '{column}' column from one sub-folder per class: "
                          f"{args.train_data_dir}/<class name>/<image files>.")
            raise ConfigError(f"{flag} '{column}' is not a column of the dataset; it has: "
                              f"{', '.join(dataset.column_names)}.{layout}")
    if args.max_train_samples is not None:  # a seeded random subset, as upstream does
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ConfigError("The training dataset is empty.")
    return dataset


EXIF_ORIENTATION = 0x0112


def _decode_fully(item: dict) -> tuple[int, int] | str:
    """An image cell as stored (``{"bytes", "path"}``) decoded to the last pixel: its size as training sees it
    (after the EXIF rotation datasets applies), or why it failed."""
    import io

    try:
        with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
            image.load()  # headers alone do not catch a truncated file
            # Training sees the image as datasets decodes it, EXIF orientation applied: 5-8 swap width and height.
            rotated = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            return (image.height, image.width) if rotated else image.size
    except Exception as err:  # noqa: BLE001 - every decoder failure is reported the same way
        return f"{type(err).__name__}: {err}"


def check_images(dataset: Any, columns: dict[str, str], skip_bad: bool) -> tuple[Any, list[tuple]]:
    """Decode every image of ``columns`` (flag -> column) once, in threads, before the first step.

    An unreadable or truncated image stops the run naming its file (or, with ``--skip_bad_images``, its row
    is dropped with a warning naming the file, and a count). Returns the dataset (without dropped rows) and,
    per kept row, the (width, height) of each column's image, for checks such as ControlNet's alignment.
    """
    from concurrent.futures import ThreadPoolExecutor

    from datasets import Image as ImageFeature

    names = list(columns.values())
    raw = dataset.select_columns(names)
    for column in names:
        raw = raw.cast_column(column, ImageFeature(decode=False))
    flag_of = {column: flag for flag, column in columns.items()}
    bad: dict[int, str] = {}
    sizes: dict[int, list] = {}
    chunk = 1000  # rows in memory at a time: the encoded bytes of a large dataset would not fit at once
    progress = tqdm(total=len(raw), desc="Checking images", disable=len(raw) < 2000 or not is_main_process())
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        for start, records in zip(range(0, len(raw), chunk), raw.iter(batch_size=chunk), strict=True):
            cells = [(start + i, column, item) for column in names for i, item in enumerate(records[column])]
            for (row, column, item), result in zip(cells, pool.map(lambda cell: _decode_fully(cell[2]), cells),
                                                   strict=True):
                if isinstance(result, str):
                    bad.setdefault(row, f"{flag_of[column]} {item.get('path') or f'of row {row}'} cannot be "
                                        f"decoded ({result})")
                else:
                    sizes.setdefault(row, []).append(result)
            progress.update(len(records[names[0]]))
    progress.close()
    if bad and not skip_bad:
        more = f" ({len(bad) - 1} more unreadable; --skip_bad_images leaves them out)" if len(bad) > 1 else (
            " (--skip_bad_images leaves such rows out)")
        raise ConfigError(f"Training image {next(iter(bad.values()))}{more}.")
    if bad:
        for reason in bad.values():
            logger.warning(f"Skipping training image {reason}.")
        logger.warning(f"--skip_bad_images: left out {len(bad)} of {len(dataset)} rows.")
        if len(bad) == len(dataset):
            raise ConfigError("Every training image is unreadable.")
        dataset = dataset.select([row for row in range(len(dataset)) if row not in bad])
    return dataset, [tuple(sizes[row]) for row in range(len(raw)) if row not in bad]


HIGH_BIT_DEPTH_SCALE = {"I;16": 1 / 257, "I;16L": 1 / 257, "I;16B": 1 / 257, "I;16N": 1 / 257}


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)`` that keeps the real values of high-bit-depth images: PIL clips 16-bit grey
    (``I;16``) and 32-bit (``I``, ``F``) pixels to 0..255, which turns most 16-bit photos solid white.
    They are rescaled to 8 bits first (``I``: as 16-bit when any value exceeds 255; ``F``: as [0, 1] when
    no value exceeds 1)."""
    if image.mode in HIGH_BIT_DEPTH_SCALE or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode in HIGH_BIT_DEPTH_SCALE or (image.mode == "I" and array.max() > 255):
            array = array / 257
        elif image.mode == "F" and array.max() <= 1.0:
            array = array * 255
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def describe_image_conversion(dataset: Any, image_column: str, channels: int, resolution: int) -> None:
    """Say once, before training, when the first training image will be converted to fit the model
    (colour to grey or back, resized), so a mismatch is visible rather than silent."""
    image = dataset[0][image_column]
    model_mode = "L" if channels == 1 else "RGB"
    changes = []
    if image.mode != model_mode:
        changes.append(f"converted from {image.mode} to {model_mode}")
    if min(image.size) != resolution:
        changes.append(f"resized from {image.width}x{image.height} (short side) to {resolution} and cropped")
    if changes:
        logger.info(f"Training images (the first is {image.mode} {image.width}x{image.height}) are "
                    f"{' and '.join(changes)}: the model works on {channels}-channel {resolution}x{resolution} images.")


def log_throughput(accelerator: Accelerator, log: TrainingLog, global_step: int, args: argparse.Namespace) -> dict:
    """Log the steady-state throughput of the run (see :class:`TrainingLog`) to the console and the
    trackers, and write it to ``<output_dir>/<logging_dir>/throughput.json`` for tools to read."""
    summary = log.summary()
    if accelerator.is_main_process:
        folder = os.path.join(args.output_dir, args.logging_dir)
        os.makedirs(folder, exist_ok=True)
        with disk_space_guard(folder, "throughput.json"):
            atomic_write_json(os.path.join(folder, "throughput.json"), {
                **summary, "images_per_step": log.images_per_step, "flops_per_image": log.flops_per_image,
                "peak_flops": log.peak, "mixed_precision": accelerator.mixed_precision,
                "num_processes": accelerator.num_processes, "global_step": global_step,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
    if summary:
        accelerator.log(summary, step=global_step)
        tflops = f", {summary['steady_model_tflops']:.3g} model TFLOP/s" if "steady_model_tflops" in summary else ""
        mfu = f" ({100 * summary['steady_mfu']:.1f}% of the GPU's peak)" if "steady_mfu" in summary else ""
        logger.info(f"Steady-state throughput: {summary['steady_images_per_sec']:.1f} images/s{tflops}{mfu} over "
                    f"{summary['steady_steps']} steps (warm-up, validation and checkpoints left out).")
    else:
        logger.info("Too few steps for a steady-state throughput (it skips the first --logging_steps window).")
    return summary


class SampleKey(NamedTuple):
    """What :class:`EpochShuffleSampler` yields and a training dataset's ``__getitem__`` receives: the
    row to read and the epoch, so per-sample augmentation can be seeded from both (see :func:`sample_rng`)."""

    epoch: int
    index: int


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation per epoch, from (seed, epoch) alone, the same on every process.

    It yields :class:`SampleKey` (epoch, index) so the dataset can derive per-sample augmentation
    from the epoch without shared state (works with worker processes). accelerate shards its batches
    across processes and ``skip_first_batches`` resumes mid-epoch exactly.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[SampleKey]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "data", self.epoch))
        return (SampleKey(self.epoch, i) for i in torch.randperm(self.num_items, generator=generator).tolist())


def make_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, sampler: EpochShuffleSampler,
                    num_workers: int) -> torch.utils.data.DataLoader:
    """The training DataLoader: workers that live across epochs, pinned memory on a GPU machine."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       drop_last=True, persistent_workers=num_workers > 0,
                                       pin_memory=torch.cuda.is_available())


def epoch_loader(accelerator: Accelerator, train_dataloader: Any, sampler: EpochShuffleSampler, epoch: int,
                 global_step: int, updates_per_epoch: int, gradient_accumulation_steps: int) -> Any:
    """The dataloader for ``epoch``, skipping the batches a resumed run has already seen in it.

    Both the sampler and accelerate's dataloader get the epoch explicitly (accelerate's own
    counter restarts at 0 after a resume), so the order is the straight run's.
    """
    sampler.set_epoch(epoch)
    train_dataloader.set_epoch(epoch)
    first_epoch = global_step // updates_per_epoch
    skip = (global_step % updates_per_epoch) * gradient_accumulation_steps if epoch == first_epoch else 0
    return accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader


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


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_local_main_process


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


def resize_crop_flip(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: np.random.Generator | None, resample: Image.Resampling = Image.BICUBIC
                     ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the short side to ``resolution``, crop a square (centre or random), maybe flip. Returns the
    square image, the original (height, width) and the crop's (top, left) in the resized image as it is
    shown (mirrored with the flip): SDXL's size-and-crop conditioning."""
    original_size = (image.height, image.width)
    scale = resolution / min(image.size)
    if scale != 1:
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, resample)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left = int(rng.integers(0, image.width - resolution + 1))
        top = int(rng.integers(0, image.height - resolution + 1))
    width = image.width
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = width - left - resolution
    return image, original_size, (top, left)


def to_model_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A square PIL image -> [channels, H, W] float32 in [-1, 1] (PIL and numpy only: no torchvision here)."""
    image = convert_image(image, "L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: np.random.Generator, channels: int = 3,
                     resample: Image.Resampling = Image.BICUBIC) -> torch.Tensor:
    """Resize the short side to ``resolution`` (``resample``: upstream ControlNet uses bilinear), crop a
    square (centre or random), maybe flip; return [channels, H, W] float32 in [-1, 1]."""
    image = convert_image(image, "L" if channels == 1 else "RGB")
    return to_model_tensor(resize_crop_flip(image, resolution, center_crop, random_flip, rng, resample)[0], channels)


def sample_rng(seed: int, key: SampleKey) -> np.random.Generator:
    """The augmentation RNG of one sample in one epoch: the same in every process, worker and resume."""
    return np.random.default_rng(derive_seed(seed, "augment", key.epoch, key.index))


# ----------------------------------------------------------------------------------------------
# DiT helpers, shared by train_dit_difftuning.py and the benchmark tools
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic save, pruning, exact resume
# ----------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoint folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if CHECKPOINT_PATTERN.match(d)]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(CHECKPOINT_PATTERN.match(d)[1]))]


CHECKPOINT_INFO = "checkpoint_info.json"
# The flags that decide what a checkpoint holds: resuming across a change in any of them cannot work.
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "controlnet_model_name_or_path", "finetune", "controlnet_lora",
                  "rank", "lora_alpha", "lora_target_modules", "use_ema", "train_text_encoder")
# Identity flags added later, recorded only when not at these defaults, so older checkpoints still match.
OPTIONAL_IDENTITY_FLAGS = {"use_dora": False, "optimizer": "adamw"}


def checkpoint_identity(args: argparse.Namespace, script: str) -> dict:
    """What a checkpoint was saved by: the script and the flags that shape its state (models by last path
    component, so a moved model folder still matches)."""
    identity = {"script": os.path.basename(script)}
    for flag in IDENTITY_FLAGS:
        if hasattr(args, flag):
            identity[flag] = display_path(getattr(args, flag))
    if hasattr(args, "lora_alpha") and args.lora_alpha is None:  # not given: the alpha trained with is the rank
        identity["lora_alpha"] = args.rank
    for flag, default in OPTIONAL_IDENTITY_FLAGS.items():
        if getattr(args, flag, default) != default:
            identity[flag] = getattr(args, flag)
    return identity


def checkpoint_pieces(accelerator: Accelerator) -> list[tuple[str, ...]]:
    """What accelerate's ``save_state`` writes, by distributed type, besides the per-process files: each entry
    lists the names (file or folder) one of which must exist."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return [("pytorch_model",)]  # the engine's own folder: weights and optimizer states
    if accelerator.distributed_type == DistributedType.FSDP:  # folders when sharded, files when gathered
        return [("pytorch_model_fsdp_0", "pytorch_model_fsdp_0.bin"), ("optimizer_0", "optimizer_0.bin"),
                ("scheduler.bin",)]
    return [("optimizer.bin",), ("scheduler.bin",)]


def _check_checkpoint(path: str, identity: dict, accelerator: Accelerator) -> None:
    """Refuse, in one sentence, a checkpoint of another script or set-up, or one with a missing or empty piece."""
    import json

    info_path = os.path.join(path, CHECKPOINT_INFO)
    if os.path.exists(info_path):
        saved = json.load(open(info_path))
        now = {**{k: v for k, v in OPTIONAL_IDENTITY_FLAGS.items() if k in saved}, **identity}
        # a key an older checkpoint lacks is skipped, or compared with its default where one is known
        differ = [k for k in now if (k in saved or k in OPTIONAL_IDENTITY_FLAGS)
                  and saved.get(k, OPTIONAL_IDENTITY_FLAGS.get(k)) != now[k]]
        if differ:
            raise ConfigError(f"--resume_from_checkpoint {path} was saved by another set-up ("
                              + ", ".join(f"{'' if k == 'script' else '--'}{k} {saved.get(k)!r} there, "
                                          f"{now[k]!r} now" for k in differ)
                              + "); resume with the same script and flags, or start a new --output_dir.")
    for names in [(f"process_{accelerator.process_index}.pt",), *checkpoint_pieces(accelerator)]:
        if not any(os.path.exists(os.path.join(path, name)) for name in names):
            raise _UnreadableCheckpoint(f"{path} has no {names[0]}" + (
                " (was it saved with another number of processes, or by another script?)"
                if names[0].startswith("process_") else " (was it saved under another accelerate config?)"))
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file) and os.path.getsize(file) == 0:
            raise _UnreadableCheckpoint(f"{file} is empty")
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(file, "pt"):
                    pass
            except Exception as err:  # noqa: BLE001 - a damaged file, whatever the parser says
                raise _UnreadableCheckpoint(f"{file} is damaged ({type(err).__name__}: {err})") from err


class _UnreadableCheckpoint(ConfigError):
    """A checkpoint that cannot be loaded (``latest`` falls back to the one before it)."""


def resume(accelerator: Accelerator, args: argparse.Namespace, per_process_state: dict[str, Any],
           identity: dict) -> tuple[int, str | None]:
    """(global step, checkpoint) of --resume_from_checkpoint; (0, None) for a new run. With "latest", a
    checkpoint that cannot be loaded is skipped with a warning for the one before it ("latest" with none
    found starts a new run, as upstream); a checkpoint of another script or set-up is refused."""
    if not args.resume_from_checkpoint:
        return 0, None
    latest = args.resume_from_checkpoint == "latest"
    candidates = list_checkpoints(args.output_dir)[::-1] if latest else [args.resume_from_checkpoint]
    if not candidates:
        logger.info("--resume_from_checkpoint latest: no checkpoint in --output_dir; starting a new run.")
        return 0, None
    for path in candidates:
        try:
            _check_checkpoint(path, identity, accelerator)
            return load_checkpoint(accelerator, path, per_process_state), path
        except _UnreadableCheckpoint as err:
            if not latest:
                raise ConfigError(f"--resume_from_checkpoint: {err}.") from err
            logger.warning(f"--resume_from_checkpoint latest: skipping {path}: {err}.")
    raise ConfigError(f"--resume_from_checkpoint latest: none of the {len(candidates)} checkpoints in "
                      f"{args.output_dir} can be loaded (see the warnings above); delete them or start a new "
                      "--output_dir.")


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, global_step: int,
                    per_process_state: dict[str, Any], keep: str | None = None, identity: dict | None = None) -> str:
    """Save a resumable checkpoint atomically at ``output_dir/checkpoint-<global_step>``.

    Old checkpoints are pruned first to respect ``--checkpoints_total_limit``, never ``keep``
    (the one this run resumed from). Everything is written to ``checkpoint-N.tmp`` and renamed
    once complete, so a crash mid-save leaves the previous checkpoints intact. Each process adds
    its own ``process_<rank>.pt`` with the objects in ``per_process_state`` (step generator,
    replay stream) because accelerate saves custom objects from the main process only; ``identity``
    (:func:`checkpoint_identity`) goes into ``checkpoint_info.json`` so a resume with another set-up is refused.
    """
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    tmp = f"{final}.tmp"
    if accelerator.is_main_process:
        if args.checkpoints_total_limit is not None:
            existing = [c for c in list_checkpoints(args.output_dir) if c != final]
            removable = [c for c in existing if keep is None or os.path.abspath(c) != os.path.abspath(keep)]
            excess = len(existing) + 1 - args.checkpoints_total_limit
            for path in removable[:max(0, excess)]:
                logger.info(f"Removing old checkpoint {path}")
                shutil.rmtree(path)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with disk_space_guard(args.output_dir, f"checkpoint-{global_step}", tmp):
        accelerator.save_state(tmp)
        state = {name: obj.state_dict() for name, obj in per_process_state.items()}
        torch.save({"global_step": global_step, **state},
                   os.path.join(tmp, f"process_{accelerator.process_index}.pt"))
        if accelerator.is_main_process and identity is not None:
            atomic_write_json(os.path.join(tmp, CHECKPOINT_INFO), identity)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str, per_process_state: dict[str, Any]) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the global step. A piece that fails to
    load is an :class:`_UnreadableCheckpoint` naming the checkpoint."""
    own = os.path.join(path, f"process_{accelerator.process_index}.pt")
    accelerator.print(f"Resuming from checkpoint {path}")
    try:
        accelerator.load_state(path)
        state = torch.load(own, weights_only=False)
        for name, obj in per_process_state.items():
            obj.load_state_dict(state[name])
    except Exception as err:  # noqa: BLE001 - torch, safetensors and pickle each raise their own kind
        reason = (str(err).strip().splitlines() or [""])[0]
        raise _UnreadableCheckpoint(f"{path} cannot be loaded ({type(err).__name__}: {reason})") from err
    return int(state["global_step"])


# ----------------------------------------------------------------------------------------------
# Losses and throughput, read every --logging_steps
# ----------------------------------------------------------------------------------------------

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name, for model FLOPs utilisation.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10G": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(mixed_precision: str) -> float | None:
    """The device's dense half-precision peak, when it is known and training is in bf16/fp16."""
    if not torch.cuda.is_available() or mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def compile_for_training(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``model`` as the training step calls it: under --torch_compile a torch.compile wrapper of the prepared model
    (DDP included, so its gradient buckets are kept), else the model itself. Only the step calls the wrapper:
    accumulation, checkpoints, saving and validation use the prepared model, so no state-dict key carries
    torch.compile's ``_orig_mod.`` prefix and sampling never waits on a recompile for its batch shapes."""
    return torch.compile(model) if args.torch_compile else model


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A weightless copy of a diffusers model on the meta device: the same architecture (built from its config,
    unquantized), frozen. Model FLOPs are counted on it (:func:`count_flops`: shapes only), so counting takes no
    memory and no computation; a real forward and backward pass before gradient checkpointing is on could be the
    run's peak of memory. Call it inside ``torch.device("meta")`` to add adapters to it."""
    with torch.device("meta"):
        copy = type(model).from_config(model.config)
    return copy.requires_grad_(False)


def count_flops(fn: Any) -> int:
    """FLOPs that ``fn()`` executes (matmuls, convolutions, attention; forward and backward), counted by
    torch's FlopCounterMode (from shapes: ``fn`` may run on meta tensors): what a model FLOPs utilisation is
    computed from."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class NonFiniteLoss(ConfigError):
    """Training diverged: reported as one sentence (exit status 2), like bad input, since a setting caused it."""


class TrainingLog:
    """The losses of each step, added up on the device and read every ``logging_steps`` (one host sync
    there, none in between), and the steady-state throughput.

    A logging window's throughput is its optimizer steps x ``images_per_step`` over its wall time,
    minus the time spent in :meth:`paused` blocks (validation, checkpoints). The first window holds
    the warm-up (first step, allocator, autotuning) and is left out of the steady state. With
    ``flops_per_image`` (the denoiser's forward + backward FLOPs per training image) the log also
    gives model TFLOP/s, and the FLOPs utilisation when ``peak`` is known.
    """

    def __init__(self, accelerator: Accelerator, logging_steps: int, images_per_step: int,
                 flops_per_image: float | None = None, peak: float | None = None,
                 checkpointing_steps: int | None = None, params: Sequence[torch.nn.Parameter] = (),
                 output_dir: str | None = None) -> None:
        self.accelerator, self.logging_steps, self.images_per_step = accelerator, logging_steps, images_per_step
        self.checkpointing_steps = checkpointing_steps  # also read before every checkpoint: never save a NaN model
        self.params = list(params)  # the trained weights, checked finite before each checkpoint and the final save
        self.output_dir = output_dir  # where the checkpoints are, for the advice after a divergence
        self.last_finite_read: int | None = None  # the last step whose losses were read finite
        self.flops_per_image, self.peak = flops_per_image, peak
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.window_steps, self.window_start, self.paused_seconds = 0, time.perf_counter(), 0.0
        self.windows = 0
        self.steady_steps, self.steady_seconds = 0, 0.0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """One micro-batch's detached losses (device tensors): summed, not read."""
        for key, value in logs.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.detach().clone()
        self.count += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in this block (validation, a checkpoint) is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def step(self, global_step: int, lr: float, force: bool = False) -> dict[str, float] | None:
        """Count an optimizer step; every ``logging_steps`` (or when ``force``) read and log the window."""
        self.window_steps += 1
        before_checkpoint = self.checkpointing_steps and global_step % self.checkpointing_steps == 0
        if not (force or before_checkpoint or global_step % self.logging_steps == 0) or not self.count:
            return None
        names = list(self.sums)
        values = (torch.stack([self.sums[k].float() for k in names]) / self.count).tolist()  # the one sync
        bad = [name for name, value in zip(names, values, strict=True) if not math.isfinite(value)]
        if bad:  # stop before a non-finite model is checkpointed, saved or pushed
            raise NonFiniteLoss(f"The loss became non-finite by step {global_step} ({', '.join(bad)} = "
                                f"{values[names.index(bad[0])]}); {self.where_to_resume()}")
        self.last_finite_read = global_step
        if (force or before_checkpoint) and not self.weights_finite():
            raise NonFiniteLoss(f"The trained weights became non-finite at step {global_step} (its loss was still "
                                f"finite); {self.where_to_resume()}")
        seconds = max(time.perf_counter() - self.window_start - self.paused_seconds, 1e-9)
        logs = dict(zip(names, values, strict=True)) | {"lr": lr}
        logs["images_per_sec"] = self.window_steps * self.images_per_step / seconds
        if self.windows > 0:  # the first window holds the warm-up
            self.steady_steps += self.window_steps
            self.steady_seconds += seconds
        if self.flops_per_image:
            logs["model_tflops"] = logs["images_per_sec"] * self.flops_per_image / 1e12
            if self.peak:
                logs["mfu"] = logs["model_tflops"] * 1e12 / self.peak
        self.accelerator.log(logs, step=global_step)
        self.sums, self.count, self.windows = {}, 0, self.windows + 1
        self.window_steps, self.window_start, self.paused_seconds = 0, time.perf_counter(), 0.0
        return logs

    def where_to_resume(self) -> str:
        """The end of the divergence sentence: which checkpoint to resume from. Every checkpoint holds finite weights
        (checked before it is saved), but the loss of a step is computed before its update: checkpoint-N's weights
        first meet the data at step N + 1, so they may already have diverged (Adam moves every weight by about the
        learning rate at once) unless a later loss read was finite. The newest checkpoint before the last finite
        read is the one known to train."""
        lower = "a lower --learning_rate (or set --max_grad_norm)"
        found = list_checkpoints(self.output_dir) if self.output_dir else []
        steps = [int(CHECKPOINT_PATTERN.match(os.path.basename(c))[1]) for c in found]
        good = [c for c, step in zip(found, steps, strict=True)
                if self.last_finite_read is not None and step < self.last_finite_read]
        if not good:
            newest = f" ({os.path.basename(found[-1])} was saved after the last finite loss, so its weights may " \
                     "already have diverged)" if found else ""
            return f"no checkpoint's weights were seen to give a finite loss{newest}; start again with {lower}."
        later = found[found.index(good[-1]) + 1:]
        caveat = (f" ({', '.join(os.path.basename(c) for c in later)} was saved after the last finite loss, so its "
                  "weights may already have diverged)") if later else ""
        return (f"resume from {os.path.basename(good[-1])}, the newest checkpoint whose weights gave a finite loss"
                f"{caveat}, with {lower}: --resume_from_checkpoint {good[-1]}.")

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite on every process (one sync; each process checks its own shards)."""
        if not self.params:
            return True
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        bad = torch.stack([(~p.detach().isfinite()).any() for p in local]).sum().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        return int(bad.item()) == 0

    def summary(self) -> dict[str, float]:
        """Steady-state images/s (and model TFLOP/s, MFU) over every window after the first."""
        if not self.steady_steps:
            return {}
        result = {"steady_images_per_sec": self.steady_steps * self.images_per_step / self.steady_seconds,
                  "steady_steps": self.steady_steps}
        if self.flops_per_image:
            result["steady_model_tflops"] = result["steady_images_per_sec"] * self.flops_per_image / 1e12
            if self.peak:
                result["steady_mfu"] = result["steady_model_tflops"] * 1e12 / self.peak
        return result


# ----------------------------------------------------------------------------------------------
# Logging, model card, Hub
# ----------------------------------------------------------------------------------------------


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """VAE latents (scaled) -> PIL images, e.g. for the knowledge-bank preview."""
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():
        images = vae.decode((latents / vae.config.scaling_factor + latent_shift(vae)).to(vae.device, vae.dtype)
                            ).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return VaeImageProcessor.numpy_to_pil(images)


def public_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as trackers, logs and cards may show them: every flag but the secrets, and no value that holds a
    secret (a token pasted into another flag by mistake)."""
    secrets = [getattr(args, flag) for flag in SECRET_FLAGS if getattr(args, flag, None)]
    return {k: v for k, v in vars(args).items()
            if k not in SECRET_FLAGS and not (isinstance(v, str) and any(s in v for s in secrets))}


def start_trackers(accelerator: Accelerator, args: argparse.Namespace, default_project: str) -> None:
    """``init_trackers`` on the main process with the scalar flags as the run's config (TensorBoard writes them to
    ``hparams.yml`` and its event files, which ``--push_to_hub`` uploads with ``logs/``): secrets left out."""
    if accelerator.is_main_process:
        tracked = {k: v for k, v in public_flags(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or default_project, config=tracked)


def log_images(accelerator: Accelerator, images: Sequence[Image.Image], captions: Sequence[str], step: int,
               tag: str = "validation") -> None:
    """Send images to whichever trackers are active (TensorBoard and/or wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            arrays = np.stack([np.asarray(img.convert("RGB")) for img in images])
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img, caption=c) for img, c in zip(images, captions, strict=False)]})


def hub_repo_id(args: argparse.Namespace) -> str | None:
    """Create the Hub repository at start (so a bad token fails before training), like upstream."""
    if not args.push_to_hub:
        return None
    name = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as err:  # offline mode, no network, no or a bad token: all before any training
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--push_to_hub: the Hub repository {name!r} could not be created ({type(err).__name__}: "
                          f"{reason}); check the network, HF_HUB_OFFLINE and the token (--hub_token or `hf auth "
                          "login`), or leave --push_to_hub out and upload later.") from err


def display_path(value: Any) -> Any:
    """A local path as the card shows it: its last component, so a user's folders never reach the Hub."""
    if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
        return os.path.basename(os.path.normpath(value))
    return value


def usage_reference(args: argparse.Namespace, repo_id: str | None) -> str:
    """What a model card's usage snippet loads: the Hub repository when pushed, else the output folder's name
    (never an absolute local path)."""
    return repo_id or os.path.basename(os.path.normpath(args.output_dir))


def hub_id(name_or_path: str) -> str | None:
    """The Hub id of a base model: the name itself when it is not a local path, the repository of a local copy in
    the Hub's cache (``.../models--org--name/snapshots/<revision>``), else None (a folder of unknown origin)."""
    if not os.path.exists(name_or_path):
        return name_or_path
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", os.path.abspath(name_or_path))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def save_model_card(args: argparse.Namespace, base_model: str, description: str,
                    tags: list[str], images: Sequence[Image.Image] = (), license: str = "apache-2.0",
                    widget_prompt: str | None = None, **card_data: Any) -> str:
    """Write README.md (the model card: metadata, ``description`` with its usage snippet, a sample grid
    and the training flags) into ``output_dir``. ``base_model`` goes into the metadata only when its Hub id is
    known (:func:`hub_id`): a local path means nothing on the Hub. ``widget_prompt``: also save each image as
    image_<i>.png and list them as the card's widget (the Hub's gallery), as diffusers' LoRA cards do;
    ``card_data``: more metadata (license_name, license_link, instance_prompt)."""
    from diffusers.utils import make_image_grid
    from huggingface_hub import ModelCard, ModelCardData

    if widget_prompt is not None:
        card_data["widget"] = []
        for i, image in enumerate(images):
            image.save(os.path.join(args.output_dir, f"image_{i}.png"))
            card_data["widget"].append({"text": widget_prompt, "output": {"url": f"image_{i}.png"}})
    if images:
        cols = min(len(images), 8)
        rows = math.ceil(len(images) / cols)
        images = list(images) + [images[0].point(lambda _: 0)] * (rows * cols - len(images))
        with disk_space_guard(args.output_dir, "the model card's samples.png"):
            make_image_grid(list(images), rows=rows, cols=cols).save(os.path.join(args.output_dir, "samples.png"))
        description += "\n\n## Samples\n\n![samples](./samples.png)\n"
    flags = {k: display_path(v) for k, v in sorted(public_flags(args).items()) if v not in (None, False)}
    description += ("\n\n## Training flags\n\n" + "\n".join(f"- `--{k}`: `{v}`" for k, v in flags.items()) + "\n")
    # Built locally (never fetched): the Hub may be unreachable, and a stale card must not win.
    metadata = ModelCardData(license=license, library_name="diffusers", tags=tags, base_model=hub_id(base_model),
                             **card_data)
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{description}")
    path = os.path.join(args.output_dir, "README.md")
    with disk_space_guard(args.output_dir, "the model card"):
        card.save(path)
    return path


def end_collectives(accelerator: Accelerator) -> None:
    """Call after the last collective of a run, on every process: all ranks destroy their process group here,
    together, as torch asks (one point on every rank). When the other ranks destroyed theirs at exit while the
    main process was still saving, one two-process CPU run (gloo) left the main process hung at exit after its
    model was written. The main process then saves, samples and uploads alone, and no rank waits for it (a
    barrier after a long upload would hit --ddp_timeout). accelerate's ``end_training`` at the very end still
    closes the trackers; its own destroy is then a no-op."""
    accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind accelerate's wrappers and, with ``accelerate launch --dynamo_backend ...``,
    behind torch.compile's (whose state-dict keys carry an ``_orig_mod.`` prefix), as diffusers does."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def cast(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)``. For diffusers models with nothing to keep in float32 it goes through
    torch's own ``to``, which skips diffusers' warning about an empty list of such modules."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device, dtype=dtype)
    return torch.nn.Module.to(module, device, dtype=dtype)


def save_final(output_dir: str, what: str, write: Callable[[str], None]) -> None:
    """Write the final weights atomically: ``write(folder)`` fills a temporary folder inside ``output_dir``, whose
    entries then replace their namesakes in ``output_dir`` by rename. A full disk (or any failure) while writing
    leaves the earlier files as they were, removes the partial folder and, for a full disk, ends in one sentence."""
    tmp = os.path.join(output_dir, "final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_space_guard(output_dir, what, tmp):
            os.makedirs(tmp)
            write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in sorted(os.listdir(tmp)):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)  # a folder (transformer/, vae/) cannot be renamed over
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


def push_output_dir(args: argparse.Namespace, repo_id: str) -> None:
    """Upload the output folder without checkpoints, the knowledge bank or temporary files."""
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                  ignore_patterns=HUB_IGNORE_PATTERNS, token=args.hub_token)
