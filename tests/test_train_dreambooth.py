"""Tests of train_dreambooth_lora_difftuning.py: the real script on tiny SD, SDXL, SD3 and Flux pipelines built
offline."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, TOKEN, assert_no_token, error_line, files_uploaded, run_script
from PIL import Image
from safetensors.torch import load_file

import difftuning_utils as dt
import model_families as mf
import training_plumbing as tp

SCRIPT = os.path.join(ROOT, "train_dreambooth_lora_difftuning.py")
LORA_FILE = "pytorch_lora_weights.safetensors"


def load_pipeline(model: str):
    """A tiny pipeline as a user loads it (SD3 saved without T5 needs the absent parts named)."""
    from diffusers import DiffusionPipeline

    absent = {"text_encoder_3": None, "tokenizer_3": None} if "sd3" in os.path.basename(model) else {}
    return DiffusionPipeline.from_pretrained(model, **absent)


def base_args(model: str, data: str, out: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--output_dir", out,
            "--instance_prompt", "a red square", "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--seed", "1", "--report_to", "none",
            "--num_validation_images", "1", "--validation_num_inference_steps", "2", "--rank", "2",
            "--num_class_images", "4", "--sample_batch_size", "2", "--knowledge_bank_num_inference_steps", "2"]


def load_with_lora(model: str, out: str):
    pipe = load_pipeline(model)
    base = unet_output(pipe)
    pipe.load_lora_weights(out)
    return pipe, base


def unet_output(pipe) -> torch.Tensor:
    """The denoiser's prediction on a fixed input, with the family's conditioning."""
    family = mf.family_class(type(pipe).__name__)(pipe)
    with torch.no_grad():
        prompts = family.encode(family.tokenize(["a red square"]))
        x = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        ids = mf.time_ids((32, 32), (0, 0), 32)[None]
        return family.predict(getattr(pipe, family.denoiser_name), x, torch.tensor([500]), prompts, ids,
                              torch.float32)


@pytest.mark.parametrize("model, extra", [
    pytest.param("sd", ["--with_prior_preservation", "--class_prompt", "a circle"], id="sd-prior-preservation"),
    pytest.param("sd", ["--difftuning", "--with_prior_preservation", "--class_prompt", "a circle",
                        "--train_text_encoder", "--validation_prompt", "a red square", "--validation_steps", "2"],
                 id="sd-difftuning-text-encoder"),
    pytest.param("sdxl", ["--difftuning", "--with_prior_preservation", "--class_prompt", "", "--snr_gamma", "5",
                          "--cache_latents", "--center_crop", "--random_flip", "--train_text_encoder"],
                 id="sdxl-difftuning-empty-prompt-bank"),
    pytest.param("sd3", ["--difftuning", "--with_prior_preservation", "--class_prompt", "a circle",
                         "--train_text_encoder", "--validation_prompt", "a red square", "--validation_steps", "2"],
                 id="sd3-difftuning-text-encoder"),
    pytest.param("flux", ["--difftuning", "--with_prior_preservation", "--class_prompt", "a circle",
                          "--train_text_encoder", "--cache_latents", "--center_crop", "--random_flip",
                          "--validation_prompt", "a red square", "--validation_steps", "2"],
                 id="flux-difftuning-text-encoder-cached"),
])
def test_train_save_load_lora(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux, subject, tmp_path, model, extra):
    """The saved LoRA is diffusers' format: load_lora_weights puts every tensor of it into the pipeline (UNet and,
    when trained, the text encoders) and changes what the UNet predicts; the card names no local path."""
    from peft.utils import get_peft_model_state_dict

    base_model = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[model]
    out = str(tmp_path / "out")
    run_script(SCRIPT, base_args(base_model, subject, out) + extra)
    saved = load_file(os.path.join(out, LORA_FILE))
    assert load_file(os.path.join(out, "checkpoint-4", LORA_FILE)).keys() == saved.keys()
    pipe, base = load_with_lora(base_model, out)
    denoiser = "transformer" if model in ("sd3", "flux") else "unet"
    denoiser_keys = [k for k in saved if k.startswith(f"{denoiser}.")]
    def loaded(model) -> int:  # LoRA tensors load_lora_weights put into the model (adapter "default_0")
        return len(get_peft_model_state_dict(model, adapter_name=next(iter(model.peft_config))))

    assert denoiser_keys and loaded(getattr(pipe, denoiser)) == len(denoiser_keys)
    if model in ("sd3", "flux"):  # upstream's targets: both attention streams
        assert any(".attn.add_q_proj." in k for k in denoiser_keys) and any(".attn.to_q." in k for k in denoiser_keys)
    if model == "flux":  # and Flux's feed-forward layers, in the single-stream blocks too; LoRA on CLIP only
        assert any(".ff_context.net.2." in k for k in denoiser_keys)
        assert any(k.startswith("transformer.single_transformer_blocks.") for k in denoiser_keys)
        assert not any(k.startswith("text_encoder_2.") for k in saved)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if model in ("sdxl", "sd3") else [])
    if "--train_text_encoder" in extra:
        for encoder, name in zip(encoders, ("text_encoder.", "text_encoder_2."), strict=False):
            assert loaded(encoder) == len([k for k in saved if k.startswith(name)]) > 0
    else:
        assert not any(k.startswith("text_encoder") for k in saved)
    assert not torch.allclose(unet_output(pipe), base)
    card = open(os.path.join(out, "README.md")).read()
    assert "a red square" in card and str(tmp_path) not in card and os.path.dirname(base_model) not in card
    assert ("psi timesteps" in card) == ("--difftuning" in extra)
    # The class images, generated into <output_dir>/class_images as upstream names them.
    names = os.listdir(os.path.join(out, "class_images"))
    assert sorted(int(n.split("-")[0]) for n in names) == [0, 1, 2, 3]
    assert all(re.fullmatch(r"\d+-[0-9a-f]{40}\.jpg", n) for n in names)


FAMILY_CLASSES = {"sd": mf.StableDiffusionFamily, "sdxl": mf.StableDiffusionXLFamily,
                  "sd3": mf.StableDiffusion3Family, "flux": mf.FluxFamily}


@pytest.mark.parametrize("model, alpha", [("sd", "8"), ("sd", "-4"), ("sdxl", "8"), ("sd3", "-4"), ("flux", "8")])
def test_reloaded_lora_is_the_trained_model(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux, subject, tmp_path, monkeypatch,
                                            model, alpha):
    """--rank 4 --lora_alpha 8 trains at scale 2 (a negative alpha at a negative scale): the saved file carries the
    adapter metadata, so load_lora_weights (the user's load, and the model card's) rebuilds the model as trained,
    denoiser and text encoders, from the final LoRA and from a checkpoint's."""
    import train_dreambooth_lora_difftuning as script

    base_model = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[model]
    family_class, trained = FAMILY_CLASSES[model], {}
    save = family_class.save_lora_weights

    def save_recording_output(self, folder, *args):  # the in-memory trained model's prediction at each save
        name = os.path.basename(folder)  # checkpoint-2.tmp, or final.tmp in out (renamed into out when written)
        key = name.split(".")[0] if name.startswith("checkpoint-") else os.path.basename(os.path.dirname(folder))
        trained[key] = unet_output(self.pipeline)
        save(self, folder, *args)

    monkeypatch.setattr(family_class, "save_lora_weights", save_recording_output)
    out = str(tmp_path / "out")
    script.main(script.parse_args(base_args(base_model, subject, out, steps=2) + [
        "--rank", "4", "--lora_alpha", alpha, "--train_text_encoder", "--learning_rate", "1e-2"]))
    for folder, name in ((out, "out"), (os.path.join(out, "checkpoint-2"), "checkpoint-2")):
        pipe, base = load_with_lora(base_model, folder)
        change = (trained[name] - base).abs().max()
        assert change > 1e-4  # the LoRA did change the prediction
        assert (unet_output(pipe) - trained[name]).abs().max() < 1e-3 * change, name


def test_resume_with_another_lora_alpha_refused(tiny_sd, subject, tmp_path):
    """The alpha is part of what a checkpoint holds: resuming with another one is refused in one sentence, and the
    checkpoint and the saved LoRA are left as they were."""
    import train_dreambooth_lora_difftuning as script

    out = str(tmp_path / "out")
    script.main(script.parse_args(base_args(tiny_sd, subject, out, steps=2) + ["--lora_alpha", "8"]))
    before = {f: open(os.path.join(d, f), "rb").read() for d in (out, os.path.join(out, "checkpoint-2"))
              for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))}
    for alpha in (["--lora_alpha", "4"], []):  # another alpha, or none (alpha = --rank 2)
        with pytest.raises(dt.ConfigError, match=r"--lora_alpha 8 there, [24] now\); resume with the same"):
            script.main(script.parse_args(base_args(tiny_sd, subject, out, steps=4) + alpha + [
                "--resume_from_checkpoint", "latest"]))
    assert before == {f: open(os.path.join(d, f), "rb").read() for d in (out, os.path.join(out, "checkpoint-2"))
                      for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))}
    with pytest.raises(dt.ConfigError, match="--lora_alpha must not be 0"):
        script.parse_args(base_args(tiny_sd, subject, out) + ["--lora_alpha", "0"])


def test_half_precision_base_model(tiny_sdxl, subject, tmp_path):
    """A base pipeline saved in bf16 (like an fp16 --variant): transformers loads its text encoders in bf16 and
    diffusers its UNet in float32; training and the final samples still run, every part in one dtype."""
    from diffusers import DiffusionPipeline

    half = str(tmp_path / "sdxl-bf16")
    DiffusionPipeline.from_pretrained(tiny_sdxl).to(torch.bfloat16).save_pretrained(half)
    out = str(tmp_path / "out")
    run_script(SCRIPT, base_args(half, subject, out, steps=1) + ["--mixed_precision", "bf16"])
    assert os.path.exists(os.path.join(out, LORA_FILE)) and os.path.exists(os.path.join(out, "README.md"))


@pytest.mark.parametrize("model", ["sd", "sd3", "flux"])
def test_resume_equals_straight_run(tiny_sd, tiny_sd3, tiny_flux, subject, tmp_path, model):
    """Stopped at step 2 and resumed gives bit-identical LoRA weights (bank replay, text-encoder LoRA)."""
    tiny_sd = {"sd": tiny_sd, "sd3": tiny_sd3, "flux": tiny_flux}[model]
    args = ["--difftuning", "--with_prior_preservation", "--class_prompt", "a circle", "--train_text_encoder",
            "--class_data_dir", str(tmp_path / "bank")] + (["--max_sequence_length", "32"] if model == "flux" else [])
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_script(SCRIPT, base_args(tiny_sd, subject, straight) + args)
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run_script(SCRIPT, base_args(tiny_sd, subject, resumed) + args + ["--resume_from_checkpoint", "latest"])
    a, b = load_file(os.path.join(straight, LORA_FILE)), load_file(os.path.join(resumed, LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    halfway = load_file(os.path.join(straight, "checkpoint-2", LORA_FILE))
    assert not all(torch.equal(a[k], halfway[k]) for k in a)  # the last two steps did train


def test_push_to_hub_uploads_the_lora_and_card_only(tiny_sd, subject, tmp_path, captured_hub, capfd):
    """The Hub is unreachable: capture create_repo/upload_folder; the LoRA and the card go, the checkpoints and
    the class-sample bank stay; the card's snippet names the Hub repo; the token is in no file and no log."""
    import train_dreambooth_lora_difftuning as script

    out = str(tmp_path / "out")
    script.main(script.parse_args(base_args(tiny_sd, subject, out, steps=2) + [
        "--difftuning", "--with_prior_preservation", "--class_prompt", "a circle", "--push_to_hub",
        "--hub_model_id", "me/sks-square", "--report_to", "tensorboard", "--hub_token", TOKEN]))
    assert captured_hub["upload"]["token"] == TOKEN  # used to authenticate, and only there
    assert any(p.startswith("logs/") for p in files_uploaded(captured_hub["upload"]))
    assert_no_token(out, *capfd.readouterr())
    assert captured_hub["create"]["repo_id"] == "me/sks-square"
    sent = files_uploaded(captured_hub["upload"])
    assert LORA_FILE in sent and "README.md" in sent
    assert not any(p.startswith(("checkpoint-", "class_images")) for p in sent)
    assert 'pipe.load_lora_weights("me/sks-square"' in open(os.path.join(out, "README.md")).read()


def step_for(model: str, prediction_type: str = "epsilon", difftuning: bool = False, snr_gamma: float | None = None,
             prior_loss_weight: float = 0.7):
    """A DreamBoothStep on a tiny pipeline with a two-sample class bank, as the script builds it."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    from train_dreambooth_lora_difftuning import DreamBoothStep

    pipe = DiffusionPipeline.from_pretrained(model)
    family = mf.family_class(type(pipe).__name__)(pipe)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    bank = dt.KnowledgeBank(latents, ["a circle"] * 2, {}, torch.stack([latents, latents.flip(-1)], 1),
                            torch.full((2, 2, 4, 8, 8), 0.01))
    prompt_ids = family.tokenize(["a red square", "a circle"])
    with torch.no_grad():
        table = family.encode(prompt_ids)
    tau = 1.0 if difftuning else 0.0
    return DreamBoothStep(family=family, denoiser=pipe.unet, vae=pipe.vae, noise_scheduler=scheduler,
                          psi=dt.TimestepSampler(1000, tau, "adaptation"),
                          xi=dt.TimestepSampler(1000, tau, "retention"), weighting_scheme=None,
                          precondition_outputs=False,
                          prompt_ids=prompt_ids, prompt_table=table, prior_loss_weight=prior_loss_weight,
                          snr_gamma=snr_gamma, weight_dtype=torch.float32,
                          bank=dt.BankReplay(bank, "images", False, 2, 0, 0, "cpu"), bank_prompt_row=1,
                          bank_time_ids=mf.time_ids((32, 32), (0, 0), 32).expand(2, -1))


def captured_loss(step, monkeypatch) -> tuple[torch.Tensor, dict]:
    """Run step.loss on a two-image batch, capturing what went into the UNet and what it predicted."""
    seen: dict = {}
    add_noise = step.noise_scheduler.add_noise

    def spy_add_noise(latents, noise, timesteps):
        seen.update(latents=latents, noise=noise, timesteps=timesteps)
        return add_noise(latents, noise, timesteps)

    monkeypatch.setattr(step.noise_scheduler, "add_noise", spy_add_noise)
    handle = step.denoiser.register_forward_hook(lambda _m, _i, out: seen.update(pred=out.sample))
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1,
             "prompt_rows": torch.tensor([0, 0]), "time_ids": mf.time_ids((40, 40), (4, 4), 32).expand(2, -1)}
    with torch.no_grad():
        loss, logs = step.loss(batch, tp.StepGenerator(3, 0))
    handle.remove()
    return loss, logs | seen


@pytest.mark.parametrize("model, prediction_type, snr_gamma", [("sd", "epsilon", None), ("sd", "v_prediction", 5.0),
                                                                ("sdxl", "epsilon", 5.0)])
def test_prior_preservation_loss_matches_diffusers(tiny_sd, tiny_sdxl, monkeypatch, model, prediction_type, snr_gamma):
    """Without --difftuning the loss is diffusers' DreamBooth loss on the same batch: instance and class halves
    concatenated, MSE of each half, Min-SNR weights (min(snr, gamma)/snr, + 1 for v) on the instance half
    only, instance + prior_loss_weight * prior."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    step = step_for({"sd": tiny_sd, "sdxl": tiny_sdxl}[model], prediction_type, snr_gamma=snr_gamma)
    loss, seen = captured_loss(step, monkeypatch)
    latents, noise, timesteps, pred = seen["latents"], seen["noise"], seen["timesteps"], seen["pred"]
    target = noise if prediction_type == "epsilon" else step.noise_scheduler.get_velocity(latents, noise, timesteps)
    model_pred, model_pred_prior = torch.chunk(pred, 2)
    target, target_prior = torch.chunk(target, 2)
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    if snr_gamma is None:
        instance_loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(step.noise_scheduler, timesteps[:2])
        weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / snr + 1  # upstream SDXL's v form
        per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        instance_loss = (per_sample * weights).mean()
    assert torch.allclose(loss, instance_loss + 0.7 * prior_loss, rtol=1e-5)
    assert torch.allclose(seen["loss_retention"], prior_loss, rtol=1e-5)


def test_difftuning_draws_subject_late_and_class_early(tiny_sd, monkeypatch):
    """--difftuning: subject rows at psi timesteps, class rows at xi (over many steps: means near 2T/3 and T/3),
    the class rows carry the class prompt and bank latents."""
    step = step_for(tiny_sd, difftuning=True)
    subject_t, class_t = [], []
    for _ in range(60):
        _, seen = captured_loss(step, monkeypatch)
        subject_t += seen["timesteps"][:2].tolist()
        class_t += seen["timesteps"][2:].tolist()
    assert sum(subject_t) / len(subject_t) > 550 and sum(class_t) / len(class_t) < 450
    for row in seen["latents"][2:]:  # bank rows: posterior samples (std 0.01) of bank samples
        assert min((row - mean).abs().max() for mean in step.bank.means) < 0.1


def test_sdxl_time_ids_follow_resize_and_crop(subject, tmp_path):
    """SDXL's micro-conditioning: the original size, the crop's top-left in the resized image, the target size."""
    from train_dreambooth_lora_difftuning import InstanceImages

    path = str(tmp_path / "tall.png")
    Image.new("RGB", (40, 48)).save(path)  # width 40, height 48 -> resized to 32x38, centre crop top 3
    args = argparse.Namespace(image_column="image", resolution=32, seed=0, center_crop=True, random_flip=False,
                                 image_interpolation_mode="lanczos")
    item = InstanceImages([{"image": Image.open(path)}], args, [0], 1)[tp.SampleKey(0, 0)]
    assert item["time_ids"].tolist() == [48, 40, 3, 0, 32, 32]
    assert item["pixel_values"].shape == (3, 32, 32)


def test_bad_inputs_refused_in_one_sentence(tiny_sd, subject, tmp_path):
    """Bad data is refused before the first step, naming the flag or file, with nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    line = error_line(run_script(SCRIPT, base_args(tiny_sd, str(empty), out), ok=False))
    assert "--instance_data_dir" in line and "no image files" in line and not os.path.exists(out)
    broken = tmp_path / "broken"
    shutil.copytree(subject, broken)
    (broken / "bad.png").write_bytes(b"not a png")
    line = error_line(run_script(SCRIPT, base_args(tiny_sd, str(broken), out), ok=False))
    assert "bad.png" in line and not os.path.exists(out)


def write_class_images(folder: str, names: list[str], sizes: list[tuple[int, int]] | None = None) -> dict[str, bytes]:
    """Class images of the test's own (noise, each (width, height) of ``sizes``, 32x32 by default); returns the
    folder's files and bytes."""
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        width, height = sizes[i] if sizes else (32, 32)
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, name))
    return folder_bytes(folder)


def folder_bytes(folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path: bytes)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def prior_args(model: str, subject: str, out: str, class_dir: str, *extra: str) -> list[str]:
    return base_args(model, subject, out, steps=1) + ["--with_prior_preservation", "--class_prompt", "a circle",
                                                      "--class_data_dir", class_dir, *extra]


@pytest.mark.parametrize("difftuning", [[], ["--difftuning"]], ids=["upstream", "difftuning"])
def test_class_images_in_the_folder_are_used_as_they_are(tiny_sd, subject, tmp_path, monkeypatch, difftuning):
    """A --class_data_dir filled by upstream ("<index>-<sha1>.jpg") or holding a regularisation set (any names,
    sizes) is used as it is, with or without --difftuning: nothing generated, nothing written into it, and the class
    rows replay the VAE encoding of those very images (centre-cropped; SDXL ids from each image's size)."""
    from diffusers import AutoencoderKL

    import train_dreambooth_lora_difftuning as script

    class_dir = str(tmp_path / "class")
    names = [f"0-{'a' * 40}.jpg", f"1-{'b' * 40}.jpg", "photo.png"]
    before = write_class_images(class_dir, names, [(32, 32), (32, 32), (48, 32)])
    monkeypatch.setattr(script, "class_image_writer", lambda *a: lambda indices: pytest.fail("generated an image"))
    built = {}
    class_image_bank = dt.class_image_bank
    monkeypatch.setattr(dt, "class_image_bank", lambda *a, **k: built.setdefault("bank", class_image_bank(*a, **k)))
    script.main(script.parse_args(prior_args(tiny_sd, subject, str(tmp_path / "out"), class_dir, "--num_class_images",
                                             "3", *difftuning)))
    assert folder_bytes(class_dir) == before
    bank, sizes = built["bank"]
    assert sizes == [(32, 32), (32, 32), (32, 48)]
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    for i, name in enumerate(names):
        left = 8 if i == 2 else 0  # the 48x32 image's centre crop
        pixels = np.asarray(Image.open(os.path.join(class_dir, name)).convert("RGB"), dtype=np.float32)
        pixels = torch.from_numpy(pixels[:, left:left + 32]).permute(2, 0, 1)[None] / 127.5 - 1
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        assert torch.allclose(bank.posterior_mean[i, 0], expected[0], atol=1e-5)
        assert torch.allclose(bank.posterior_mean[i, 1], vae.encode(pixels.flip(-1)).latent_dist.mean[0].detach()
                              * vae.config.scaling_factor, atol=1e-5)


def test_missing_class_images_generated_and_named_as_upstream(tiny_sd, subject, tmp_path):
    """A folder with fewer than --num_class_images gets only the missing ones, numbered on from the images there and
    named "<index>-<sha1>.jpg" as upstream names them; the images there are left as they were."""
    class_dir = str(tmp_path / "class")
    before = write_class_images(class_dir, ["a.png", "b.png"])
    run_script(SCRIPT, prior_args(tiny_sd, subject, str(tmp_path / "out"), class_dir, "--num_class_images", "4",
                                  "--sample_batch_size", "1"))
    after = folder_bytes(class_dir)
    assert {k: v for k, v in after.items() if k in before} == before
    new = sorted(set(after) - set(before))
    assert [n.split("-")[0] for n in new] == ["2", "3"] and all(re.fullmatch(r"\d-[0-9a-f]{40}\.jpg", n) for n in new)
    assert all(Image.open(os.path.join(class_dir, n)).format == "JPEG" for n in new)
    assert os.listdir(str(tmp_path / "class.knowledge_bank"))  # the encodings, beside the folder


def test_class_image_writer_names_files_as_upstream(tmp_path):
    """Each generated image is saved as "<index>-<sha1 of its pixels>.jpg", from one pipeline call per batch with the
    class prompt, the resolution, the bank's steps and guidance and the family's prompt encoding (T5's length)."""
    import argparse

    import train_dreambooth_lora_difftuning as script

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    calls = []

    def pipeline(prompts, **kwargs):
        calls.append((prompts, kwargs))
        return argparse.Namespace(images=images)

    args = argparse.Namespace(class_data_dir=str(tmp_path / "class"), class_prompt="a circle", resolution=32,
                              knowledge_bank_seed=0, knowledge_bank_num_inference_steps=3)
    family = argparse.Namespace(call_kwargs={"max_sequence_length": 77})
    os.makedirs(args.class_data_dir)  # (dt.class_image_bank makes it before it writes)
    script.class_image_writer(args, pipeline, family, 5.0)([7, 8])
    prompts, kwargs = calls[0]
    assert prompts == ["a circle"] * 2 and kwargs["max_sequence_length"] == 77 and kwargs["height"] == 32
    assert kwargs["num_inference_steps"] == 3 and kwargs["guidance_scale"] == 5.0
    assert sorted(os.listdir(args.class_data_dir)) == [f"{i}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg"
                                                       for i, image in zip((7, 8), images, strict=True)]


def test_class_image_cache_keyed_on_images_and_vae(tiny_sd, subject, tmp_path):
    """The encodings are reused across --seed, --num_class_images, --sample_batch_size and precision (nothing
    re-encoded, no refusal); a new image is encoded alone; another VAE encodes the images again, beside the first."""
    from diffusers import AutoencoderKL

    import train_dreambooth_lora_difftuning as script

    class_dir, cache = str(tmp_path / "class"), str(tmp_path / "class.knowledge_bank")
    write_class_images(class_dir, ["0.png", "1.png", "2.png"])
    run = lambda *flags: script.main(script.parse_args(prior_args(  # noqa: E731
        tiny_sd, subject, str(tmp_path / "out"), class_dir, "--num_class_images", "3", *flags)))
    run()
    cached = folder_bytes(cache)
    assert len([f for f in cached if f.endswith(".safetensors")]) == 2  # 3 images, --sample_batch_size 2
    run_script(SCRIPT, prior_args(tiny_sd, subject, str(tmp_path / "out"), class_dir, "--seed", "7",
                                  "--num_class_images", "2", "--sample_batch_size", "1", "--mixed_precision", "bf16"))
    assert folder_bytes(cache) == cached
    write_class_images(class_dir, ["0.png", "1.png", "2.png", "3.png"])
    run("--num_class_images", "4")
    grown = folder_bytes(cache)
    assert {k: v for k, v in grown.items() if k in cached and k.endswith(".safetensors")} == {
        k: v for k, v in cached.items() if k.endswith(".safetensors")}
    assert len([f for f in grown if f.endswith(".safetensors")]) == 3  # the fourth image, encoded alone
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.1)
    vae.save_pretrained(str(tmp_path / "other_vae"))
    run("--num_class_images", "4", "--pretrained_vae_model_name_or_path", str(tmp_path / "other_vae"))
    folders = sorted(d for d in os.listdir(cache) if d.startswith("encoded-"))
    assert len(folders) == 2 and {k: v for k, v in folder_bytes(cache).items() if k in grown and k != ".lock"} == {
        k: v for k, v in grown.items() if k != ".lock"}


def test_bad_class_folders_refused_before_any_model_loads(subject, tmp_path):
    """A --class_data_dir holding this script's former latent bank, or a damaged image, is refused in one sentence
    before any model loads (not after hours of generating the missing images), and left as it was."""
    from train_dreambooth_lora_difftuning import parse_args

    old = tmp_path / "bank"
    old.mkdir()
    (old / "manifest.json").write_text('{"format_version": 2}')
    with pytest.raises(dt.ConfigError, match="holds class samples as latents, written by an earlier version"):
        parse_args(prior_args("unused-model", subject, str(tmp_path / "out"), str(old)))
    assert os.listdir(old) == ["manifest.json"]
    damaged = str(tmp_path / "damaged")
    before = write_class_images(damaged, ["0.png", "1.png"])
    with open(os.path.join(damaged, "1.png"), "r+b") as f:
        f.truncate(100)
    before["1.png"] = before["1.png"][:100]
    with pytest.raises(dt.ConfigError, match=r"--class_data_dir: .*1\.png is not a readable image"):
        parse_args(prior_args("unused-model", subject, str(tmp_path / "out"), damaged))
    assert folder_bytes(damaged) == before and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flags, message", [
    (["--instance_prompt", ""], "--instance_prompt is required"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--lora_dropout", "1"], r"--lora_dropout must be in \[0, 1\)"),
    (["--lora_blocks", "1,x"], "--lora_blocks takes comma-separated block numbers"),
    (["--lora_layers", "to_q", "--lora_target_modules", "to_k"], "--lora_layers and --lora_target_modules name"),
    (["--train_text_encoder", "--pre_compute_text_embeddings"], "--pre_compute_text_embeddings releases the text"),
    (["--text_encoder_lr", "0"], "--text_encoder_lr must be > 0"),
    (["--validation_images", "a.png", "b.png"], "--validation_images: images to upscale .* DeepFloyd IF"),
    (["--class_labels_conditioning", "timesteps"], "--class_labels_conditioning: the timestep class labels"),
    (["--do_edm_style_training"], "--do_edm_style_training: EDM-style training"),
    (["--enable_npu_flash_attention"], "--enable_npu_flash_attention: Ascend NPU"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
    (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
    (["--num_class_images", "0"], "--num_class_images must be >= 1"),
    (["--dataset_name", "x"], "Specify only one of --dataset_name or --instance_data_dir"),
    (["--difftuning_tau", "-1"], "--difftuning_tau must be >= 0"),
])
def test_bad_flags_fail_fast(subject, tmp_path, flags, message):
    from train_dreambooth_lora_difftuning import parse_args

    with pytest.raises(dt.ConfigError, match=message):
        parse_args(base_args("unused-model", subject, str(tmp_path / "out")) + flags)
    assert not os.path.exists(tmp_path / "out")


def test_help_has_no_bank_mix_flags():
    """The class-sample flags of diffusers' DreamBooth take the places of the DiT script's bank flags."""
    from train_dreambooth_lora_difftuning import build_parser

    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {"--with_prior_preservation", "--prior_loss_weight", "--num_class_images", "--difftuning"} <= flags
    assert not flags & {"--retention_ratio", "--retention_weight", "--knowledge_bank_size", "--knowledge_bank_dir",
                        "--knowledge_bank_replay"}  # (class images are replayed as their encodings)


def test_diverging_run_stops_in_one_sentence_before_saving(tiny_sd, subject, tmp_path):
    """A learning rate that blows the weights up stops the run at the next loss read (every checkpoint is preceded
    by one) in one sentence naming the step: no non-finite LoRA is saved or checkpointed."""
    out = str(tmp_path / "out")
    args = base_args(tiny_sd, subject, out) + ["--learning_rate", "1e30", "--logging_steps", "100"]
    line = error_line(run_script(SCRIPT, args, ok=False))
    assert "non-finite by step 2" in line and "--learning_rate" in line
    assert not os.path.exists(os.path.join(out, LORA_FILE)) and not os.path.exists(os.path.join(out, "checkpoint-2"))


@pytest.mark.parametrize("flag, value", [("--learning_rate", "inf"), ("--learning_rate", "nan"),
                                         ("--difftuning_tau", "nan"), ("--snr_gamma", "inf")])
def test_non_finite_numbers_refused(subject, tmp_path, flag, value):
    from train_dreambooth_lora_difftuning import parse_args

    with pytest.raises(dt.ConfigError, match=f"{flag} must be a finite number, got {value}"):
        parse_args(base_args("unused-model", subject, str(tmp_path / "out")) + [flag, value])


def _flow_prior_step(pipe, family, scheduler, latent_shape: list[int], weighting_scheme: str, precondition: bool):
    """Two subject latents, two bank (class) latents and the DreamBoothStep of a flow-matching pipeline without
    Diff-Tuning (tau 0: upstream's shared draw), prior loss weight 0.7."""
    from train_dreambooth_lora_difftuning import DreamBoothStep

    instance = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(4))
    class_latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(5))
    bank = dt.KnowledgeBank(class_latents, ["a circle"] * 2, {}, torch.stack([class_latents, class_latents], 1),
                            torch.zeros(2, 2, *latent_shape))
    prompt_ids = family.tokenize(["a red square", "a circle"])
    with torch.no_grad():
        table = family.encode(prompt_ids)
    base = dt.flow_base_probs(len(scheduler.sigmas), weighting_scheme)
    step = DreamBoothStep(family=family, denoiser=pipe.transformer, vae=None, noise_scheduler=scheduler,
                          psi=dt.FlowTimestepSampler(scheduler.sigmas, base, 0.0, "adaptation"),
                          xi=dt.FlowTimestepSampler(scheduler.sigmas, base, 0.0, "retention"),
                          weighting_scheme=weighting_scheme, precondition_outputs=precondition, prompt_ids=prompt_ids,
                          prompt_table=table, prior_loss_weight=0.7, snr_gamma=None, weight_dtype=torch.float32,
                          bank=dt.BankReplay(bank, "images", False, 2, 0, 0, "cpu"), bank_prompt_row=1,
                          bank_time_ids=mf.time_ids((32, 32), (0, 0), 32).expand(2, -1))
    return instance, class_latents, step


@pytest.mark.parametrize("weighting_scheme, precondition", [("logit_normal", True), ("cosmap", False)])
def test_sd3_prior_preservation_loss_matches_diffusers(tiny_sd3, weighting_scheme, precondition):
    """SD3 without --difftuning is diffusers' train_dreambooth_lora_sd3.py loss on the same batch: sigma from the
    scheduler's table, x_sigma = (1 - sigma) x + sigma noise, the preconditioned x0 estimate (or the velocity)
    against its target, --weighting_scheme's loss weights, instance + prior_loss_weight * prior."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3


    pipe = load_pipeline(tiny_sd3)
    family = mf.family_class(type(pipe).__name__)(pipe)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    instance, class_latents, step = _flow_prior_step(pipe, family, scheduler, [4, 8, 8], weighting_scheme,
                                                     precondition)
    seen: dict = {}
    handle = pipe.transformer.register_forward_hook(
        lambda _m, _a, kw, out: seen.update(noisy=kw["hidden_states"], t=kw["timestep"], pred=out[0]), with_kwargs=True)
    batch = {"latent_mean": instance, "latent_std": torch.zeros_like(instance), "prompt_rows": torch.tensor([0, 0]),
             "time_ids": mf.time_ids((32, 32), (0, 0), 32).expand(2, -1)}
    with torch.no_grad():
        loss, logs = step.loss(batch, tp.StepGenerator(3, 0))
    handle.remove()
    # upstream's formula from what the transformer saw
    x = torch.cat([instance, class_latents])
    sigmas = (seen["t"] / scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
    entries = (scheduler.timesteps[:, None] == seen["t"]).int().argmax(0)  # the timesteps are table entries
    assert torch.allclose(sigmas.flatten(), scheduler.sigmas[entries])
    noise = (seen["noisy"] - (1 - sigmas) * x) / sigmas
    model_pred = seen["pred"] * -sigmas + seen["noisy"] if precondition else seen["pred"]
    target = x if precondition else noise - x
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    per_row = (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(4, -1).mean(1)
    assert torch.allclose(loss, per_row[:2].mean() + 0.7 * per_row[2:].mean(), rtol=1e-4)


@pytest.mark.parametrize("weighting_scheme", ["none", "cosmap"])
def test_flux_prior_preservation_loss_matches_diffusers(tiny_flux, monkeypatch, weighting_scheme):
    """Flux without --difftuning is diffusers' train_dreambooth_lora_flux.py loss on the same batch: the prompts as
    the pipeline encodes them (T5's hidden states, CLIP's pooled output, zero text ids), x_sigma from the scheduler's
    unshifted table packed 2x2 with its image ids, timestep = t / 1000, guidance 3.5, the prediction unpacked and
    compared with noise - latents, --weighting_scheme's loss weights, instance + prior_loss_weight * prior."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3


    pipe = load_pipeline(tiny_flux)
    family = mf.FluxFamily(pipe, max_sequence_length=16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert torch.allclose(scheduler.sigmas, torch.arange(1000, 0, -1) / 1000)  # dynamic shifting: none at training
    # 32 px through an 8x VAE: 16 channels of 4x4
    instance, class_latents, step = _flow_prior_step(pipe, family, scheduler, [16, 4, 4], weighting_scheme, False)
    seen: dict = {}
    handle = pipe.transformer.register_forward_hook(lambda _m, _a, kw, out: seen.update(kw, pred=out[0]),
                                                    with_kwargs=True)
    step_rng, draws = tp.StepGenerator(3, 0), []
    randn = step_rng.randn
    monkeypatch.setattr(step_rng, "randn", lambda *a, **kw: draws.append(randn(*a, **kw)) or draws[-1])
    batch = {"latent_mean": instance, "latent_std": torch.zeros_like(instance), "prompt_rows": torch.tensor([0, 0]),
             "time_ids": mf.time_ids((32, 32), (0, 0), 32).expand(2, -1)}
    with torch.no_grad():
        loss, _ = step.loss(batch, step_rng)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(["a red square"] * 2 + ["a circle"] * 2,
                                                             max_sequence_length=16)
    handle.remove()
    # upstream's step, by hand, on the same latents, noise and timesteps
    x, noise = torch.cat([instance, class_latents]), draws[-1]  # the step's last draw is the noise
    entries = (scheduler.timesteps[:, None] - seen["timestep"] * 1000).abs().argmin(0)
    assert torch.allclose(seen["timestep"], scheduler.timesteps[entries] / 1000)
    sigmas = scheduler.sigmas[entries].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x + sigmas * noise
    assert torch.allclose(seen["hidden_states"], FluxPipeline._pack_latents(noisy, 4, 16, 4, 4))
    assert torch.equal(seen["img_ids"], FluxPipeline._prepare_latent_image_ids(4, 2, 2, "cpu", torch.float32))
    assert torch.equal(seen["txt_ids"], text_ids) and torch.equal(seen["guidance"], torch.full((4,), 3.5))
    assert torch.allclose(seen["encoder_hidden_states"], prompt_embeds)
    assert torch.allclose(seen["pooled_projections"], pooled)
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    model_pred = FluxPipeline._unpack_latents(seen["pred"], 4 * vae_scale_factor, 4 * vae_scale_factor,
                                              vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    per_row = (weighting.float() * (model_pred.float() - (noise - x).float()) ** 2).reshape(4, -1).mean(1)
    assert torch.allclose(loss, per_row[:2].mean() + 0.7 * per_row[2:].mean(), rtol=1e-5)


def test_family_flags_refused_on_the_other_family(tiny_sd, tiny_sd3, tiny_flux, subject, tmp_path):
    """Another family's flags are refused in one sentence before anything is written (or loaded): flow-matching flags
    on a DDPM model, Min-SNR on a flow-matching one, Flux's guidance on SD3, SD3's preconditioning on Flux, and a Flux
    resolution its 2x2 latent packing cannot cut."""
    import train_dreambooth_lora_difftuning as script

    for model, flags, words in (
            (tiny_sd, ["--weighting_scheme", "mode"], "--weighting_scheme: flow-matching flags"),
            (tiny_sd3, ["--snr_gamma", "5"], "--snr_gamma (Min-SNR) is for DDPM models"),
            (tiny_sd3, ["--guidance_scale", "3.5"], "--guidance_scale: Flux's flag"),
            (tiny_sd, ["--guidance_scale", "2"], "--guidance_scale: Flux's flag"),
            (tiny_flux, ["--precondition_outputs", "1"], "--precondition_outputs: SD3's flag"),
            (tiny_flux, ["--snr_gamma", "5"], "--snr_gamma (Min-SNR) is for DDPM models"),
            (tiny_flux, ["--resolution", "40"], "--resolution 40 is not a multiple of 16")):
        out = str(tmp_path / "out")
        with pytest.raises(dt.ConfigError, match=re.escape(words)):
            script.main(script.parse_args(base_args(model, subject, out) + flags))
        assert not os.path.exists(out)


def test_family_defaults_follow_upstream(subject, tmp_path):
    """Unset family flags take each upstream script's default: SD3 logit-normal, preconditioned, 77 T5 tokens; Flux
    uniform, not preconditioned, 512 T5 tokens, guidance 3.5, upstream's twelve LoRA targets."""
    from train_dreambooth_lora_difftuning import check_family_flags, parse_args

    for family, expected in ((mf.StableDiffusion3Family, ("logit_normal", 1, 77, None)),
                             (mf.FluxFamily, ("none", None, 512, 3.5))):
        args = parse_args(base_args("unused-model", subject, str(tmp_path / "out")))
        check_family_flags(args, family)
        assert (args.weighting_scheme, args.precondition_outputs, args.max_sequence_length,
                args.guidance_scale) == expected
    assert len(args.lora_target_modules.split(",")) == 12 and "ff_context.net.0.proj" in args.lora_target_modules
