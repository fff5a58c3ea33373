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
plumbing in the training_plumbing package.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from PIL import Image
from tqdm.auto import tqdm

import difftuning_utils as dt
import model_families as mf
import training_plumbing as tp

logger = get_logger(__name__)

# --image_interpolation_mode: upstream's choices (torchvision's modes) as PIL resamples them.
INTERPOLATION = {"nearest": Image.NEAREST, "nearest_exact": Image.NEAREST, "bilinear": Image.BILINEAR,
                 "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
# Flags of upstream's four scripts whose default here differs from upstream's, and why (docs/dreambooth.md's table
# shows it; tests/test_dreambooth_dropin.py checks that no other default differs).
UPSTREAM_DIFFERENCES = {
    "seed": "0 (upstream: none, a different run each time): runs, checkpoints and knowledge banks are reproducible "
            "by default.",
    "allow_tf32": "on (upstream: off): TF32 matmuls on Ampere and newer GPUs, as PyTorch's own default for "
                  "convolutions; --no-allow_tf32 turns it off.",
}
# Flags of upstream's four scripts that cannot apply here, and why (refused in one sentence).
REFUSED_FLAGS = {
    "--validation_images": "images to upscale at validation are for DeepFloyd IF's super-resolution stage, which "
                           "this script does not train (upstream's train_dreambooth_lora.py does).",
    "--class_labels_conditioning": "the timestep class labels of DeepFloyd IF's stage-II UNet, which this script "
                                   "does not train (upstream's train_dreambooth_lora.py does).",
    "--do_edm_style_training": "EDM-style training (upstream's SDXL option, and the only way it trains Playground "
                               "v2.5) is not implemented here; use diffusers' train_dreambooth_lora_sdxl.py for it.",
    "--enable_npu_flash_attention": "Ascend NPU attention needs torch_npu and an NPU; this script runs on CUDA "
                                    "and CPU (upstream refuses it there too).",
}


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


def base_vae_config(args: argparse.Namespace) -> dict:
    """The config of the VAE the run will use (--pretrained_vae_model_name_or_path's, else the pipeline's)."""
    import diffusers

    if args.pretrained_vae_model_name_or_path:
        return tp.load_pretrained(diffusers.AutoencoderKL.load_config, "--pretrained_vae_model_name_or_path",
                                  args.pretrained_vae_model_name_or_path, "an AutoencoderKL", cache_dir=args.cache_dir)
    return tp.load_pretrained(diffusers.AutoencoderKL.load_config, "--pretrained_model_name_or_path",
                              args.pretrained_model_name_or_path, "a pipeline with a VAE", subfolder="vae",
                              revision=args.revision, cache_dir=args.cache_dir)


def load_base_pipeline(args: argparse.Namespace, quantized_dtype: torch.dtype | None = None,
                       **kwargs: Any) -> tuple[Any, mf.StableDiffusionFamily]:
    """The base pipeline of the family named by its ``model_index.json``, and that family, built with the
    family's flags (T5's --max_sequence_length, Flux's --guidance_scale). ``quantized_dtype``: given
    --quantize_base, the denoiser is loaded quantized, its other weights and its computation in this dtype."""
    import diffusers

    config, family = base_family(args)
    if quantized_dtype is not None and args.quantize_base:
        class_name = config[family.denoiser_name][1]
        kwargs[family.denoiser_name] = tp.load_pretrained(
            getattr(diffusers, class_name).from_pretrained, "--pretrained_model_name_or_path",
            args.pretrained_model_name_or_path, f"a {class_name}", subfolder=family.denoiser_name,
            revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, torch_dtype=quantized_dtype,
            quantization_config=tp.quantization_config(args.quantize_base, quantized_dtype))
    if args.pretrained_vae_model_name_or_path:
        kwargs["vae"] = tp.load_pretrained(diffusers.AutoencoderKL.from_pretrained,
                                           "--pretrained_vae_model_name_or_path",
                                           args.pretrained_vae_model_name_or_path, "an AutoencoderKL",
                                           cache_dir=args.cache_dir)
    if "safety_checker" in config:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if getattr(args, "tokenizer_name", None):  # SD's --tokenizer_name, loaded as upstream loads it
        from transformers import AutoTokenizer

        kwargs["tokenizer"] = tp.load_pretrained(AutoTokenizer.from_pretrained, "--tokenizer_name",
                                                 args.tokenizer_name, "a tokenizer", revision=args.revision,
                                                 use_fast=False)
    for name, value in config.items():  # parts saved as absent (SD3 without T5) must be passed as None to load
        if isinstance(value, list) and value == [None, None] and name not in ("feature_extractor", "image_encoder"):
            kwargs.setdefault(name, None)
    pipeline_class = getattr(diffusers, family.pipeline_class_name)
    pipeline = tp.load_pretrained(pipeline_class.from_pretrained, "--pretrained_model_name_or_path",
                                  args.pretrained_model_name_or_path, f"a {family.pipeline_class_name}",
                                  revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    options = {name: getattr(args, name, None) for name in inspect.signature(family.__init__).parameters
               if name in family.flag_defaults}  # the family's own flags it is built with (T5 length, SD's mask)
    return pipeline, family(pipeline, **options)


def add_lora_adapters(denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module],
                      args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """peft LoRA on the denoiser's attention projections (UNet or transformer; and the text encoders' given
    with --train_text_encoder), as diffusers' DreamBooth scripts add them; returns the trainable parameters,
    kept in float32."""
    from diffusers.training_utils import cast_training_params
    from peft import inject_adapter_in_model

    try:
        denoiser.add_adapter(tp.lora_config(args))
    except ValueError as err:  # peft: none of the targets is in the model (a wrong --lora_layers / --lora_blocks)
        raise dt.ConfigError(f"--lora_target_modules / --lora_layers / --lora_blocks {args.lora_target_modules}: "
                             f"{str(err).splitlines()[0]}") from None
    models = [denoiser]
    if args.train_text_encoder:
        config = tp.lora_config(args, mf.TEXT_ENCODER_LORA_MODULES)
        for encoder in text_encoders:  # peft directly: transformers' add_adapter may ask for a newer peft
            inject_adapter_in_model(config, encoder)
            models.append(encoder)
    cast_training_params(models, dtype=torch.float32)  # frozen weights may be fp16/bf16; LoRA trains in fp32
    return [[p for p in m.parameters() if p.requires_grad] for m in models]


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
                              text_encoders: list[torch.nn.Module]) -> list[Any]:
    """Checkpoints hold only the LoRA weights, in diffusers' format (``checkpoint-N`` loads with
    ``load_lora_weights``, as upstream's do), not a full copy of the frozen model. ``text_encoders``: the trained
    ones. Returns the hooks' handles (removing them lets go of the models)."""
    from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    def role(model: torch.nn.Module) -> int:  # 0: the denoiser, 1..: text encoders
        plain = tp.unwrap(accelerator, model)
        return next(i for i, m in enumerate([denoiser, *text_encoders]) if m is plain)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        states = [tp.full_state_dict(accelerator, model) for model in models]  # every process: gathers shards
        if accelerator.is_main_process:
            layers: list[dict | None] = [None] * (1 + len(family.component_names))
            metadata: list[dict | None] = [None] * (1 + len(family.component_names))
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

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]


def cast_frozen(modules: tuple[torch.nn.Module, ...], device: torch.device, dtype: torch.dtype) -> None:
    """:func:`tp.cast` of each frozen part; a quantized denoiser (--quantize_base) keeps its storage and is only
    moved to the device (bitsandbytes loads it there)."""
    for module in modules:
        if not getattr(module, "is_quantized", False):
            tp.cast(module, device, dtype)
        elif module.device.type != torch.device(device).type:
            module.to(device)


class InstanceImages(torch.utils.data.Dataset):
    """The subject's images as the loader sees them, per :class:`tp.SampleKey`: pixels (or, with a latent
    cache, the cached posterior of the image or its mirror), the row's prompt in the prompt table and
    SDXL's size-and-crop ids. Keys run over the epoch's rows (:func:`epoch_rows`); row i is image i mod N."""

    def __init__(self, dataset: Any, args: argparse.Namespace, prompt_rows: list[int], num_rows: int,
                 latent_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.dataset, self.prompt_rows, self.num_rows, self.latent_cache = dataset, prompt_rows, num_rows, latent_cache
        self.image_column, self.resolution, self.seed = args.image_column, args.resolution, args.seed
        self.center_crop, self.random_flip = args.center_crop, args.random_flip
        self.resample = INTERPOLATION[args.image_interpolation_mode]

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: tp.SampleKey) -> dict:
        rng = tp.sample_rng(self.seed, key)
        index = key.index % len(self.dataset)
        item = {"prompt_rows": self.prompt_rows[index]}
        if self.latent_cache is not None:  # the crop is fixed: the only draw is the flip
            view = int(self.random_flip and rng.random() < 0.5)
            mean, std, ids = self.latent_cache
            return {**item, "latent_mean": mean[index, view], "latent_std": std[index, view],
                    "time_ids": ids[index, view]}
        image = tp.convert_image(self.dataset[index][self.image_column], "RGB")
        square, original_size, crop = tp.resize_crop_flip(image, self.resolution, self.center_crop,
                                                          self.random_flip, rng, self.resample)
        return {**item, "pixel_values": tp.to_model_tensor(square),
                "time_ids": mf.time_ids(original_size, crop, self.resolution)}


class FixedCrops(torch.utils.data.Dataset):
    """Every subject image cropped once, unflipped: what --cache_latents encodes (and mirrors). The centre with
    --center_crop; else one random crop per image, drawn from --seed (upstream's SD3 and Flux scripts also crop
    each image once, when they load it)."""

    def __init__(self, dataset: Any, args: argparse.Namespace) -> None:
        self.dataset, self.column, self.resolution = dataset, args.image_column, args.resolution
        self.center_crop, self.seed = args.center_crop, args.seed
        self.resample = INTERPOLATION[args.image_interpolation_mode]

    def __len__(self) -> int:
        return len(self.dataset)

    def crop(self, index: int) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
        image = tp.convert_image(self.dataset[index][self.column], "RGB")
        rng = None if self.center_crop else tp.sample_rng(self.seed, tp.SampleKey(-1, index))
        return tp.resize_crop_flip(image, self.resolution, self.center_crop, False, rng, self.resample)

    def __getitem__(self, index: int) -> torch.Tensor:
        return tp.to_model_tensor(self.crop(index)[0])

    def time_ids(self) -> torch.Tensor:
        """SDXL's ids [N, 2, 6] of each crop and of its mirror (whose crop's left edge is mirrored)."""
        ids = []
        for index in range(len(self)):
            _, (height, width), (top, left) = self.crop(index)
            resized_width = max(self.resolution, round(width * self.resolution / min(height, width)))
            ids.append(torch.stack([mf.time_ids((height, width), (top, left), self.resolution),
                                    mf.time_ids((height, width), (top, resized_width - left - self.resolution),
                                                self.resolution)]))
        return torch.stack(ids)


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


def epoch_rows(args: argparse.Namespace, num_images: int, num_processes: int) -> int:
    """Rows of one epoch as upstream counts them: every subject image --repeats times or, with prior preservation,
    one row per class image when there are more of those; rounded up to whole batches on every process (the last
    batch is filled with more subject images, where upstream's is shorter)."""
    rows = max(num_images * args.repeats, args.num_class_images if args.with_prior_preservation else 0)
    per_step = args.train_batch_size * num_processes
    return math.ceil(rows / per_step) * per_step


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


def optimizer_groups(args: argparse.Namespace, param_lists: list[list[torch.nn.Parameter]]) -> list[dict]:
    """The optimizer's parameter groups as upstream builds them: the denoiser's LoRA at --learning_rate and
    --adam_weight_decay; the text encoders' at --text_encoder_lr and --adam_weight_decay_text_encoder (SD: the
    same as the denoiser's). Prodigy sets its own step size, so upstream gives both groups --learning_rate."""
    denoiser_params, *encoder_params = param_lists
    groups = [{"params": denoiser_params, "lr": args.learning_rate}]
    encoder_params = [p for params in encoder_params for p in params]
    if encoder_params:
        lr = args.text_encoder_lr or args.learning_rate
        if args.optimizer == "prodigy" and lr != args.learning_rate:
            logger.warning(f"--optimizer prodigy: the text encoders train at --learning_rate {args.learning_rate}, "
                           f"not --text_encoder_lr {lr} (as upstream).")
            lr = args.learning_rate
        decay = args.adam_weight_decay if args.adam_weight_decay_text_encoder is None else (
            args.adam_weight_decay_text_encoder)
        groups.append({"params": encoder_params, "lr": lr, "weight_decay": decay})
    return groups


def validation_due(args: argparse.Namespace, global_step: int, updates_per_epoch: int, max_train_steps: int) -> bool:
    """Whether to validate after this optimizer step: every --validation_steps steps when given, else at the end of
    every --validation_epochs-th epoch, the first included, and of a last epoch cut short by --max_train_steps
    (upstream's rule)."""
    if args.validation_steps is not None:
        return global_step % args.validation_steps == 0
    epoch_ends = global_step % updates_per_epoch == 0 or global_step >= max_train_steps
    return epoch_ends and (global_step - 1) // updates_per_epoch % args.validation_epochs == 0


def denoiser_flops_per_image(family: mf.StableDiffusionFamily, denoiser: torch.nn.Module, args: argparse.Namespace,
                             prompt_ids: list[torch.Tensor], prompt_table: mf.PromptEmbeddings | None,
                             latent_shape: list[int], resolution: int) -> int:
    """The forward + backward FLOPs of one training image: the denoiser with its LoRA, counted on a weightless
    (and unquantized) copy, so no memory and no computation; with --train_text_encoder also the text encoders, by
    a real pass over two prompts (small beside the denoiser)."""
    text_flops = 0
    if prompt_table is None:
        def encode_backward() -> None:
            encoded = family.encode([ids[:1].expand(2, -1) for ids in prompt_ids])
            sum(e.float().square().mean() for e in (encoded.hidden, encoded.pooled) if e is not None).backward()

        text_flops = tp.count_flops(encode_backward)
        for encoder in family.text_encoders:
            encoder.zero_grad(set_to_none=True)
        with torch.no_grad():
            prompt_table = family.encode([ids[:1] for ids in prompt_ids])
    with torch.device("meta"):
        model = tp.meta_copy(denoiser)
        model.add_adapter(tp.lora_config(args))
        x, t = torch.zeros(2, *latent_shape), torch.tensor([10, 900])
        ids = mf.time_ids((resolution, resolution), (0, 0), resolution).expand(2, -1)
        pooled = None if prompt_table.pooled is None else prompt_table.pooled[:1].expand(2, -1).to("meta")
        prompts = mf.PromptEmbeddings(prompt_table.hidden[:1].expand(2, -1, -1).to("meta"), pooled)
    flops = tp.count_flops(lambda: family.predict(model, x, t, prompts, ids, torch.float32).float().square().mean()
                           .backward())
    return (flops + text_flops) // 2


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
                    help="Training resolution; default: upstream's for the family (SD 512, SDXL 1024, SD3 512, "
                         "Flux 512).")
    db.add_argument("--repeats", type=int, default=1,
                    help="How many times each subject image is seen per epoch (upstream's flag).")
    db.add_argument("--image_interpolation_mode", type=str, default=None, choices=sorted(INTERPOLATION),
                    help="How the subject's images are resized; default: upstream's, lanczos for SD and SDXL, "
                         "bilinear for SD3 and Flux.")
    db.add_argument("--center_crop", action="store_true", help="Centre-crop instead of random-crop.")
    db.add_argument("--random_flip", action="store_true",
                    help="Random horizontal flips of the subject's images (and of the class samples).")
    db.add_argument("--train_text_encoder", action="store_true",
                    help="Train LoRA adapters on the CLIP text encoder(s) too (q/k/v/out projections; T5 stays "
                         "frozen, as upstream).")
    db.add_argument("--snr_gamma", type=float, default=None,
                    help="Min-SNR weighting gamma (5.0 is recommended); weights the subject rows, as upstream.")
    db.add_argument("--tokenizer_name", type=str, default=None,
                    help="SD only: a tokenizer (name or folder) instead of the pipeline's.")
    db.add_argument("--tokenizer_max_length", type=int, default=None,
                    help="SD only: tokens per prompt; default: the tokenizer's model_max_length.")
    db.add_argument("--text_encoder_use_attention_mask", action="store_true",
                    help="SD only: give the text encoder the prompt's attention mask (padding masked out).")
    db.add_argument("--pre_compute_text_embeddings", action="store_true",
                    help="SD only: encode the training and validation prompts once, then release the text encoder "
                         "for the whole run (not with --train_text_encoder).")
    db.add_argument("--local_rank", type=int, default=-1,
                    help="Set by launchers that pass it (torch.distributed.launch); the process's place is read "
                         "from accelerate, as upstream (LOCAL_RANK wins).")
    for flag, why in REFUSED_FLAGS.items():
        db.add_argument(flag, nargs="*", default=None, help=f"Refused: {why}")
    lora = parser.add_argument_group("LoRA")
    tp.add_lora_args(lora)
    lora.add_argument("--lora_layers", type=str, default=None,
                      help="Upstream's name for --lora_target_modules (SD3, Flux): comma-separated module names "
                           "that get LoRA adapters; a 'transformer_blocks.N.' prefix picks one block.")
    lora.add_argument("--lora_blocks", type=str, default=None,
                      help="SD3 and Flux: comma-separated transformer block numbers; LoRA only on the "
                           "--lora_layers of transformer_blocks.N (default: every block).")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout probability of the LoRA layers.")
    lora.add_argument("--use_dora", action="store_true",
                      help="Weight-decomposed LoRA (DoRA, Liu et al. 2024) instead of LoRA.")
    lora.add_argument("--output_kohya_format", action="store_true",
                      help="SD and SDXL: also save pytorch_lora_weights_kohya.safetensors, the LoRA under kohya's "
                           "key names (AUTOMATIC1111, ComfyUI).")
    lora.add_argument("--upcast_before_saving", action="store_true", default=None,
                      help="Save the LoRA in float32; without it SD3 and Flux save it in the mixed-precision dtype "
                           "(upstream's default), SD and SDXL always in float32.")
    train = next(g for g in parser._action_groups if g.title == "Training")
    train.add_argument("--optimizer", type=str.lower, default="adamw", choices=["adamw", "prodigy"],
                       help="AdamW, or Prodigy (prodigyopt; its learning rate is a multiplier: upstream "
                            "advises --learning_rate 1.0).")
    train.add_argument("--prodigy_beta3", type=float, default=None,
                       help="Prodigy's beta3 (its step-size EMA); default: the square root of --adam_beta2.")
    for name, what in (("decouple", "AdamW-style decoupled weight decay"),
                       ("use_bias_correction", "Adam's bias correction"),
                       ("safeguard_warmup", "the step-size safeguard during warmup")):
        train.add_argument(f"--prodigy_{name}", type=tp.str_to_bool, default=True,
                           help=f"Prodigy: {what} (true/false).")
    train.add_argument("--text_encoder_lr", type=float, default=None,
                       help="Learning rate of the text encoders' LoRA (--train_text_encoder); default: upstream's, "
                            "5e-6 for SDXL, SD3 and Flux, --learning_rate for SD.")
    train.add_argument("--adam_weight_decay_text_encoder", type=float, default=None,
                       help="Weight decay of the text encoders' LoRA; default: upstream's, 1e-3 for SDXL, SD3 and "
                            "Flux, --adam_weight_decay for SD.")
    val = next(g for g in parser._action_groups if g.title == "Validation")
    val.add_argument("--validation_prompt", type=str, default=None, help="A prompt sampled at each validation.")
    val.add_argument("--validation_epochs", type=int, default=50,
                     help="Validate at the end of every N-th epoch (the first one included), as upstream; "
                          "--validation_steps instead validates every N optimizer steps.")
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
    # None: the family's upstream default (model_families.py), filled in once the base model's family is known.
    next(g for g in parser._action_groups if g.title == "Training").add_argument(
        "--quantize_base", type=str, default=None, choices=list(tp.QUANTIZED_BASES),
        help="Keep the frozen UNet/transformer quantized while its LoRA trains (QLoRA, as diffusers' Flux QLoRA "
             "example), through diffusers' backends: "
             + "; ".join(f"{kind}: {what}" for kind, (_, what) in tp.QUANTIZED_BASES.items())
             + ". The saved LoRA loads into the unquantized base.")
    parser.set_defaults(lora_target_modules=None, validation_steps=None,
                        **{name: None for name in mf.StableDiffusionFamily.defaults})
    short = {mf.StableDiffusionFamily: "SD", mf.StableDiffusionXLFamily: "SDXL", mf.StableDiffusion3Family: "SD3",
             mf.FluxFamily: "Flux"}
    for action in parser._actions:  # the shared flags' help, where it does not say the family's default
        if action.dest == "lora_alpha":
            action.help = "LoRA alpha (the update is scaled by alpha / rank); default: the rank, Flux 4 (upstream's)."
        elif action.dest in mf.StableDiffusionFamily.defaults and "default" not in (action.help or "").lower():
            values = ", ".join(f"{name} {family.defaults[action.dest]}" for family, name in short.items())
            action.help = f"{action.help} Default per family, as upstream: {values}."
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(input_args)
    for flag, why in REFUSED_FLAGS.items():
        if getattr(args, flag.removeprefix("--")) is not None:
            raise dt.ConfigError(f"{flag}: {why}")
    if not (args.instance_prompt or "").strip():  # "   " names no subject either
        given = f", got {args.instance_prompt!r}" if args.instance_prompt else ""
        raise dt.ConfigError(f"--instance_prompt is required: the prompt that names the subject, e.g. "
                             f"'a photo of sks dog'{given}.")
    local_rank = int(os.environ.get("LOCAL_RANK", -1))  # as upstream: the launcher's environment wins
    if local_rank != -1:
        args.local_rank = local_rank
    if args.output_dir is None and args.pretrained_model_name_or_path:  # upstream's per-family folder name
        args.output_dir = base_family(args)[1].defaults["output_dir"]
    tp.validate_common_args(args, "--instance_data_dir")  # every flag's range (tp.FLAG_RANGES)
    if args.with_prior_preservation and args.class_prompt is None:
        raise dt.ConfigError("--with_prior_preservation needs --class_prompt (the class the subject belongs to, "
                             "e.g. 'a photo of dog'; '' for the empty prompt).")
    if not args.with_prior_preservation:  # upstream warns and trains without them
        for flag in ("class_data_dir", "class_prompt"):
            if getattr(args, flag) is not None:
                warnings.warn(f"--{flag} is used only with --with_prior_preservation; training without class "
                              "samples.", stacklevel=2)
                setattr(args, flag, None)
    tp.lora_alpha(args)  # 0 refused before any model loads
    if args.lora_layers is not None and args.lora_target_modules is not None:
        raise dt.ConfigError("--lora_layers and --lora_target_modules name the same thing: give one of them.")
    if args.lora_blocks is not None:
        try:
            args.lora_blocks = ",".join(str(int(block)) for block in args.lora_blocks.split(","))
        except ValueError:
            raise dt.ConfigError(f"--lora_blocks takes comma-separated block numbers, e.g. '12,30'; got "
                                 f"{args.lora_blocks!r}.") from None
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        raise dt.ConfigError("--pre_compute_text_embeddings releases the text encoder that --train_text_encoder "
                             "trains: give one of them (as upstream).")
    if args.with_prior_preservation:
        args.class_data_dir = args.class_data_dir or os.path.join(args.output_dir, "class_images")
        if os.path.exists(os.path.join(args.class_data_dir, dt.MANIFEST_NAME)):
            raise dt.ConfigError(f"--class_data_dir {args.class_data_dir} holds class samples as latents, written by "
                                 "an earlier version of this script, which now keeps class images there as upstream "
                                 "does: pass another folder, or delete that one.")
        check_class_images(args.class_data_dir)
    tp.check_quantization_backend(args.quantize_base)
    dt.validate_difftuning_args(args, bank_num_inference_steps=50)
    return args


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def check_family_flags(args: argparse.Namespace, family: type[mf.StableDiffusionFamily]) -> None:
    """Flags that only some kinds of model have, checked once the base model's family is known (before its
    weights load): another family's flag given is refused in one sentence; the family's own, and the flags whose
    defaults differ between upstream's four scripts, are filled with the family's defaults (model_families.py)."""
    if family.flow_matching and args.snr_gamma is not None:
        raise dt.ConfigError("--snr_gamma (Min-SNR) is for DDPM models; flow-matching models (SD3, Flux) weight "
                             "the loss with --weighting_scheme.")
    accepted = set(family.flag_defaults) | (set(mf.DENSITY_FLAGS) if family.flow_matching else set())
    foreign: dict[str, list[str]] = {}
    for name, (owner, default) in mf.FAMILY_FLAGS.items():
        if name not in accepted and getattr(args, name) != default:
            foreign.setdefault(owner, []).append(f"--{name}")
    if foreign:
        named = "; ".join(", ".join(flags) + f": {owner}" for owner, flags in foreign.items())
        kind = "" if family.flow_matching else " (DDPM)"
        raise dt.ConfigError(f"{named}, and {args.pretrained_model_name_or_path} is a {family.name} model{kind}.")
    for name, default in {**family.flag_defaults, **family.defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if family.flow_matching:  # e.g. --logit_mean 1e6: every draw at the last sigma, a loss of 0 that trains nothing
        dt.check_flow_density(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    args.lora_target_modules = args.lora_layers or args.lora_target_modules or family.lora_target_modules
    if args.lora_blocks:  # upstream's SD3 rule: the chosen layers, in the chosen blocks only
        layers = [m.strip() for m in args.lora_target_modules.split(",")]
        args.lora_target_modules = ",".join(f"transformer_blocks.{block}.{layer}"
                                            for block in args.lora_blocks.split(",") for layer in layers)
    if args.optimizer == "prodigy" and args.learning_rate <= 0.1:
        warnings.warn(f"--optimizer prodigy adapts the step size itself; --learning_rate {args.learning_rate} is "
                      "its multiplier, and upstream advises 1.0.", stacklevel=2)


@tp.claims_output_dir
def main(args: argparse.Namespace) -> None:
    from accelerate.utils import DistributedType
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import free_memory

    accelerator, weight_dtype = tp.setup_accelerator(args)
    if args.train_text_encoder and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise dt.ConfigError(f"--train_text_encoder trains several models, and accelerate's "
                             f"{accelerator.distributed_type.value} prepares one: leave the flag out or launch "
                             "without the sharding config.")
    # --- Models -------------------------------------------------------------------------------
    # given (--lora_target_modules or --lora_layers), else the family's (upstream's) defaults
    targets_given = args.lora_target_modules is not None or args.lora_layers is not None
    model_index, family_class = base_family(args)  # all checked before the weights load (FLUX.1-dev's are ~34 GB)
    check_family_flags(args, family_class)
    family_class.check_supported(args.pretrained_model_name_or_path, model_index.get("scheduler", [None, ""])[1],
                                 base_vae_config(args))
    if args.quantize_base and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise dt.ConfigError(f"--quantize_base keeps the frozen base in quantized storage, which "
                             f"{accelerator.distributed_type.value} cannot shard: leave one of them out.")
    repo_id = tp.hub_repo_id(args) if accelerator.is_main_process else None

    # --- The subject's data (checked before the weights load and the class samples are generated) ----------
    columns = {"--image_column": args.image_column, **({"--caption_column": args.caption_column}
                                                        if args.caption_column else {})}
    dataset = tp.load_train_dataset(args, columns, "--instance_data_dir")
    dataset, _ = tp.check_images(dataset, {"--image_column": args.image_column}, args.skip_bad_images)
    if args.with_prior_preservation and len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise dt.ConfigError(f"There are {len(dataset)} subject images, fewer than one batch of "
                             f"{args.train_batch_size} on each of {accelerator.num_processes} process(es); lower "
                             "--train_batch_size.")
    captions = list(dataset[args.caption_column]) if args.caption_column else [args.instance_prompt] * len(dataset)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise dt.ConfigError(f"--caption_column: row {i} holds {type(caption).__name__}, not a string.")
    prompts = list(dict.fromkeys(captions)) + ([args.class_prompt] if args.with_prior_preservation else [])
    prompt_rows = [prompts.index(c) for c in captions]

    # --- The base model -------------------------------------------------------------------------
    pipeline, family = load_base_pipeline(args, quantized_dtype=weight_dtype)
    denoiser, vae, text_encoders = getattr(pipeline, family.denoiser_name), pipeline.vae, family.text_encoders
    if targets_given:  # (upstream's SD3 list names to_add_out, which a transformer of one block lacks)
        tp.check_lora_targets(denoiser, args.lora_target_modules)  # before the class samples are generated
    scheduler_class = FlowMatchEulerDiscreteScheduler if family.flow_matching else DDPMScheduler
    noise_scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
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
    del frozen  # the loop variable would keep a text encoder alive after its release
    # Frozen parts in the mixed-precision dtype (upstream); first in --prior_generation_precision's, if given,
    # while the class samples are generated.
    generation_dtype = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                        "bf16": torch.bfloat16}.get(args.prior_generation_precision, weight_dtype)
    cast_frozen((denoiser, *text_encoders), accelerator.device,
                generation_dtype if args.with_prior_preservation else weight_dtype)
    # The fp16 VAE overflows (SDXL's especially): keep it in fp32 unless another VAE was given, as upstream.
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path or weight_dtype == torch.bfloat16 else (
        torch.float32)
    tp.cast(vae, accelerator.device, vae_dtype)
    if args.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()

    tp.describe_image_conversion(dataset, args.image_column, 3, args.resolution)

    # --- Class images: upstream's folder, encoded once into the knowledge bank -------------------------
    bank, bank_time_ids = None, None
    latent_shape = [vae.config.latent_channels] + [args.resolution // vae_scale] * 2  # unpacked (Flux packs 2x2)
    if args.with_prior_preservation:
        call_defaults = inspect.signature(type(pipeline).__call__).parameters
        guidance = (call_defaults["guidance_scale"].default if args.knowledge_bank_guidance_scale is None
                    else args.knowledge_bank_guidance_scale)  # 0 is a value (no guidance), not "the default"
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
        cast_frozen((denoiser, *text_encoders), accelerator.device, weight_dtype)

    # --- What to train --------------------------------------------------------------------------
    param_lists = add_lora_adapters(denoiser, family.lora_text_encoders, args)
    params = [p for model_params in param_lists for p in model_params]
    hook_handles = register_checkpoint_hooks(accelerator, family, denoiser,
                                             family.lora_text_encoders if args.train_text_encoder else [])
    prompt_ids = [ids.to(accelerator.device) for ids in family.tokenize(prompts)]
    prompt_table = None
    sample_kwargs = family.call_kwargs  # what the validation samples are called with
    if not args.train_text_encoder:  # fixed prompts, frozen encoders: encode them once, then release the encoders
        with torch.no_grad():
            prompt_table = family.encode(prompt_ids)
            if args.pre_compute_text_embeddings:  # SD: the validation prompt encoded as the training prompts
                embeds = family.encode([ids.to(accelerator.device) for ids in family.tokenize(
                    [args.validation_prompt or args.instance_prompt, ""])]).hidden
                sample_kwargs = {**sample_kwargs, "prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}
            elif args.validation_prompt:  # as the pipeline encodes it: the same samples as from the prompt
                sample_kwargs = {**sample_kwargs,
                                 **family.pipeline_prompt_embeds(args.validation_prompt, accelerator.device)}
        family.release_text_encoders()  # as upstream frees them (T5-XXL is ~9 GB in bf16)
        text_encoders = []
        free_memory()
    flops_per_image = denoiser_flops_per_image(family, denoiser, args, prompt_ids, prompt_table, latent_shape,
                                               args.resolution)  # model FLOPs, counted without a real pass
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in family.lora_text_encoders if args.train_text_encoder else ():
            encoder.gradient_checkpointing_enable()
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = tp.create_optimizer(args, optimizer_groups(args, param_lists))

    # --- Data loader: a seeded permutation per epoch, per-sample augmentation from (seed, epoch, index) ---
    per_step = args.train_batch_size * accelerator.num_processes
    if len(dataset) * args.repeats < per_step:  # upstream trains on a shorter batch
        logger.warning(f"{len(dataset)} subject images x --repeats {args.repeats} are fewer than one batch of "
                       f"{per_step}: each batch shows some of them more than once.")
    latent_cache = None
    if args.cache_latents:
        if not args.center_crop:
            logger.warning("--cache_latents without --center_crop: each image is cropped once, at random (as "
                           "upstream), not anew every epoch.")
        crops = FixedCrops(dataset, args)
        mean, std = tp.cache_posteriors(vae, crops, args.random_flip, 32, args.dataloader_num_workers,
                                        accelerator.device)
        latent_cache = (mean, std, crops.time_ids())
        if not args.validation_prompt:  # nothing left to encode or decode (upstream frees it too)
            pipeline.register_modules(vae=None)
            vae = None
    num_rows = epoch_rows(args, len(dataset), accelerator.num_processes)
    sampler = tp.EpochShuffleSampler(num_rows, args.seed)
    train_dataloader = tp.make_dataloader(InstanceImages(dataset, args, prompt_rows, num_rows, latent_cache),
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
        family=family, denoiser=tp.compile_for_training(denoiser, args), vae=None if args.cache_latents else vae,
        noise_scheduler=noise_scheduler,
        psi=psi, xi=xi, weighting_scheme=args.weighting_scheme, precondition_outputs=bool(args.precondition_outputs),
        prompt_ids=prompt_ids, prompt_table=prompt_table, prior_loss_weight=args.prior_loss_weight,
        snr_gamma=args.snr_gamma, weight_dtype=weight_dtype, bank=bank, bank_prompt_row=len(prompts) - 1,
        bank_time_ids=bank_time_ids)
    rows_per_step = args.train_batch_size * (2 if bank is not None else 1)
    log = tp.TrainingLog(accelerator, args.logging_steps,
                         rows_per_step * accelerator.num_processes * args.gradient_accumulation_steps,
                         flops_per_image, tp.peak_flops(accelerator.mixed_precision), args.checkpointing_steps,
                         params, args.output_dir)
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
                    if args.validation_prompt and validation_due(args, global_step, updates_per_epoch, max_train_steps):
                        run_validation(args, accelerator, pipeline, global_step, sample_kwargs)
            if global_step >= max_train_steps:
                break

    # --- Save ------------------------------------------------------------------------------------
    tp.log_throughput(accelerator, log, global_step, args)
    accelerator.wait_for_everyone()
    denoiser_state = tp.full_state_dict(accelerator, denoiser)  # every process: gathers shards
    tp.end_collectives(accelerator)
    if accelerator.is_main_process:
        encoders = [tp.unwrap(accelerator, e) for e in prepared_encoders] or [None] * len(family.component_names)
        # The LoRA trains in float32; upstream's SD3 and Flux save it in the mixed-precision dtype unless
        # --upcast_before_saving (their text encoders' LoRA always in float32), SD and SDXL always in float32.
        saved_dtype = torch.float32 if args.upcast_before_saving else weight_dtype
        denoiser_layers = {k: v.to(saved_dtype) for k, v in
                           lora_layers(tp.unwrap(accelerator, denoiser), family, denoiser_state).items()}
        trained_denoiser = tp.unwrap(accelerator, denoiser)

        def write(folder: str) -> None:
            family.save_lora_weights(folder, denoiser_layers,
                                     [lora_layers(e, family) if e is not None else None for e in encoders],
                                     [lora_metadata(m) for m in (trained_denoiser, *encoders)])
            if args.output_kohya_format:
                save_kohya_copy(folder)

        tp.save_final(args.output_dir, "the LoRA weights", write)
        # One pipeline at a time: every reference to the training one (accelerate's and the hooks' too) goes
        # before the base model is loaded again.
        for handle in hook_handles:
            handle.remove()
        card = family.card_metadata(args.pretrained_model_name_or_path)
        description = model_description(args, family, args.validation_prompt or args.instance_prompt, repo_id)
        pipeline = family = denoiser = trained_denoiser = vae = text_encoders = encoders = denoiser_state = None
        step = prepared_encoders = trained_encoders = params = optimizer = lr_scheduler = train_dataloader = None
        accelerator.free_memory()
        if args.torch_compile:
            torch.compiler.reset()  # compiled code may hold the trained model
        # The saved file, loaded as a user would, every part in one dtype: left to themselves, transformers loads
        # half-precision text encoders (e.g. --variant fp16) as saved and diffusers the UNet in float32.
        final_dtype = weight_dtype if accelerator.device.type == "cuda" else torch.float32
        final, final_family = load_base_pipeline(args, torch_dtype=final_dtype)
        final.load_lora_weights(args.output_dir)
        prompt = args.validation_prompt or args.instance_prompt
        images = generate_images(args, final.to(accelerator.device), prompt, accelerator.device,
                                 final_family.call_kwargs)
        tp.log_images(accelerator, images, [prompt] * len(images), global_step, tag="final")
        tp.save_model_card(args, args.pretrained_model_name_or_path, description,
                           ["text-to-image", "diffusers-training", "diffusers", "dora" if args.use_dora else "lora",
                            "template:sd-lora", *card.pop("tags"), "dreambooth", "diff-tuning"], images,
                           widget_prompt=prompt, instance_prompt=args.instance_prompt, **card)
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
    if "prompt_embeds" in call_kwargs:  # --pre_compute_text_embeddings: the prompt comes encoded
        prompt = None
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
    """The card's text, laid out as diffusers' DreamBooth LoRA cards (gallery, trigger words, usage, licence),
    plus what Diff-Tuning and prior preservation did."""
    name = tp.usage_reference(args, repo_id)
    base = tp.hub_id(args.pretrained_model_name_or_path)
    if args.with_prior_preservation:
        prior = (f"prior preservation on {args.num_class_images} class images of '{args.class_prompt}' "
                 f"(weight {args.prior_loss_weight})")
    else:
        prior = "no prior preservation"
    method = (f"Diff-Tuning (subject at psi timesteps, tau {args.difftuning_tau}; class samples at xi timesteps, "
              f"tau {args.retention_tau}; {args.timestep_sampling} sampling)" if args.difftuning
              else "uniform timesteps (standard DreamBooth)")
    load_base = (f'DiffusionPipeline.from_pretrained("{base}")' if base else
                 "DiffusionPipeline.from_pretrained(...)  # the base model this LoRA was trained on")
    kohya = ("\n\nFor AUTOMATIC1111 and ComfyUI: `pytorch_lora_weights_kohya.safetensors` (kohya's key names)."
             if args.output_kohya_format else "")
    licence = card_licence_line(family.card_metadata(args.pretrained_model_name_or_path), base)
    return (f"# {family.name} DreamBooth {'DoRA' if args.use_dora else 'LoRA'} - {name}\n\n<Gallery />\n\n"
            f"## Model description\n\nThese are {name} DreamBooth LoRA weights for {base or 'a local base model'}"
            f", trained with Diff-Tuning's DreamBooth script (a drop-in for diffusers' "
            f"{family.upstream_script}). LoRA rank {args.rank}"
            f"{', with text-encoder LoRA' if args.train_text_encoder else ''}; {method}; {prior}; "
            f"{args.max_train_steps or '?'} steps, batch {args.train_batch_size}, lr {args.learning_rate}, "
            f"resolution {args.resolution}.\n\n"
            f"## Trigger words\n\nYou should use `{args.instance_prompt}` to trigger the image generation.\n\n"
            f"## Download model\n\nThe weights are `pytorch_lora_weights.safetensors` (diffusers' format).{kohya}\n\n"
            "## Use it with the [🧨 diffusers library](https://github.com/huggingface/diffusers)\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = {load_base}\n"
            f'pipe.load_lora_weights("{name}", weight_name="pytorch_lora_weights.safetensors")\n'
            f'image = pipe("{prompt}").images[0]\n```\n\n## License\n\n{licence}')


def card_licence_line(card: dict[str, Any], base: str | None) -> str:
    """The card's licence paragraph: the base model's terms, which a LoRA of it inherits."""
    if "license_link" in card:
        return f"Please adhere to the licensing terms as described [here]({card['license_link']})."
    where = f" of [{base}](https://huggingface.co/{base})" if base else ""
    return f"The base model's licence{where} applies: {card['license']}."


def save_kohya_copy(output_dir: str) -> None:
    """--output_kohya_format: the saved LoRA again, under kohya's key names, as
    pytorch_lora_weights_kohya.safetensors (written under a temporary name, then renamed)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    state = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(
        load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))))
    path = os.path.join(output_dir, "pytorch_lora_weights_kohya.safetensors")
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    tp.run_cli(main, parse_args)
