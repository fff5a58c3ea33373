"""Text-to-image model families of train_dreambooth_lora_difftuning.py.

What differs between Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1 (the pipeline class, how a prompt
becomes the denoiser's conditioning, SDXL's size-and-crop ids, Flux's packed latents, how LoRA weights are
saved, the family's own flags and upstream's per-family defaults, the licence and tags of its model card, the
models it refuses) lives here behind one small interface, so the DreamBooth loop reads the same for every family.
The noise target (epsilon or v) is read from the scheduler's ``prediction_type``, so SD 2.x's v-prediction needs
nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftuning_common import ConfigError

# LoRA targets of diffusers' DreamBooth scripts: the UNet's attention projections, and the CLIP text
# encoders' attention projections with --train_text_encoder.
TEXT_ENCODER_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]

# Flags that only some families take: who they belong to (a refusal names it) and their parser default (a value
# other than it means the user gave the flag). Each family accepts the ones in its ``flag_defaults`` (and the
# flow-matching ones take the density's parameters); the rest are refused in one sentence.
FLOW_FLAGS = "flow-matching flags (SD3, Flux)"
SD_FLAGS = "flags of upstream's train_dreambooth_lora.py (Stable Diffusion 1.x/2.x)"
FAMILY_FLAGS: dict[str, tuple[str, Any]] = {
    "weighting_scheme": (FLOW_FLAGS, None),
    "logit_mean": (FLOW_FLAGS, 0.0),
    "logit_std": (FLOW_FLAGS, 1.0),
    "mode_scale": (FLOW_FLAGS, 1.29),
    "max_sequence_length": (FLOW_FLAGS, None),
    "precondition_outputs": ("SD3's flag (upstream's Flux script trains the velocity against noise - latents, "
                             "unpreconditioned)", None),
    "guidance_scale": ("Flux's flag (the guidance input of a guidance-distilled transformer)", None),
    "lora_blocks": ("a flag of the MMDiT transformers (SD3, Flux), whose blocks are numbered "
                    "transformer_blocks.N; a UNet's are not", None),
    "output_kohya_format": ("a flag of the UNet families (SD, SDXL): diffusers converts only UNet LoRA keys to "
                            "kohya's names", False),
    "snr_gamma": ("Min-SNR, a DDPM weighting (flow-matching models weight the loss with --weighting_scheme)", None),
    "tokenizer_name": (SD_FLAGS, None),
    "tokenizer_max_length": (SD_FLAGS, None),
    "text_encoder_use_attention_mask": (SD_FLAGS, False),
    "pre_compute_text_embeddings": (SD_FLAGS, False),
}
DENSITY_FLAGS = ("logit_mean", "logit_std", "mode_scale")


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
    # The family's own flags of FAMILY_FLAGS and their defaults; a flag of FAMILY_FLAGS missing here is refused
    # (train_dreambooth_lora_difftuning.check_family_flags).
    flag_defaults: dict[str, Any] = {"tokenizer_name": None, "tokenizer_max_length": None,
                                     "text_encoder_use_attention_mask": False, "pre_compute_text_embeddings": False,
                                     "output_kohya_format": False, "snr_gamma": None}
    # Defaults of flags every family takes, as the family's upstream script sets them (the parser's default is
    # None). text_encoder_lr and adam_weight_decay_text_encoder None: the same as the denoiser's (upstream's SD
    # script has one parameter group); upcast_before_saving True: SD and SDXL always save the LoRA in float32.
    defaults: dict[str, Any] = {"learning_rate": 5e-4, "adam_weight_decay": 1e-2, "text_encoder_lr": None,
                                "adam_weight_decay_text_encoder": None, "resolution": 512, "lora_alpha": None,
                                "image_interpolation_mode": "lanczos", "upcast_before_saving": True,
                                "output_dir": "lora-dreambooth-model"}
    upstream_script = "train_dreambooth_lora.py"
    latent_patch = 1  # latents are cut into patches of this size before the denoiser (Flux packs 2x2)
    tokenizer_max_length: int | None = None  # SD's --tokenizer_max_length (None: the tokenizer's own)
    use_attention_mask = False  # SD's --text_encoder_use_attention_mask

    def __init__(self, pipeline: Any, tokenizer_max_length: int | None = None,
                 text_encoder_use_attention_mask: bool = False) -> None:
        self.pipeline = pipeline
        self.tokenizers = [pipeline.tokenizer]
        self.text_encoders = [pipeline.text_encoder]
        self.tokenizer_max_length, self.use_attention_mask = tokenizer_max_length, text_encoder_use_attention_mask

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
        return [tok(prompts, padding="max_length", max_length=self.tokenizer_max_length or tok.model_max_length,
                    truncation=True, return_tensors="pt").input_ids for tok in self.tokenizers]

    def encode(self, token_ids: list[torch.Tensor]) -> PromptEmbeddings:
        encoder, ids = self.text_encoders[0], token_ids[0]
        mask = None
        if self.use_attention_mask:  # the tokenizer's mask: every token up to and including the first end token
            is_end = ids == self.tokenizers[0].eos_token_id
            mask = ((is_end.cumsum(-1) - is_end.long()) == 0).long().to(_device(encoder))
        return PromptEmbeddings(encoder(ids.to(_device(encoder)), attention_mask=mask, return_dict=False)[0])

    def unet_kwargs(self, prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": prompts.hidden.to(dtype)}

    def pipeline_prompt_embeds(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """``prompt`` (and the empty negative prompt of classifier-free guidance) encoded by the pipeline itself, as
        the keyword arguments of its ``__call__``: sampling with them needs no text encoder, so frozen encoders can
        be released once the training prompts are encoded (as upstream frees them)."""
        embeds, negative = self.pipeline.encode_prompt(prompt, device, 1, True)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def release_text_encoders(self) -> None:
        """Drop the frozen text encoders from the pipeline and the family (their outputs are cached)."""
        self.pipeline.register_modules(**{name: None for name in self.component_names})
        self.text_encoders = []

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None],
                          metadata: list[dict | None]) -> None:
        """Save the LoRA as upstream does, with each model's adapter metadata (its LoraConfig: alpha, rank, DoRA,
        targets; ``metadata[0]`` the denoiser's, then the text encoders'), without which ``load_lora_weights``
        assumes alpha = rank and reloads another model than the one trained."""
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0], safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata[0],
                                              text_encoder_lora_adapter_metadata=metadata[1])

    def card_metadata(self, base_model: str) -> dict[str, Any]:
        """The model card's licence (the base model's own) and family tags, as diffusers' DreamBooth LoRA cards
        carry them. SD 2.x (a 1024-wide text conditioning) is under openrail++, SD 1.x under CreativeML OpenRAIL-M."""
        sd2 = getattr(self.pipeline.unet.config, "cross_attention_dim", 768) == 1024
        return {"license": "openrail++" if sd2 else "creativeml-openrail-m",
                "tags": ["stable-diffusion", "stable-diffusion-diffusers"]}

    @classmethod
    def check_supported(cls, base_model: str, scheduler_name: str, vae_config: dict) -> None:
        """Refuse, in one sentence, a base model this script does not train right (read from the configs, before
        any weights load): EDM-formulated SDXL models (Playground v2.5: an EDM scheduler, latents normalised by the
        VAE's latents_mean/latents_std) need another noise schedule, preconditioning and latent scaling than DDPM."""
        if "EDM" in scheduler_name or vae_config.get("latents_mean") is not None:
            why = (f"an EDM scheduler ({scheduler_name})" if "EDM" in scheduler_name
                   else "a VAE with latents_mean/latents_std")
            raise ConfigError(f"--pretrained_model_name_or_path {base_model} has {why} (an EDM-style SDXL model such "
                              "as Playground v2.5), which this script does not train; use diffusers' "
                              "train_dreambooth_lora_sdxl.py for it.")


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated; the second one's pooled
    projection) and the size-and-crop micro-conditioning ids (original size, crop top-left, target size)."""

    name = "Stable Diffusion XL"
    hub_tag = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    component_names = ("text_encoder", "text_encoder_2")
    uses_time_ids = True
    flag_defaults = {"output_kohya_format": False, "snr_gamma": None}
    defaults = {"learning_rate": 1e-4, "adam_weight_decay": 1e-4, "text_encoder_lr": 5e-6,
                "adam_weight_decay_text_encoder": 1e-3, "resolution": 1024, "lora_alpha": None,
                "image_interpolation_mode": "lanczos", "upcast_before_saving": True,
                "output_dir": "lora-dreambooth-model"}
    upstream_script = "train_dreambooth_lora_sdxl.py"

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

    def pipeline_prompt_embeds(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(prompt, device=device)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None],
                          metadata: list[dict | None]) -> None:
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0],
                                              text_encoder_2_lora_layers=text_encoder_layers[1],
                                              safe_serialization=True, unet_lora_adapter_metadata=metadata[0],
                                              text_encoder_lora_adapter_metadata=metadata[1],
                                              text_encoder_2_lora_adapter_metadata=metadata[2])

    def card_metadata(self, base_model: str) -> dict[str, Any]:
        return {"license": "openrail++", "tags": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]}

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
    flag_defaults = {"weighting_scheme": "logit_normal", "precondition_outputs": 1, "max_sequence_length": 77,
                     "lora_blocks": None}
    # Upstream's SD3 and Flux scripts resize with torchvision's default (bilinear) and save the LoRA in the
    # training's mixed-precision dtype unless --upcast_before_saving.
    defaults = {"learning_rate": 1e-4, "adam_weight_decay": 1e-4, "text_encoder_lr": 5e-6,
                "adam_weight_decay_text_encoder": 1e-3, "resolution": 512, "lora_alpha": None,
                "image_interpolation_mode": "bilinear", "upcast_before_saving": False, "output_dir": "sd3-dreambooth"}
    upstream_script = "train_dreambooth_lora_sd3.py"

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

    def pipeline_prompt_embeds(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt, None, None, device=device, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

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

    def card_metadata(self, base_model: str) -> dict[str, Any]:
        """Stability AI's community licence, linked as upstream links it (SD3.5 Large's for a "large" model)."""
        version = "3.5" if "3.5" in base_model or "3-5" in base_model else "3"
        size = "large" if "large" in base_model.lower() else "medium"
        tags = [f"sd{version}-{size}", f"sd{version}", f"sd{version}-diffusers"] if version == "3.5" else [
            "sd3", "sd3-diffusers"]
        return {"license": "other", "license_name": "stabilityai-ai-community",
                "license_link": f"https://huggingface.co/stabilityai/stable-diffusion-{version}-{size}/blob/main/"
                                "LICENSE.md", "tags": tags}


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
    flag_defaults = {"weighting_scheme": "none", "max_sequence_length": 512, "guidance_scale": 3.5,
                     "lora_blocks": None}
    defaults = {"learning_rate": 1e-4, "adam_weight_decay": 1e-4, "text_encoder_lr": 5e-6,
                "adam_weight_decay_text_encoder": 1e-3, "resolution": 512, "lora_alpha": 4,
                "image_interpolation_mode": "bilinear", "upcast_before_saving": False,
                "output_dir": "flux-dreambooth-lora"}
    upstream_script = "train_dreambooth_lora_flux.py"
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

    def pipeline_prompt_embeds(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt, None, device=device,
                                                         max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

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

    def card_metadata(self, base_model: str) -> dict[str, Any]:
        """FLUX.1 [dev] (a guidance-distilled transformer) is under its non-commercial licence; FLUX.1 [schnell]
        (no guidance input) under Apache 2.0."""
        tags = ["flux", "flux-diffusers"]
        if not self.guidance_embeds:
            return {"license": "apache-2.0", "tags": tags}
        return {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
                "tags": tags}


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
