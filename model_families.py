"""Text-to-image model families of train_dreambooth_lora_difftuning.py.

What differs between Stable Diffusion 1.x/2.x and SDXL (the pipeline class, how a prompt becomes
the UNet's conditioning, SDXL's size-and-crop ids, how LoRA weights are saved) lives here behind one
small interface, so the DreamBooth loop reads the same for every family. The noise target (epsilon or
v) is read from the scheduler's ``prediction_type``, so SD 2.x's v-prediction needs nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftuning_utils import ConfigError

# LoRA targets of diffusers' DreamBooth scripts: the UNet's attention projections, and the CLIP text
# encoders' attention projections with --train_text_encoder.
TEXT_ENCODER_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class PromptEmbeddings:
    """A table of encoded prompts: ``hidden`` [P, L, D] (the UNet's encoder_hidden_states) and, for
    SDXL, ``pooled`` [P, D2] (its pooled text embedding)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> PromptEmbeddings:
        return PromptEmbeddings(self.hidden[rows], None if self.pooled is None else self.pooled[rows])


class StableDiffusionFamily:
    """SD 1.x and 2.x: one CLIP text encoder, its last hidden state as the condition."""

    name = "Stable Diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    component_names = ("text_encoder",)
    uses_time_ids = False

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.tokenizers = [pipeline.tokenizer]
        self.text_encoders = [pipeline.text_encoder]

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids [P, max_length] per tokenizer, padded as the model was trained."""
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]

    def encode(self, token_ids: list[torch.Tensor]) -> PromptEmbeddings:
        encoder = self.text_encoders[0]
        return PromptEmbeddings(encoder(token_ids[0].to(_device(encoder)), return_dict=False)[0])

    def unet_kwargs(self, prompts: PromptEmbeddings, time_ids: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": prompts.hidden.to(dtype)}

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None]) -> None:
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0], safe_serialization=True)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated; the second one's pooled
    projection) and the size-and-crop micro-conditioning ids (original size, crop top-left, target size)."""

    name = "Stable Diffusion XL"
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

    def save_lora_weights(self, folder: str, unet_layers: dict, text_encoder_layers: list[dict | None]) -> None:
        type(self.pipeline).save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=text_encoder_layers[0],
                                              text_encoder_2_lora_layers=text_encoder_layers[1],
                                              safe_serialization=True)


def _device(module: torch.nn.Module) -> torch.device:
    """A module's device, also through a DistributedDataParallel wrapper (which has no ``.device``)."""
    return next(module.parameters()).device


FAMILIES = (StableDiffusionFamily, StableDiffusionXLFamily)


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
