#!/usr/bin/env python
"""Fine-tune a pre-trained DiT on a new class-conditional dataset, with or without Diff-Tuning.

    accelerate launch train_dit_difftuning.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --train_data_dir ./food101/train --output_dir dit-food101 --mixed_precision bf16 --difftuning

The result is a DiTPipeline folder: ``DiffusionPipeline.from_pretrained(output_dir)`` generates by
class name with guidance. Diff-Tuning itself lives in difftuning_utils.py; the shared training
plumbing in the training_plumbing package.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

import difftuning_utils as dt
import training_plumbing as tp

if TYPE_CHECKING:
    from diffusers import DiTPipeline, DiTTransformer2DModel

logger = get_logger(__name__)
FINETUNE_MODES = ("full", "lora", "difffit", "bitfit")
# The training settings of the authors' released code (--authors_recipe); the method's own defaults
# (tau, bank fraction and weight, null label) are the authors' already.
AUTHORS_RECIPE = {"use_ema": True, "ema_decay": 0.9999, "ema_warmup": False, "max_grad_norm": 0.0,
                  "center_crop": True, "random_flip": True, "knowledge_bank_replay": "images",
                  "learning_rate": 1e-4, "adam_weight_decay": 0.0, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "train_batch_size": 32}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def configure_finetuning(transformer: DiTTransformer2DModel, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """Freeze what the --finetune mode does not train; return the trainable parameters.

    full: everything. bitfit: biases. difffit (Xie et al. 2023): biases, norm affines, label
    embeddings and new scale factors gamma (see add_difffit_gammas) in the first half of the blocks
    (the authors' 14 of 28). lora: peft LoRA adapters (DiT has no adapter mixin in diffusers, so
    peft injects them directly).
    """
    if args.finetune == "full":
        transformer.requires_grad_(True)
        return [p for p in transformer.parameters() if p.requires_grad]
    transformer.requires_grad_(False)
    if args.finetune == "lora":
        from peft import inject_adapter_in_model

        inject_adapter_in_model(tp.lora_config(args), transformer)
        return [p for n, p in transformer.named_parameters() if "lora_" in n]
    for name, param in transformer.named_parameters():
        if name.endswith(".bias"):
            param.requires_grad_(True)
    if args.finetune == "difffit":
        from diffusers.models.embeddings import LabelEmbedding

        for module in transformer.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, LabelEmbedding)):
                module.requires_grad_(True)
        for block in transformer.transformer_blocks[: math.ceil(len(transformer.transformer_blocks) / 2)]:
            add_difffit_gammas(block)
    return [p for p in transformer.parameters() if p.requires_grad]


def add_difffit_gammas(block: torch.nn.Module) -> None:
    """DiffFit's four learnable scales (initialised to 1), where the authors put them: on the q, k and v
    projections (one 3d vector), on the attention output projection, on the attention branch and on
    the MLP branch. All of them scale the outputs of linear layers, so export folds them into those."""
    dim = block.attn1.to_out[0].out_features
    block.register_parameter("difffit_gamma_qkv", torch.nn.Parameter(torch.ones(3 * dim)))
    for name in ("difffit_gamma_proj", "difffit_gamma_attn", "difffit_gamma_ff"):
        block.register_parameter(name, torch.nn.Parameter(torch.ones(dim)))
    for i, linear in enumerate((block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)):
        linear.register_forward_hook(lambda _m, _i, out, b=block, s=slice(i * dim, (i + 1) * dim):
                                     out * b.difffit_gamma_qkv[s])
    block.attn1.to_out[0].register_forward_hook(lambda _m, _i, out, b=block: out * b.difffit_gamma_proj)
    for name, module in (("difffit_gamma_attn", block.attn1), ("difffit_gamma_ff", block.ff)):
        module.register_forward_hook(lambda _m, _i, out, b=block, n=name: out * getattr(b, n))


def fold_difffit_gammas(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Multiply each block's DiffFit gammas into the linear layers whose outputs they scale (q/k/v;
    the attention output projection takes both the projection and the branch gamma; the MLP's last
    layer) and drop them, leaving a plain DiTTransformer2DModel state dict."""
    for i in range(num_blocks):
        prefix = f"transformer_blocks.{i}."
        if f"{prefix}difffit_gamma_qkv" not in state:
            continue
        qkv = state.pop(f"{prefix}difffit_gamma_qkv").chunk(3)
        proj, attn, ff = (state.pop(f"{prefix}difffit_gamma_{n}") for n in ("proj", "attn", "ff"))
        for linear, gamma in (("attn1.to_q", qkv[0]), ("attn1.to_k", qkv[1]), ("attn1.to_v", qkv[2]),
                              ("attn1.to_out.0", proj * attn), ("ff.net.2", ff)):
            state[f"{prefix}{linear}.weight"] = state[f"{prefix}{linear}.weight"] * gamma[:, None]
            state[f"{prefix}{linear}.bias"] = state[f"{prefix}{linear}.bias"] * gamma
    return state


def export_transformer(transformer: torch.nn.Module, finetune: str) -> DiTTransformer2DModel:
    """A plain DiTTransformer2DModel with the fine-tuning folded in (LoRA merged, DiffFit gammas
    multiplied into the layers they scale), so DiffusionPipeline.from_pretrained loads it as is.
    Saving unmerged peft layers would write base_layer keys that reload silently wrong."""
    from diffusers import DiTTransformer2DModel

    transformer = copy.deepcopy(transformer).float()
    state = transformer.state_dict()
    if finetune == "lora":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        state = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    if finetune == "difffit":
        state = fold_difffit_gammas(state, len(transformer.transformer_blocks))
    clean = DiTTransformer2DModel.from_config(transformer.config)
    clean.load_state_dict(state)
    return clean.eval()


def blank_like(transformer: DiTTransformer2DModel, args: argparse.Namespace) -> DiTTransformer2DModel:
    """A new model shaped as the trained one (its config, the --finetune adapters or DiffFit gammas), to receive
    the weights gathered from a sharded run (tp.plain_copy)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_config(transformer.config)
    configure_finetuning(model, args)
    return model


def make_ema(params: list[torch.nn.Parameter], args: argparse.Namespace, foreach: bool = True) -> Any:
    """diffusers' EMAModel of the trained parameters, starting from their pre-trained values. With
    --ema_warmup its decay at step s is min((1+s)/(10+s), --ema_decay); without, --ema_decay from the
    first step, as DiT and the Diff-Tuning authors update theirs (min_decay pins the decay, and
    update_after_step=-1 keeps the first update from being a plain copy). ``foreach=False`` for FSDP's
    sharded parameters, which torch's fused multi-tensor copy does not take."""
    from diffusers.training_utils import EMAModel

    if args.ema_warmup:
        return EMAModel(params, decay=args.ema_decay, foreach=foreach)
    return EMAModel(params, decay=args.ema_decay, min_decay=args.ema_decay, update_after_step=-1, foreach=foreach)


def target_classes(dataset: Any, label_column: str, num_model_classes: int) -> tuple[list[str], Callable]:
    """Class names of the target dataset and a function mapping a raw label to row 0..K-1.

    Target classes reuse rows 0..K-1 of the pre-trained label table; the null row stays last, so
    classifier-free guidance keeps working (DiTPipeline hard-codes null = 1000)."""
    from datasets import ClassLabel

    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        names, to_index = list(feature.names), int
    else:
        values = sorted(set(dataset[label_column]))
        names = [str(v) for v in values]
        lookup = {v: i for i, v in enumerate(values)}
        to_index = lookup.__getitem__
    if len(names) > num_model_classes:
        raise dt.ConfigError(f"The dataset has {len(names)} classes but the model's label table has only "
                         f"{num_model_classes} (plus the null label); Diff-Tuning reuses rows 0..K-1.")
    return names, to_index


class TargetImages(torch.utils.data.Dataset):
    """The target dataset as the loader sees it: pixels and a label row per :class:`tp.SampleKey`, or,
    with a latent cache, the cached posterior of the image or of its mirror image, and no decoding."""

    def __init__(self, dataset: Any, args: argparse.Namespace, labels: list[int], channels: int,
                 latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.dataset, self.labels, self.channels, self.latent_cache = dataset, labels, channels, latent_cache
        self.image_column, self.resolution, self.seed = args.image_column, args.resolution, args.seed
        self.center_crop, self.random_flip = args.center_crop, args.random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tp.SampleKey) -> dict:
        rng = tp.sample_rng(self.seed, key)
        if self.latent_cache is not None:  # centre crop: the only draw is the flip, as in preprocess_image
            view = int(self.random_flip and rng.random() < 0.5)
            mean, std = self.latent_cache
            return {"latent_mean": mean[key.index, view], "latent_std": std[key.index, view],
                    "class_labels": self.labels[key.index]}
        pixels = tp.preprocess_image(self.dataset[key.index][self.image_column], self.resolution, self.center_crop,
                                     self.random_flip, rng, channels=self.channels)
        return {"pixel_values": pixels, "class_labels": self.labels[key.index]}


class CenteredImages(torch.utils.data.Dataset):
    """Every image centre-cropped, unflipped: what --cache_latents encodes (and mirrors)."""

    def __init__(self, dataset: Any, args: argparse.Namespace, channels: int) -> None:
        self.dataset, self.args, self.channels = dataset, args, channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return tp.preprocess_image(self.dataset[index][self.args.image_column], self.args.resolution, True, False,
                                   None, channels=self.channels)


@dataclass(kw_only=True)
class DiTStep:
    """One training step's loss, given a batch: target latents with psi timesteps and (with a bank)
    replayed bank latents with xi timesteps and the null label, one forward pass, MSE (+ VB for learned
    sigma), the Diff-Tuning combination. The training loop calls it; benchmark/overhead.py times it."""

    transformer: torch.nn.Module
    vae: torch.nn.Module | None  # None when batches carry cached latents
    noise_scheduler: Any
    vb: dt.LearnedSigmaVB | None
    psi: dt.TimestepSampler
    xi: dt.TimestepSampler
    null_class: int
    label_dropout_prob: float
    retention_weight: float
    use_weights: bool
    bank: dt.BankReplay | None = None

    def loss(self, batch: dict, step_rng: tp.StepGenerator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = tp.batch_latents(self.vae, batch, step_rng)
        device, num_target = latents.device, latents.shape[0]
        drop = step_rng.rand(num_target, device) < self.label_dropout_prob
        class_labels = torch.where(drop, self.null_class, batch["class_labels"])
        timesteps, weights = self.psi.sample(num_target, step_rng.generator, device)
        if self.bank is not None:
            bank_latents, _ = self.bank.next(step_rng.generator, lambda shape: step_rng.randn(shape, device))
            bank_t, bank_w = self.xi.sample(bank_latents.shape[0], step_rng.generator, device)
            latents = torch.cat([latents, bank_latents])
            class_labels = torch.cat([class_labels, torch.full_like(bank_t, self.null_class)])
            timesteps, weights = torch.cat([timesteps, bank_t]), torch.cat([weights, bank_w])
        noise = step_rng.randn(latents.shape, device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = self.transformer(noisy_latents, timestep=timesteps, class_labels=class_labels).sample
        per_sample = dt.per_sample_denoising_loss(model_pred, latents, noise, noisy_latents, timesteps,
                                                  self.noise_scheduler, self.vb)
        return dt.difftuning_loss(per_sample, num_target, self.retention_weight, weights if self.use_weights else None)


def denoiser_flops_per_image(transformer: torch.nn.Module, args: argparse.Namespace, latent_shape: list[int],
                             null_class: int) -> int:
    """The transformer's forward + backward FLOPs for one training image (what --finetune trains), counted on a
    weightless copy: no memory, no computation."""
    with torch.device("meta"):
        model = tp.meta_copy(transformer)
        configure_finetuning(model, args)
        x, t, y = torch.zeros(2, *latent_shape), torch.tensor([10, 900]), torch.tensor([0, null_class])
    return tp.count_flops(lambda: model(x, timestep=t, class_labels=y).sample.float().square().mean().backward()) // 2


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Every flag, grouped as ``--help`` shows them (docs/scripts/flag_tables.py writes the docs' tables from it)."""
    parser = argparse.ArgumentParser(description="Fine-tune a DiT on a class-conditional dataset with Diff-Tuning.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, default="facebook/DiT-XL-2-256",
                        help="A DiTPipeline on the Hub or in a local folder.")
    tp.add_common_args(parser)
    dit = parser.add_argument_group("DiT")
    dit.add_argument("--label_column", type=str, default="label",
                     help="The column holding the class labels (an image folder gets it from its class sub-folders).")
    dit.add_argument("--resolution", type=int, default=None,
                     help="Training resolution; default: the model's (sample_size x VAE downsampling).")
    dit.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=False,
                     help="Centre-crop instead of random-crop (DiT and the Diff-Tuning authors: on).")
    dit.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False,
                     help="Random horizontal flips of target images (and bank images) (DiT: on).")
    dit.add_argument("--label_dropout_prob", type=float, default=0.1,
                     help="Probability of replacing a target label by the null label (classifier-free guidance).")
    dit.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                     help="Keep an EMA of the trained weights; validation samples and the saved model use it.")
    dit.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (DiT: 0.9999 every step).")
    dit.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=True,
                     help="diffusers' EMA warm-up, decay min((1+s)/(10+s), --ema_decay) at step s; --no-ema_warmup "
                          "uses --ema_decay from the first step, from the pre-trained weights (DiT, the authors).")
    dit.add_argument("--finetune", choices=FINETUNE_MODES, default="full",
                     help="What to train: all weights, LoRA adapters, DiffFit or BitFit parameters.")
    tp.add_lora_args(dit)
    dit.add_argument("--authors_recipe", action="store_true",
                     help="The Diff-Tuning authors' training settings as defaults (explicit flags still win): "
                          + ", ".join(f"{k}={v}" for k, v in AUTHORS_RECIPE.items()) + ". Add --difftuning for "
                          "their method; without it, their standard fine-tuning.")
    val = next(g for g in parser._action_groups if g.title == "Validation")
    val.add_argument("--validation_class_labels", type=str, nargs="*", default=None,
                     help="Target class names (or indices) to sample at each validation.")
    val.add_argument("--validation_guidance_scale", type=float, default=4.0, help="Guidance scale for validation.")
    val.add_argument("--validation_num_inference_steps", type=int, default=50, help="Sampling steps for validation.")
    dt.add_difftuning_args(parser)
    # The authors' DiT transfer setting: AdamW lr 1e-4, no weight decay, constant lr, batch 32.
    parser.set_defaults(output_dir="dit-difftuning", learning_rate=1e-4, adam_weight_decay=0.0, lr_warmup_steps=0,
                        train_batch_size=32)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    if parser.parse_known_args(input_args)[0].authors_recipe:
        parser.set_defaults(**AUTHORS_RECIPE)
    args = parser.parse_args(input_args)
    tp.validate_common_args(args)  # every flag's range (tp.FLAG_RANGES)
    dt.validate_difftuning_args(args, bank_num_inference_steps=250, bank_guidance_scale=1.5)
    if args.cache_latents and not args.center_crop:
        raise dt.ConfigError("--cache_latents keeps one encoding per image (and its mirror image): add --center_crop, "
                             "since random crops would differ every epoch, or leave --cache_latents out.")
    return args


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


@tp.claims_output_dir
def main(args: argparse.Namespace) -> None:
    from diffusers import DDPMScheduler, DiTPipeline

    accelerator, weight_dtype = tp.setup_accelerator(args)
    repo_id = tp.hub_repo_id(args) if accelerator.is_main_process else None

    # --- Target data: every image decoded and the batch checked before any model loads ---------------------
    dataset = tp.load_train_dataset(args, {"--image_column": args.image_column, "--label_column": args.label_column})
    dataset, _ = tp.check_images(dataset, {"--image_column": args.image_column}, args.skip_bad_images)
    num_target, num_bank = dt.split_batch_size(args.train_batch_size, args.retention_ratio if args.difftuning else 0)
    if len(dataset) < num_target * accelerator.num_processes:
        raise dt.ConfigError(f"The dataset has {len(dataset)} images, fewer than one batch of {num_target} target "
                             f"samples on each of {accelerator.num_processes} process(es); lower --train_batch_size.")

    # --- Models -------------------------------------------------------------------------------
    pipeline = tp.load_pretrained(DiTPipeline.from_pretrained, "--pretrained_model_name_or_path",
                                  args.pretrained_model_name_or_path, "a DiTPipeline", revision=args.revision,
                                  variant=args.variant, cache_dir=args.cache_dir)
    transformer, vae = pipeline.transformer, pipeline.vae
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if pipeline.scheduler.config.get("variance_type") in ("learned", "learned_range"):
        # DiTPipeline drops the variance half before scheduler.step: give it a scheduler that copes.
        pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, variance_type="fixed_small")
    null_class = transformer.config.num_embeds_ada_norm
    learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    model_resolution = transformer.config.sample_size * vae_scale
    args.resolution = args.resolution or model_resolution
    if args.resolution != model_resolution:
        raise dt.ConfigError(f"--resolution {args.resolution} does not fit the model, which works on "
                             f"{model_resolution}x{model_resolution} px images ({transformer.config.sample_size}x"
                             f"{transformer.config.sample_size} latents x {vae_scale}): use --resolution "
                             f"{model_resolution} or leave it out.")
    if args.finetune == "lora":
        tp.check_lora_targets(transformer, args.lora_target_modules)
    vae.requires_grad_(False)
    vae_fingerprint = dt.model_fingerprint(vae) if args.difftuning else None  # as loaded: one bank for all precisions
    # The fp16 VAE is known to give NaNs; bf16 is safe.
    tp.cast(vae, accelerator.device, torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    tp.disable_per_block_label_dropout(transformer)
    uses_bank = args.difftuning and args.retention_ratio > 0
    base_fingerprint = dt.model_fingerprint(transformer) if uses_bank else None

    # --- Target data: its classes (the bank is built after these checks) -------------------------------
    tp.describe_image_conversion(dataset, args.image_column, vae.config.in_channels, args.resolution)
    class_names, to_index = target_classes(dataset, args.label_column, null_class)
    label_ids(args.validation_class_labels or [], class_names)  # a label that is not a class fails now, not at step N
    labels = [to_index(label) for label in dataset[args.label_column]]

    # --- Knowledge bank (built with the frozen pre-trained model, before any weight changes) ---
    bank = None
    latent_shape = [transformer.config.in_channels] + [transformer.config.sample_size] * 2
    if num_bank:
        transformer.to(accelerator.device)
        bank_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, variance_type=(
            "learned_range" if learned_sigma else noise_scheduler.config.variance_type))
        # The classes the pre-trained model knows (its id2label, e.g. 10 for our miniature), else every row.
        source_classes = sorted(set(pipeline.labels.values())) or list(range(null_class))
        label_gen = torch.Generator().manual_seed(dt.derive_seed(args.knowledge_bank_seed, "bank-labels"))
        picks = torch.randint(0, len(source_classes), (args.knowledge_bank_size,), generator=label_gen)
        sample_fn = lambda labels, gen: tp.sample_dit_latents(  # noqa: E731
            transformer, bank_scheduler, labels, args.knowledge_bank_guidance_scale,
            args.knowledge_bank_num_inference_steps, gen, null_class)
        _, bank = tp.set_up_knowledge_bank(
            args, accelerator, bank_dir=args.knowledge_bank_dir, sample_fn=sample_fn,
            conditions=[source_classes[i] for i in picks.tolist()], build_batch_size=args.knowledge_bank_batch_size,
            vae=vae, fingerprint=base_fingerprint, vae_fingerprint=vae_fingerprint,
            scheduler_name=type(bank_scheduler).__name__, guidance_scale=args.knowledge_bank_guidance_scale,
            latent_shape=latent_shape, rows_per_step=num_bank, random_flip=args.random_flip)

    # --- What to train --------------------------------------------------------------------------
    params = configure_finetuning(transformer, args)
    transformer.to(accelerator.device)
    flops_per_image = denoiser_flops_per_image(transformer, args, latent_shape, null_class)  # model FLOPs
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = tp.create_optimizer(args, params)

    # --- Data loader: a seeded permutation per epoch, per-sample augmentation from (seed, epoch, index) ---
    latent_cache = None
    if args.cache_latents:
        latent_cache = tp.cache_posteriors(vae, CenteredImages(dataset, args, vae.config.in_channels),
                                           args.random_flip, 32, args.dataloader_num_workers, accelerator.device)
    sampler = tp.EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = tp.make_dataloader(TargetImages(dataset, args, labels, vae.config.in_channels, latent_cache),
                                          num_target, sampler, args.dataloader_num_workers)
    (transformer, optimizer, train_dataloader), params = tp.prepare_training(accelerator, params, transformer,
                                                                            optimizer, train_dataloader)
    max_train_steps, num_epochs = tp.resolve_training_length(args, len(train_dataloader))
    lr_scheduler = tp.prepare_lr_scheduler(accelerator, tp.create_lr_scheduler(args, optimizer,
                                                                               accelerator.num_processes,
                                                                               max_train_steps))
    # Of the prepared parameters (FSDP replaces them by shards)
    ema = make_ema(params, args, foreach=not tp.sharded_parameters(accelerator)) if args.use_ema else None

    # --- Resume -----------------------------------------------------------------------------------
    step_rng = tp.StepGenerator(args.seed, accelerator.process_index, accelerator.device)
    per_process_state = {"step_rng": step_rng, **({"replay": bank} if bank is not None else {})}
    if ema is not None:
        ema.to(accelerator.device, dtype=torch.float32)  # DeepSpeed's bf16/fp16 mode casts the parameters
        tp.checkpoint_ema(accelerator, ema, per_process_state)
    identity = tp.checkpoint_identity(args, __file__)
    global_step, resume_path = tp.resume(accelerator, args, per_process_state, identity)
    tp.start_trackers(accelerator, args, "dit-difftuning")

    num_timesteps = noise_scheduler.config.num_train_timesteps
    step = DiTStep(
        transformer=tp.compile_for_training(transformer, args), vae=None if args.cache_latents else vae,
        noise_scheduler=noise_scheduler,
        vb=dt.LearnedSigmaVB(noise_scheduler) if learned_sigma else None,
        psi=dt.TimestepSampler(num_timesteps, args.difftuning_tau if args.difftuning else 0.0, "adaptation",
                               args.timestep_sampling),
        xi=dt.TimestepSampler(num_timesteps, args.retention_tau, "retention", args.timestep_sampling),
        null_class=null_class, label_dropout_prob=args.label_dropout_prob, retention_weight=args.retention_weight,
        use_weights=args.difftuning and args.timestep_sampling == "weighting", bank=bank)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    log = tp.TrainingLog(accelerator, args.logging_steps,
                         args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
                         flops_per_image, tp.peak_flops(accelerator.mixed_precision), args.checkpointing_steps,
                         params, args.output_dir)
    logger.info(f"***** Training: {len(dataset)} images, {len(class_names)} classes, {max_train_steps} steps, "
                f"{num_target} target + {num_bank} bank samples per device batch, finetune={args.finetune}, "
                f"difftuning={args.difftuning}, cache_latents={args.cache_latents} *****")

    # --- Training loop ---------------------------------------------------------------------------
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    for epoch in range(global_step // updates_per_epoch, num_epochs):
        transformer.train()
        for batch in tp.epoch_loader(accelerator, train_dataloader, sampler, epoch, global_step, updates_per_epoch,
                                     args.gradient_accumulation_steps):
            with accelerator.accumulate(transformer):
                loss, logs = step.loss(batch, step_rng)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            log.add(logs)

            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(params)
                global_step += 1
                progress_bar.update(1)
                logged = log.step(global_step, lr_scheduler.get_last_lr()[0], force=global_step >= max_train_steps)
                if logged:
                    progress_bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_sec']:.1f}")
                with log.paused():
                    if global_step % args.checkpointing_steps == 0:
                        tp.save_checkpoint(accelerator, args, global_step, per_process_state, keep=resume_path,
                                           identity=identity)
                    if args.validation_class_labels and global_step % args.validation_steps == 0:
                        run_validation(args, accelerator, pipeline, transformer, ema, params, class_names,
                                       global_step)
            if global_step >= max_train_steps:
                break

    # --- Save ------------------------------------------------------------------------------------
    tp.log_throughput(accelerator, log, global_step, args)
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # on every process: with sharded parameters each holds its own shard
    trained = tp.plain_copy(accelerator, transformer, lambda: blank_like(tp.unwrap(accelerator, transformer), args))
    tp.end_collectives(accelerator)
    if accelerator.is_main_process:
        final = export_transformer(trained, args.finetune)
        tp.cast(vae, vae.device, torch.float32)
        out = DiTPipeline(transformer=final, vae=vae, scheduler=pipeline.scheduler)
        out.register_to_config(id2label=dict(enumerate(class_names)))

        def write(folder: str) -> None:
            out.save_pretrained(folder, safe_serialization=True)
            if args.finetune == "lora":
                save_lora_adapter(trained, args, folder)

        tp.save_final(args.output_dir, "the fine-tuned pipeline", write)
        shown = args.validation_class_labels or class_names[: min(len(class_names), 4)]
        images = generate_images(args, out.to(accelerator.device), shown, class_names, accelerator.device)
        tp.log_images(accelerator, images, shown, global_step, tag="final")
        tp.save_model_card(args, args.pretrained_model_name_or_path, model_description(args, class_names, repo_id),
                           ["dit", "diff-tuning", "class-conditional", "diffusers",
                            "diffusers-training", args.finetune], images)
        logger.info(f"Saved the fine-tuned DiTPipeline to {args.output_dir} (load it with "
                    f"DiffusionPipeline.from_pretrained({args.output_dir!r}))")
        if args.push_to_hub:
            tp.push_output_dir(args, repo_id)
    accelerator.end_training()


# ----------------------------------------------------------------------------------------------
# Validation and output
# ----------------------------------------------------------------------------------------------


def label_ids(labels: list[str], class_names: list[str]) -> list[int]:
    """Class names (or indices as strings) -> rows of the label table, with a clear error."""
    ids = []
    for label in labels:
        if label in class_names:
            ids.append(class_names.index(label))
        elif label.isdigit() and int(label) < len(class_names):
            ids.append(int(label))
        else:
            raise dt.ConfigError(f"--validation_class_labels: {label!r} is not a class of the dataset "
                             f"({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}).")
    return ids


def generate_images(args: argparse.Namespace, pipe: DiTPipeline, labels: list[str], class_names: list[str],
                    device: torch.device) -> list:
    ids = [i for i in label_ids(labels, class_names) for _ in range(args.num_validation_images)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=ids, guidance_scale=args.validation_guidance_scale, generator=generator,
                num_inference_steps=args.validation_num_inference_steps).images


def run_validation(args: argparse.Namespace, accelerator: Any, pipeline: DiTPipeline, transformer: torch.nn.Module,
                   ema: Any, params: list, class_names: list[str], global_step: int) -> None:
    """Sample the validation classes with the current (EMA) weights and log them (main process; every process
    samples when the parameters are sharded, since each forward pass gathers them)."""
    from diffusers import DiTPipeline

    if not (accelerator.is_main_process or tp.sharded_parameters(accelerator)):
        return
    model = tp.unwrap(accelerator, transformer)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    model.eval()
    pipe = DiTPipeline(transformer=model, vae=pipeline.vae, scheduler=pipeline.scheduler)
    with tp.sampling_autocast(accelerator.device, pipeline.vae.dtype):  # the VAE may be in half precision
        images = generate_images(args, pipe, args.validation_class_labels, class_names, accelerator.device)
    tp.log_images(accelerator, images, [lbl for lbl in args.validation_class_labels
                                        for _ in range(args.num_validation_images)], global_step)
    model.train()
    tp.reshard(model)  # before the weights are restored into the shards
    if ema is not None:
        ema.restore(params)


def save_lora_adapter(transformer: torch.nn.Module, args: argparse.Namespace, output_dir: str) -> None:
    """peft-format adapter (weights + config) in ``output_dir``/transformer_lora, beside the merged pipeline."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = os.path.join(output_dir, "transformer_lora")
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    save_file(state, os.path.join(folder, "adapter_model.safetensors"))
    tp.lora_config(args).save_pretrained(folder)


def model_description(args: argparse.Namespace, class_names: list[str], repo_id: str | None) -> str:
    data = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir))
    method = (f"Diff-Tuning (psi tau {args.difftuning_tau}, xi tau {args.retention_tau}, "
              f"{args.timestep_sampling} sampling, retention ratio {args.retention_ratio}, "
              f"retention weight {args.retention_weight}, knowledge bank of {args.knowledge_bank_size} samples)"
              if args.difftuning else "standard fine-tuning")
    return (f"# DiT fine-tuned with {method}\n\n"
            f"Base model: `{tp.display_path(args.pretrained_model_name_or_path)}`. Dataset: `{data}` "
            f"({len(class_names)} classes). "
            f"Fine-tuning: `{args.finetune}`, {args.max_train_steps or '?'} steps, batch {args.train_batch_size}, "
            f"lr {args.learning_rate}.\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{tp.usage_reference(args, repo_id)}\")\n"
            f"image = pipe(class_labels=pipe.get_label_ids([\"{class_names[0]}\"]), guidance_scale=4.0).images[0]\n```")


if __name__ == "__main__":
    tp.run_cli(main, parse_args)
