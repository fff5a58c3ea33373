"""Text-to-image model families of train_dreambooth_lora_difftuning.py.

What differs between Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1 (the pipeline class, how a prompt
becomes the denoiser's conditioning, SDXL's size-and-crop ids, Flux's packed latents, how LoRA weights are
saved, the family's own flags and their defaults) lives here behind one small interface, so the DreamBooth
loop reads the same for every family. The noise target (epsilon or v) is read from the scheduler's
``prediction_type``, so SD 2.x's v-prediction needs nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftuning_common import ConfigError

# LoRA targets of diffusers' DreamBooth scripts: the UNet's attention projections, and the CLIP text
# encoders' attention projections with --train_text_encoder.
TEXT_ENCODER_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class PromptEmbeddings:
    """A table of encoded prompts: ``hidden`` [P, L, D] (the denoiser's encoder_hidden_states) and, for
    SDXL, SD3 and Flux, ``pooled`` [P, D2] (the pooled text embedding)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> PromptEmbeddings:
        return PromptEmbeddings(self.hidden[rows], None if self.pooled is None else self.pooled[rows])


class StableDiffusionFamily:
    """SD 1.x and 2.x: one CLIP text encoder, its last hidden state as the condition."""

    name = "Stable Diffusion"
    hub_tag = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    component_names = ("text_encoder",)
    uses_time_ids = False
    flow_matching = False  # DDPM noise and timesteps; True: flow matching over the scheduler's sigmas
    denoiser_name = "unet"
    lora_target_modules = "to_k,to_q,to_v,to_out.0"  # upstream's default (--lora_target_modules)
    # The family's own flags and their defaults where upstream's script for it has them; a flag missing here
    # is refused (train_dreambooth_lora_difftuning.check_family_flags).
    flag_defaults: dict[str, Any] = {}
    default_resolution: int | None = None  # None: the denoiser's sample_size in pixels
    latent_patch = 1  # latents are cut into patches of this size before the denoiser (Flux packs 2x2)

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.tokenizers = [pipeline.tokenizer]
        self.text_encoders = [pipeline.text_encoder]

    @property
    def lora_text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders that get LoRA adapters with --train_text_encoder (upstream's choice)."""
        return self.text_encoders

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's output for a batch."""
        return denoiser(noisy.to(dtype), timesteps, **self.unet_kwargs(prompts, time_ids, dtype)).sample

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """Arguments of the pipeline's ``__call__`` that make it encode prompts as the loop does (the class
        samples and validation images come from the pipeline)."""
        return {}

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids [P, max_length] per tokenizer, padded as the model was trained."""
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]

    def encode(self, token_ids: list[torch.Tensor]) -> PromptEmbeddings:
        encoder = self.text_encoders[0]
        return PromptEmbeddings(encoder(token_ids[0].to(_device(encoder)), return_dict=False)[0])

    def unet_kwargs(self, prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": prompts.hidden.to(dtype)}

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None],
                          metadata: list[dict | None]) -> None:
        """Save the LoRA as upstream does, with each model's adapter metadata (its LoraConfig: alpha, rank, DoRA,
        targets; ``metadata[0]`` the denoiser's, then the text encoders'), without which ``load_lora_weights``
        assumes alpha = rank and reloads another model than the one trained."""
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0], safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata[0],
                                              text_encoder_lora_adapter_metadata=metadata[1])


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated; the second one's pooled
    projection) and the size-and-crop micro-conditioning ids (original size, crop top-left, target size)."""

    name = "Stable Diffusion XL"
    hub_tag = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    component_names = ("text_encoder", "text_encoder_2")
    uses_time_ids = True

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
        self.text_encoders = [pipeline.text_encoder, pipeline.text_encoder_2]

    def encode(self, token_ids: list[torch.Tensor]) -> PromptEmbeddings:
        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, token_ids, strict=True):
            out = encoder(ids.to(_device(encoder)), output_hidden_states=True)
            pooled = out[0]  # the last encoder's pooled projection is SDXL's text_embeds
            hidden.append(out.hidden_states[-2])
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)

    def unet_kwargs(self, prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": prompts.hidden.to(dtype),
                "added_cond_kwargs": {"text_embeds": prompts.pooled.to(dtype), "time_ids": time_ids.to(dtype)}}

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None],
                          metadata: list[dict | None]) -> None:
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0],
                                              text_encoder_2_lora_layers=text_encoder_layers[1],
                                              safe_serialization=True, unet_lora_adapter_metadata=metadata[0],
                                              text_encoder_lora_adapter_metadata=metadata[1],
                                              text_encoder_2_lora_adapter_metadata=metadata[2])


class StableDiffusion3Family(StableDiffusionFamily):
    """SD3 / SD3.5 (flow matching, an MMDiT transformer): two CLIP encoders (penultimate hidden states
    concatenated, zero-padded to T5's width) followed by T5's tokens along the sequence, or zeros when the
    pipeline has no T5; the two CLIP pooled projections concatenated. LoRA on the transformer's attention
    (both streams) and, with --train_text_encoder, on the CLIP encoders, as upstream."""

    name = "Stable Diffusion 3"
    hub_tag = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    flow_matching = True
    denoiser_name = "transformer"
    lora_target_modules = ("attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,"
                           "attn.to_q,attn.to_v")
    flag_defaults = {"weighting_scheme": "logit_normal", "precondition_outputs": 1, "max_sequence_length": 77}

    def __init__(self, pipeline: Any, max_sequence_length: int | None = None) -> None:
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length or self.flag_defaults["max_sequence_length"]
        self.has_t5 = pipeline.text_encoder_3 is not None
        self.tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2] + ([pipeline.tokenizer_3] if self.has_t5 else [])
        self.text_encoders = [pipeline.text_encoder, pipeline.text_encoder_2] + (
            [pipeline.text_encoder_3] if self.has_t5 else [])
        self.component_names = ("text_encoder", "text_encoder_2", "text_encoder_3")[:len(self.text_encoders)]

    @property
    def lora_text_encoders(self) -> list[torch.nn.Module]:
        return self.text_encoders[:2]

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """T5's length as the loop pads it (the pipeline's default is 256; without T5 it is the count of zeros)."""
        return {"max_sequence_length": self.max_sequence_length}

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = [tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for tok in self.tokenizers[:2]]
        if self.has_t5:
            ids.append(self.tokenizers[2](prompts, padding="max_length", max_length=self.max_sequence_length,
                                          truncation=True, add_special_tokens=True, return_tensors="pt").input_ids)
        return ids

    def encode(self, token_ids: list[torch.Tensor]) -> PromptEmbeddings:
        hidden, pooled = [], []
        for encoder, ids in zip(self.text_encoders[:2], token_ids[:2], strict=True):
            out = encoder(ids.to(_device(encoder)), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        if self.has_t5:
            t5 = self.text_encoders[2](token_ids[2].to(_device(self.text_encoders[2])))[0]
        else:
            width = self.pipeline.transformer.config.joint_attention_dim
            t5 = torch.zeros(clip.shape[0], self.max_sequence_length, width, device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbeddings(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return denoiser(hidden_states=noisy.to(dtype), timestep=timesteps,
                        encoder_hidden_states=prompts.hidden.to(dtype), pooled_projections=prompts.pooled.to(dtype),
                        return_dict=False)[0]

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None],
                          metadata: list[dict | None]) -> None:
        layers, metadata = list(text_encoder_layers) + [None, None], list(metadata) + [None, None]
        type(self.pipeline).save_lora_weights(folder, transformer_lora_layers=unet_layers,
                                              text_encoder_lora_layers=layers[0], text_encoder_2_lora_layers=layers[1],
                                              safe_serialization=True, transformer_lora_adapter_metadata=metadata[0],
                                              text_encoder_lora_adapter_metadata=metadata[1],
                                              text_encoder_2_lora_adapter_metadata=metadata[2])


class FluxFamily(StableDiffusionFamily):
    """Flux.1 (flow matching, an MMDiT on 2x2-packed latents), as upstream's train_dreambooth_lora_flux.py feeds
    it: CLIP's pooled output as ``pooled_projections``, T5's last hidden state as ``encoder_hidden_states`` with
    zero text ids, the latents packed into 2x2 patches with their (0, row, column) image ids, ``timestep / 1000``
    and, when the transformer embeds it (FLUX.1-dev; schnell does not), the guidance scale as an input. LoRA on the
    transformer's attention and feed-forward layers and, with --train_text_encoder, on CLIP only (T5 stays
    frozen), saved in peft's format as upstream saves it."""

    name = "Flux.1"
    hub_tag = "flux"
    pipeline_class_name = "FluxPipeline"
    component_names = ("text_encoder", "text_encoder_2")
    flow_matching = True
    denoiser_name = "transformer"
    lora_target_modules = ("attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,"
                           "attn.add_v_proj,attn.to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,"
                           "ff_context.net.2")
    # Upstream: uniform sigma (the scheduler's own table, unshifted: Flux shifts by resolution only when it
    # samples), the velocity against noise - latents with no preconditioning, 512 T5 tokens, guidance 3.5.
    flag_defaults = {"weighting_scheme": "none", "max_sequence_length": 512, "guidance_scale": 3.5}
    default_resolution = 512
    latent_patch = 2

    def __init__(self, pipeline: Any, max_sequence_length: int | None = None,
                 guidance_scale: float | None = None) -> None:
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length or self.flag_defaults["max_sequence_length"]
        self.guidance_scale = self.flag_defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        self.guidance_embeds = bool(pipeline.transformer.config.guidance_embeds)
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
        self.text_encoders = [pipeline.text_encoder, pipeline.text_encoder_2]

    @property
    def lora_text_encoders(self) -> list[torch.nn.Module]:
        return self.text_encoders[:1]

    @property
    def call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}  # the pipeline's default is 512

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        return [self.tokenizers[0](prompts, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids,
                self.tokenizers[1](prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, return_tensors="pt").input_ids]

    def encode(self, token_ids: list[torch.Tensor]) -> PromptEmbeddings:
        clip, t5 = self.text_encoders
        pooled = clip(token_ids[0].to(_device(clip)), output_hidden_states=False).pooler_output
        return PromptEmbeddings(t5(token_ids[1].to(_device(t5)))[0], pooled)

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The velocity for [B, C, h, w] latents, unpacked to their shape (the loop never sees the packing)."""
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, dtype)
        txt_ids = torch.zeros(prompts.hidden.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = (torch.full((batch,), self.guidance_scale, device=noisy.device, dtype=torch.float32)
                    if self.guidance_embeds else None)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=prompts.pooled.to(dtype), encoder_hidden_states=prompts.hidden.to(dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None],
                          metadata: list[dict | None]) -> None:
        type(self.pipeline).save_lora_weights(folder, transformer_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0],
                                              safe_serialization=True, transformer_lora_adapter_metadata=metadata[0],
                                              text_encoder_lora_adapter_metadata=metadata[1])


def _device(module: torch.nn.Module) -> torch.device:
    """A module's device, also through a DistributedDataParallel wrapper (which has no ``.device``)."""
    return next(module.parameters()).device


FAMILIES = (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family, FluxFamily)


def family_class(pipeline_class_name: str) -> type[StableDiffusionFamily]:
    """The family of a pipeline by its class name (``model_index.json``'s ``_class_name``)."""
    for family in FAMILIES:
        if family.pipeline_class_name == pipeline_class_name:
            return family
    raise ConfigError(f"--pretrained_model_name_or_path is a {pipeline_class_name}; this script trains "
                      f"{', '.join(f.pipeline_class_name for f in FAMILIES)}.")


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], resolution: int) -> torch.Tensor:
    """SDXL's six micro-conditioning ids of one image: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, resolution, resolution], dtype=torch.float32)
