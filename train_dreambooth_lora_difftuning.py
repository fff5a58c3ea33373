#!/usr/bin/env python
"""DreamBooth LoRA for Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1, with or without Diff-Tuning; a drop-in
for diffusers' examples/dreambooth/train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py,
train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py.

    accelerate launch train_dreambooth_lora_difftuning.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_prompt "a photo of dog" \\
        --output_dir dreambooth-dog --mixed_precision fp16 --difftuning

Prior preservation already replays the base model's own samples of a class prompt: a knowledge bank.
``--difftuning`` trains the subject at psi timesteps (toward large t) and the class samples at xi
timesteps (toward small t), where upstream gives both halves the same uniform draw. The result is a
diffusers-format LoRA: ``pipe.load_lora_weights(output_dir)``. The model family (SD, SDXL, SD3 or Flux) is
read from the base pipeline (model_families.py); the method lives in difftuning_utils.py and the shared
plumbing in training_plumbing.py.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

import difftuning_utils as dt
import model_families as mf
import training_plumbing as tp

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def base_family(args: argparse.Namespace) -> tuple[dict, type[mf.StableDiffusionFamily]]:
    """The base pipeline's ``model_index.json`` and the family it names (read before any weights load)."""
    import diffusers

    config = tp.load_pretrained(diffusers.DiffusionPipeline.load_config, "--pretrained_model_name_or_path",
                                args.pretrained_model_name_or_path, "a diffusers pipeline", revision=args.revision,
                                cache_dir=args.cache_dir)
    return config, mf.family_class(config["_class_name"])


def load_base_pipeline(args: argparse.Namespace, **kwargs: Any) -> tuple[Any, mf.StableDiffusionFamily]:
    """The base pipeline of the family named by its ``model_index.json``, and that family, built with the
    family's flags (T5's --max_sequence_length, Flux's --guidance_scale)."""
    import diffusers

    config, family = base_family(args)
    if args.pretrained_vae_model_name_or_path:
        kwargs["vae"] = tp.load_pretrained(diffusers.AutoencoderKL.from_pretrained,
                                           "--pretrained_vae_model_name_or_path",
                                           args.pretrained_vae_model_name_or_path, "an AutoencoderKL",
                                           cache_dir=args.cache_dir)
    if "safety_checker" in config:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    for name, value in config.items():  # parts saved as absent (SD3 without T5) must be passed as None to load
        if isinstance(value, list) and value == [None, None] and name not in ("feature_extractor", "image_encoder"):
            kwargs.setdefault(name, None)
    pipeline_class = getattr(diffusers, family.pipeline_class_name)
    pipeline = tp.load_pretrained(pipeline_class.from_pretrained, "--pretrained_model_name_or_path",
                                  args.pretrained_model_name_or_path, f"a {family.pipeline_class_name}",
                                  revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    options = {name: getattr(args, name) for name in ("max_sequence_length", "guidance_scale")
               if name in family.flag_defaults}
    return pipeline, family(pipeline, **options)


def add_lora_adapters(denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module],
                      args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """peft LoRA on the denoiser's attention projections (UNet or transformer; and the text encoders' given
    with --train_text_encoder), as diffusers' DreamBooth scripts add them; returns the trainable parameters,
    kept in float32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    denoiser.add_adapter(tp.lora_config(args))
    models = [denoiser]
    if args.train_text_encoder:
        config = LoraConfig(r=args.rank, lora_alpha=tp.lora_alpha(args), init_lora_weights="gaussian",
                            target_modules=mf.TEXT_ENCODER_LORA_MODULES)
        for encoder in text_encoders:  # peft directly: transformers' add_adapter may ask for a newer peft
            inject_adapter_in_model(config, encoder)
            models.append(encoder)
    cast_training_params(models, dtype=torch.float32)  # frozen weights may be fp16/bf16; LoRA trains in fp32
    return [p for m in models for p in m.parameters() if p.requires_grad]


def lora_layers(model: torch.nn.Module, family: mf.StableDiffusionFamily,
                state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A model's LoRA weights as upstream saves them for the family: diffusers' key format for SD and SDXL,
    peft's for SD3 and Flux (what each pipeline's ``load_lora_weights`` reads back). ``state``: the model's
    full state dict when its own parameters are shards (tp.full_state_dict)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=state)
    return state if family.flow_matching else convert_state_dict_to_diffusers(state)


def lora_metadata(model: torch.nn.Module | None) -> dict | None:
    """The adapter metadata upstream saves beside a model's LoRA weights (diffusers' ``_collate_lora_metadata``):
    the LoraConfig the model was trained with, so that ``load_lora_weights`` rebuilds the same adapter (alpha,
    rank, DoRA, dropout, targets)."""
    return None if model is None else model.peft_config["default"].to_dict()


def register_checkpoint_hooks(accelerator: Any, family: mf.StableDiffusionFamily, denoiser: torch.nn.Module,
                              text_encoders: list[torch.nn.Module]) -> None:
    """Checkpoints hold only the LoRA weights, in diffusers' format (``checkpoint-N`` loads with
    ``load_lora_weights``, as upstream's do), not a full copy of the frozen model."""
    from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    def role(model: torch.nn.Module) -> int:  # 0: the denoiser, 1..: text encoders
        plain = tp.unwrap(accelerator, model)
        return next(i for i, m in enumerate([denoiser, *text_encoders]) if m is plain)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        states = [tp.full_state_dict(accelerator, model) for model in models]  # every process: gathers shards
        if accelerator.is_main_process:
            layers: list[dict | None] = [None] * (1 + len(text_encoders))
            metadata: list[dict | None] = [None] * (1 + len(text_encoders))
            for model, state in zip(models, states, strict=True):
                plain = tp.unwrap(accelerator, model)
                layers[role(model)] = lora_layers(plain, family, state)
                metadata[role(model)] = lora_metadata(plain)
            family.save_lora_weights(output_dir, layers[0], layers[1:], metadata)
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        if not models:  # FSDP and DeepSpeed restore the whole model from their own files
            return
        state = type(family.pipeline).lora_state_dict(input_dir)
        state = state[0] if isinstance(state, tuple) else state  # SD/SDXL also return the network alphas
        trained = []
        while models:
            model = models.pop()
            index = role(model)
            plain = tp.unwrap(accelerator, model)
            if index == 0:
                prefix = f"{family.denoiser_name}."
                denoiser_state = convert_unet_state_dict_to_peft(
                    {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
                result = set_peft_model_state_dict(plain, denoiser_state, adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise dt.ConfigError(f"--resume_from_checkpoint {input_dir} holds LoRA weights this model does not "
                                         f"have ({result.unexpected_keys[0]}...): another model or --rank?")
            else:
                prefix = family.component_names[index - 1]
                _set_state_dict_into_text_encoder(state, prefix=f"{prefix}.", text_encoder=plain)
            trained.append(plain)
        cast_training_params(trained, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class InstanceImages(torch.utils.data.Dataset):
    """The subject's images as the loader sees them, per :class:`tp.SampleKey`: pixels (or, with a latent
    cache, the cached posterior of the image or its mirror), the row's prompt in the prompt table and
    SDXL's size-and-crop ids."""

    def __init__(self, dataset: Any, args: argparse.Namespace, prompt_rows: list[int],
                 latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.dataset, self.prompt_rows, self.latent_cache = dataset, prompt_rows, latent_cache
        self.image_column, self.resolution, self.seed = args.image_column, args.resolution, args.seed
        self.center_crop, self.random_flip = args.center_crop, args.random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tp.SampleKey) -> dict:
        rng = tp.sample_rng(self.seed, key)
        item = {"prompt_rows": self.prompt_rows[key.index]}
        if self.latent_cache is not None:  # centre crop: the only draw is the flip
            view = int(self.random_flip and rng.random() < 0.5)
            mean, std, ids = self.latent_cache
            return {**item, "latent_mean": mean[key.index, view], "latent_std": std[key.index, view],
                    "time_ids": ids[key.index]}
        image = tp.convert_image(self.dataset[key.index][self.image_column], "RGB")
        square, original_size, crop = tp.resize_crop_flip(image, self.resolution, self.center_crop,
                                                          self.random_flip, rng)
        return {**item, "pixel_values": tp.to_model_tensor(square),
                "time_ids": mf.time_ids(original_size, crop, self.resolution)}


class CenteredImages(torch.utils.data.Dataset):
    """Every subject image centre-cropped, unflipped: what --cache_latents encodes (and mirrors)."""

    def __init__(self, dataset: Any, args: argparse.Namespace) -> None:
        self.dataset, self.column, self.resolution = dataset, args.image_column, args.resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = tp.convert_image(self.dataset[index][self.column], "RGB")
        return tp.to_model_tensor(tp.resize_crop_flip(image, self.resolution, True, False, None)[0])


def centre_crop_time_ids(dataset: Any, column: str, resolution: int) -> torch.Tensor:
    """SDXL ids [N, 6] of every image centre-cropped (--cache_latents)."""
    return torch.stack([centre_crop_ids((dataset[i][column].height, dataset[i][column].width), resolution)
                        for i in range(len(dataset))])


def centre_crop_ids(size: tuple[int, int], resolution: int) -> torch.Tensor:
    """SDXL ids [6] of an image of (height, width) ``size`` resized and centre-cropped to ``resolution``."""
    height, width = size
    scale = resolution / min(height, width)
    resized = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    return mf.time_ids(size, ((resized[0] - resolution) // 2, (resized[1] - resolution) // 2), resolution)


def class_bank_dir(class_data_dir: str) -> str:
    """Where the class images' encodings are kept: beside the folder, not in it, so the folder stays upstream's
    (images only: upstream's DreamBooth reads every file in it as an image)."""
    return os.path.normpath(os.path.abspath(class_data_dir)) + ".knowledge_bank"


def class_image_writer(args: argparse.Namespace, pipeline: Any, family: mf.StableDiffusionFamily,
                       guidance: float) -> Any:
    """``write(indices)``: the base pipeline's images of --class_prompt, saved into --class_data_dir as upstream
    names them ("<index>-<sha1 of the pixels>.jpg"), at --resolution, with the family's prompt encoding (T5's
    length as trained), seeded by --knowledge_bank_seed and the first index; each file written whole (temporary
    name, then renamed)."""
    def write(indices: list[int]) -> None:
        generator = torch.Generator().manual_seed(dt.derive_seed(args.knowledge_bank_seed, "class image", indices[0]))
        with torch.no_grad():
            images = pipeline([args.class_prompt] * len(indices), height=args.resolution, width=args.resolution,
                              generator=generator, num_inference_steps=args.knowledge_bank_num_inference_steps,
                              guidance_scale=guidance, **family.call_kwargs).images
        for index, image in zip(indices, images, strict=True):
            path = os.path.join(args.class_data_dir, f"{index}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg")
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                with dt.disk_space_guard(args.class_data_dir, "a class image", tmp):
                    image.save(tmp, format="JPEG")
            except PermissionError as err:
                raise dt.ConfigError(f"--class_data_dir {args.class_data_dir} is not writable ({err.strerror}), and "
                                     "class images are missing there: make it writable or lower "
                                     "--num_class_images.") from err
            os.replace(tmp, path)

    return write


def check_class_images(folder: str) -> None:
    """Every image already in --class_data_dir decodes: checked before any model loads, since a damaged one
    found while encoding would come after the missing images were generated (hours on a real model)."""
    from PIL import Image

    for path in dt.image_files(folder):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as err:  # noqa: BLE001 - whatever PIL raises for a damaged file
            raise dt.ConfigError(f"--class_data_dir: {path} is not a readable image ({type(err).__name__}: "
                                 f"{err}); remove it or pass another folder.") from err


@dataclass(kw_only=True)
class DreamBoothStep:
    """One training step's loss, given a batch: the subject's latents at psi timesteps (uniform without
    --difftuning) and, with prior preservation, as many class samples from the bank at xi timesteps
    (uniform without --difftuning), one UNet pass, MSE (Min-SNR-weighted on the subject rows, as upstream),
    and subject + prior_loss_weight * prior. The training loop calls it."""

    family: mf.StableDiffusionFamily
    denoiser: torch.nn.Module
    vae: torch.nn.Module | None  # None when batches carry cached latents
    noise_scheduler: Any
    psi: dt.TimestepSampler | dt.FlowTimestepSampler  # flow matching: entries of the scheduler's sigma table
    xi: dt.TimestepSampler | dt.FlowTimestepSampler
    weighting_scheme: str | None  # flow matching only (its loss weighting)
    precondition_outputs: bool  # flow matching only
    prompt_ids: list[torch.Tensor]  # token ids [P, L] per tokenizer, on the device
    prompt_table: mf.PromptEmbeddings | None  # encoded once when the text encoders are frozen
    prior_loss_weight: float
    snr_gamma: float | None
    weight_dtype: torch.dtype
    bank: dt.BankReplay | None = None
    bank_prompt_row: int = -1
    bank_time_ids: torch.Tensor | None = None  # [N, 6]: SDXL's ids of each class image (centre-cropped)

    def __post_init__(self) -> None:
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # flow matching: (sigmas, timesteps) on device

    def flow_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's sigma and timestep tables on ``device``, copied there once, not every step."""
        if self._tables is None or self._tables[0].device != device:
            self._tables = (self.noise_scheduler.sigmas.to(device), self.noise_scheduler.timesteps.to(device))
        return self._tables

    def loss(self, batch: dict, step_rng: tp.StepGenerator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = tp.batch_latents(self.vae, batch, step_rng)
        device, num_instance = latents.device, latents.shape[0]
        rows, time_ids = batch["prompt_rows"], batch["time_ids"]
        timesteps, weights = self.psi.sample(num_instance, step_rng.generator, device)
        if self.bank is not None:
            bank_latents, bank_rows = self.bank.next(step_rng.generator, lambda shape: step_rng.randn(shape, device))
            bank_t, bank_w = self.xi.sample(bank_latents.shape[0], step_rng.generator, device)
            latents = torch.cat([latents, bank_latents])
            rows = torch.cat([rows, torch.full_like(bank_t, self.bank_prompt_row)])
            time_ids = torch.cat([time_ids, self.bank_time_ids[bank_rows]])
            timesteps, weights = torch.cat([timesteps, bank_t]), torch.cat([weights, bank_w])
        if self.snr_gamma is not None:  # upstream weights the subject rows only
            snr_w = dt.min_snr_weights(self.noise_scheduler, timesteps[:num_instance], self.snr_gamma)
            weights = torch.cat([weights[:num_instance] * snr_w, weights[num_instance:]])
        noise = step_rng.randn(latents.shape, device)
        if self.prompt_table is not None:
            prompts = self.prompt_table.take(rows)
        else:  # --train_text_encoder: the encoders' LoRA is in the graph
            prompts = self.family.encode([ids[rows] for ids in self.prompt_ids])
        if self.family.flow_matching:  # timesteps are entries of the sigma table (upstream's SD3 and Flux loss)
            sigma_table, time_table = self.flow_tables(device)
            sigmas = sigma_table[timesteps].view(-1, *[1] * (latents.ndim - 1))
            noisy_latents = (1 - sigmas) * latents + sigmas * noise
            model_pred = self.family.predict(self.denoiser, noisy_latents, time_table[timesteps], prompts, time_ids,
                                             self.weight_dtype).float()
            if self.precondition_outputs:
                model_pred, target = model_pred * -sigmas + noisy_latents, latents
            else:
                target = noise - latents
            per_sample = ((model_pred - target) ** 2).mean(dim=list(range(1, latents.ndim)))
            weights = weights * dt.flow_loss_weights(self.weighting_scheme, sigmas.flatten())
        else:
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            model_pred = self.family.predict(self.denoiser, noisy_latents, timesteps, prompts, time_ids,
                                             self.weight_dtype)
            per_sample = dt.per_sample_denoising_loss(model_pred, latents, noise, noisy_latents, timesteps,
                                                      self.noise_scheduler)
        return dt.difftuning_loss(per_sample, num_instance, self.prior_loss_weight, weights)


def denoiser_flops_per_image(family: mf.StableDiffusionFamily, denoiser: torch.nn.Module,
                             prompt_ids: list[torch.Tensor],
                             prompt_table: mf.PromptEmbeddings | None, latent_shape: list[int], resolution: int,
                             weight_dtype: torch.dtype) -> int:
    """The forward + backward FLOPs of one training image: the denoiser, and the text encoders when they train."""
    device = next(denoiser.parameters()).device
    x = torch.zeros(2, *latent_shape, device=device, dtype=weight_dtype)
    t = torch.tensor([10, 900], device=device)
    rows = torch.zeros(2, dtype=torch.long, device=device)
    ids = mf.time_ids((resolution, resolution), (0, 0), resolution).expand(2, -1).to(device)

    def fwd_bwd() -> None:
        prompts = prompt_table.take(rows) if prompt_table is not None else family.encode([i[rows] for i in prompt_ids])
        family.predict(denoiser, x, t, prompts, ids, weight_dtype).float().square().mean().backward()

    flops = tp.count_flops(fwd_bwd)
    for model in (denoiser, *family.text_encoders):
        model.zero_grad(set_to_none=True)
    return flops // 2


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Every flag, grouped as ``--help`` shows them (docs/scripts/flag_tables.py writes the docs' tables from it)."""
    parser = argparse.ArgumentParser(description="DreamBooth LoRA for Stable Diffusion, SDXL, SD3 and Flux.1, "
                                                 "with Diff-Tuning.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="A Stable Diffusion (1.x/2.x), SDXL, SD3 or Flux.1 pipeline on the Hub or in a local "
                             "folder.")
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="A VAE instead of the pipeline's (SDXL in fp16: e.g. madebyollin/sdxl-vae-fp16-fix).")
    tp.add_common_args(parser, "--instance_data_dir",
                       "A folder of the subject's images (with a metadata.jsonl for per-image captions).")
    db = parser.add_argument_group("DreamBooth")
    db.add_argument("--instance_prompt", type=str, default=None,
                    help="The prompt with the identifier of the subject, e.g. 'a photo of sks dog' (required).")
    db.add_argument("--caption_column", type=str, default=None,
                    help="A column of per-image captions (--dataset_name or a metadata.jsonl); default: every "
                         "image gets --instance_prompt.")
    db.add_argument("--with_prior_preservation", action="store_true",
                    help="Replay the base model's own samples of --class_prompt beside the subject (DreamBooth's "
                         "prior-preservation loss).")
    db.add_argument("--class_prompt", type=str, default=None,
                    help="The prompt of the class samples, e.g. 'a photo of dog'; '' gives an empty-prompt bank "
                         "(unconditional samples, replayed on the empty prompt).")
    db.add_argument("--class_data_dir", type=str, default=None,
                    help="A folder of class images, as upstream's: those there (e.g. a regularisation set) are used "
                         "as they are and the missing ones, up to --num_class_images, generated by the base model. "
                         "Each image is encoded once, into <class_data_dir>.knowledge_bank beside it. Default: "
                         "<output_dir>/class_images.")
    db.add_argument("--num_class_images", type=int, default=100,
                    help="Number of class images used; fewer in --class_data_dir are completed by generation.")
    db.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    db.add_argument("--sample_batch_size", type=int, default=4,
                    help="Class images generated (and encoded) per pipeline call.")
    db.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                    help="Precision of the frozen model while it generates the class samples; default: the "
                         "training's mixed precision.")
    db.add_argument("--resolution", type=int, default=None,
                    help="Training resolution; default: the model's (SD 1.x 512, SD 2.x 768, SDXL and SD3 1024), "
                         "Flux 512 (upstream's).")
    db.add_argument("--center_crop", action="store_true", help="Centre-crop instead of random-crop.")
    db.add_argument("--random_flip", action="store_true",
                    help="Random horizontal flips of the subject's images (and of the class samples).")
    db.add_argument("--train_text_encoder", action="store_true",
                    help="Train LoRA adapters on the CLIP text encoder(s) too (q/k/v/out projections; T5 stays "
                         "frozen, as upstream).")
    db.add_argument("--snr_gamma", type=float, default=None,
                    help="Min-SNR weighting gamma (5.0 is recommended); weights the subject rows, as upstream.")
    tp.add_lora_args(db)
    val = next(g for g in parser._action_groups if g.title == "Validation")
    val.add_argument("--validation_prompt", type=str, default=None, help="A prompt sampled at each validation.")
    val.add_argument("--validation_epochs", type=int, default=None,
                     help="Validate every N epochs (upstream's flag); overrides --validation_steps.")
    val.add_argument("--validation_num_inference_steps", type=int, default=25,
                     help="DPM-Solver++ steps of validation and final samples (upstream: 25).")
    flow = parser.add_argument_group("Flow matching (SD3, Flux)")
    flow.add_argument("--weighting_scheme", type=str, default=None, choices=dt.FLOW_WEIGHTING_SCHEMES,
                      help="Density of the training sigma (logit_normal, mode) or loss weighting (sigma_sqrt, "
                           "cosmap); none: uniform. Default: upstream's, logit_normal for SD3 and none for Flux. With "
                           "--difftuning it is the base density that psi and xi reweight.")
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal density.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal density.")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' density.")
    flow.add_argument("--precondition_outputs", type=int, default=None, choices=[0, 1],
                      help="SD3 only. 1: compare the denoised estimate x0 = x_sigma - sigma * v with the latents "
                           "(upstream's SD3 default); 0: compare v with noise - latents (what Flux always does).")
    flow.add_argument("--max_sequence_length", type=int, default=None,
                      help="T5 tokens of each prompt; default: upstream's, 77 for SD3 and 512 for Flux.")
    flow.add_argument("--guidance_scale", type=float, default=None,
                      help="Flux only: the guidance scale a guidance-distilled transformer (FLUX.1-dev) is given "
                           "while it trains; default 3.5 (upstream's). A transformer without a guidance input "
                           "(FLUX.1-schnell) ignores it.")
    dt.add_difftuning_args(parser, class_prior=True)
    parser.set_defaults(output_dir="lora-dreambooth-model", learning_rate=5e-4, lora_target_modules=None)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(input_args)
    if not args.instance_prompt:
        raise dt.ConfigError("--instance_prompt is required: the prompt that names the subject, e.g. "
                             "'a photo of sks dog'.")
    tp.validate_common_args(args, "--instance_data_dir")
    if args.with_prior_preservation and args.class_prompt is None:
        raise dt.ConfigError("--with_prior_preservation needs --class_prompt (the class the subject belongs to, "
                             "e.g. 'a photo of dog'; '' for the empty prompt).")
    if not args.with_prior_preservation and (args.class_prompt is not None or args.class_data_dir is not None):
        raise dt.ConfigError("--class_prompt and --class_data_dir are used only with --with_prior_preservation: add "
                             "it, or leave them out.")
    for flag in ("num_class_images", "sample_batch_size", "rank"):
        if getattr(args, flag) < 1:
            raise dt.ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    tp.lora_alpha(args)  # 0 refused before any model loads
    if args.validation_epochs is not None and args.validation_epochs < 1:
        raise dt.ConfigError(f"--validation_epochs must be >= 1, got {args.validation_epochs}.")
    if not args.prior_loss_weight >= 0:
        raise dt.ConfigError(f"--prior_loss_weight must be >= 0, got {args.prior_loss_weight}.")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise dt.ConfigError(f"--snr_gamma must be > 0, got {args.snr_gamma}.")
    if args.cache_latents and not args.center_crop:
        raise dt.ConfigError("--cache_latents keeps one encoding per image (and its mirror image): add --center_crop, "
                             "since random crops would differ every epoch, or leave --cache_latents out.")
    if args.class_data_dir and os.path.isfile(args.class_data_dir):
        raise dt.ConfigError(f"--class_data_dir {args.class_data_dir} is a file, not a folder.")
    if args.with_prior_preservation:
        args.class_data_dir = args.class_data_dir or os.path.join(args.output_dir, "class_images")
        if os.path.exists(os.path.join(args.class_data_dir, dt.MANIFEST_NAME)):
            raise dt.ConfigError(f"--class_data_dir {args.class_data_dir} holds class samples as latents, written by "
                                 "an earlier version of this script, which now keeps class images there as upstream "
                                 "does: pass another folder, or delete that one.")
        check_class_images(args.class_data_dir)
    dt.validate_difftuning_args(args, bank_num_inference_steps=50)
    return args


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


# The family-dependent flags, what they belong to (the refusal names it), and their parser defaults; each family
# takes the ones in its ``flag_defaults`` (flow-matching families also take the density's parameters).
FAMILY_FLAGS = {"weighting_scheme": ("flow-matching flags (SD3, Flux)", None),
                "logit_mean": ("flow-matching flags (SD3, Flux)", 0.0),
                "logit_std": ("flow-matching flags (SD3, Flux)", 1.0),
                "mode_scale": ("flow-matching flags (SD3, Flux)", 1.29),
                "max_sequence_length": ("flow-matching flags (SD3, Flux)", None),
                "precondition_outputs": ("SD3's flag (upstream's Flux script trains the velocity against noise - "
                                         "latents, unpreconditioned)", None),
                "guidance_scale": ("Flux's flag (the guidance input of a guidance-distilled transformer)", None)}
DENSITY_FLAGS = ("logit_mean", "logit_std", "mode_scale")


def check_family_flags(args: argparse.Namespace, family: type[mf.StableDiffusionFamily]) -> None:
    """Flags that only some kinds of model have, checked once the base model's family is known (before its
    weights load): another family's flag given is refused in one sentence; the family's own are filled with its
    defaults (its LoRA targets, SD3's logit-normal density, Flux's uniform one and guidance 3.5, T5's length)."""
    if family.flow_matching and args.snr_gamma is not None:
        raise dt.ConfigError("--snr_gamma (Min-SNR) is for DDPM models; flow-matching models (SD3, Flux) weight "
                             "the loss with --weighting_scheme.")
    accepted = set(family.flag_defaults) | (set(DENSITY_FLAGS) if family.flow_matching else set())
    foreign: dict[str, list[str]] = {}
    for name, (owner, default) in FAMILY_FLAGS.items():
        if name not in accepted and getattr(args, name) != default:
            foreign.setdefault(owner, []).append(f"--{name}")
    if foreign:
        named = "; ".join(", ".join(flags) + f": {owner}" for owner, flags in foreign.items())
        kind = "" if family.flow_matching else " (DDPM)"
        raise dt.ConfigError(f"{named}, and {args.pretrained_model_name_or_path} is a {family.name} model{kind}.")
    for name, default in family.flag_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if family.flow_matching and not 1 <= args.max_sequence_length <= 512:
        raise dt.ConfigError(f"--max_sequence_length must be 1..512 (the {family.name} pipeline's limit), got "
                             f"{args.max_sequence_length}.")
    if family.flow_matching and not args.logit_std > 0:
        raise dt.ConfigError(f"--logit_std must be > 0, got {args.logit_std}.")
    args.lora_target_modules = args.lora_target_modules or family.lora_target_modules


def main(args: argparse.Namespace) -> None:
    from accelerate.utils import DistributedType
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    accelerator, weight_dtype = tp.setup_accelerator(args)
    if args.train_text_encoder and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise dt.ConfigError(f"--train_text_encoder trains several models, and accelerate's "
                             f"{accelerator.distributed_type.value} prepares one: leave the flag out or launch "
                             "without the sharding config.")
    repo_id = tp.hub_repo_id(args) if accelerator.is_main_process else None

    # --- Models -------------------------------------------------------------------------------
    check_family_flags(args, base_family(args)[1])  # before the weights load (FLUX.1-dev's are ~34 GB)
    pipeline, family = load_base_pipeline(args)
    denoiser, vae, text_encoders = getattr(pipeline, family.denoiser_name), pipeline.vae, family.text_encoders
    scheduler_class = FlowMatchEulerDiscreteScheduler if family.flow_matching else DDPMScheduler
    noise_scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    args.resolution = args.resolution or family.default_resolution or denoiser.config.sample_size * vae_scale
    if args.resolution % (vae_scale * family.latent_patch):
        why = f"the VAE's downsampling {vae_scale}"
        if family.latent_patch > 1:
            why += f" times {family.name}'s {family.latent_patch}x{family.latent_patch} latent packing"
        raise dt.ConfigError(f"--resolution {args.resolution} is not a multiple of {vae_scale * family.latent_patch}: "
                             f"{why}.")
    # The class images' encodings are kept per VAE, as loaded (before any cast, so every precision shares them).
    vae_fingerprint = dt.model_fingerprint(vae) if args.with_prior_preservation else None
    for frozen in (denoiser, vae, *text_encoders):
        frozen.requires_grad_(False)
    # Frozen parts in the mixed-precision dtype (upstream); first in --prior_generation_precision's, if given,
    # while the class samples are generated.
    generation_dtype = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                        "bf16": torch.bfloat16}.get(args.prior_generation_precision, weight_dtype)
    for module in (denoiser, *text_encoders):
        tp.cast(module, accelerator.device, generation_dtype if args.with_prior_preservation else weight_dtype)
    # The fp16 VAE overflows (SDXL's especially): keep it in fp32 unless another VAE was given, as upstream.
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path or weight_dtype == torch.bfloat16 else (
        torch.float32)
    tp.cast(vae, accelerator.device, vae_dtype)
    if args.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()

    # --- The subject's data (checked before the expensive class-sample generation) --------------------
    columns = {"--image_column": args.image_column, **({"--caption_column": args.caption_column}
                                                        if args.caption_column else {})}
    dataset = tp.load_train_dataset(args, columns, "--instance_data_dir")
    dataset, _ = tp.check_images(dataset, {"--image_column": args.image_column}, args.skip_bad_images)
    tp.describe_image_conversion(dataset, args.image_column, 3, args.resolution)
    captions = list(dataset[args.caption_column]) if args.caption_column else [args.instance_prompt] * len(dataset)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise dt.ConfigError(f"--caption_column: row {i} holds {type(caption).__name__}, not a string.")
    prompts = list(dict.fromkeys(captions)) + ([args.class_prompt] if args.with_prior_preservation else [])
    prompt_rows = [prompts.index(c) for c in captions]

    # --- Class images: upstream's folder, encoded once into the knowledge bank -------------------------
    bank, bank_time_ids = None, None
    latent_shape = [vae.config.latent_channels] + [args.resolution // vae_scale] * 2  # unpacked (Flux packs 2x2)
    if args.with_prior_preservation:
        call_defaults = inspect.signature(type(pipeline).__call__).parameters
        guidance = args.knowledge_bank_guidance_scale or call_defaults["guidance_scale"].default
        settings = {"vae_fingerprint": vae_fingerprint, "scaling_factor": vae.config.scaling_factor,
                    "shift_factor": tp.latent_shift(vae), "resolution": args.resolution, "crop": "centre"}
        class_bank, sizes = dt.class_image_bank(
            args.class_data_dir, class_bank_dir(args.class_data_dir), args.num_class_images,
            class_image_writer(args, pipeline, family, guidance),
            lambda paths: tp.encode_image_files(vae, paths, args.resolution, accelerator.device), settings,
            args.sample_batch_size, args.class_prompt)
        bank = dt.BankReplay(class_bank, "images", args.random_flip, args.train_batch_size, args.seed,
                             accelerator.process_index, accelerator.device, args.class_data_dir)
        bank_time_ids = torch.stack([centre_crop_ids(size, args.resolution) for size in sizes]).to(accelerator.device)
        for module in (denoiser, *text_encoders):
            tp.cast(module, accelerator.device, weight_dtype)

    # --- What to train --------------------------------------------------------------------------
    params = add_lora_adapters(denoiser, family.lora_text_encoders, args)
    register_checkpoint_hooks(accelerator, family, denoiser, family.lora_text_encoders)
    prompt_ids = [ids.to(accelerator.device) for ids in family.tokenize(prompts)]
    prompt_table = None
    if not args.train_text_encoder:  # fixed prompts, frozen encoders: encode them once
        with torch.no_grad():
            prompt_table = family.encode(prompt_ids)
    # Model FLOPs (no recomputation), counted before accelerator.prepare: a pass outside DDP's forward
    # would upset its gradient hooks.
    flops_per_image = denoiser_flops_per_image(family, denoiser, prompt_ids, prompt_table, latent_shape,
                                               args.resolution, weight_dtype)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in family.lora_text_encoders if args.train_text_encoder else ():
            encoder.gradient_checkpointing_enable()
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = tp.create_optimizer(args, params)

    # --- Data loader: a seeded permutation per epoch, per-sample augmentation from (seed, epoch, index) ---
    if len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise dt.ConfigError(f"There are {len(dataset)} subject images, fewer than one batch of "
                             f"{args.train_batch_size} on each of {accelerator.num_processes} process(es); lower "
                             "--train_batch_size.")
    latent_cache = None
    if args.cache_latents:
        mean, std = tp.cache_posteriors(vae, CenteredImages(dataset, args), args.random_flip, 32,
                                        args.dataloader_num_workers, accelerator.device)
        latent_cache = (mean, std, centre_crop_time_ids(dataset, args.image_column, args.resolution))
    sampler = tp.EpochShuffleSampler(len(dataset), args.seed)
    train_dataloader = tp.make_dataloader(InstanceImages(dataset, args, prompt_rows, latent_cache),
                                          args.train_batch_size, sampler, args.dataloader_num_workers)
    trained_encoders = family.lora_text_encoders if args.train_text_encoder else []
    (denoiser, optimizer, train_dataloader, *prepared_encoders), params = tp.prepare_training(
        accelerator, params, denoiser, optimizer, train_dataloader, *trained_encoders)
    if prepared_encoders:
        family.text_encoders[:len(prepared_encoders)] = prepared_encoders
    max_train_steps, num_epochs = tp.resolve_training_length(args, len(train_dataloader))
    lr_scheduler = tp.prepare_lr_scheduler(accelerator, tp.create_lr_scheduler(args, optimizer,
                                                                               accelerator.num_processes,
                                                                               max_train_steps))
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.validation_epochs is not None:
        args.validation_steps = args.validation_epochs * updates_per_epoch

    # --- Resume -----------------------------------------------------------------------------------
    step_rng = tp.StepGenerator(args.seed, accelerator.process_index, accelerator.device)
    per_process_state = {"step_rng": step_rng, **({"replay": bank} if bank is not None else {})}
    identity = tp.checkpoint_identity(args, __file__)
    global_step, resume_path = tp.resume(accelerator, args, per_process_state, identity)
    tp.start_trackers(accelerator, args, "dreambooth-lora-difftuning")

    psi_tau, xi_tau = (args.difftuning_tau, args.retention_tau) if args.difftuning else (0.0, 0.0)
    if family.flow_matching:  # psi and xi reweight upstream's density over the scheduler's sigma table
        base = dt.flow_base_probs(len(noise_scheduler.sigmas), args.weighting_scheme, args.logit_mean,
                                  args.logit_std, args.mode_scale)
        psi = dt.FlowTimestepSampler(noise_scheduler.sigmas, base, psi_tau, "adaptation", args.timestep_sampling)
        xi = dt.FlowTimestepSampler(noise_scheduler.sigmas, base, xi_tau, "retention", args.timestep_sampling)
    else:
        num_timesteps = noise_scheduler.config.num_train_timesteps
        psi = dt.TimestepSampler(num_timesteps, psi_tau, "adaptation", args.timestep_sampling)
        xi = dt.TimestepSampler(num_timesteps, xi_tau, "retention", args.timestep_sampling)
    step = DreamBoothStep(
        family=family, denoiser=denoiser, vae=None if args.cache_latents else vae, noise_scheduler=noise_scheduler,
        psi=psi, xi=xi, weighting_scheme=args.weighting_scheme, precondition_outputs=bool(args.precondition_outputs),
        prompt_ids=prompt_ids, prompt_table=prompt_table, prior_loss_weight=args.prior_loss_weight,
        snr_gamma=args.snr_gamma, weight_dtype=weight_dtype, bank=bank, bank_prompt_row=len(prompts) - 1,
        bank_time_ids=bank_time_ids)
    rows_per_step = args.train_batch_size * (2 if bank is not None else 1)
    log = tp.TrainingLog(accelerator, args.logging_steps,
                         rows_per_step * accelerator.num_processes * args.gradient_accumulation_steps,
                         flops_per_image, tp.peak_flops(accelerator.mixed_precision), args.checkpointing_steps)
    logger.info(f"***** Training: {family.name}, {len(dataset)} subject images, {max_train_steps} steps, "
                f"{args.train_batch_size} subject + {rows_per_step - args.train_batch_size} class samples per device "
                f"batch, difftuning={args.difftuning}, train_text_encoder={args.train_text_encoder} *****")

    # --- Training loop ---------------------------------------------------------------------------
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    for epoch in range(global_step // updates_per_epoch, num_epochs):
        denoiser.train()
        for batch in tp.epoch_loader(accelerator, train_dataloader, sampler, epoch, global_step, updates_per_epoch,
                                     args.gradient_accumulation_steps):
            with accelerator.accumulate(denoiser, *prepared_encoders):
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
                        run_validation(args, accelerator, pipeline, global_step, family.call_kwargs)
            if global_step >= max_train_steps:
                break

    # --- Save ------------------------------------------------------------------------------------
    tp.log_throughput(accelerator, log, global_step, args)
    accelerator.wait_for_everyone()
    denoiser_state = tp.full_state_dict(accelerator, denoiser)  # every process: gathers shards
    tp.end_collectives(accelerator)
    if accelerator.is_main_process:
        encoders = [tp.unwrap(accelerator, e) for e in prepared_encoders] or [None] * len(text_encoders)
        with dt.disk_space_guard(args.output_dir, "the LoRA weights"):
            trained_denoiser = tp.unwrap(accelerator, denoiser)
            family.save_lora_weights(args.output_dir, lora_layers(trained_denoiser, family, denoiser_state),
                                     [lora_layers(e, family) if e is not None else None for e in encoders],
                                     [lora_metadata(m) for m in (trained_denoiser, *encoders)])
        del pipeline, denoiser, text_encoders, step
        # The saved file, loaded as a user would, every part in one dtype: left to themselves, transformers loads
        # half-precision text encoders (e.g. --variant fp16) as saved and diffusers the UNet in float32.
        final_dtype = weight_dtype if accelerator.device.type == "cuda" else torch.float32
        final, final_family = load_base_pipeline(args, torch_dtype=final_dtype)
        final.load_lora_weights(args.output_dir)
        prompt = args.validation_prompt or args.instance_prompt
        images = generate_images(args, final.to(accelerator.device), prompt, accelerator.device,
                                 final_family.call_kwargs)
        tp.log_images(accelerator, images, [prompt] * len(images), global_step, tag="final")
        tp.save_model_card(args, args.pretrained_model_name_or_path, model_description(args, family, prompt, repo_id),
                           ["text-to-image", "diffusers", "lora", "dreambooth", "diffusers-training", "diff-tuning",
                            family.hub_tag], images)
        logger.info(f"Saved the LoRA weights to {args.output_dir} (load them with "
                    f"pipe.load_lora_weights({args.output_dir!r}))")
        if args.push_to_hub:
            tp.push_output_dir(args, repo_id)
    accelerator.end_training()


# ----------------------------------------------------------------------------------------------
# Validation and output
# ----------------------------------------------------------------------------------------------


def generate_images(args: argparse.Namespace, pipeline: Any, prompt: str, device: torch.device,
                    call_kwargs: dict[str, Any]) -> list:
    """--num_validation_images samples of ``prompt`` with DPM-Solver++ (upstream's validation sampler);
    ``call_kwargs``: the family's, so the prompt is encoded as in training (SD3's and Flux's T5 length)."""
    from diffusers import DPMSolverMultistepScheduler

    training_scheduler = pipeline.scheduler
    if not hasattr(pipeline, "transformer"):  # DDPM models: upstream samples with DPM-Solver++
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(training_scheduler.config)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        images = [pipeline(prompt, num_inference_steps=args.validation_num_inference_steps, generator=generator,
                           height=args.resolution, width=args.resolution, **call_kwargs).images[0]
                  for _ in range(args.num_validation_images)]
    pipeline.scheduler = training_scheduler
    return images


def run_validation(args: argparse.Namespace, accelerator: Any, pipeline: Any, global_step: int,
                   call_kwargs: dict[str, Any]) -> None:
    """Sample --validation_prompt with the current LoRA (the pipeline holds the trained modules) and log it (main
    process; every process samples when the parameters are sharded, since each forward pass gathers them)."""
    if not (accelerator.is_main_process or tp.sharded_parameters(accelerator)):
        return
    denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
    denoiser.eval()
    with tp.sampling_autocast(accelerator.device, tp.mixed_precision_dtype(accelerator)):
        images = generate_images(args, pipeline, args.validation_prompt, accelerator.device, call_kwargs)
    tp.log_images(accelerator, images, [args.validation_prompt] * len(images), global_step)
    denoiser.train()
    tp.reshard(denoiser)  # frees the weights FSDP keeps gathered after a forward pass without backward


def model_description(args: argparse.Namespace, family: mf.StableDiffusionFamily, prompt: str,
                      repo_id: str | None) -> str:
    if args.with_prior_preservation:
        prior = (f"prior preservation on {args.num_class_images} class images of '{args.class_prompt}' "
                 f"(weight {args.prior_loss_weight})")
    else:
        prior = "no prior preservation"
    method = (f"Diff-Tuning (subject at psi timesteps, tau {args.difftuning_tau}; class samples at xi timesteps, "
              f"tau {args.retention_tau}; {args.timestep_sampling} sampling)" if args.difftuning
              else "uniform timesteps (standard DreamBooth)")
    return (f"# DreamBooth LoRA for {family.name}: {args.instance_prompt}\n\n"
            f"LoRA rank {args.rank}{' with text-encoder LoRA' if args.train_text_encoder else ''}, "
            f"{method}, {prior}; {args.max_train_steps or '?'} steps, batch {args.train_batch_size}, "
            f"lr {args.learning_rate}, resolution {args.resolution}.\n\n"
            f"Trigger prompt: `{args.instance_prompt}`.\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{tp.display_path(args.pretrained_model_name_or_path)}\")\n"
            f"pipe.load_lora_weights(\"{tp.usage_reference(args, repo_id)}\")\n"
            f"image = pipe(\"{prompt}\").images[0]\n```")


if __name__ == "__main__":
    tp.run_cli(main, parse_args)
