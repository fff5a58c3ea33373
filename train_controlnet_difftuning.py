#!/usr/bin/env python
"""Train a ControlNet on Stable Diffusion, with or without Diff-Tuning; a drop-in for diffusers'
examples/controlnet/train_controlnet.py (same flags, dataset columns and outputs).

    accelerate launch train_controlnet_difftuning.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name fusing/fill50k --output_dir controlnet-fill50k --mixed_precision fp16 --difftuning

The result loads with ``ControlNetModel.from_pretrained(output_dir)``. Diff-Tuning itself lives in
difftuning_utils.py, the shared training plumbing in the training_plumbing package; docs/controlnet.md says
which parts of the ControlNet recipe are the paper's and which are ours.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.logging import get_logger
from PIL import Image
from tqdm.auto import tqdm

import difftuning_utils as dt
import training_plumbing as tp

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel

logger = get_logger(__name__)
RETENTION_MODES = ("none", "replay", "distill")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_MODULES_NAME = "controlnet_modules.safetensors"
# The layers ControlNet adds to its UNet copy, each ending in a zero-initialised convolution: trained in
# full even with --controlnet_lora (see configure_finetuning).
NEW_MODULES = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def conditioning_channels_for(vae: torch.nn.Module) -> tuple[int, ...]:
    """ControlNet's conditioning-embedding widths for this VAE: the embedding must downsample the
    condition image as much as the VAE downsamples the target (SD: 8x, diffusers' default widths)."""
    levels = len(vae.config.block_out_channels) - 1
    return ((16, 32, 96) + (256,) * levels)[: levels + 1]


def configure_finetuning(controlnet: ControlNetModel, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """Mark what trains; return the trainable parameters.

    Default: the whole ControlNet (upstream). --controlnet_lora: peft LoRA adapters on the attention
    projections of the UNet copy, plus the conditioning embedding and the zero convolutions in full.
    Those start at zero, so if they stayed frozen the ControlNet's output, and every LoRA gradient
    through it, would stay zero for ever.
    """
    if not args.controlnet_lora:
        controlnet.requires_grad_(True)
        return list(controlnet.parameters())
    controlnet.requires_grad_(False)
    controlnet.add_adapter(tp.lora_config(args))
    for name in NEW_MODULES:
        getattr(controlnet, name).requires_grad_(True)
    return [p for p in controlnet.parameters() if p.requires_grad]


def export_controlnet(controlnet: ControlNetModel, lora: bool) -> ControlNetModel:
    """A plain ControlNetModel (LoRA merged into the weights) that ``from_pretrained`` reloads as is.
    Saving unmerged peft layers would write ``base_layer`` keys that reload silently wrong."""
    if not lora:
        return controlnet
    merged = copy.deepcopy(controlnet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def load_controlnet_lora(folder: str, base: UNet2DConditionModel | ControlNetModel) -> ControlNetModel:
    """Rebuild the trained ControlNet from ``output_dir/controlnet_lora``: the base (the UNet it was
    initialised from, or the --controlnet_model_name_or_path ControlNet) + the LoRA + the fully trained
    new ControlNet layers, merged into a plain ControlNetModel."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    if isinstance(base, UNet2DConditionModel):
        channels = ControlNetModel.load_config(folder)["conditioning_embedding_out_channels"]
        controlnet = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=channels)
    else:
        controlnet = copy.deepcopy(base)
    controlnet.load_lora_adapter(folder, prefix=None, weight_name=LORA_WEIGHT_NAME)
    missing = controlnet.load_state_dict(load_file(os.path.join(folder, LORA_MODULES_NAME)), strict=False)
    if missing.unexpected_keys:
        raise dt.ConfigError(f"{folder} holds weights this ControlNet does not have: {missing.unexpected_keys[:3]}.")
    return export_controlnet(controlnet, lora=True)


def blank_like(controlnet: ControlNetModel, args: argparse.Namespace) -> ControlNetModel:
    """A new ControlNet shaped as the trained one (its config, the --controlnet_lora adapters), to receive the
    weights gathered from a sharded run (tp.plain_copy)."""
    from diffusers import ControlNetModel

    model = ControlNetModel.from_config(controlnet.config)
    configure_finetuning(model, args)
    return model


def plain_controlnet(accelerator: Any, controlnet: torch.nn.Module, args: argparse.Namespace
                     ) -> ControlNetModel | None:
    """The trained ControlNet as a plain module on the main process (tp.plain_copy: every process must call it)."""
    return tp.plain_copy(accelerator, controlnet, lambda: blank_like(tp.unwrap(accelerator, controlnet), args))


def register_checkpoint_hooks(accelerator: Any, args: argparse.Namespace) -> None:
    """Upstream's checkpoint layout: ``checkpoint-N/controlnet`` is a ControlNet folder usable for
    inference. Without LoRA it is also the model's resume state (accelerate does not store the weights
    twice); with LoRA it holds the merged model and accelerate keeps the adapter state for resuming.
    Under FSDP and DeepSpeed, accelerate saves and restores the model in its own files as well.
    The hooks write into tp.save_checkpoint's temporary folder, so the save stays atomic."""

    from diffusers import ControlNetModel

    lora = args.controlnet_lora

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        model = plain_controlnet(accelerator, models[0], args)
        if model is not None:
            export_controlnet(model, lora).save_pretrained(os.path.join(output_dir, "controlnet"))
        if weights and not lora:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        if not lora and models:  # (FSDP and DeepSpeed pass none: they restore the model themselves)
            model = tp.unwrap(accelerator, models.pop())
            model.load_state_dict(ControlNetModel.from_pretrained(input_dir, subfolder="controlnet").state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_image_pairs(args: argparse.Namespace, dataset: Any) -> Any:
    """Decode both images of every row before the first step (see ``tp.check_images``; a row with an
    unreadable image fails or, with --skip_bad_images, is left out) and refuse a condition whose size differs
    from its image's: it would no longer be pixel-aligned after the resize and crop."""
    columns = {"--image_column": args.image_column, "--conditioning_image_column": args.conditioning_image_column}
    dataset, sizes = tp.check_images(dataset, columns, args.skip_bad_images)
    for row, (image_size, condition_size) in enumerate(sizes):
        if image_size != condition_size:
            raise dt.ConfigError(
                f"Row {row}: {args.image_column} is {image_size[0]}x{image_size[1]} but "
                f"{args.conditioning_image_column} is {condition_size[0]}x{condition_size[1]}; each condition must "
                "have its image's size so the two stay pixel-aligned.")
    return dataset


def check_captions(captions: list) -> None:
    for i, caption in enumerate(captions):
        if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                             and all(isinstance(c, str) for c in caption))):
            raise dt.ConfigError(f"--caption_column: row {i} holds {type(caption).__name__}, "
                                 "not a string or a list of strings.")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Every flag, grouped as ``--help`` shows them (docs/scripts/flag_tables.py writes the docs' tables from it)."""
    parser = argparse.ArgumentParser(description="Train a ControlNet on Stable Diffusion, with Diff-Tuning.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="A Stable Diffusion pipeline on the Hub or in a local folder.")
    tp.add_common_args(parser)
    cn = parser.add_argument_group("ControlNet")
    cn.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                    help="A ControlNet to start from; default: initialised from the UNet.")
    cn.add_argument("--tokenizer_name", type=str, default=None, help="A tokenizer, if not the model's.")
    cn.add_argument("--resolution", type=int, default=512,
                    help="Training resolution (divisible by 8): images and conditions are resized and centre-cropped.")
    cn.add_argument("--conditioning_image_column", type=str, default="conditioning_image",
                    help="The column holding the ControlNet conditioning images.")
    cn.add_argument("--caption_column", type=str, default="text",
                    help="The column holding a caption or a list of captions.")
    cn.add_argument("--proportion_empty_prompts", type=float, default=0,
                    help="Proportion of training prompts replaced by the empty prompt.")
    cn.add_argument("--controlnet_lora", action="store_true",
                    help="Train LoRA adapters on the ControlNet's UNet copy (and the layers ControlNet adds, in full) "
                         "instead of all its weights.")
    tp.add_lora_args(cn)
    val = next(g for g in parser._action_groups if g.title == "Validation")
    val.add_argument("--validation_prompt", type=str, default=None, nargs="+",
                     help="Prompts for validation: as many as --validation_image, or one for all of them.")
    val.add_argument("--validation_image", type=str, default=None, nargs="+",
                     help="Conditioning images for validation: as many as --validation_prompt, or one for all.")
    val.add_argument("--validation_num_inference_steps", type=int, default=20,
                     help="UniPC steps for validation images (upstream: 20).")
    group = dt.add_difftuning_args(parser)
    group.add_argument("--retention", choices=RETENTION_MODES, default="none",
                       help="The retention term of --difftuning: 'none' = psi timestep sampling only (best on our "
                            "ControlNet benchmark, see docs/controlnet.md); 'replay' = knowledge-bank samples with a "
                            "null control (the paper's two-objective recipe); 'distill' = match the frozen UNet "
                            "without control on xi timesteps.")
    group.add_argument("--retention_empty_prompt", action="store_true",
                       help="Replay bank samples with the empty prompt instead of the caption that made them.")
    parser.set_defaults(output_dir="controlnet-model", tracker_project_name="train_controlnet")
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(input_args)
    tp.validate_common_args(args)  # every flag's range (tp.FLAG_RANGES)
    dt.validate_difftuning_args(args, bank_num_inference_steps=50, bank_guidance_scale=7.5)
    if (args.validation_prompt is None) != (args.validation_image is None):
        raise dt.ConfigError("--validation_prompt and --validation_image must be given together.")
    if args.validation_image is not None:
        counts = (len(args.validation_prompt), len(args.validation_image))
        if 1 not in counts and counts[0] != counts[1]:
            raise dt.ConfigError(f"{counts[0]} --validation_prompt for {counts[1]} --validation_image: give one "
                                 "of either, or as many of each.")
        for path in args.validation_image:
            if not os.path.isfile(path):
                raise dt.ConfigError(f"--validation_image {path}: no such file.")
    return args


class PairImages(torch.utils.data.Dataset):
    """The training pairs as the loader sees them, per :class:`tp.SampleKey`: the target image (or, with a
    latent cache, its cached posterior), the condition in [0, 1], and the token ids of its caption (one
    drawn at random when a row holds several)."""

    def __init__(self, dataset: Any, args: argparse.Namespace, input_ids: list[torch.Tensor],
                 latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.dataset, self.input_ids, self.latent_cache = dataset, input_ids, latent_cache
        self.image_column, self.condition_column = args.image_column, args.conditioning_image_column
        self.resolution, self.seed = args.resolution, args.seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tp.SampleKey) -> dict:
        rng = tp.sample_rng(self.seed, key)
        row = self.dataset[key.index]
        columns = (self.condition_column,) if self.latent_cache is not None else (self.image_column,
                                                                                   self.condition_column)
        # Upstream resizes with bilinear interpolation and centre-crops; no flips (a flip would need the
        # condition flipped too).
        images = [tp.preprocess_image(row[c], self.resolution, True, False, rng, resample=Image.BILINEAR)
                  for c in columns]
        ids = self.input_ids[key.index]
        item = {"conditioning_pixel_values": images[-1] * 0.5 + 0.5,  # [0, 1]
                "input_ids": ids[int(rng.integers(len(ids)))] if ids.ndim == 2 else ids}
        if self.latent_cache is None:
            item["pixel_values"] = images[0]
        else:
            item["latent_mean"], item["latent_std"] = (x[key.index, 0] for x in self.latent_cache)
        return item


class TargetPixels(torch.utils.data.Dataset):
    """Every target image as training sees it (resized, centre-cropped): what --cache_latents encodes."""

    def __init__(self, dataset: Any, args: argparse.Namespace) -> None:
        self.dataset, self.column, self.resolution = dataset, args.image_column, args.resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return tp.preprocess_image(self.dataset[index][self.column], self.resolution, True, False, None,
                                   resample=Image.BILINEAR)


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Token ids [len(prompts), max_length], padded to the tokenizer's length as Stable Diffusion is trained."""
    return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


@dataclass(kw_only=True)
class ControlNetStep:
    """One training step's loss, given a batch: target pairs with psi timesteps and, for retention,
    ``num_retention`` rows with xi timesteps: knowledge-bank latents with their prompts and a null
    (all-zero) control (``replay``), or the batch's last rows with the frozen UNet's own prediction
    without control as the target (``distill``). One text-encoder call, the ControlNet and the UNet, the
    Diff-Tuning combination. The training loop calls it; benchmark/overhead.py times it."""

    controlnet: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None  # None when batches carry cached latents
    noise_scheduler: Any
    psi: dt.TimestepSampler
    xi: dt.TimestepSampler
    empty_ids: torch.Tensor
    proportion_empty_prompts: float
    retention_weight: float
    use_weights: bool
    weight_dtype: torch.dtype
    num_retention: int = 0
    distill: bool = False
    bank: dt.BankReplay | None = None
    bank_input_ids: torch.Tensor | None = None

    def loss(self, batch: dict, step_rng: tp.StepGenerator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = tp.batch_latents(self.vae, batch, step_rng)
        device, num_rows = latents.device, latents.shape[0]
        num_target = num_rows - (self.num_retention if self.distill else 0)
        drop = step_rng.rand(num_rows, device) < self.proportion_empty_prompts
        input_ids = torch.where(drop[:, None], self.empty_ids, batch["input_ids"])
        controlnet_image = batch["conditioning_pixel_values"]
        timesteps, weights = self.psi.sample(num_target, step_rng.generator, device)
        if self.num_retention:
            bank_t, bank_w = self.xi.sample(self.num_retention, step_rng.generator, device)
            timesteps, weights = torch.cat([timesteps, bank_t]), torch.cat([weights, bank_w])
        if self.bank is not None:  # replay: the bank's latents, their prompts, a null (all-zero) control
            bank_latents, indices = self.bank.next(step_rng.generator, lambda shape: step_rng.randn(shape, device))
            latents = torch.cat([latents, bank_latents])
            input_ids = torch.cat([input_ids, self.bank_input_ids[indices]])
            controlnet_image = torch.cat([controlnet_image, controlnet_image.new_zeros(
                (self.num_retention, *controlnet_image.shape[1:]))])
        noise = step_rng.randn(latents.shape, device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps).to(self.weight_dtype)
        encoder_hidden_states = self.text_encoder(input_ids, return_dict=False)[0]
        down_block_res_samples, mid_block_res_sample = self.controlnet(
            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_image.to(self.weight_dtype), return_dict=False)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                               down_block_additional_residuals=[r.to(self.weight_dtype)
                                                                for r in down_block_res_samples],
                               mid_block_additional_residual=mid_block_res_sample.to(self.weight_dtype)).sample
        target = None
        if self.distill:  # retention rows: the frozen UNet's own prediction, without control
            target = dt.prediction_target(self.noise_scheduler, latents, noise, timesteps)
            with torch.no_grad():
                teacher = self.unet(noisy_latents[num_target:], timesteps[num_target:],
                                    encoder_hidden_states=encoder_hidden_states[num_target:]).sample
            target = torch.cat([target[:num_target], teacher.to(target.dtype)])
        per_sample = dt.per_sample_denoising_loss(model_pred, latents, noise, noisy_latents, timesteps,
                                                  self.noise_scheduler, target=target)
        return dt.difftuning_loss(per_sample, num_target, self.retention_weight, weights if self.use_weights else None)


def denoiser_flops_per_image(controlnet: torch.nn.Module, unet: torch.nn.Module, args: argparse.Namespace,
                             latent_shape: list[int], resolution: int, context: torch.Tensor) -> int:
    """Forward + backward FLOPs of the ControlNet (what is trained of it) and the frozen UNet it feeds, for one
    training image, counted on weightless copies: no memory, no computation."""
    with torch.device("meta"):
        controlnet, unet = tp.meta_copy(controlnet), tp.meta_copy(unet)
        configure_finetuning(controlnet, args)
        x, t = torch.zeros(2, *latent_shape), torch.tensor([10, 900])
        cond, context = torch.zeros(2, 3, resolution, resolution), torch.zeros(2, *context.shape[1:])

    def fwd_bwd() -> None:
        down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
             mid_block_additional_residual=mid).sample.float().square().mean().backward()

    return tp.count_flops(fwd_bwd) // 2


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


@tp.claims_output_dir
def main(args: argparse.Namespace) -> None:
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

    accelerator, weight_dtype = tp.setup_accelerator(args)
    if weight_dtype == torch.float16 and accelerator.device.type == "cpu":  # the fp32 ControlNet meets fp16 inputs
        raise dt.ConfigError("--mixed_precision fp16 needs a GPU: accelerate runs no fp16 autocast on the CPU, "
                             "which the float32 ControlNet relies on; use bf16 or no.")
    repo_id = tp.hub_repo_id(args) if accelerator.is_main_process else None

    # --- Target data: every pair decoded and compared, and the batch checked, before any model loads ------------
    dataset = tp.load_train_dataset(args, {"--image_column": args.image_column,
                                           "--conditioning_image_column": args.conditioning_image_column,
                                           "--caption_column": args.caption_column})
    dataset = check_image_pairs(args, dataset)
    captions = list(dataset[args.caption_column])
    check_captions(captions)
    ratio = args.retention_ratio if args.difftuning and args.retention != "none" else 0
    num_target, num_retention = dt.split_batch_size(args.train_batch_size, ratio)
    distill = bool(num_retention) and args.retention == "distill"
    num_data = num_target + (num_retention if distill else 0)  # distill: retention rows are training pairs too
    if len(dataset) < num_data * accelerator.num_processes:
        raise dt.ConfigError(f"The dataset has {len(dataset)} pairs, fewer than one batch of {num_data} on each of "
                             f"{accelerator.num_processes} process(es); lower --train_batch_size.")

    # --- Models -------------------------------------------------------------------------------
    pipeline = tp.load_pretrained(StableDiffusionPipeline.from_pretrained, "--pretrained_model_name_or_path",
                                  args.pretrained_model_name_or_path, "a Stable Diffusion pipeline",
                                  revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
                                  safety_checker=None, requires_safety_checker=False)
    if args.tokenizer_name:
        from transformers import AutoTokenizer

        pipeline.tokenizer = tp.load_pretrained(AutoTokenizer.from_pretrained, "--tokenizer_name", args.tokenizer_name,
                                                "a tokenizer", revision=args.revision)
    controlnet = None
    if args.controlnet_model_name_or_path:
        controlnet = tp.load_pretrained(ControlNetModel.from_pretrained, "--controlnet_model_name_or_path",
                                        args.controlnet_model_name_or_path, "a ControlNet", cache_dir=args.cache_dir)
    tokenizer, text_encoder, vae, unet = pipeline.tokenizer, pipeline.text_encoder, pipeline.vae, pipeline.unet
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % vae_scale:
        raise dt.ConfigError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling {vae_scale}.")
    controlnet = controlnet or ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(
        conditioning_channels_for(vae)))
    if 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1) != vae_scale:
        raise dt.ConfigError(f"--controlnet_model_name_or_path downsamples its condition by "
                             f"{2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)}, the VAE by "
                             f"{vae_scale}: the two must match.")
    if controlnet.dtype != torch.float32:
        raise dt.ConfigError(f"The ControlNet was loaded as {controlnet.dtype}; trainable weights must be float32.")
    if args.controlnet_lora:
        tp.check_lora_targets(controlnet, args.lora_target_modules)
    base_fingerprint = dt.model_fingerprint(unet) if args.difftuning and args.retention == "replay" else None
    vae_fingerprint = dt.model_fingerprint(vae) if base_fingerprint else None  # before the cast, like the UNet's
    for frozen in (vae, unet, text_encoder):  # upstream: frozen parts in the mixed-precision dtype
        frozen.requires_grad_(False)
        tp.cast(frozen, accelerator.device, weight_dtype)
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()

    # --- Target data: the captions' token ids (the bank is built after these checks) ----------------------
    tp.describe_image_conversion(dataset, args.image_column, 3, args.resolution)
    input_ids = [tokenize(tokenizer, [c] if isinstance(c, str) else c) for c in captions]
    input_ids = [ids[0] if len(ids) == 1 else ids for ids in input_ids]

    # --- Knowledge bank (replay: the frozen SD's own samples for the dataset's captions) -----------
    bank, bank_input_ids = None, None
    if num_retention and args.retention == "replay":
        prompt_gen = torch.Generator().manual_seed(dt.derive_seed(args.knowledge_bank_seed, "bank-prompts"))
        picks = torch.randint(0, len(captions), (args.knowledge_bank_size,), generator=prompt_gen).tolist()
        prompts = [c if isinstance(c, str) else c[0] for c in (captions[i] for i in picks)]
        sample_fn = lambda batch, gen: pipeline(  # noqa: E731
            batch, height=args.resolution, width=args.resolution, generator=gen, output_type="latent",
            num_inference_steps=args.knowledge_bank_num_inference_steps,
            guidance_scale=args.knowledge_bank_guidance_scale).images
        latent_size = args.resolution // vae_scale
        # No flips: upstream's ControlNet data pipeline has none, so the bank's images are not flipped either.
        bank_contents, bank = tp.set_up_knowledge_bank(
            args, accelerator, bank_dir=args.knowledge_bank_dir, sample_fn=sample_fn, conditions=prompts,
            build_batch_size=args.knowledge_bank_batch_size, vae=vae, fingerprint=base_fingerprint,
            vae_fingerprint=vae_fingerprint, scheduler_name=type(pipeline.scheduler).__name__,
            guidance_scale=args.knowledge_bank_guidance_scale,
            latent_shape=[unet.config.in_channels, latent_size, latent_size], rows_per_step=num_retention,
            random_flip=False, extra_identity={"resolution": args.resolution})
        # Token ids, not embeddings: the bank's prompts ride in the target batch's one text-encoder
        # call (about 1% of a step), so memory does not grow with the bank.
        bank_input_ids = tokenize(tokenizer, [""] * len(bank_contents) if args.retention_empty_prompt
                                  else bank_contents.conditions).to(accelerator.device)

    # --- What to train --------------------------------------------------------------------------
    register_checkpoint_hooks(accelerator, args)
    params = configure_finetuning(controlnet, args)
    controlnet.train()
    latent_size = args.resolution // vae_scale
    with torch.no_grad():
        context = text_encoder(tokenize(tokenizer, [""]).to(accelerator.device), return_dict=False)[0]
    controlnet.to(accelerator.device)
    flops_per_image = denoiser_flops_per_image(controlnet, unet, args, [unet.config.in_channels, latent_size,
                                                                        latent_size], args.resolution, context)
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = tp.create_optimizer(args, params)

    # --- Data loader: a seeded permutation per epoch, per-sample choices from (seed, epoch, index) ---
    latent_cache = None
    if args.cache_latents:
        latent_cache = tp.cache_posteriors(vae, TargetPixels(dataset, args), False, 32, args.dataloader_num_workers,
                                           accelerator.device)
    sampler = tp.EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = tp.make_dataloader(PairImages(dataset, args, input_ids, latent_cache), num_data, sampler,
                                          args.dataloader_num_workers)
    (controlnet, optimizer, train_dataloader), params = tp.prepare_training(accelerator, params, controlnet,
                                                                           optimizer, train_dataloader)
    max_train_steps, num_epochs = tp.resolve_training_length(args, len(train_dataloader))
    lr_scheduler = tp.prepare_lr_scheduler(accelerator, tp.create_lr_scheduler(args, optimizer,
                                                                               accelerator.num_processes,
                                                                               max_train_steps))

    # --- Resume -----------------------------------------------------------------------------------
    step_rng = tp.StepGenerator(args.seed, accelerator.process_index, accelerator.device)
    per_process_state = {"step_rng": step_rng, **({"replay": bank} if bank is not None else {})}
    identity = tp.checkpoint_identity(args, __file__)
    global_step, resume_path = tp.resume(accelerator, args, per_process_state, identity)
    tp.start_trackers(accelerator, args, "controlnet-difftuning")

    num_timesteps = noise_scheduler.config.num_train_timesteps
    empty_ids = tokenize(tokenizer, [""]).to(accelerator.device)
    step = ControlNetStep(
        controlnet=tp.compile_for_training(controlnet, args), unet=tp.compile_for_training(unet, args),
        text_encoder=text_encoder, vae=None if args.cache_latents else vae,
        noise_scheduler=noise_scheduler,
        psi=dt.TimestepSampler(num_timesteps, args.difftuning_tau if args.difftuning else 0.0, "adaptation",
                               args.timestep_sampling),
        xi=dt.TimestepSampler(num_timesteps, args.retention_tau, "retention", args.timestep_sampling),
        empty_ids=empty_ids, proportion_empty_prompts=args.proportion_empty_prompts,
        retention_weight=args.retention_weight, use_weights=args.difftuning and args.timestep_sampling == "weighting",
        weight_dtype=weight_dtype, num_retention=num_retention, distill=distill, bank=bank,
        bank_input_ids=bank_input_ids)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    log = tp.TrainingLog(accelerator, args.logging_steps,
                         args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
                         flops_per_image, tp.peak_flops(accelerator.mixed_precision), args.checkpointing_steps,
                         params, args.output_dir)
    logger.info(f"***** Training: {len(dataset)} pairs, {max_train_steps} steps, {num_target} target + "
                f"{num_retention} retention samples per device batch, difftuning={args.difftuning}, "
                f"retention={args.retention}, lora={args.controlnet_lora}, cache_latents={args.cache_latents} *****")

    # --- Training loop ---------------------------------------------------------------------------
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    for epoch in range(global_step // updates_per_epoch, num_epochs):
        controlnet.train()
        for batch in tp.epoch_loader(accelerator, train_dataloader, sampler, epoch, global_step, updates_per_epoch,
                                     args.gradient_accumulation_steps):
            with accelerator.accumulate(controlnet):
                loss, logs = step.loss(batch, step_rng)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            log.add(logs)

            if accelerator.sync_gradients:
                global_step += 1
                progress_bar.update(1)
                logged = log.step(global_step, lr_scheduler.get_last_lr()[0], force=global_step >= max_train_steps)
                if logged:
                    progress_bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_sec']:.1f}")
                with log.paused():
                    if global_step % args.checkpointing_steps == 0:
                        tp.save_checkpoint(accelerator, args, global_step, per_process_state, keep=resume_path,
                                           identity=identity)
                    if args.validation_prompt and global_step % args.validation_steps == 0:
                        run_validation(args, accelerator, pipeline, controlnet, global_step)
            if global_step >= max_train_steps:
                break

    # --- Save ------------------------------------------------------------------------------------
    tp.log_throughput(accelerator, log, global_step, args)
    accelerator.wait_for_everyone()
    controlnet = plain_controlnet(accelerator, controlnet, args)
    tp.end_collectives(accelerator)
    if accelerator.is_main_process:
        final = export_controlnet(controlnet, args.controlnet_lora)

        def write(folder: str) -> None:
            final.save_pretrained(folder)
            if args.controlnet_lora:
                save_lora_adapter(controlnet, folder)

        tp.save_final(args.output_dir, "the fine-tuned ControlNet", write)
        pairs = validation_pairs(args) or [(captions[0] if isinstance(captions[0], str) else captions[0][0],
                                            tp.convert_image(dataset[0][args.conditioning_image_column], "RGB"))]
        images, labels = generate_images(args, accelerator, pipeline,
                                         sampling_controlnet(final, False, pipeline.unet.dtype), pairs)
        tp.log_images(accelerator, images, labels, global_step, tag="final")
        tp.save_model_card(args, args.pretrained_model_name_or_path, model_description(args, pairs, repo_id),
                           ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers",
                            "controlnet", "diffusers-training", "diff-tuning"], images)
        logger.info(f"Saved the ControlNet to {args.output_dir} (load it with "
                    f"ControlNetModel.from_pretrained({args.output_dir!r}))")
        if args.push_to_hub:
            tp.push_output_dir(args, repo_id)
    accelerator.end_training()


# ----------------------------------------------------------------------------------------------
# Validation and output
# ----------------------------------------------------------------------------------------------


def validation_pairs(args: argparse.Namespace) -> list[tuple[str, Image.Image]]:
    """(prompt, conditioning image) pairs from --validation_prompt/--validation_image, paired as upstream."""
    if not args.validation_prompt:
        return []
    prompts, paths = args.validation_prompt, args.validation_image
    if len(prompts) == 1:
        prompts = prompts * len(paths)
    elif len(paths) == 1:
        paths = paths * len(prompts)
    return [(p, tp.convert_image(Image.open(path), "RGB")) for p, path in zip(prompts, paths, strict=True)]


def generate_images(args: argparse.Namespace, accelerator: Any, pipeline: StableDiffusionPipeline,
                    controlnet: ControlNetModel, pairs: list) -> tuple[list, list[str]]:
    """For each pair: the conditioning image, then --num_validation_images samples (UniPC)."""
    from diffusers import StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionControlNetPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=pipeline.unet,
        controlnet=controlnet, scheduler=UniPCMultistepScheduler.from_config(pipeline.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    images, labels = [], []
    for prompt, condition in pairs:
        samples = []
        for _ in range(args.num_validation_images):
            samples += pipe(prompt, condition, num_inference_steps=args.validation_num_inference_steps,
                            generator=generator).images
        images += [condition.resize(samples[0].size)] + samples
        labels += ["ControlNet conditioning"] + [prompt] * len(samples)
    return images, labels


def sampling_controlnet(controlnet: ControlNetModel, lora: bool, dtype: torch.dtype) -> ControlNetModel:
    """A plain ControlNet in the frozen parts' dtype for the pipeline, as upstream's final validation
    loads it. The training model cannot be used as is: accelerate wraps its forward to return fp32,
    which a half-precision UNet cannot add to its activations without CUDA autocast. Built on the
    meta device and given the trained tensors, so no fp32 copy is made (none at all without mixed
    precision)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        model = ControlNetModel.from_config(controlnet.config)
    model.load_state_dict(export_controlnet(controlnet, lora).state_dict(), assign=True)
    return tp.cast(model, model.device, dtype).eval()


def run_validation(args: argparse.Namespace, accelerator: Any, pipeline: StableDiffusionPipeline,
                   controlnet: torch.nn.Module, global_step: int) -> None:
    """Sample the validation pairs with the current weights and log them (main process only; with sharded
    parameters every process first joins in gathering them)."""
    trained = plain_controlnet(accelerator, controlnet, args)
    if not accelerator.is_main_process:
        return
    model = sampling_controlnet(trained, args.controlnet_lora, pipeline.unet.dtype)
    images, labels = generate_images(args, accelerator, pipeline, model, validation_pairs(args))
    tp.log_images(accelerator, images, labels, global_step)


def save_lora_adapter(controlnet: ControlNetModel, output_dir: str) -> None:
    """``output_dir``/controlnet_lora: the LoRA (diffusers' format), the fully trained new ControlNet
    layers and the ControlNet config, beside the merged model; reload with load_controlnet_lora."""
    from safetensors.torch import save_file

    folder = os.path.join(output_dir, "controlnet_lora")
    controlnet.save_lora_adapter(folder, weight_name=LORA_WEIGHT_NAME)
    modules = {k: v.detach().float().contiguous().cpu() for k, v in controlnet.state_dict().items()
               if k.startswith(NEW_MODULES)}
    save_file(modules, os.path.join(folder, LORA_MODULES_NAME))
    controlnet.save_config(folder)


def model_description(args: argparse.Namespace, pairs: list, repo_id: str | None) -> str:
    data = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir))
    retention = {"replay": f"knowledge-bank replay ({args.knowledge_bank_size} samples, null control)",
                 "distill": "distillation toward the frozen UNet without control",
                 "none": "no retention term"}[args.retention]
    if not args.difftuning:
        method = "standard ControlNet training"
    elif args.retention == "none":
        method = f"Diff-Tuning (psi tau {args.difftuning_tau}, {args.timestep_sampling} sampling, {retention})"
    else:
        method = (f"Diff-Tuning (psi tau {args.difftuning_tau}, xi tau {args.retention_tau}, {args.timestep_sampling} "
                  f"sampling, {retention}, retention ratio {args.retention_ratio}, weight {args.retention_weight})")
    return (f"# ControlNet trained with {method}\n\n"
            f"Base model: `{tp.display_path(args.pretrained_model_name_or_path)}`. Dataset: `{data}`. "
            f"{'LoRA rank ' + str(args.rank) + ', ' if args.controlnet_lora else ''}{args.max_train_steps or '?'} "
            f"steps, batch {args.train_batch_size}, lr {args.learning_rate}, resolution {args.resolution}.\n\n"
            "Samples: each conditioning image, then the images generated from it.\n\n"
            "```python\nfrom diffusers import ControlNetModel, StableDiffusionControlNetPipeline\n"
            "from diffusers.utils import load_image\n\n"
            f"controlnet = ControlNetModel.from_pretrained(\"{tp.usage_reference(args, repo_id)}\")\n"
            "pipe = StableDiffusionControlNetPipeline.from_pretrained(\n"
            f"    \"{tp.display_path(args.pretrained_model_name_or_path)}\", controlnet=controlnet)\n"
            "control_image = load_image(\"condition.png\")  # a conditioning image like the training ones\n"
            f"image = pipe(\"{pairs[0][0]}\", control_image).images[0]\n```")


if __name__ == "__main__":
    tp.run_cli(main, parse_args)
