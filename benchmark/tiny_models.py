"""Tiny models and data built offline, for the tests and the quick demo (no Hub needed)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def make_tiny_dit_pipeline(path: str, seed: int = 0, id2label: dict | None = None) -> str:
    """A DiTPipeline folder: 2-layer DiT (1001-row label table, learned sigma) + 4x VAE, 32 px."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(sample_size=8, in_channels=4, out_channels=8, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, patch_size=2,
                                        num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    if id2label is not None:
        pipe.register_to_config(id2label=id2label)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_image_folder(path: str, classes: tuple[str, ...] = ("circle", "square", "cross"), per_class: int = 4,
                      size: int = 40) -> str:
    """An imagefolder dataset of simple coloured shapes, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(path, name), exist_ok=True)
        for i in range(per_class):
            array = rng.integers(0, 60, (size, size + 8, 3), dtype=np.uint8)
            array[8 + c * 4: 24 + c * 4, 10:26, c % 3] = 255
            Image.fromarray(array).save(os.path.join(path, name, f"{i}.png"))
    return path
