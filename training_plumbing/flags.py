"""The command line every script shares: diffusers' common flags and their checks, the LoRA flags, the
flags kept out of logs (secrets), and the one-sentence exit for bad input."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from difftuning_common import ConfigError

# Flags whose values are secrets: never sent to a tracker, written to a card or a log, or uploaded.
SECRET_FLAGS = ("hub_token",)


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


def run_cli(main: Any, parse_args: Any) -> None:
    """Run ``main(parse_args())``; bad input (a ConfigError) exits with status 2 and one sentence, no
    traceback. Anything else is a bug or an environment problem and keeps its traceback."""
    try:
        main(parse_args())
    except ConfigError as err:
        tqdm.write(f"error: {err}", file=sys.stderr)  # on a line of its own, also under a progress bar
        sys.exit(2)


def public_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as trackers, logs and cards may show them: every flag but the secrets, and no value that holds a
    secret (a token pasted into another flag by mistake)."""
    secrets = [getattr(args, flag) for flag in SECRET_FLAGS if getattr(args, flag, None)]
    return {k: v for k, v in vars(args).items()
            if k not in SECRET_FLAGS and not (isinstance(v, str) and any(s in v for s in secrets))}


def display_path(value: Any) -> Any:
    """A local path as the card shows it: its last component, so a user's folders never reach the Hub."""
    if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
        return os.path.basename(os.path.normpath(value))
    return value
