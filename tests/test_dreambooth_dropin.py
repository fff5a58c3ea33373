"""train_dreambooth_lora_difftuning.py as a drop-in for diffusers' four DreamBooth LoRA scripts: the commands of
diffusers' DreamBooth READMEs run unchanged (the model ids swapped for tiny local pipelines, the steps and the
resolution cut), every upstream flag is accepted with upstream's per-family default or refused in one sentence, and
each flag the upstream scripts added does what upstream's does."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import torch
import yaml
from conftest import ROOT
from safetensors.torch import load_file
from test_train_dreambooth import LORA_FILE, base_args, load_pipeline

import difftuning_utils as dt
import model_families as mf
import training_plumbing as tp


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> None:
    """Runs in this process each set their own --mixed_precision, which accelerate's state keeps otherwise."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


UPSTREAM = json.load(open(os.path.join(ROOT, "docs", "upstream_dreambooth_lora_flags.json")))
FAMILIES = {"sd": mf.StableDiffusionFamily, "sdxl": mf.StableDiffusionXLFamily, "sd3": mf.StableDiffusion3Family,
            "flux": mf.FluxFamily}

# The LoRA commands of diffusers' examples/dreambooth/README.md, README_sdxl.md, README_sd3.md and README_flux.md, as
# printed there (DeepFloyd IF's stage-I command run on SD: its flags are SD's; the stage-II one is refused below).
README_COMMANDS = {
    "sd": """--pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=$INSTANCE_DIR --output_dir=$OUTPUT_DIR
        --instance_prompt="a photo of sks dog" --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=1
        --checkpointing_steps=100 --learning_rate=1e-4 --report_to="wandb" --lr_scheduler="constant"
        --lr_warmup_steps=0 --max_train_steps=500 --validation_prompt="A photo of sks dog in a bucket"
        --validation_epochs=50 --seed="0" --push_to_hub""",
    "sd-if-stage-1-flags": """--report_to wandb --pretrained_model_name_or_path=$MODEL_NAME
        --instance_data_dir=$INSTANCE_DIR --output_dir=$OUTPUT_DIR --instance_prompt="a sks dog" --resolution=64
        --train_batch_size=4 --gradient_accumulation_steps=1 --learning_rate=5e-6 --scale_lr --max_train_steps=1200
        --validation_prompt="a sks dog" --validation_epochs=25 --checkpointing_steps=100 --pre_compute_text_embeddings
        --tokenizer_max_length=77 --text_encoder_use_attention_mask""",
    "sdxl": """--pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=$INSTANCE_DIR
        --pretrained_vae_model_name_or_path=$VAE_PATH --output_dir=$OUTPUT_DIR --mixed_precision="fp16"
        --instance_prompt="a photo of sks dog" --resolution=1024 --train_batch_size=1 --gradient_accumulation_steps=4
        --learning_rate=1e-4 --report_to="wandb" --lr_scheduler="constant" --lr_warmup_steps=0 --max_train_steps=500
        --validation_prompt="A photo of sks dog in a bucket" --validation_epochs=25 --seed="0" --push_to_hub""",
    "sd3": """--pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=$INSTANCE_DIR --output_dir=$OUTPUT_DIR
        --mixed_precision="fp16" --instance_prompt="a photo of sks dog" --resolution=512 --train_batch_size=1
        --gradient_accumulation_steps=4 --learning_rate=4e-4 --report_to="wandb" --lr_scheduler="constant"
        --lr_warmup_steps=0 --max_train_steps=500 --validation_prompt="A photo of sks dog in a bucket"
        --validation_epochs=25 --seed="0" --push_to_hub""",
    "sd3-text-encoder-prodigy": """--pretrained_model_name_or_path=$MODEL_NAME --output_dir=$OUTPUT_DIR
        --dataset_name="Norod78/Yarn-art-style" --instance_prompt="a photo of TOK yarn art dog" --resolution=1024
        --train_batch_size=1 --train_text_encoder --gradient_accumulation_steps=1 --optimizer="prodigy"
        --learning_rate=1.0 --text_encoder_lr=1.0 --report_to="wandb" --lr_scheduler="constant" --lr_warmup_steps=0
        --max_train_steps=1500 --rank=32 --seed="0" --push_to_hub""",
    "flux-prodigy": """--pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=$INSTANCE_DIR
        --output_dir=$OUTPUT_DIR --mixed_precision="bf16" --instance_prompt="a photo of sks dog" --resolution=512
        --train_batch_size=1 --guidance_scale=1 --gradient_accumulation_steps=4 --optimizer="prodigy"
        --learning_rate=1. --report_to="wandb" --lr_scheduler="constant" --lr_warmup_steps=0 --max_train_steps=500
        --validation_prompt="A photo of sks dog in a bucket" --validation_epochs=25 --seed="0" --push_to_hub""",
    "flux-text-encoder-prodigy": """--pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=$INSTANCE_DIR
        --output_dir=$OUTPUT_DIR --mixed_precision="bf16" --train_text_encoder --instance_prompt="a photo of sks dog"
        --resolution=512 --train_batch_size=1 --guidance_scale=1 --gradient_accumulation_steps=4
        --optimizer="prodigy" --learning_rate=1. --report_to="wandb" --lr_scheduler="constant" --lr_warmup_steps=0
        --max_train_steps=500 --validation_prompt="A photo of sks dog in a bucket" --seed="0" --push_to_hub""",
}
# The READMEs' variations of those commands (SD3's block and layer choice, SDXL's DoRA, Flux's latent cache) and
# the commands with the other upstream flags that change what is saved.
README_VARIATIONS = {
    "sdxl-kohya": ("sdxl", "--output_kohya_format"),
    "flux-upcast": ("flux-prodigy", "--upcast_before_saving"),
    "flux-cache-latents": ("flux-prodigy", "--cache_latents"),
    "sd-batch-above-the-subject-images": ("sd", "--train_batch_size=6"),  # 4 images: upstream trains on
    "sd3-lora-blocks-and-layers": ("sd3", '--lora_blocks "0" '
                                          '--lora_layers attn.to_k,attn.to_q,attn.to_v,attn.to_out.0'),
    "sdxl-dora": ("sdxl", "--use_dora"),
}


def readme_args(command: str, model: str, subject_dir: str, out: str, vae: str | None = None) -> list[str]:
    """A README command's arguments with the ids swapped for local tiny ones: the model (and VAE), the dataset (a
    local image folder), 32 px, 2 steps (1 validation and 1 final image of 2 sampling steps), TensorBoard for wandb
    (not installed here); --push_to_hub stays (the Hub calls are captured)."""
    args = shlex.split(command.replace("$MODEL_NAME", model).replace("$INSTANCE_DIR", subject_dir)
                       .replace("$OUTPUT_DIR", out).replace("$VAE_PATH", vae or model + "/vae")
                       .replace("Norod78/Yarn-art-style", subject_dir))
    swaps = {"--resolution": "32", "--max_train_steps": "2", "--report_to": "tensorboard"}
    out_args = []
    for arg in args:
        name, sep, value = arg.partition("=")
        if sep and name in swaps:
            arg = f"{name}={swaps[name]}"
        out_args.append(arg)
    if "--report_to" in out_args:
        out_args[out_args.index("--report_to") + 1] = "tensorboard"
    return out_args + ["--num_validation_images", "1", "--validation_num_inference_steps", "2"]


def models(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux) -> dict[str, str]:
    return {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


@pytest.mark.parametrize("name", [*README_COMMANDS, *README_VARIATIONS])
def test_readme_commands_run_unchanged(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux, subject, tmp_path, captured_hub,
                                       monkeypatch, name):
    """Each README command trains, saves a LoRA that loads, writes the card and pushes (captured); the upstream
    flags in it took effect (Prodigy, the text encoders' learning rate, DoRA, the chosen blocks and layers)."""
    import train_dreambooth_lora_difftuning as script

    family = name.split("-")[0]
    base, variation = README_VARIATIONS.get(name, (name, ""))
    command = f"{README_COMMANDS[base]} {variation}"
    model = models(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux)[family]
    out = str(tmp_path / "out")
    optimizers = []
    create = tp.create_optimizer
    monkeypatch.setattr(tp, "create_optimizer", lambda a, p: optimizers.append(create(a, p)) or optimizers[-1])
    validations = []
    validate = script.run_validation
    monkeypatch.setattr(script, "run_validation", lambda a, acc, pipe, step, kw: validations.append(
        (pipe.text_encoder, set(kw))) or validate(a, acc, pipe, step, kw))
    args = script.parse_args(readme_args(command, model, subject, out))
    script.main(args)
    saved = load_file(os.path.join(out, LORA_FILE))
    assert saved and ("--push_to_hub" not in command or captured_hub["upload"]["folder_path"] == out)
    load_pipeline(model).load_lora_weights(out)
    optimizer = optimizers[0]
    assert type(optimizer).__name__ == ("Prodigy" if "prodigy" in command else "AdamW")
    if "text-encoder" in name:  # the text encoders' group: --text_encoder_lr (Prodigy: --learning_rate, as upstream)
        assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]
        assert optimizer.param_groups[1]["weight_decay"] == 1e-3  # upstream's --adam_weight_decay_text_encoder
        assert any(k.startswith("text_encoder.") for k in saved)
    if name == "sd-if-stage-1-flags":  # --scale_lr: 5e-6 x batch 4
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)
    if name == "sdxl-dora":
        assert any("lora_magnitude_vector" in k or "dora_scale" in k for k in saved)
    if name == "sd-if-stage-1-flags":  # --pre_compute_text_embeddings: validated from embeddings, encoder released
        assert validations and all(encoder is None and "prompt_embeds" in kw for encoder, kw in validations)
    elif "--validation_prompt" in command:  # the end of the first epoch (--validation_epochs 25 or 50)
        assert validations  # (frozen text encoders are released once the prompts are encoded, on every family)
    transformer = [v for k, v in saved.items() if k.startswith("transformer.")]
    if family == "flux":  # bf16 training: upstream saves the transformer's LoRA in bf16 unless upcast
        assert {v.dtype for v in transformer} == {torch.float32 if "upcast" in name else torch.bfloat16}
    if family == "sdxl":  # fp16 training: SDXL always saves float32
        assert {v.dtype for v in saved.values()} == {torch.float32}
    if name == "sdxl-kohya":
        kohya = load_file(os.path.join(out, "pytorch_lora_weights_kohya.safetensors"))
        assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    card = open(os.path.join(out, "README.md")).read()
    meta = yaml.safe_load(card.split("---")[1])
    assert "template:sd-lora" in meta["tags"] and ("dora" if "dora" in name else "lora") in meta["tags"]
    assert meta["license"] == {"sd": "creativeml-openrail-m", "sdxl": "openrail++"}.get(family, "other")
    assert meta["instance_prompt"] == args.instance_prompt and "base_model" not in meta  # a local folder
    assert meta["widget"][0]["output"]["url"] == "image_0.png" and os.path.exists(os.path.join(out, "image_0.png"))
    if name == "sd3-lora-blocks-and-layers":
        assert {re.sub(r"\.lora_[AB]\.weight$", "", k) for k in saved} == {
            f"transformer.transformer_blocks.0.attn.{m}" for m in ("to_k", "to_q", "to_v", "to_out.0")}


def minimal_args(subject_dir: str, out: str, *flags: str, model: str = "unused-model") -> list[str]:
    """Only the flags a command must give, so every other flag takes its default."""
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir, "--output_dir", out,
            "--instance_prompt", "a photo of sks dog", *flags]


def family_args(family: str, subject_dir: str, out: str, *flags: str) -> object:
    """Parsed arguments with the family's defaults filled in, as main() has them once the model is known."""
    import train_dreambooth_lora_difftuning as script

    args = script.parse_args(minimal_args(subject_dir, out, *flags))
    script.check_family_flags(args, FAMILIES[family])
    return args


@pytest.mark.parametrize("family", FAMILIES)
def test_every_upstream_flag_takes_upstreams_default_or_is_refused(subject, tmp_path, family):
    """Every flag of upstream's four scripts exists here; in each family, every flag its upstream script has takes
    that script's default (but for the documented UPSTREAM_DIFFERENCES), and the flags that cannot apply are
    refused in one sentence."""
    import train_dreambooth_lora_difftuning as script

    ours = {o.removeprefix("--"): a.dest for a in script.build_parser()._actions for o in a.option_strings}
    args = family_args(family, subject, str(tmp_path / "out"))
    checked = 0
    for flag, defaults in UPSTREAM["flags"].items():
        assert flag in ours, f"--{flag} is upstream's and missing here"
        if family not in defaults or f"--{flag}" in script.REFUSED_FLAGS or flag in script.UPSTREAM_DIFFERENCES:
            continue
        if flag in ("pretrained_model_name_or_path", "instance_data_dir", "output_dir", "instance_prompt"):
            continue  # given here (output_dir's per-family default is checked below)
        ours_value, upstream_value = getattr(args, ours[flag]), defaults[family]
        if flag == "optimizer":  # upstream lowercases it too
            ours_value, upstream_value = ours_value.lower(), upstream_value.lower()
        assert ours_value == upstream_value, f"--{flag} on {family}: {ours_value!r}, upstream {upstream_value!r}"
        checked += 1
    assert checked > 50
    for flag in script.REFUSED_FLAGS:
        with pytest.raises(dt.ConfigError, match=re.escape(flag) + ": "):
            script.parse_args(minimal_args(subject, str(tmp_path / "out"), flag))


def test_output_dir_defaults_per_family(tiny_sd, tiny_sd3, tiny_flux, subject, tmp_path, monkeypatch):
    import train_dreambooth_lora_difftuning as script

    monkeypatch.chdir(tmp_path)
    for model, folder in ((tiny_sd, "lora-dreambooth-model"), (tiny_sd3, "sd3-dreambooth"),
                          (tiny_flux, "flux-dreambooth-lora")):
        args = script.parse_args(["--pretrained_model_name_or_path", model, "--instance_data_dir", subject,
                                  "--instance_prompt", "a photo of sks dog"])
        assert args.output_dir == folder and not os.path.exists(folder)


@pytest.mark.parametrize("family, expected", [
    ("sd", (5e-4, 1e-2, [5e-4, 5e-4], [1e-2, 1e-2], 512, None, "lanczos", True)),
    ("sdxl", (1e-4, 1e-4, [1e-4, 5e-6], [1e-4, 1e-3], 1024, None, "lanczos", True)),
    ("sd3", (1e-4, 1e-4, [1e-4, 5e-6], [1e-4, 1e-3], 512, None, "bilinear", False)),
    ("flux", (1e-4, 1e-4, [1e-4, 5e-6], [1e-4, 1e-3], 512, 4, "bilinear", False)),
])
def test_family_defaults_and_text_encoder_groups(subject, tmp_path, family, expected):
    """Upstream's per-family defaults; the text encoders' LoRA is its own optimizer group at --text_encoder_lr and
    --adam_weight_decay_text_encoder (SD: one setting for both, as upstream's SD script)."""
    import train_dreambooth_lora_difftuning as script

    args = family_args(family, subject, str(tmp_path / "out"), "--train_text_encoder")
    groups = script.optimizer_groups(args, [[torch.nn.Parameter(torch.zeros(1))]] * 2)
    assert (args.learning_rate, args.adam_weight_decay, [g["lr"] for g in groups],
            [g.get("weight_decay", args.adam_weight_decay) for g in groups], args.resolution, args.lora_alpha,
            args.image_interpolation_mode, args.upcast_before_saving) == expected
    custom = family_args(family, subject, str(tmp_path / "out"), "--text_encoder_lr", "3e-5",
                         "--adam_weight_decay_text_encoder", "0.5")
    assert script.optimizer_groups(custom, [[torch.nn.Parameter(torch.zeros(1))]] * 2)[1] == {
        "params": [groups[1]["params"][0]], "lr": 3e-5, "weight_decay": 0.5}


def test_prodigy_takes_its_flags(subject, tmp_path):
    args = family_args("sdxl", subject, str(tmp_path / "out"), "--optimizer", "Prodigy", "--learning_rate", "1.0",
                       "--prodigy_beta3", "0.5", "--prodigy_decouple", "false", "--prodigy_safeguard_warmup", "no")
    optimizer = tp.create_optimizer(args, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}])
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == "Prodigy"
    assert (group["beta3"], group["decouple"], group["use_bias_correction"], group["safeguard_warmup"],
            group["weight_decay"]) == (0.5, False, True, False, 1e-4)


def test_lora_dropout_reaches_the_adapters(tiny_sd, subject, tmp_path):
    import train_dreambooth_lora_difftuning as script

    args = family_args("sd", subject, str(tmp_path / "out"), "--lora_dropout", "0.25", "--train_text_encoder")
    pipe = load_pipeline(tiny_sd)
    script.add_lora_adapters(pipe.unet, [pipe.text_encoder], args)
    dropouts = {m.lora_dropout["default"].p for model in (pipe.unet, pipe.text_encoder) for m in model.modules()
                if hasattr(m, "lora_dropout")}
    assert dropouts == {0.25}


def test_epochs_count_as_upstream(subject, tmp_path):
    """An epoch is every subject image --repeats times, or one row per class image when there are more (upstream's
    dataset length), in whole batches."""
    import train_dreambooth_lora_difftuning as script

    args = family_args("sd", subject, str(tmp_path / "out"), "--repeats", "3", "--train_batch_size", "4")
    assert script.epoch_rows(args, 4, 1) == 12
    prior = family_args("sd", subject, str(tmp_path / "out"), "--with_prior_preservation", "--class_prompt", "dog",
                        "--train_batch_size", "4", "--num_class_images", "30")
    assert script.epoch_rows(prior, 4, 1) == 32 and script.epoch_rows(prior, 4, 2) == 32
    few = family_args("sd", subject, str(tmp_path / "out"), "--train_batch_size", "6")
    assert script.epoch_rows(few, 4, 1) == 6  # fewer images than a batch: upstream trains on, so do we


def test_validation_epochs_as_upstream(subject, tmp_path):
    """At the end of every --validation_epochs-th epoch, the first included; --validation_steps when given."""
    import train_dreambooth_lora_difftuning as script

    args = family_args("sd", subject, str(tmp_path / "out"), "--validation_epochs", "2")
    assert [s for s in range(1, 13) if script.validation_due(args, s, 3, 12)] == [3, 9]
    assert [s for s in range(1, 9) if script.validation_due(args, s, 3, 8)] == [3, 8]  # epoch 2, cut short
    assert [s for s in range(1, 3) if script.validation_due(args, s, 3, 2)] == [2]  # a run shorter than an epoch
    args = family_args("sd", subject, str(tmp_path / "out"), "--validation_steps", "5")
    assert [s for s in range(1, 13) if script.validation_due(args, s, 3, 12)] == [5, 10]


def test_interpolation_mode_resizes_the_images(subject, tmp_path):
    import datasets

    import train_dreambooth_lora_difftuning as script

    dataset = datasets.load_dataset("imagefolder", data_dir=subject, split="train")
    pixels = {}
    for mode in ("nearest", "lanczos"):
        args = family_args("sd", subject, str(tmp_path / "out"), "--image_interpolation_mode", mode,
                           "--resolution", "32", "--center_crop")
        pixels[mode] = script.InstanceImages(dataset, args, [0] * len(dataset), 4)[tp.SampleKey(0, 0)]["pixel_values"]
    assert pixels["nearest"].shape == (3, 32, 32) and not torch.equal(pixels["nearest"], pixels["lanczos"])


def test_sd_tokenizer_flags(tiny_sd, subject, tmp_path):
    """--tokenizer_name loads another tokenizer, --tokenizer_max_length pads to its length and
    --text_encoder_use_attention_mask gives the text encoder the tokenizer's attention mask."""
    from transformers import CLIPTokenizer

    import train_dreambooth_lora_difftuning as script
    from benchmark.tiny_models import write_tiny_clip_tokenizer

    other = write_tiny_clip_tokenizer(str(tmp_path / "tokenizer"))
    CLIPTokenizer.from_pretrained(other, model_max_length=12).save_pretrained(other)
    args = family_args("sd", subject, str(tmp_path / "out"), "--tokenizer_name", other)
    args.pretrained_model_name_or_path = tiny_sd
    pipe, family = script.load_base_pipeline(args)
    assert pipe.tokenizer.model_max_length == 12 and family.tokenize(["a red circle"])[0].shape == (1, 12)
    masked = mf.StableDiffusionFamily(pipe, tokenizer_max_length=20, text_encoder_use_attention_mask=True)
    ids = masked.tokenize(["a red circle"])
    assert ids[0].shape == (1, 20)
    mask = pipe.tokenizer(["a red circle"], padding="max_length", max_length=20, return_tensors="pt").attention_mask
    with torch.no_grad():
        expected = pipe.text_encoder(ids[0], attention_mask=mask)[0]
        assert torch.allclose(masked.encode(ids).hidden, expected)
        assert not torch.allclose(mf.StableDiffusionFamily(pipe, 20).encode(ids).hidden, expected)


def test_local_rank_from_the_launcher(subject, tmp_path, monkeypatch):
    import train_dreambooth_lora_difftuning as script

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert script.parse_args(minimal_args(subject, str(tmp_path / "o"), "--local_rank", "1")).local_rank == 1
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert script.parse_args(minimal_args(subject, str(tmp_path / "o"), "--local_rank", "1")).local_rank == 3


def test_class_prompt_without_prior_preservation_warns_and_trains_without(subject, tmp_path):
    import train_dreambooth_lora_difftuning as script

    with pytest.warns(UserWarning, match="--class_prompt is used only with --with_prior_preservation"):
        args = script.parse_args(minimal_args(subject, str(tmp_path / "o"), "--class_prompt", "a dog"))
    assert args.class_prompt is None


def test_family_only_flags_refused_elsewhere(tiny_sd, tiny_sdxl, tiny_sd3, subject, tmp_path):
    import train_dreambooth_lora_difftuning as script

    for model, flags, words in ((tiny_sd, ["--lora_blocks", "1"], "--lora_blocks: a flag of the MMDiT"),
                                (tiny_sd3, ["--output_kohya_format"], "--output_kohya_format: a flag of the UNet"),
                                (tiny_sdxl, ["--tokenizer_max_length", "10"], "--tokenizer_max_length: flags of "
                                                                               "upstream's train_dreambooth_lora.py"),
                                (tiny_sd3, ["--lora_blocks", "7"], "--lora_blocks")):  # the tiny SD3 has 1 block
        out = str(tmp_path / "out")
        with pytest.raises(dt.ConfigError, match=re.escape(words)):
            script.main(script.parse_args(base_args(model, subject, out) + flags))


def test_edm_sdxl_models_are_refused(tiny_sdxl, subject, tmp_path):
    """An SDXL model with an EDM scheduler (Playground v2.5) or latents_mean/std in its VAE is refused in one
    sentence before its weights load; upstream's Playground README command is such a run."""
    import shutil

    import train_dreambooth_lora_difftuning as script

    edm, shifted = str(tmp_path / "edm"), str(tmp_path / "shifted")
    shutil.copytree(tiny_sdxl, edm)
    shutil.copytree(tiny_sdxl, shifted)
    index = json.load(open(os.path.join(edm, "model_index.json")))
    index["scheduler"] = ["diffusers", "EDMDPMSolverMultistepScheduler"]
    json.dump(index, open(os.path.join(edm, "model_index.json"), "w"))
    vae = json.load(open(os.path.join(shifted, "vae", "config.json")))
    json.dump({**vae, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4},
              open(os.path.join(shifted, "vae", "config.json"), "w"))
    playground = README_COMMANDS["sdxl"].replace("--pretrained_vae_model_name_or_path=$VAE_PATH ", "")
    for model, words in ((edm, "an EDM scheduler (EDMDPMSolverMultistepScheduler)"),
                         (shifted, "a VAE with latents_mean/latents_std")):
        with pytest.raises(dt.ConfigError, match=re.escape(words)):
            script.main(script.parse_args(readme_args(playground, model, subject, str(tmp_path / "out"))))
        assert not os.path.exists(tmp_path / "out")


def test_bank_guidance_zero_is_kept(tiny_sd, subject, tmp_path, monkeypatch):
    """--knowledge_bank_guidance_scale 0 samples the class images without guidance (it used to become 7.5)."""
    import train_dreambooth_lora_difftuning as script

    seen = {}

    def stop(args, pipeline, family, guidance):
        seen["guidance_scale"] = guidance
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "class_image_writer", stop)
    with pytest.raises(KeyboardInterrupt):
        script.main(script.parse_args(base_args(tiny_sd, subject, str(tmp_path / "o")) + [
            "--with_prior_preservation", "--class_prompt", "a circle", "--knowledge_bank_guidance_scale", "0"]))
    assert seen["guidance_scale"] == 0


def test_card_licence_and_tags_per_family(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux):
    cards = {name: FAMILIES[name](load_pipeline(model)).card_metadata(name) for name, model in
             models(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux).items()}
    assert cards["sd"] == {"license": "creativeml-openrail-m", "tags": ["stable-diffusion",
                                                                        "stable-diffusion-diffusers"]}
    assert cards["sdxl"]["license"] == "openrail++"
    assert cards["sd3"]["license"] == "other" and cards["sd3"]["license_name"] == "stabilityai-ai-community"
    assert cards["flux"]["license_name"] == "flux-1-dev-non-commercial-license"  # the tiny Flux takes guidance
    assert mf.StableDiffusion3Family.card_metadata(object(), "stabilityai/stable-diffusion-3.5-large")[
        "license_link"] == "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md"


def test_hub_id_of_a_cached_copy(tmp_path):
    cached = tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert tp.hub_id(str(cached)) == "stabilityai/stable-diffusion-xl-base-1.0"
    assert tp.hub_id(str(tmp_path)) is None
    assert tp.hub_id("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"


def test_resume_with_another_optimizer_or_dora_is_refused(subject, tmp_path):
    """Prodigy's and DoRA's state differ from AdamW's and LoRA's: the checkpoint records them (only when set, so a
    checkpoint of an older run still matches a default one) and a resume with the other one is refused."""
    import train_dreambooth_lora_difftuning as script

    plain = family_args("sd", subject, str(tmp_path / "o"))
    prodigy = family_args("sd", subject, str(tmp_path / "o"), "--optimizer", "prodigy", "--use_dora")
    assert "optimizer" not in tp.checkpoint_identity(plain, script.__file__)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / tp.CHECKPOINT_INFO).write_text(json.dumps(tp.checkpoint_identity(prodigy, script.__file__)))
    with pytest.raises(dt.ConfigError, match="--use_dora True there, False now, --optimizer 'prodigy' there, "
                                             "'adamw' now"):
        tp._check_checkpoint(str(checkpoint), tp.checkpoint_identity(plain, script.__file__), None)
