#!/usr/bin/env python
"""One command that checks the training scripts at real size on one GPU, offline, and measures them.

    python -m benchmark.gpu_check --output_dir outputs/gpu_check                 # one GPU, every run: ~25 minutes
    python -m benchmark.gpu_check --steps 40 --deadline_s 380 --runs ...         # a short lease: what matters first
    python -m benchmark.gpu_check --steps 20 --deadline_s 400 --runs priority    # compiled DiT rate, Flux QLoRA...
    python -m benchmark.gpu_check --size tiny --output_dir /tmp/gpu_check        # CPU smoke (the tests run it)

What it does, with no Hub access:

1. builds random-init models of real size from configs and saves them as pipelines: DiT-XL/2-256 with an
   SD-style VAE (a ``DiTPipeline``), and an SD-1.5-shaped UNet + VAE + a CLIP-L-shaped text encoder with
   an offline tokenizer (a ``StableDiffusionPipeline``), and SDXL-base, SD3-medium and FLUX.1-dev-shaped pipelines
   (saved in bf16) for the DreamBooth LoRA script;
2. writes generated datasets large enough that epochs do not dominate: 2,048 class-labelled 256 px images
   for DiT, 1,024 (image, condition, caption) triples at 512 px for ControlNet, 8 subject images for DreamBooth;
3. runs the scripts for ``--steps`` steps, standard vs Diff-Tuning, in bf16 and fp16, with and without
   ``--cache_latents``, and reads each run's steady-state throughput and peak memory (``logs/throughput.json``):
   also the DiT step under ``--torch_compile`` at batches 32-128, and the memory runs users ask for first, with
   upstream's low-memory settings: FLUX.1-dev-shaped QLoRA (``--quantize_base nf4``, gradient checkpointing,
   8-bit Adam, cached latents and prompts) at 512 and 1,024 px, SDXL and SD3 LoRA at 1,024 px; the report puts
   published anchors and targets beside them and the Diff-Tuning / standard step-time and memory ratios of each
   pair;
4. loads the outputs with ``DiffusionPipeline`` / ``ControlNetModel`` / ``load_lora_weights`` and samples them;
5. runs ``benchmark/overhead.py`` (the scripts' own step, timed in isolation) at the same batches;
6. writes ``summary.md`` and ``gpu_check.json`` in ``--output_dir`` after every run (a machine taken back
   mid-way leaves what was measured), and lists what ``--deadline_s`` skipped.

Without CUDA (the tests' tiny mode) torchao's int8 stands in for bitsandbytes' NF4 and AdamW for 8-bit Adam.
Numbers on random weights measure speed and plumbing, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from difftuning_common import atomic_write_json
from training_plumbing import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The settings diffusers' Flux QLoRA example trains with (NF4 base, gradient checkpointing, 8-bit Adam; latents and
# prompt embeddings cached), and upstream's low-memory DreamBooth LoRA settings for SDXL and SD3.
QLORA = ["--quantize_base", "nf4", "--gradient_checkpointing", "--use_8bit_adam"]
LOW_MEMORY = ["--gradient_checkpointing", "--use_8bit_adam"]
PRIOR = ["--with_prior_preservation"]
# name -> (script, precision, cache latents, extra flags[, {"batch": global batch, "resolution": px at real size}])
RUNS = {
    "dit-standard-bf16": ("dit", "bf16", False, []),
    "dit-difftuning-bf16": ("dit", "bf16", False, ["--difftuning"]),
    "dit-standard-bf16-cached": ("dit", "bf16", True, []),
    "dit-difftuning-bf16-cached": ("dit", "bf16", True, ["--difftuning"]),
    "dit-difftuning-fp16-cached": ("dit", "fp16", True, ["--difftuning", "--use_ema"]),
    "controlnet-none-bf16": ("controlnet", "bf16", False, []),
    "controlnet-replay-bf16": ("controlnet", "bf16", False, ["--difftuning", "--retention", "replay"]),
    "controlnet-replay-bf16-cached": ("controlnet", "bf16", True, ["--difftuning", "--retention", "replay"]),
    "controlnet-distill-bf16-cached": ("controlnet", "bf16", True, ["--difftuning", "--retention", "distill"]),
    "controlnet-replay-fp16": ("controlnet", "fp16", False, ["--difftuning", "--retention", "replay"]),
    # DreamBooth LoRA: diffusers' prior preservation vs the same with --difftuning (the subject at psi, the
    # class samples at xi); the step is the same work, so the two should match in speed and memory.
    "dreambooth-sd-prior-bf16": ("dreambooth-sd", "bf16", False, ["--with_prior_preservation"]),
    "dreambooth-sd-difftuning-bf16": ("dreambooth-sd", "bf16", False, ["--with_prior_preservation", "--difftuning"]),
    "dreambooth-sd-difftuning-fp16-te": ("dreambooth-sd", "fp16", False, ["--with_prior_preservation", "--difftuning",
                                                                          "--train_text_encoder"]),
    "dreambooth-sdxl-prior-bf16": ("dreambooth-sdxl", "bf16", True, ["--with_prior_preservation"]),
    "dreambooth-sdxl-difftuning-bf16": ("dreambooth-sdxl", "bf16", True, ["--with_prior_preservation",
                                                                          "--difftuning"]),
    # SD3-medium-shaped transformer (no T5: random T5-XXL weights would be 19 GB and measure nothing of ours)
    "dreambooth-sd3-prior-bf16": ("dreambooth-sd3", "bf16", True, ["--with_prior_preservation"]),
    "dreambooth-sd3-difftuning-bf16": ("dreambooth-sd3", "bf16", True, ["--with_prior_preservation",
                                                                        "--difftuning"]),
    # FLUX.1-dev-shaped: the full 12B transformer (guidance input, 19 + 38 blocks), upstream's LoRA targets and
    # 512 px (upstream's default resolution: at 1024 px the activations of 4 rows would not fit beside it)
    "dreambooth-flux-prior-bf16": ("dreambooth-flux", "bf16", True, ["--with_prior_preservation"]),
    "dreambooth-flux-difftuning-bf16": ("dreambooth-flux", "bf16", True, ["--with_prior_preservation",
                                                                          "--difftuning"]),
    # Rate: the DiT-XL/2 step compiled (--torch_compile), cached latents, at larger batches; standard and
    # Diff-Tuning at the same batch for the ratios.
    "dit-standard-bf16-cached-compile-b128": ("dit", "bf16", True, ["--torch_compile"], {"batch": 128}),
    "dit-difftuning-bf16-cached-compile-b128": ("dit", "bf16", True, ["--torch_compile", "--difftuning"],
                                                {"batch": 128}),
    "dit-standard-bf16-cached-compile-b64": ("dit", "bf16", True, ["--torch_compile"], {"batch": 64}),
    "dit-standard-bf16-cached-compile-b32": ("dit", "bf16", True, ["--torch_compile"], {"batch": 32}),
    # Memory: FLUX.1-dev-shaped QLoRA at batch 1 as diffusers' example (no class images), then with prior
    # preservation (1 subject + 1 class row) standard vs Diff-Tuning, and Diff-Tuning at 1,024 px.
    "dreambooth-flux-qlora-512": ("dreambooth-flux", "bf16", True, QLORA, {"batch": 1}),
    "dreambooth-flux-qlora-512-prior": ("dreambooth-flux", "bf16", True, QLORA + PRIOR, {"batch": 1}),
    "dreambooth-flux-qlora-512-difftuning": ("dreambooth-flux", "bf16", True, QLORA + PRIOR + ["--difftuning"],
                                             {"batch": 1}),
    "dreambooth-flux-qlora-1024-difftuning": ("dreambooth-flux", "bf16", True, QLORA + PRIOR + ["--difftuning"],
                                              {"batch": 1, "resolution": 1024}),
    "dreambooth-sdxl-lora-1024-prior": ("dreambooth-sdxl", "bf16", True, LOW_MEMORY + PRIOR, {"batch": 1}),
    "dreambooth-sdxl-lora-1024-difftuning": ("dreambooth-sdxl", "bf16", True, LOW_MEMORY + PRIOR + ["--difftuning"],
                                             {"batch": 1}),
    "dreambooth-sd3-lora-1024-prior": ("dreambooth-sd3", "bf16", True, LOW_MEMORY + PRIOR, {"batch": 1}),
    "dreambooth-sd3-lora-1024-difftuning": ("dreambooth-sd3", "bf16", True, LOW_MEMORY + PRIOR + ["--difftuning"],
                                            {"batch": 1}),
}
# What users compare a run with: published figures (anchors) and the targets this check was written for.
ANCHORS = {
    "dit-standard-bf16-cached": "LightningDiT ~284 img/s per H800; fast-DiT ~107 img/s per A100",
    "dit-standard-bf16-cached-compile-b128": "LightningDiT ~284 img/s per H800 (target >= 290 on H100/H200)",
    "dreambooth-flux-qlora-512": "diffusers' Flux QLoRA: ~9 GB peak (bf16 LoRA ~26 GB)",
    "dreambooth-flux-qlora-1024-difftuning": "target < 24 GiB (a 24 GB card)",
    "dreambooth-sdxl-lora-1024-prior": "target < 12 GiB",
    "dreambooth-sdxl-lora-1024-difftuning": "target < 12 GiB",
}
# `--runs priority`: what one short GPU lease measures first (with --deadline_s, the rest is skipped and listed):
# the compiled DiT rate and its Diff-Tuning ratio, Flux QLoRA memory at 512 and 1,024 px, SDXL, the eager DiT
# baseline at the batch of the 2026-11-30 check, SD3.
PRIORITY = ["dit-standard-bf16-cached-compile-b128", "dit-difftuning-bf16-cached-compile-b128",
            "dreambooth-flux-qlora-512", "dreambooth-flux-qlora-512-difftuning", "dreambooth-flux-qlora-512-prior",
            "dreambooth-flux-qlora-1024-difftuning", "dreambooth-sdxl-lora-1024-difftuning",
            "dreambooth-sdxl-lora-1024-prior", "dit-standard-bf16-cached", "dit-standard-bf16-cached-compile-b32",
            "dit-standard-bf16-cached-compile-b64", "dreambooth-sd3-lora-1024-difftuning",
            "dreambooth-sd3-lora-1024-prior"]
# (standard, Diff-Tuning) run pairs whose step time and peak memory the report compares.
PAIRS = [("dit-standard-bf16", "dit-difftuning-bf16"), ("dit-standard-bf16-cached", "dit-difftuning-bf16-cached"),
         ("dit-standard-bf16-cached-compile-b128", "dit-difftuning-bf16-cached-compile-b128"),
         ("controlnet-none-bf16", "controlnet-replay-bf16"),
         ("dreambooth-sd-prior-bf16", "dreambooth-sd-difftuning-bf16"),
         ("dreambooth-sdxl-prior-bf16", "dreambooth-sdxl-difftuning-bf16"),
         ("dreambooth-sdxl-lora-1024-prior", "dreambooth-sdxl-lora-1024-difftuning"),
         ("dreambooth-sd3-prior-bf16", "dreambooth-sd3-difftuning-bf16"),
         ("dreambooth-sd3-lora-1024-prior", "dreambooth-sd3-lora-1024-difftuning"),
         ("dreambooth-flux-prior-bf16", "dreambooth-flux-difftuning-bf16"),
         ("dreambooth-flux-qlora-512-prior", "dreambooth-flux-qlora-512-difftuning")]
SIZES = {  # dataset size, image resolution, global batch (DreamBooth: subject images; as many class samples join)
    "real": {"dit": (2048, 256, 32), "controlnet": (1024, 512, 8), "dreambooth-sd": (8, 512, 4),
             "dreambooth-sdxl": (8, 1024, 2), "dreambooth-sd3": (8, 1024, 2), "dreambooth-flux": (8, 512, 2)},
    "tiny": {"dit": (48, 32, 8), "controlnet": (24, 32, 4), "dreambooth-sd": (8, 32, 2), "dreambooth-sdxl": (8, 32, 2),
             "dreambooth-sd3": (8, 32, 2), "dreambooth-flux": (8, 32, 2)},
}
DREAMBOOTH_SCRIPT = "train_dreambooth_lora_difftuning.py"
SCRIPTS = {"dit": "train_dit_difftuning.py", "controlnet": "train_controlnet_difftuning.py",
           "dreambooth-sd": DREAMBOOTH_SCRIPT, "dreambooth-sdxl": DREAMBOOTH_SCRIPT,
           "dreambooth-sd3": DREAMBOOTH_SCRIPT, "dreambooth-flux": DREAMBOOTH_SCRIPT}


def run_shape(name: str, size: str) -> tuple[int, int]:
    """(resolution, global batch) of a run: its kind's, or the run's own (the tiny models keep their resolution,
    and their datasets their batch)."""
    kind, *_, extra = RUNS[name] if len(RUNS[name]) == 5 else (*RUNS[name], {})
    _, resolution, batch = SIZES[size][kind]
    if size == "real":
        resolution, batch = extra.get("resolution", resolution), extra.get("batch", batch)
    return resolution, batch


def run_flags(name: str, device: str) -> list[str]:
    """A run's own flags; without CUDA, torchao's int8 stands in for bitsandbytes' NF4 and plain AdamW for the
    8-bit one (bitsandbytes needs the GPU), so the CPU rehearsal takes the same code path."""
    extra = list(RUNS[name][3])
    if device != "cuda":
        extra = ["int8" if flag == "nf4" else flag for flag in extra if flag != "--use_8bit_adam"]
    return extra


def build_models(size: str, folder: str, device: str, kinds: set[str]) -> dict[str, str]:
    """Pipeline folders (random init) of the base models the chosen runs need; reused when already written."""
    import torch

    paths = {"dit": os.path.join(folder, "dit-pipeline"), "controlnet": os.path.join(folder, "sd-pipeline"),
             "dreambooth-sdxl": os.path.join(folder, "sdxl-pipeline"),
             "dreambooth-sd3": os.path.join(folder, "sd3-pipeline"),
             "dreambooth-flux": os.path.join(folder, "flux-pipeline")}
    paths["dreambooth-sd"] = paths["controlnet"]
    if size == "tiny":
        from benchmark.tiny_models import (
            make_tiny_dit_pipeline,
            make_tiny_flux_pipeline,
            make_tiny_sd3_pipeline,
            make_tiny_sd_pipeline,
            make_tiny_sdxl_pipeline,
        )

        for kind, make in (("dit", make_tiny_dit_pipeline), ("controlnet", make_tiny_sd_pipeline),
                           ("dreambooth-sdxl", make_tiny_sdxl_pipeline), ("dreambooth-sd3", make_tiny_sd3_pipeline),
                           ("dreambooth-flux", make_tiny_flux_pipeline)):
            if not os.path.exists(os.path.join(paths[kind], "model_index.json")):
                make(paths[kind])
        return paths
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from benchmark.tiny_models import SD_VAE_CONFIG, train_clip_tokenizer

    torch.manual_seed(0)
    if "dit" in kinds and not os.path.exists(os.path.join(paths["dit"], "model_index.json")):
        with torch.device(device):
            transformer = DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                                patch_size=2, sample_size=32, in_channels=4, out_channels=8,
                                                num_embeds_ada_norm=1000)
            vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=256)
        DiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler(variance_type="learned_range")
                    ).save_pretrained(paths["dit"])
    tokenizer_dir = os.path.join(folder, "tokenizer")
    if kinds - {"dit"} and not os.path.exists(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        train_clip_tokenizer(tokenizer_dir, [caption(i) for i in range(64)], 200)
    needs_sd = kinds & {"controlnet", "dreambooth-sd"}
    if needs_sd and not os.path.exists(os.path.join(paths["controlnet"], "model_index.json")):
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        with torch.device(device):
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's shape (the defaults)
            vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=512)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(paths["controlnet"])
    if "dreambooth-sdxl" in kinds and not os.path.exists(os.path.join(paths["dreambooth-sdxl"], "model_index.json")):
        build_sdxl(paths["dreambooth-sdxl"], tokenizer_dir, device)
    if "dreambooth-sd3" in kinds and not os.path.exists(os.path.join(paths["dreambooth-sd3"], "model_index.json")):
        build_sd3(paths["dreambooth-sd3"], tokenizer_dir, device)
    if "dreambooth-flux" in kinds and not os.path.exists(os.path.join(paths["dreambooth-flux"], "model_index.json")):
        build_flux(paths["dreambooth-flux"], tokenizer_dir, device)
    return paths


def build_sd3(path: str, tokenizer_dir: str, device: str) -> None:
    """An SD3-medium-shaped pipeline with random weights (the 2B MMDiT, a 16-channel VAE, CLIP-L and bigG-shaped
    encoders with projections, no T5), saved in bf16."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    with torch.device(device):
        transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                            caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                            pos_embed_max_size=192)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5305)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                  num_hidden_layers=12, num_attention_heads=12,
                                                                  projection_dim=768, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", **ids))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16).save_pretrained(path)


def build_flux(path: str, tokenizer_dir: str, device: str) -> None:
    """A FLUX.1-dev-shaped pipeline with random weights, saved in bf16 (~25 GB): the 12B transformer as released
    (19 double- and 38 single-stream blocks, guidance input), its 16-channel VAE and scheduler, a CLIP-L-shaped
    encoder, and a T5 of T5-XXL's width (4096, the transformer's text input) but 2 of its 24 layers. T5 is frozen
    and the prompts are encoded once, so its depth costs only loading time and disk (9 GB more at full depth), not
    training speed or memory; the prompts keep upstream's 512 T5 tokens."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from benchmark.tiny_models import write_t5_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    t5_dir = os.path.join(os.path.dirname(path), "t5-tokenizer")
    words = (*COLOURS, *SHAPES, "a", "sks", "on", "grey", "background")
    tokenizer_2 = T5Tokenizer.from_pretrained(write_t5_tokenizer(t5_dir, words))
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)  # the defaults: FLUX.1's
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer)))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.to(torch.bfloat16).save_pretrained(path)


def build_sdxl(path: str, tokenizer_dir: str, device: str) -> None:
    """An SDXL-base-shaped pipeline with random weights (2.6B-parameter UNet, CLIP-L and bigG-shaped text
    encoders), saved in bf16 to keep the folder at ~7 GB."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from benchmark.tiny_models import SD_VAE_CONFIG

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(**SD_VAE_CONFIG, sample_size=1024)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", **ids))
    vae.register_to_config(scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.to(torch.bfloat16).save_pretrained(path)


COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square")


def caption(i: int) -> str:
    return f"a {COLOURS[i % len(COLOURS)]} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]} on a grey background"


def write_datasets(size: str, folder: str) -> dict[str, str]:
    """An imagefolder of 10 classes of coloured shapes (DiT) and a fill50k-style ControlNet folder."""
    from PIL import Image, ImageDraw

    (n_dit, res_dit, _), (n_cn, res_cn, _) = SIZES[size]["dit"], SIZES[size]["controlnet"]
    paths = {"dit": os.path.join(folder, "dit-data"), "controlnet": os.path.join(folder, "controlnet-data"),
             "dreambooth-sd": os.path.join(folder, "subject-sd"),
             "dreambooth-sdxl": os.path.join(folder, "subject-sdxl"),
             "dreambooth-sd3": os.path.join(folder, "subject-sd3"),
             "dreambooth-flux": os.path.join(folder, "subject-flux")}
    rng = np.random.default_rng(0)
    rgb = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 220, 40),
           "purple": (140, 50, 200), "orange": (240, 140, 30), "white": (250, 250, 250), "black": (10, 10, 10)}

    def draw(i: int, res: int) -> tuple[Image.Image, Image.Image]:
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        r = int(rng.integers(res // 6, res // 3))
        cx, cy = (int(rng.integers(r + 1, res - r - 1)) for _ in range(2))
        box = (cx - r, cy - r, cx + r, cy + r)
        image, condition = Image.new("RGB", (res, res), (128, 128, 128)), Image.new("RGB", (res, res), (0, 0, 0))
        fill = ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle
        outline = ImageDraw.Draw(condition).ellipse if shape == "circle" else ImageDraw.Draw(condition).rectangle
        fill(box, fill=rgb[colour])
        outline(box, outline=(255, 255, 255), width=max(1, res // 128))
        return image, condition

    if not os.path.isdir(paths["dit"]):
        tmp = paths["dit"] + ".tmp"
        for i in range(n_dit):
            os.makedirs(os.path.join(tmp, f"class{i % 10}"), exist_ok=True)
            draw(i, res_dit)[0].save(os.path.join(tmp, f"class{i % 10}", f"{i:05d}.png"))
        os.replace(tmp, paths["dit"])
    if not os.path.isdir(paths["controlnet"]):
        tmp = paths["controlnet"] + ".tmp"
        os.makedirs(os.path.join(tmp, "images"))
        os.makedirs(os.path.join(tmp, "conditioning_images"))
        with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
            for i in range(n_cn):
                image, condition = draw(i, res_cn)
                image.save(os.path.join(tmp, "images", f"{i:05d}.png"))
                condition.save(os.path.join(tmp, "conditioning_images", f"{i:05d}.png"))
                f.write(json.dumps({"file_name": f"images/{i:05d}.png", "text": caption(i),
                                    "conditioning_image_file_name": f"conditioning_images/{i:05d}.png"}) + "\n")
        os.replace(tmp, paths["controlnet"])
    for kind in ("dreambooth-sd", "dreambooth-sdxl", "dreambooth-sd3", "dreambooth-flux"):  # a red circle, in places
        if not os.path.isdir(paths[kind]):
            n, res, _ = SIZES[size][kind]
            os.makedirs(paths[kind] + ".tmp")
            for i in range(n):
                draw(0, res)[0].save(os.path.join(paths[kind] + ".tmp", f"{i:02d}.png"))
            os.replace(paths[kind] + ".tmp", paths[kind])
    return paths


def train(name: str, args: argparse.Namespace, models: dict, data: dict) -> dict:
    """One run of a training script as a user launches it; its steady-state throughput and wall time."""
    import torch

    kind, precision, cached = RUNS[name][:3]
    extra = run_flags(name, "cuda" if torch.cuda.is_available() else "cpu")
    resolution, batch = run_shape(name, args.size)
    out = os.path.join(args.output_dir, "runs", name)
    # One bank per model, shape and batch (a bank built for other settings is refused, and a quantized base
    # samples its own)
    quantized = f"-{extra[extra.index('--quantize_base') + 1]}" if "--quantize_base" in extra else ""
    bank = os.path.join(args.output_dir, f"bank-{kind}-{resolution}px-b{batch}{quantized}")
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[kind]), "--pretrained_model_name_or_path", models[kind],
           "--train_data_dir" if kind in ("dit", "controlnet") else "--instance_data_dir", data[kind],
           "--output_dir", out, "--max_train_steps", str(args.steps), "--train_batch_size", str(batch),
           "--mixed_precision", precision, "--logging_steps", str(max(1, args.steps // 10)), "--seed", "0",
           "--checkpointing_steps", "1000000", "--report_to", "none", "--num_validation_images", "1",
           "--dataloader_num_workers", str(args.dataloader_num_workers), "--resolution", str(resolution),
           "--knowledge_bank_num_inference_steps", "10", *(["--cache_latents"] if cached else []),
           *(["--center_crop"] if kind != "controlnet" else []), *extra]
    if kind.startswith("dreambooth"):
        cmd += ["--instance_prompt", "a sks circle", "--learning_rate", "1e-4", "--validation_num_inference_steps", "5"]
        if "--with_prior_preservation" in extra:
            cmd += ["--class_prompt", "a circle", "--class_data_dir", bank,
                    "--num_class_images", str(2 * batch), "--sample_batch_size", str(batch)]
    else:
        cmd += ["--knowledge_bank_dir", bank, "--knowledge_bank_size", str(2 * batch),
                "--knowledge_bank_batch_size", str(batch)]
        cmd += (["--validation_num_inference_steps", "10"] if kind == "dit" else
                ["--validation_num_inference_steps", "5", "--learning_rate", "1e-5"])
    start = time.time()
    with open(out + ".log", "w") as log:
        returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    result = {"returncode": returncode, "wall_s": round(time.time() - start, 1), "log": out + ".log",
              "batch": batch, "resolution": resolution, "flags": extra}
    throughput = os.path.join(out, "logs", "throughput.json")
    if returncode == 0 and os.path.exists(throughput):
        result.update(json.load(open(throughput)))
    elif returncode != 0:  # the report may be all that comes back from a leased machine
        result["log_tail"] = open(out + ".log", errors="replace").read()[-3000:]
    print(f"[gpu_check] {name}: {'ok' if returncode == 0 else 'FAILED'} in {result['wall_s']} s, "
          f"{result.get('steady_images_per_sec', float('nan')):.1f} images/s", flush=True)
    return result


def load_and_sample(name: str, args: argparse.Namespace, models: dict, data: dict) -> str:
    """Load a finished run as a user would and generate from it; 'ok' or the error."""
    import torch

    kind = RUNS[name][0]
    out = os.path.join(args.output_dir, "runs", name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if kind == "dit":
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(out).to(device)
            pipe(class_labels=pipe.get_label_ids(["class3"]), num_inference_steps=4, guidance_scale=4.0)
        elif kind == "controlnet":
            from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
            from PIL import Image

            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                models["controlnet"], controlnet=ControlNetModel.from_pretrained(out), safety_checker=None,
                requires_safety_checker=False).to(device)
            condition = Image.open(os.path.join(data["controlnet"], "conditioning_images", "00000.png"))
            pipe(caption(0), condition, num_inference_steps=4)
        if kind.startswith("dreambooth"):
            from diffusers import DiffusionPipeline

            absent = {"text_encoder_3": None, "tokenizer_3": None} if kind == "dreambooth-sd3" else {}
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            pipe = DiffusionPipeline.from_pretrained(models[kind], **absent, torch_dtype=dtype).to(device)
            pipe.load_lora_weights(out)
            resolution = run_shape(name, args.size)[0]
            pipe("a sks circle", num_inference_steps=4, height=resolution, width=resolution)
        return "ok"
    except Exception as err:  # noqa: BLE001 - reported in the summary, not raised
        return f"{type(err).__name__}: {err}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="real")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "gpu_check"))
    parser.add_argument("--report_dir", default=None,
                        help="Where summary.md and gpu_check.json are written after every run; default --output_dir "
                             "(which also holds the models: ~40 GB at real size).")
    parser.add_argument("--runs", nargs="+", choices=[*RUNS, "priority"], default=list(RUNS),
                        help="Runs in the order given; 'priority': the PRIORITY list, for a short lease.")
    parser.add_argument("--steps", type=int, default=100, help="Training steps per run.")
    parser.add_argument("--dataloader_num_workers", type=int, default=4)
    parser.add_argument("--overhead_repeats", type=int, default=10, help="0 skips the overhead harness.")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="Start no new run or harness measurement after this many seconds (a lease's limit); "
                             "what was skipped is listed in the report.")
    args = parser.parse_args(argv)
    args.runs = [run for name in args.runs for run in (PRIORITY if name == "priority" else [name])]
    if args.steps < 2 or args.dataloader_num_workers < 0 or args.overhead_repeats < 0:
        parser.error("--steps must be >= 2, --dataloader_num_workers and --overhead_repeats >= 0.")
    if args.deadline_s is not None and not 0 < args.deadline_s < float("inf"):
        parser.error("--deadline_s must be a positive number of seconds.")
    return args


def main(args: argparse.Namespace) -> dict:
    import torch

    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(os.path.join(args.output_dir, "runs"), exist_ok=True)
    data = write_datasets(args.size, args.output_dir)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "size": args.size, "steps": args.steps, "runs": {}, "overhead": {}, "skipped": [],
              "stand_ins": "" if device == "cuda" else "without CUDA: torchao int8 for NF4, AdamW for 8-bit Adam"}

    report_dir = args.report_dir or args.output_dir
    os.makedirs(report_dir, exist_ok=True)

    def write_report() -> None:  # after every run: a machine taken back mid-way still leaves its figures
        report["wall_s"] = round(time.time() - start, 1)
        with open(os.path.join(report_dir, "summary.md"), "w") as f:
            f.write(markdown(report))
        atomic_write_json(os.path.join(report_dir, "gpu_check.json"), report)

    def out_of_time() -> bool:
        return args.deadline_s is not None and time.time() - start > args.deadline_s

    for name in args.runs:  # in the order given: put the runs that matter most first
        if out_of_time():
            report["skipped"].append(name)
            continue
        # Each model is built when a run first needs it (FLUX.1-dev-shaped: ~25 GB written), so a lease's deadline
        # is not spent on models of runs it skips.
        models = build_models(args.size, args.output_dir, device, {RUNS[name][0]})
        result = train(name, args, models, data)
        result["load_and_sample"] = load_and_sample(name, args, models, data) if result["returncode"] == 0 else "-"
        report["runs"][name] = result
        write_report()
    if args.overhead_repeats:
        from benchmark import overhead

        sizes = {"dit": "dit-xl", "controlnet": "sd15-controlnet"} if args.size == "real" else {
            "dit": "tiny", "controlnet": "tiny-controlnet"}
        for kind, cached in (("dit", False), ("dit", True), ("controlnet", False)):
            key = f"{kind}-bf16{'-cached' if cached else ''}"
            if out_of_time():
                report["skipped"].append(f"overhead {key}")
                continue
            batch = SIZES[args.size][kind][2]
            report["overhead"][key] = overhead.run_overhead(sizes[kind], batch, device, "bf16",
                                                            args.overhead_repeats, 2, cache_latents=cached)
            print(f"[gpu_check] overhead {key}: DT/standard step time "
                  f"{report['overhead'][key]['ratios']['step_time']:.3f}", flush=True)
            write_report()
    write_report()
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The runs (steady-state throughput, load + sample), the harness, and the script/harness ratios."""
    def num(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    stand_ins = f"; {report['stand_ins']}" if report.get("stand_ins") else ""
    lines = [f"GPU check on {report['device']} (torch {report['torch']}, size {report['size']}, {report['steps']} "
             f"steps per run, {report['wall_s']:.0f} s in all{stand_ins}).", "",
             "| run | batch x px | exit | images/s (steady) | model TFLOP/s | MFU | peak GiB | anchor / target | "
             "wall (s) | load + sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r.get('batch', '?')} x {r.get('resolution', '?')} | {r['returncode']} | "
                     f"{num(r.get('steady_images_per_sec'), '.1f')} | {num(r.get('steady_model_tflops'), '.3g')} | "
                     f"{num(r.get('steady_mfu'), '.1%')} | {num(r.get('peak_memory_gib'), '.1f')} | "
                     f"{ANCHORS.get(name, '')} | {r['wall_s']:.0f} | {r['load_and_sample']} |")
    pairs = [(a, b) for a, b in PAIRS if report["runs"].get(a, {}).get("steady_images_per_sec")
             and report["runs"].get(b, {}).get("steady_images_per_sec")]
    if pairs:
        lines += ["", "| Diff-Tuning / standard (same batch) | step time | peak memory |", "|---|---|---|"]
        for a, b in pairs:
            ra, rb = report["runs"][a], report["runs"][b]
            memory = (rb["peak_memory_gib"] / ra["peak_memory_gib"] if ra.get("peak_memory_gib")
                      and rb.get("peak_memory_gib") else None)
            lines.append(f"| {b} / {a} | {ra['steady_images_per_sec'] / rb['steady_images_per_sec']:.3f} | "
                         f"{num(memory, '.3f')} |")
    if report["overhead"]:
        lines += ["", "| harness (the scripts' step alone) | standard images/s | DT images/s | DT / standard step time "
                      "| peak memory ratio | script / harness (standard) |", "|---|---|---|---|---|---|"]
        for key, h in report["overhead"].items():
            run = report["runs"].get(f"{key.split('-')[0]}-{'standard' if key.startswith('dit') else 'none'}-bf16"
                                     f"{'-cached' if key.endswith('cached') else ''}", {})
            ratio = (run["steady_images_per_sec"] / h["standard"]["images_per_s"]
                     if run.get("steady_images_per_sec") else None)
            lines.append(f"| {key} | {h['standard']['images_per_s']:.1f} | {h['difftuning']['images_per_s']:.1f} | "
                         f"{h['ratios']['step_time']:.3f} | {num(h['ratios']['peak_memory'], '.3f')} | "
                         f"{num(ratio, '.2f')} |")
    if report.get("skipped"):
        lines += ["", f"Skipped (past --deadline_s): {', '.join(report['skipped'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main, parse_args)
