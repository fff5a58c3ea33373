#!/usr/bin/env python
"""Fine-tune a pre-trained DiT on a new class-conditional dataset, with or without Diff-Tuning.

    accelerate launch train_dit_difftuning.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --train_data_dir ./food101/train --output_dir dit-food101 --mixed_precision bf16 --difftuning

The result is a DiTPipeline folder: ``DiffusionPipeline.from_pretrained(output_dir)`` generates by
class name with guidance. Diff-Tuning itself lives in difftuning_utils.py; the shared training
plumbing in training_plumbing.py.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from collections.abc import Callable

import torch
from accelerate.logging import get_logger
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

import difftuning_utils as dt
import training_plumbing as tp

logger = get_logger(__name__)
FINETUNE_MODES = ("full", "lora", "difffit", "bitfit")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_dit_latents(transformer: torch.nn.Module, scheduler: DDPMScheduler, class_labels: list[int],
                       guidance_scale: float, num_inference_steps: int, generator: torch.Generator,
                       null_class: int, base_transformer: torch.nn.Module | None = None,
                       switch_timestep: int = -1) -> torch.Tensor:
    """Final latents [B, C, H, W] of DiT's ancestral sampler with classifier-free guidance.

    DiTPipeline always decodes with the VAE and drops the learned variance; the knowledge bank
    wants latents, and DiT's own sampler uses the learned variance, so this is the short loop
    both need. Guidance is applied to the noise half, as DiTPipeline does. With
    ``base_transformer``, it denoises steps with t < ``switch_timestep`` with that model instead
    (the chain-of-forgetting analysis).
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
        model = base_transformer if base_transformer is not None and t < switch_timestep else transformer
        model_input = torch.cat([latents, latents]) if guidance_scale > 1 else latents
        output = model(model_input, timestep=t.expand(model_input.shape[0]).to(device), class_labels=labels).sample
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
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def configure_finetuning(transformer: DiTTransformer2DModel, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """Freeze what the --finetune mode does not train; return the trainable parameters.

    full: everything. bitfit: biases. difffit (Xie et al. 2023): biases, norm affines, label
    embeddings and new per-block scale factors gamma on the attention and MLP outputs of the
    first half of the blocks (the authors' 14 of 28). lora: peft LoRA adapters (DiT has no
    adapter mixin in diffusers, so peft injects them directly).
    """
    if args.finetune == "full":
        transformer.requires_grad_(True)
        return [p for p in transformer.parameters() if p.requires_grad]
    transformer.requires_grad_(False)
    if args.finetune == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
                            target_modules=[m.strip() for m in args.lora_target_modules.split(",")])
        inject_adapter_in_model(config, transformer)
        return [p for n, p in transformer.named_parameters() if "lora_" in n]
    for name, param in transformer.named_parameters():
        if name.endswith(".bias"):
            param.requires_grad_(True)
    if args.finetune == "difffit":
        for module in transformer.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, LabelEmbedding)):
                module.requires_grad_(True)
        for block in transformer.transformer_blocks[: math.ceil(len(transformer.transformer_blocks) / 2)]:
            add_difffit_gammas(block)
    return [p for p in transformer.parameters() if p.requires_grad]


def add_difffit_gammas(block: torch.nn.Module) -> None:
    """Scale a block's attention and MLP outputs by learnable gammas (initialised to 1)."""
    dim = block.attn1.to_out[0].out_features
    for name, module in (("difffit_gamma_attn", block.attn1), ("difffit_gamma_ff", block.ff)):
        block.register_parameter(name, torch.nn.Parameter(torch.ones(dim)))
        module.register_forward_hook(lambda _m, _inp, out, b=block, n=name: out * getattr(b, n))


def export_transformer(transformer: torch.nn.Module, finetune: str) -> DiTTransformer2DModel:
    """A plain DiTTransformer2DModel with the fine-tuning folded in (LoRA merged, DiffFit gammas
    multiplied into the output projections), so DiffusionPipeline.from_pretrained loads it as is.
    Saving unmerged peft layers would write base_layer keys that reload silently wrong."""
    transformer = copy.deepcopy(transformer).float()
    state = transformer.state_dict()
    if finetune == "lora":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        state = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    if finetune == "difffit":
        for i in range(len(transformer.transformer_blocks)):
            for gamma_name, linear in (("difffit_gamma_attn", "attn1.to_out.0"), ("difffit_gamma_ff", "ff.net.2")):
                gamma = state.pop(f"transformer_blocks.{i}.{gamma_name}", None)
                if gamma is not None:
                    prefix = f"transformer_blocks.{i}.{linear}"
                    state[f"{prefix}.weight"] = state[f"{prefix}.weight"] * gamma[:, None]
                    state[f"{prefix}.bias"] = state[f"{prefix}.bias"] * gamma
    clean = DiTTransformer2DModel.from_config(transformer.config)
    clean.load_state_dict(state)
    return clean.eval()


def target_classes(dataset, label_column: str, num_model_classes: int) -> tuple[list[str], Callable]:
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


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune a DiT on a class-conditional dataset with Diff-Tuning.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default="facebook/DiT-XL-2-256",
                        help="A DiTPipeline on the Hub or in a local folder.")
    tp.add_common_args(parser)
    dit = parser.add_argument_group("DiT")
    dit.add_argument("--label_column", type=str, default="label", help="The column holding the class labels.")
    dit.add_argument("--resolution", type=int, default=None,
                     help="Training resolution; default: the model's (sample_size x VAE downsampling).")
    dit.add_argument("--center_crop", action="store_true", help="Centre-crop instead of random-crop (DiT: on).")
    dit.add_argument("--random_flip", action="store_true", help="Random horizontal flips (DiT: on).")
    dit.add_argument("--label_dropout_prob", type=float, default=0.1,
                     help="Probability of replacing a target label by the null label (classifier-free guidance).")
    dit.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights and save it.")
    dit.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (DiT: 0.9999 every step).")
    dit.add_argument("--finetune", choices=FINETUNE_MODES, default="full",
                     help="What to train: all weights, LoRA adapters, DiffFit or BitFit parameters.")
    dit.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    dit.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha; default: the rank.")
    dit.add_argument("--lora_target_modules", type=str, default="to_k,to_q,to_v,to_out.0",
                     help="Comma-separated module names that get LoRA adapters.")
    dit.add_argument("--validation_class_labels", type=str, nargs="*", default=None,
                     help="Target class names (or indices) to sample at each validation.")
    dit.add_argument("--validation_guidance_scale", type=float, default=4.0, help="Guidance scale for validation.")
    dit.add_argument("--validation_num_inference_steps", type=int, default=50, help="Sampling steps for validation.")
    dt.add_difftuning_args(parser)
    # The authors' DiT transfer setting: AdamW lr 1e-4, no weight decay, constant lr, batch 32.
    parser.set_defaults(output_dir="dit-difftuning", learning_rate=1e-4, adam_weight_decay=0.0, lr_warmup_steps=0,
                        train_batch_size=32)
    args = parser.parse_args(input_args)
    tp.validate_common_args(args)
    dt.validate_difftuning_args(args, bank_num_inference_steps=250, bank_guidance_scale=1.5)
    if args.finetune == "lora" and args.rank < 1:
        raise dt.ConfigError(f"--rank must be >= 1, got {args.rank}.")
    if not 0 <= args.label_dropout_prob < 1:
        raise dt.ConfigError(f"--label_dropout_prob must be in [0, 1), got {args.label_dropout_prob}.")
    return args


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    accelerator, weight_dtype = tp.setup_accelerator(args)
    repo_id = tp.hub_repo_id(args) if accelerator.is_main_process else None

    # --- Models -------------------------------------------------------------------------------
    try:
        pipeline = DiTPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                               variant=args.variant, cache_dir=args.cache_dir)
    except (OSError, ValueError) as err:
        raise dt.ConfigError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} could not be "
                             f"loaded as a DiTPipeline ({type(err).__name__}: {str(err).splitlines()[0]}).") from err
    transformer, vae = pipeline.transformer, pipeline.vae
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if pipeline.scheduler.config.get("variance_type") in ("learned", "learned_range"):
        # DiTPipeline drops the variance half before scheduler.step: give it a scheduler that copes.
        pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, variance_type="fixed_small")
    null_class = transformer.config.num_embeds_ada_norm
    learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    args.resolution = args.resolution or transformer.config.sample_size * vae_scale
    if args.resolution != transformer.config.sample_size * vae_scale:
        raise dt.ConfigError(f"--resolution {args.resolution} does not match the model's latent size "
                             f"{transformer.config.sample_size} x {vae_scale}.")
    vae.requires_grad_(False)
    # The fp16 VAE is known to give NaNs; bf16 is safe.
    vae.to(accelerator.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    disable_per_block_label_dropout(transformer)
    base_fingerprint = dt.model_fingerprint(transformer) if args.difftuning and args.retention_ratio > 0 else None

    # --- Target data (checked before the expensive bank build) -------------------------------------
    dataset = tp.load_train_dataset(args, {"--image_column": args.image_column, "--label_column": args.label_column})
    if args.train_data_dir is not None:
        tp.check_images_readable(dataset, args.image_column)
    class_names, to_index = target_classes(dataset, args.label_column, null_class)
    image_channels = vae.config.in_channels

    # --- Knowledge bank (built with the frozen pre-trained model, before any weight changes) ---
    bank = None
    num_target, num_bank = dt.split_batch_size(args.train_batch_size, args.retention_ratio if args.difftuning else 0)
    if num_bank:
        transformer.to(accelerator.device)
        bank_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, variance_type=(
            "learned_range" if learned_sigma else noise_scheduler.config.variance_type))
        # The classes the pre-trained model knows (its id2label, e.g. 10 for our miniature), else every row.
        source_classes = sorted(set(pipeline.labels.values())) or list(range(null_class))
        label_gen = torch.Generator().manual_seed(dt.derive_seed(args.seed or 0, "bank-labels"))
        picks = torch.randint(0, len(source_classes), (args.knowledge_bank_size,), generator=label_gen)
        settings = {"base_model": args.pretrained_model_name_or_path, "revision": args.revision,
                    "fingerprint": base_fingerprint, "scheduler": type(bank_scheduler).__name__,
                    "num_inference_steps": args.knowledge_bank_num_inference_steps,
                    "guidance_scale": args.knowledge_bank_guidance_scale}
        sample_fn = lambda labels, gen: sample_dit_latents(  # noqa: E731
            transformer, bank_scheduler, labels, args.knowledge_bank_guidance_scale,
            args.knowledge_bank_num_inference_steps, gen, null_class)
        with accelerator.autocast():
            dt.build_knowledge_bank(args.knowledge_bank_dir, sample_fn, [source_classes[i] for i in picks.tolist()],
                                    args.knowledge_bank_batch_size, args.seed or 0, settings)
        bank = dt.load_knowledge_bank(args.knowledge_bank_dir, base_fingerprint,
                                      [transformer.config.in_channels] + [transformer.config.sample_size] * 2)
        preview = os.path.join(args.knowledge_bank_dir, "preview.png")
        if accelerator.is_main_process and not os.path.exists(preview):
            dt.save_bank_preview(bank.latents[:16], lambda z: tp.decode_latents(vae, z), preview)
        bank_latents = bank.latents.to(accelerator.device)  # small: kept on device, no per-step copy
        replay = dt.ReplayStream(len(bank), num_bank, args.seed or 0, accelerator.process_index)

    # --- What to train --------------------------------------------------------------------------
    params = configure_finetuning(transformer, args)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    ema = EMAModel(params, decay=args.ema_decay) if args.use_ema else None
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = tp.create_optimizer(args, params)

    # --- Data loader: a seeded permutation per epoch, per-sample augmentation from (seed, epoch, index) ---
    class TargetDataset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, sampler_index: int) -> dict:
            rng = tp.sample_rng(args.seed, sampler_index)[1]
            row = dataset[sampler_index % len(dataset)]
            pixels = tp.preprocess_image(row[args.image_column], args.resolution, args.center_crop, args.random_flip,
                                         rng, channels=image_channels)
            return {"pixel_values": pixels, "class_labels": to_index(row[args.label_column])}

    sampler = tp.EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(TargetDataset(), batch_size=num_target, sampler=sampler,
                                                   num_workers=args.dataloader_num_workers, drop_last=True)
    if len(dataset) < num_target * accelerator.num_processes:
        raise dt.ConfigError(f"The dataset has {len(dataset)} images, fewer than one batch of {num_target} target "
                         f"samples on each of {accelerator.num_processes} process(es); lower --train_batch_size.")
    transformer, optimizer, train_dataloader = accelerator.prepare(transformer, optimizer, train_dataloader)
    max_train_steps, num_epochs = tp.resolve_training_length(args, len(train_dataloader))
    lr_scheduler = accelerator.prepare(tp.create_lr_scheduler(args, optimizer, accelerator.num_processes,
                                                              max_train_steps))
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    # --- Resume -----------------------------------------------------------------------------------
    step_rng = tp.StepGenerator(args.seed, accelerator.process_index, accelerator.device)
    per_process_state = {"step_rng": step_rng, **({"replay": replay} if bank is not None else {})}
    resume_path = tp.resolve_resume_checkpoint(args)
    global_step = tp.load_checkpoint(accelerator, resume_path, per_process_state) if resume_path else 0
    if accelerator.is_main_process:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or "dit-difftuning", config=tracked)

    tau_target = args.difftuning_tau if args.difftuning else 0.0
    num_timesteps = noise_scheduler.config.num_train_timesteps
    psi = dt.TimestepSampler(num_timesteps, tau_target, "adaptation", args.timestep_sampling)
    xi = dt.TimestepSampler(num_timesteps, args.retention_tau, "retention", args.timestep_sampling)
    vb = dt.LearnedSigmaVB(noise_scheduler) if learned_sigma else None
    use_weights = args.difftuning and args.timestep_sampling == "weighting"
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    logger.info(f"***** Training: {len(dataset)} images, {len(class_names)} classes, {max_train_steps} steps, "
                f"{num_target} target + {num_bank} bank samples per device batch, finetune={args.finetune}, "
                f"difftuning={args.difftuning} *****")

    # --- Training loop ---------------------------------------------------------------------------
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    loop_start, first_step = time.perf_counter(), global_step
    for epoch in range(global_step // updates_per_epoch, num_epochs):
        transformer.train()
        for batch in tp.epoch_loader(accelerator, train_dataloader, sampler, epoch, global_step, updates_per_epoch,
                                     args.gradient_accumulation_steps):
            with accelerator.accumulate(transformer):
                latents = tp.encode_latents(vae, batch["pixel_values"], step_rng)
                drop = step_rng.rand(num_target, accelerator.device) < args.label_dropout_prob
                class_labels = torch.where(drop, null_class, batch["class_labels"])
                timesteps, weights = psi.sample(num_target, step_rng.generator, accelerator.device)
                if bank is not None:
                    bank_t, bank_w = xi.sample(num_bank, step_rng.generator, accelerator.device)
                    latents = torch.cat([latents, bank_latents[replay.next_indices().to(accelerator.device)]])
                    class_labels = torch.cat([class_labels, torch.full_like(bank_t, null_class)])
                    timesteps, weights = torch.cat([timesteps, bank_t]), torch.cat([weights, bank_w])
                noise = step_rng.randn(latents.shape, accelerator.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                model_pred = transformer(noisy_latents, timestep=timesteps,
                                         class_labels=class_labels).sample
                per_sample = dt.per_sample_denoising_loss(model_pred, latents, noise, noisy_latents, timesteps,
                                                          noise_scheduler, vb)
                loss, logs = dt.difftuning_loss(per_sample, num_target, args.retention_weight,
                                                weights if use_weights else None)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)

            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(params)
                global_step += 1
                progress_bar.update(1)
                logs = {k: v.item() for k, v in logs.items()} | {"lr": lr_scheduler.get_last_lr()[0]}
                progress_bar.set_postfix(loss=logs["loss"])
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    tp.save_checkpoint(accelerator, args, global_step, per_process_state, keep=resume_path)
                if args.validation_class_labels and global_step % args.validation_steps == 0:
                    run_validation(args, accelerator, pipeline, transformer, ema, params, class_names, global_step)
            if global_step >= max_train_steps:
                break

    # --- Save ------------------------------------------------------------------------------------
    seconds = time.perf_counter() - loop_start
    logger.info(f"Trained {global_step - first_step} steps in {seconds:.1f} s "
                f"({seconds / max(1, global_step - first_step):.4f} s/step, validation and checkpoints included)")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(transformer)
        if ema is not None:
            ema.copy_to(params)
        final = export_transformer(transformer, args.finetune)
        if args.finetune == "lora":
            save_lora_adapter(transformer, args)
        vae.to(torch.float32)
        out = DiTPipeline(transformer=final, vae=vae, scheduler=pipeline.scheduler)
        out.register_to_config(id2label=dict(enumerate(class_names)))
        out.save_pretrained(args.output_dir, safe_serialization=True)
        labels = args.validation_class_labels or class_names[: min(len(class_names), 4)]
        images = generate_images(args, out.to(accelerator.device), labels, class_names, accelerator.device)
        tp.log_images(accelerator, images, labels, global_step, tag="final")
        tp.save_model_card(args, args.pretrained_model_name_or_path, model_description(args, class_names),
                           ["dit", "diff-tuning", "class-conditional", "diffusers",
                            "diffusers-training", args.finetune], images)
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
    generator = torch.Generator(device=device).manual_seed(args.seed or 0)
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=ids, guidance_scale=args.validation_guidance_scale, generator=generator,
                num_inference_steps=args.validation_num_inference_steps).images


def run_validation(args: argparse.Namespace, accelerator, pipeline: DiTPipeline, transformer, ema, params,
                   class_names: list[str], global_step: int) -> None:
    """Sample the validation classes with the current (EMA) weights and log them."""
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(transformer)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    model.eval()
    pipe = DiTPipeline(transformer=model, vae=pipeline.vae, scheduler=pipeline.scheduler)
    images = generate_images(args, pipe, args.validation_class_labels, class_names, accelerator.device)
    tp.log_images(accelerator, images, [lbl for lbl in args.validation_class_labels
                                        for _ in range(args.num_validation_images)], global_step)
    model.train()
    if ema is not None:
        ema.restore(params)


def save_lora_adapter(transformer: torch.nn.Module, args: argparse.Namespace) -> None:
    """peft-format adapter (weights + config) in output_dir/transformer_lora, beside the merged pipeline."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = os.path.join(args.output_dir, "transformer_lora")
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    save_file(state, os.path.join(folder, "adapter_model.safetensors"))
    LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
               target_modules=[m.strip() for m in args.lora_target_modules.split(",")]).save_pretrained(folder)


def model_description(args: argparse.Namespace, class_names: list[str]) -> str:
    data = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir))
    method = (f"Diff-Tuning (psi tau {args.difftuning_tau}, xi tau {args.retention_tau}, "
              f"{args.timestep_sampling} sampling, retention ratio {args.retention_ratio}, "
              f"retention weight {args.retention_weight}, knowledge bank of {args.knowledge_bank_size} samples)"
              if args.difftuning else "standard fine-tuning")
    return (f"# DiT fine-tuned with {method}\n\n"
            f"Base model: `{args.pretrained_model_name_or_path}`. Dataset: `{data}` ({len(class_names)} classes). "
            f"Fine-tuning: `{args.finetune}`, {args.max_train_steps or '?'} steps, batch {args.train_batch_size}, "
            f"lr {args.learning_rate}.\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{args.hub_model_id or args.output_dir}\")\n"
            f"image = pipe(class_labels=pipe.get_label_ids([\"{class_names[0]}\"]), guidance_scale=4.0).images[0]\n```")


if __name__ == "__main__":
    tp.run_cli(main, parse_args)
