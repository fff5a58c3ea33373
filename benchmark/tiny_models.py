"""Tiny models and data built offline, for the tests and the quick demo (no Hub needed)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

# Stable Diffusion 1.x/2.x's VAE architecture, for the real-size random-init models of the GPU check and
# the overhead harness (their step times, not their images, matter).
SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                     scaling_factor=0.18215)


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


# ----------------------------------------------------------------------------------------------
# Tiny Stable Diffusion and a fill-style ControlNet dataset (train_controlnet_difftuning.py)
# ----------------------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def learn_bpe_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from pre-tokenized, byte-mapped words (CLIP's BPE, with ``</w>`` on
    each word's last symbol): repeatedly merge the most frequent adjacent pair (ties broken by the
    pair itself, so the result is deterministic). Applied by rank, the merges rebuild every word
    they were learned from that was merged completely."""
    splits = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in word_counts if word}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, pieces in splits.items():
            for pair in zip(pieces, pieces[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + word_counts[word]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        for word, pieces in splits.items():
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            splits[word] = merged
    return merges


def write_clip_tokenizer(path: str, merges: list[tuple[str, str]] = (), model_max_length: int = 77) -> str:
    """An offline CLIP tokenizer: the byte-level vocabulary (each byte alone and word-final), the
    tokens ``merges`` build, and the two special tokens; loads with ``CLIPTokenizer.from_pretrained``."""
    import json

    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    vocab += list(dict.fromkeys(a + b for a, b in merges if a + b not in set(vocab)))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in dict.fromkeys(merges)))
    CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length).save_pretrained(path)
    return path


def train_clip_tokenizer(path: str, corpus: list[str], num_merges: int, model_max_length: int = 77) -> str:
    """:func:`write_clip_tokenizer` with merges learned from ``corpus`` (split and byte-mapped by
    CLIP's own normalizer and pre-tokenizer, so training and use agree)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        backend = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp)).backend_tokenizer
    counts: dict[str, int] = {}
    for text in corpus:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    return write_clip_tokenizer(path, learn_bpe_merges(counts, num_merges), model_max_length)


def write_tiny_clip_tokenizer(path: str, words: tuple[str, ...] = ("circle", "filled", "outline", "red",
                                                                   "green", "blue", "a", "an", "of")) -> str:
    """The tests' CLIP tokenizer: each of ``words`` merged into one token. Ids stay below 1000 so
    they fit the tiny text encoder's embedding table."""
    merges = []
    for word in words:  # merge each word left to right into one end-of-word token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return write_clip_tokenizer(path, merges)


def make_tiny_sd_pipeline(path: str, seed: int = 0) -> str:
    """A StableDiffusionPipeline folder: 2-level UNet with cross-attention, 4x VAE (32 px <-> 8x8
    latents), a 2-layer CLIP text encoder and an offline CLIP tokenizer. Loads with the real
    code paths (``from_pretrained(path, subfolder=...)``)."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32)
    text_config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_sdxl_pipeline(path: str, seed: int = 0) -> str:
    """A StableDiffusionXLPipeline folder built as diffusers' own SDXL tests build theirs: a 2-level UNet with
    the text-time micro-conditioning, two CLIP text encoders (the second with a projection), a 4x VAE and
    offline CLIP tokenizers."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32)
    text_config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config),
                                     text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_sd3_pipeline(path: str, seed: int = 0) -> str:
    """A StableDiffusion3Pipeline folder shaped like diffusers' own SD3 tests: a 1-layer MMDiT (patch 1,
    8x8 latents), two CLIP encoders with projections, no T5 (SD3 runs without it; its tokenizer needs the
    Hub), a 4x VAE with SD3's latent shift and scale, and the flow-matching scheduler with shift 3."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp), model_max_length=77)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035)
    text_config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                                    text_encoder=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
                                    text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_t5_tokenizer(path: str, words: tuple[str, ...] = ("a", "red", "square", "circle", "photo", "of", "sks",
                                                           "dog", "cat")) -> str:
    """An offline T5 tokenizer (T5's Unigram model and special tokens, what transformers builds from an spiece
    file): every printable ASCII character, alone and word-initial, and ``words`` as single word-initial pieces.
    Loads with ``T5Tokenizer.from_pretrained`` and round-trips through a pipeline's ``save_pretrained``."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    # ids 0, 1, 2 as in T5; U+2581 is SentencePiece's word-start mark
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    pieces += [("\u2581" + w, -1.0) for w in words if len(w) > 1]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(path)
    return path


def make_tiny_flux_pipeline(path: str, seed: int = 0) -> str:
    """A FluxPipeline folder shaped like diffusers' own Flux tests: a 1+1-layer Flux transformer with the guidance
    input (FLUX.1-dev's kind), an 8x VAE like Flux's, with its 16 latent channels, shift and scale and no quant
    convs (32 px <-> 4x4 latents <-> 4 packed tokens; resolutions must be multiples of 16, as Flux's), a CLIP text
    encoder, a T5 encoder with an offline tokenizer, and FLUX.1-dev's scheduler settings (shift by resolution when
    sampling, none in training)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(os.path.join(tmp, "clip")),
                                                  model_max_length=77)
        tokenizer_2 = T5Tokenizer.from_pretrained(write_t5_tokenizer(os.path.join(tmp, "t5")))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu"))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_subject_folder(path: str, n: int = 4, size: int = 40, seed: int = 0) -> str:
    """DreamBooth's instance folder: ``n`` images of one subject (a red square with a blue dot, jittered)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size + 8 * (i % 2)), (235, 235, 225))
        x, y = (int(v) for v in rng.integers(4, 12, 2))
        draw = ImageDraw.Draw(image)
        draw.rectangle((x, y, x + size // 2, y + size // 2), fill=(220, 40, 40))
        draw.ellipse((x + 6, y + 6, x + 12, y + 12), fill=(50, 80, 230))
        image.save(os.path.join(path, f"{i}.png"))
    return path


CIRCLE_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}


def make_circle_dataset(path: str, n: int = 12, size: int = 40, seed: int = 0) -> str:
    """A fill50k-style ControlNet dataset: the condition is a circle's outline on black, the target
    the same circle filled with a colour on a light background, the caption names the colour.

    Written as an imagefolder whose metadata.jsonl gives the columns upstream's script expects:
    ``image`` (``file_name``), ``conditioning_image`` (``conditioning_image_file_name``), ``text``.
    Loads with ``--train_data_dir path`` or ``--dataset_name path``."""
    import json

    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(path, "images"), exist_ok=True)
    os.makedirs(os.path.join(path, "conditioning_images"), exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(CIRCLE_COLOURS)[i % len(CIRCLE_COLOURS)]
        radius = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(rng.integers(radius + 1, size - radius - 1)) for _ in range(2))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        condition = Image.new("RGB", (size, size), (0, 0, 0))
        ImageDraw.Draw(condition).ellipse(box, outline=(255, 255, 255), width=2)
        target = Image.new("RGB", (size, size), (235, 235, 225))
        ImageDraw.Draw(target).ellipse(box, fill=CIRCLE_COLOURS[colour])
        target.save(os.path.join(path, "images", f"{i}.png"))
        condition.save(os.path.join(path, "conditioning_images", f"{i}.png"))
        rows.append({"file_name": f"images/{i}.png", "conditioning_image_file_name": f"conditioning_images/{i}.png",
                     "text": f"a {colour} filled circle"})
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path
