#!/usr/bin/env python
"""Train a ControlNet on Stable Diffusion, with or without Diff-Tuning; a drop-in for diffusers'
examples/controlnet/train_controlnet.py (same flags, dataset columns and outputs).

    accelerate launch train_controlnet_difftuning.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name fusing/fill50k --output_dir controlnet-fill50k --mixed_precision fp16 --difftuning

The result loads with ``ControlNetModel.from_pretrained(output_dir)``. Diff-Tuning itself lives in
difftuning_utils.py, the shared training plumbing in training_plumbing.py; docs/controlnet.md says
which parts of the ControlNet recipe are the paper's and which are ours.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

import difftuning_utils as dt
import training_plumbing as tp

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
    from peft import LoraConfig

    controlnet.requires_grad_(False)
    controlnet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank,
                                      init_lora_weights="gaussian",
                                      target_modules=[m.strip() for m in args.lora_target_modules.split(",")]))
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


def register_checkpoint_hooks(accelerator, lora: bool) -> None:
    """Upstream's checkpoint layout: ``checkpoint-N/controlnet`` is a ControlNet folder usable for
    inference. Without LoRA it is also the model's resume state (accelerate does not store the weights
    twice); with LoRA it holds the merged model and accelerate keeps the adapter state for resuming.
    The hooks write into tp.save_checkpoint's temporary folder, so the save stays atomic."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            model = export_controlnet(accelerator.unwrap_model(models[0]), lora)
            model.save_pretrained(os.path.join(output_dir, "controlnet"))
        if weights and not lora:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        if not lora:
            model = accelerator.unwrap_model(models.pop())
            model.load_state_dict(ControlNetModel.from_pretrained(input_dir, subfolder="controlnet").state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_image_pairs(dataset, image_column: str, conditioning_column: str) -> None:
    """Open both images of every row (headers only) before the first step: an unreadable file, or a
    condition whose size differs from its image's (it would no longer be pixel-aligned after the
    resize and crop), fails here naming the row and file, not thousands of steps in."""
    import io

    from datasets import Image as ImageFeature

    raw = dataset.select_columns([image_column, conditioning_column])
    for column in (image_column, conditioning_column):
        raw = raw.cast_column(column, ImageFeature(decode=False))
    for chunk_index, chunk in enumerate(raw.iter(batch_size=1000)):
        for offset, pair in enumerate(zip(chunk[image_column], chunk[conditioning_column], strict=True)):
            row, sizes = chunk_index * 1000 + offset, []
            for column, item in zip((image_column, conditioning_column), pair, strict=True):
                name = item.get("path") or f"of row {row}"
                try:
                    sizes.append(Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]).size)
                except Exception as err:
                    raise dt.ConfigError(f"{column} {name} cannot be read ({type(err).__name__}: {err}).") from err
            if sizes[0] != sizes[1]:
                raise dt.ConfigError(
                    f"Row {row} ({pair[0].get('path') or 'in memory'}): {image_column} is "
                    f"{sizes[0][0]}x{sizes[0][1]} but {conditioning_column} is {sizes[1][0]}x{sizes[1][1]}; "
                    "each condition must have its image's size so the two stay pixel-aligned.")


def check_captions(captions: list) -> None:
    for i, caption in enumerate(captions):
        if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                             and all(isinstance(c, str) for c in caption))):
            raise dt.ConfigError(f"--caption_column: row {i} holds {type(caption).__name__}, "
                                 "not a string or a list of strings.")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a ControlNet on Stable Diffusion, with Diff-Tuning.")
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
    cn.add_argument("--validation_prompt", type=str, default=None, nargs="+",
                    help="Prompts for validation: as many as --validation_image, or one for all of them.")
    cn.add_argument("--validation_image", type=str, default=None, nargs="+",
                    help="Conditioning images for validation: as many as --validation_prompt, or one for all.")
    cn.add_argument("--validation_num_inference_steps", type=int, default=20,
                    help="UniPC steps for validation images (upstream: 20).")
    cn.add_argument("--controlnet_lora", action="store_true",
                    help="Train LoRA adapters on the ControlNet's UNet copy (and the layers ControlNet adds, in full) "
                         "instead of all its weights.")
    cn.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    cn.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha; default: the rank.")
    cn.add_argument("--lora_target_modules", type=str, default="to_k,to_q,to_v,to_out.0",
                    help="Comma-separated module names that get LoRA adapters.")
    group = dt.add_difftuning_args(parser)
    group.add_argument("--retention", choices=RETENTION_MODES, default="replay",
                       help="How the pre-trained model's knowledge is kept (provisional default, see "
                            "docs/controlnet.md): 'replay' = knowledge-bank samples with a null control; "
                            "'distill' = match the frozen UNet without control on xi timesteps; 'none'.")
    group.add_argument("--retention_empty_prompt", action="store_true",
                       help="Replay bank samples with the empty prompt instead of the caption that made them.")
    parser.set_defaults(output_dir="controlnet-model", tracker_project_name="train_controlnet")
    args = parser.parse_args(input_args)
    tp.validate_common_args(args)
    dt.validate_difftuning_args(args, bank_num_inference_steps=50, bank_guidance_scale=7.5)
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise dt.ConfigError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}.")
    if args.controlnet_lora and args.rank < 1:
        raise dt.ConfigError(f"--rank must be >= 1, got {args.rank}.")
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


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    accelerator, weight_dtype = tp.setup_accelerator(args)
    repo_id = tp.hub_repo_id(args) if accelerator.is_main_process else None

    # --- Models -------------------------------------------------------------------------------
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
            cache_dir=args.cache_dir, safety_checker=None, requires_safety_checker=False)
        if args.tokenizer_name:
            from transformers import AutoTokenizer

            pipeline.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
        controlnet = (ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, cache_dir=args.cache_dir)
                      if args.controlnet_model_name_or_path else None)
    except (OSError, ValueError) as err:
        raise dt.ConfigError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} (or the ControlNet "
                             f"or tokenizer) could not be loaded ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]}).") from err
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
    base_fingerprint = dt.model_fingerprint(unet) if args.difftuning and args.retention == "replay" else None
    for frozen in (vae, unet, text_encoder):  # upstream: frozen parts in the mixed-precision dtype
        frozen.requires_grad_(False)
        frozen.to(accelerator.device, dtype=weight_dtype)
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()

    def tokenize(prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    # --- Target data (checked before the expensive bank build) -------------------------------------
    dataset = tp.load_train_dataset(args, {"--image_column": args.image_column,
                                           "--conditioning_image_column": args.conditioning_image_column,
                                           "--caption_column": args.caption_column})
    check_image_pairs(dataset, args.image_column, args.conditioning_image_column)
    captions = list(dataset[args.caption_column])
    check_captions(captions)

    # --- Knowledge bank (replay: the frozen SD's own samples for the dataset's captions) -----------
    bank = None
    ratio = args.retention_ratio if args.difftuning and args.retention != "none" else 0
    num_target, num_bank = dt.split_batch_size(args.train_batch_size, ratio)
    distill = bool(num_bank) and args.retention == "distill"
    if num_bank and args.retention == "replay":
        prompt_gen = torch.Generator().manual_seed(dt.derive_seed(args.seed or 0, "bank-prompts"))
        picks = torch.randint(0, len(captions), (args.knowledge_bank_size,), generator=prompt_gen).tolist()
        prompts = [c if isinstance(c, str) else c[0] for c in (captions[i] for i in picks)]
        settings = {"base_model": args.pretrained_model_name_or_path, "revision": args.revision,
                    "fingerprint": base_fingerprint, "scheduler": type(pipeline.scheduler).__name__,
                    "num_inference_steps": args.knowledge_bank_num_inference_steps,
                    "guidance_scale": args.knowledge_bank_guidance_scale, "resolution": args.resolution}
        sample_fn = lambda batch, gen: pipeline(  # noqa: E731
            batch, height=args.resolution, width=args.resolution, generator=gen, output_type="latent",
            num_inference_steps=args.knowledge_bank_num_inference_steps,
            guidance_scale=args.knowledge_bank_guidance_scale).images
        with accelerator.autocast():
            dt.build_knowledge_bank(args.knowledge_bank_dir, sample_fn, prompts, args.knowledge_bank_batch_size,
                                    args.seed or 0, settings)
        latent_size = args.resolution // vae_scale
        bank = dt.load_knowledge_bank(args.knowledge_bank_dir, base_fingerprint,
                                      [unet.config.in_channels, latent_size, latent_size])
        preview = os.path.join(args.knowledge_bank_dir, "preview.png")
        if accelerator.is_main_process and not os.path.exists(preview):
            dt.save_bank_preview(bank.latents[:16], lambda z: tp.decode_latents(vae, z), preview)
        bank_latents = bank.latents.to(accelerator.device)  # small: kept on device, no per-step copy
        # Token ids, not embeddings: the bank's prompts ride in the target batch's one text-encoder
        # call (about 1% of a step), so memory does not grow with the bank.
        bank_input_ids = tokenize([""] * len(bank) if args.retention_empty_prompt else bank.conditions)
        bank_input_ids = bank_input_ids.to(accelerator.device)
        replay = dt.ReplayStream(len(bank), num_bank, args.seed or 0, accelerator.process_index)

    # --- What to train --------------------------------------------------------------------------
    register_checkpoint_hooks(accelerator, args.controlnet_lora)
    params = configure_finetuning(controlnet, args)
    controlnet.train()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = tp.create_optimizer(args, params)

    # --- Data loader: a seeded permutation per epoch, per-sample choices from (seed, epoch, index) ---
    class PairDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, sampler_index: int) -> dict:
            rng = tp.sample_rng(args.seed, sampler_index)[1]
            row = dataset[sampler_index % len(dataset)]
            pixels, condition = (tp.preprocess_image(row[column], args.resolution, True, False, rng,
                                                     resample=Image.BILINEAR)
                                 for column in (args.image_column, args.conditioning_image_column))
            caption = row[args.caption_column]
            caption = caption if isinstance(caption, str) else caption[int(rng.integers(len(caption)))]
            return {"pixel_values": pixels, "conditioning_pixel_values": condition * 0.5 + 0.5,  # [0, 1]
                    "input_ids": tokenize([caption])[0]}

    num_data = num_target + (num_bank if distill else 0)  # distill: retention rows are training pairs too
    sampler = tp.EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(PairDataset(), batch_size=num_data, sampler=sampler,
                                                   num_workers=args.dataloader_num_workers, drop_last=True)
    if len(dataset) < num_data * accelerator.num_processes:
        raise dt.ConfigError(f"The dataset has {len(dataset)} pairs, fewer than one batch of {num_data} on each of "
                             f"{accelerator.num_processes} process(es); lower --train_batch_size.")
    controlnet, optimizer, train_dataloader = accelerator.prepare(controlnet, optimizer, train_dataloader)
    max_train_steps, num_epochs = tp.resolve_training_length(args, len(train_dataloader))
    lr_scheduler = accelerator.prepare(tp.create_lr_scheduler(args, optimizer, accelerator.num_processes,
                                                              max_train_steps))

    # --- Resume -----------------------------------------------------------------------------------
    step_rng = tp.StepGenerator(args.seed, accelerator.process_index, accelerator.device)
    per_process_state = {"step_rng": step_rng, **({"replay": replay} if bank is not None else {})}
    resume_path = tp.resolve_resume_checkpoint(args)
    global_step = tp.load_checkpoint(accelerator, resume_path, per_process_state) if resume_path else 0
    if accelerator.is_main_process:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)

    tau_target = args.difftuning_tau if args.difftuning else 0.0
    num_timesteps = noise_scheduler.config.num_train_timesteps
    psi = dt.TimestepSampler(num_timesteps, tau_target, "adaptation", args.timestep_sampling)
    xi = dt.TimestepSampler(num_timesteps, args.retention_tau, "retention", args.timestep_sampling)
    use_weights = args.difftuning and args.timestep_sampling == "weighting"
    empty_ids = tokenize([""]).to(accelerator.device)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    logger.info(f"***** Training: {len(dataset)} pairs, {max_train_steps} steps, {num_target} target + {num_bank} "
                f"retention samples per device batch, difftuning={args.difftuning}, retention={args.retention}, "
                f"lora={args.controlnet_lora} *****")

    # --- Training loop ---------------------------------------------------------------------------
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    loop_start, first_step = time.perf_counter(), global_step
    for epoch in range(global_step // updates_per_epoch, num_epochs):
        controlnet.train()
        for batch in tp.epoch_loader(accelerator, train_dataloader, sampler, epoch, global_step, updates_per_epoch,
                                     args.gradient_accumulation_steps):
            with accelerator.accumulate(controlnet):
                latents = tp.encode_latents(vae, batch["pixel_values"], step_rng)
                drop = step_rng.rand(num_data, accelerator.device) < args.proportion_empty_prompts
                input_ids = torch.where(drop[:, None], empty_ids, batch["input_ids"])
                controlnet_image = batch["conditioning_pixel_values"]
                timesteps, weights = psi.sample(num_target, step_rng.generator, accelerator.device)
                if num_bank:
                    bank_t, bank_w = xi.sample(num_bank, step_rng.generator, accelerator.device)
                    timesteps, weights = torch.cat([timesteps, bank_t]), torch.cat([weights, bank_w])
                if bank is not None:  # replay: the bank's latents, their prompts, a null (all-zero) control
                    indices = replay.next_indices().to(accelerator.device)
                    latents = torch.cat([latents, bank_latents[indices]])
                    input_ids = torch.cat([input_ids, bank_input_ids[indices]])
                    controlnet_image = torch.cat([controlnet_image,
                                                  controlnet_image.new_zeros((num_bank, *controlnet_image.shape[1:]))])
                noise = step_rng.randn(latents.shape, accelerator.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
                encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
                down_block_res_samples, mid_block_res_sample = controlnet(
                    noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                    controlnet_cond=controlnet_image.to(weight_dtype), return_dict=False)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                  down_block_additional_residuals=[s.to(weight_dtype) for s in down_block_res_samples],
                                  mid_block_additional_residual=mid_block_res_sample.to(weight_dtype)).sample
                target = dt.prediction_target(noise_scheduler, latents, noise, timesteps)
                if distill:  # retention rows: the frozen UNet's own prediction, without control
                    with torch.no_grad():
                        teacher = unet(noisy_latents[num_target:], timesteps[num_target:],
                                       encoder_hidden_states=encoder_hidden_states[num_target:]).sample
                    target = torch.cat([target[:num_target], teacher.to(target.dtype)])
                # The MSE against `target` itself (not dt.per_sample_denoising_loss): distill swaps its rows' target.
                per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss, logs = dt.difftuning_loss(per_sample, num_target, args.retention_weight,
                                                weights if use_weights else None)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)

            if accelerator.sync_gradients:
                global_step += 1
                progress_bar.update(1)
                logs = {k: v.item() for k, v in logs.items()} | {"lr": lr_scheduler.get_last_lr()[0]}
                progress_bar.set_postfix(loss=logs["loss"])
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    tp.save_checkpoint(accelerator, args, global_step, per_process_state, keep=resume_path)
                if args.validation_prompt and global_step % args.validation_steps == 0:
                    run_validation(args, accelerator, pipeline, controlnet, global_step)
            if global_step >= max_train_steps:
                break

    # --- Save ------------------------------------------------------------------------------------
    seconds = time.perf_counter() - loop_start
    logger.info(f"Trained {global_step - first_step} steps in {seconds:.1f} s "
                f"({seconds / max(1, global_step - first_step):.4f} s/step, validation and checkpoints included)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        controlnet = accelerator.unwrap_model(controlnet)
        final = export_controlnet(controlnet, args.controlnet_lora)
        final.save_pretrained(args.output_dir)
        if args.controlnet_lora:
            save_lora_adapter(controlnet, args)
        pairs = validation_pairs(args) or [(captions[0] if isinstance(captions[0], str) else captions[0][0],
                                            dataset[0][args.conditioning_image_column].convert("RGB"))]
        images, labels = generate_images(args, accelerator, pipeline,
                                         sampling_controlnet(final, False, pipeline.unet.dtype), pairs)
        tp.log_images(accelerator, images, labels, global_step, tag="final")
        tp.save_model_card(args, args.pretrained_model_name_or_path, model_description(args, pairs),
                           ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers",
                            "controlnet", "diffusers-training", "diff-tuning"], images)
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
    return [(p, Image.open(path).convert("RGB")) for p, path in zip(prompts, paths, strict=True)]


def generate_images(args: argparse.Namespace, accelerator, pipeline: StableDiffusionPipeline,
                    controlnet: ControlNetModel, pairs: list) -> tuple[list, list[str]]:
    """For each pair: the conditioning image, then --num_validation_images samples (UniPC)."""
    pipe = StableDiffusionControlNetPipeline(
        vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=pipeline.unet,
        controlnet=controlnet, scheduler=UniPCMultistepScheduler.from_config(pipeline.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
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

    with init_empty_weights():
        model = ControlNetModel.from_config(controlnet.config)
    model.load_state_dict(export_controlnet(controlnet, lora).state_dict(), assign=True)
    return model.to(dtype).eval()


def run_validation(args: argparse.Namespace, accelerator, pipeline: StableDiffusionPipeline, controlnet,
                   global_step: int) -> None:
    """Sample the validation pairs with the current weights and log them (main process only)."""
    if not accelerator.is_main_process:
        return
    model = sampling_controlnet(accelerator.unwrap_model(controlnet), args.controlnet_lora, pipeline.unet.dtype)
    images, labels = generate_images(args, accelerator, pipeline, model, validation_pairs(args))
    tp.log_images(accelerator, images, labels, global_step)


def save_lora_adapter(controlnet: ControlNetModel, args: argparse.Namespace) -> None:
    """output_dir/controlnet_lora: the LoRA (diffusers' format), the fully trained new ControlNet
    layers and the ControlNet config, beside the merged model; reload with load_controlnet_lora."""
    from safetensors.torch import save_file

    folder = os.path.join(args.output_dir, "controlnet_lora")
    controlnet.save_lora_adapter(folder, weight_name=LORA_WEIGHT_NAME)
    modules = {k: v.detach().float().contiguous().cpu() for k, v in controlnet.state_dict().items()
               if k.startswith(NEW_MODULES)}
    save_file(modules, os.path.join(folder, LORA_MODULES_NAME))
    controlnet.save_config(folder)


def model_description(args: argparse.Namespace, pairs: list) -> str:
    data = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir))
    retention = {"replay": f"knowledge-bank replay ({args.knowledge_bank_size} samples, null control)",
                 "distill": "distillation toward the frozen UNet without control",
                 "none": "no retention term"}[args.retention]
    method = (f"Diff-Tuning (psi tau {args.difftuning_tau}, xi tau {args.retention_tau}, {args.timestep_sampling} "
              f"sampling, {retention}, retention ratio {args.retention_ratio}, weight {args.retention_weight})"
              if args.difftuning else "standard ControlNet training")
    return (f"# ControlNet trained with {method}\n\n"
            f"Base model: `{args.pretrained_model_name_or_path}`. Dataset: `{data}`. "
            f"{'LoRA rank ' + str(args.rank) + ', ' if args.controlnet_lora else ''}{args.max_train_steps or '?'} "
            f"steps, batch {args.train_batch_size}, lr {args.learning_rate}, resolution {args.resolution}.\n\n"
            "Samples: each conditioning image, then the images generated from it.\n\n"
            "```python\nfrom diffusers import ControlNetModel, StableDiffusionControlNetPipeline\n\n"
            f"controlnet = ControlNetModel.from_pretrained(\"{args.hub_model_id or args.output_dir}\")\n"
            "pipe = StableDiffusionControlNetPipeline.from_pretrained(\n"
            f"    \"{args.pretrained_model_name_or_path}\", controlnet=controlnet)\n"
            f"image = pipe(\"{pairs[0][0]}\", control_image).images[0]\n```")


if __name__ == "__main__":
    tp.run_cli(main, parse_args)
