"""End-to-end tests of train_dit_difftuning.py: the real script, tiny models, a few steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, TOKEN, TWO_PROCESSES, assert_no_token, error_line, files_uploaded, run_script
from safetensors.torch import load_file

import difftuning_utils as dt
import training_plumbing as tp
from benchmark.tiny_models import make_image_folder, make_tiny_dit_pipeline

SCRIPT = os.path.join(ROOT, "train_dit_difftuning.py")


def base_args(model: str, data: str, out: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--train_batch_size", "5", "--max_train_steps", str(steps), "--checkpointing_steps", "100",
            "--seed", "3", "--report_to", "none", "--validation_num_inference_steps", "3",
            "--num_validation_images", "1", "--knowledge_bank_size", "6", "--knowledge_bank_batch_size", "3",
            "--knowledge_bank_num_inference_steps", "3"]


def run(args: list[str], launcher: list[str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, launcher, ok)


def load_and_generate(out: str, label: str) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DiTPipeline"
    assert set(pipe.labels) == {"circle", "square", "cross"}
    ids = pipe.get_label_ids([label])
    assert ids == [sorted(pipe.labels).index(label)]  # rows 0..K-1 in the dataset's class order
    images = pipe(class_labels=ids, guidance_scale=4.0, num_inference_steps=2,
                  generator=torch.manual_seed(0)).images
    assert images[0].size == (32, 32)


@pytest.mark.parametrize("extra", [
    pytest.param([], id="standard"),
    pytest.param(["--difftuning", "--use_ema"], id="difftuning-ema"),
    pytest.param(["--difftuning", "--finetune", "lora", "--rank", "2"], id="lora-difftuning"),
    pytest.param(["--difftuning", "--finetune", "difffit", "--timestep_sampling", "weighting"],
                 id="difffit-difftuning"),
    pytest.param(["--finetune", "bitfit"], id="bitfit"),
    pytest.param(["--difftuning", "--authors_recipe", "--cache_latents"], id="authors-recipe-cached-latents"),
])
def test_train_save_reload_generate(tiny_dit, image_folder, tmp_path, extra):
    out = str(tmp_path / "out")
    run(base_args(tiny_dit, image_folder, out) + extra + ["--validation_class_labels", "square",
                                                          "--validation_steps", "2"])
    load_and_generate(out, "square")
    assert os.path.exists(os.path.join(out, "README.md")) and os.path.exists(os.path.join(out, "samples.png"))
    card = open(os.path.join(out, "README.md")).read()
    assert ("Diff-Tuning (psi tau" in card) == ("--difftuning" in extra)
    assert str(tmp_path) not in card and os.path.dirname(tiny_dit) not in card  # no local path reaches the Hub
    assert f'from_pretrained("{os.path.basename(out)}")' in card
    base = load_file(os.path.join(tiny_dit, "transformer", "diffusion_pytorch_model.safetensors"))
    tuned = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    assert base.keys() == tuned.keys()  # plain DiT keys: LoRA merged, DiffFit gammas folded in
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed, "training changed no weight"
    if "bitfit" in extra:
        assert all(k.endswith(".bias") for k in changed)
    if "lora" in extra:
        assert all(k.split(".")[-2] in {"to_q", "to_k", "to_v", "0"} for k in changed)
        adapter = load_file(os.path.join(out, "transformer_lora", "adapter_model.safetensors"))
        assert adapter and all("lora_" in k for k in adapter)
    if "--difftuning" in extra:
        manifest = json.load(open(os.path.join(out, "knowledge_bank", "manifest.json")))
        assert manifest["complete"] and manifest["count"] == 6 and manifest["latent_shape"] == [4, 8, 8]
        assert manifest["format_version"] == 2 and manifest["settings"]["vae_fingerprint"]
        assert os.path.exists(os.path.join(out, "knowledge_bank", "preview.png"))


def test_difffit_export_matches_training_model(tiny_dit):
    """Folding DiffFit gammas into the output projections gives the same function."""
    import argparse

    from diffusers import DiTTransformer2DModel

    import train_dit_difftuning as script

    model = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer")
    script.configure_finetuning(model, argparse.Namespace(finetune="difffit"))
    gammas = {n: p.shape for n, p in model.named_parameters() if "difffit_gamma" in n}
    width = model.config.num_attention_heads * model.config.attention_head_dim
    assert gammas == {  # the authors' four, in the first half of the blocks (here 1 of 2)
        "transformer_blocks.0.difffit_gamma_qkv": (3 * width,), "transformer_blocks.0.difffit_gamma_proj": (width,),
        "transformer_blocks.0.difffit_gamma_attn": (width,), "transformer_blocks.0.difffit_gamma_ff": (width,)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "difffit_gamma" in name:
                param.uniform_(0.5, 1.5)
    exported = script.export_transformer(model, "difffit")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 1000])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y).sample, exported(x, t, y).sample, atol=1e-5)


def test_bank_holds_what_encoding_its_saved_images_gives(tiny_dit, image_folder, tmp_path):
    """The authors' bank is a folder of PNGs, replayed through the data pipeline (flip, VAE encode). Ours
    keeps, per sample, the posterior of exactly that: decoded, saved as 8-bit PNG, re-read, (flipped,)
    encoded. Checked here against that path, written out step by step."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from difftuning_utils import load_knowledge_bank
    from training_plumbing import decode_latents, preprocess_image

    bank_dir = str(tmp_path / "bank")
    run(base_args(tiny_dit, image_folder, str(tmp_path / "o"), steps=1) + ["--difftuning", "--knowledge_bank_dir",
                                                                           bank_dir])
    bank = load_knowledge_bank(bank_dir)
    vae = AutoencoderKL.from_pretrained(tiny_dit, subfolder="vae")
    for i, image in enumerate(decode_latents(vae, bank.latents)):
        image.save(tmp_path / f"{i}.png")
        pixels = preprocess_image(Image.open(tmp_path / f"{i}.png"), 32, True, False, np.random.default_rng(0))
        for view, x in enumerate((pixels, pixels.flip(-1))):
            with torch.no_grad():
                posterior = vae.encode(x[None]).latent_dist
            scale = vae.config.scaling_factor
            assert torch.allclose(bank.posterior_mean[i, view], posterior.mean[0] * scale, atol=1e-5)
            assert torch.allclose(bank.posterior_std[i, view], posterior.std[0] * scale, atol=1e-5)


def test_ema_decay_schedules():
    import argparse

    import train_dit_difftuning as script

    params = [torch.nn.Parameter(torch.zeros(3))]
    constant = script.make_ema(params, argparse.Namespace(ema_decay=0.9999, ema_warmup=False))
    assert [constant.get_decay(s) for s in (1, 2, 100, 10**6)] == [0.9999] * 4
    warm = script.make_ema(params, argparse.Namespace(ema_decay=0.9999, ema_warmup=True))
    assert warm.get_decay(1) == 0.0 and warm.get_decay(11) == pytest.approx(11 / 20)
    # one update from the pre-trained value 0 toward 1: decay 0.9999 moves it by 1e-4
    with torch.no_grad():
        params[0].fill_(1.0)
    constant.step(params)
    assert torch.allclose(constant.shadow_params[0], torch.full((3,), 1e-4))


def test_authors_recipe_sets_defaults_that_flags_override():
    import train_dit_difftuning as script

    common = ["--train_data_dir", os.path.join(ROOT, "docs"), "--output_dir", "x"]
    ours, theirs = script.parse_args(common), script.parse_args(common + ["--authors_recipe"])
    assert (ours.use_ema, ours.ema_warmup, ours.max_grad_norm, ours.random_flip) == (False, True, 1.0, False)
    assert (theirs.use_ema, theirs.ema_warmup, theirs.max_grad_norm, theirs.random_flip) == (True, False, 0.0, True)
    assert theirs.knowledge_bank_replay == "images" and theirs.ema_decay == 0.9999 and theirs.center_crop
    mixed = script.parse_args(common + ["--authors_recipe", "--max_grad_norm", "2", "--no-random_flip"])
    assert mixed.max_grad_norm == 2.0 and not mixed.random_flip and mixed.use_ema


def test_per_block_label_dropout_disabled(tiny_dit):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    import training_plumbing as tp

    model = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer").train()
    assert any(m.dropout_prob > 0 for m in model.modules() if isinstance(m, LabelEmbedding))
    tp.disable_per_block_label_dropout(model)
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 50), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # train mode, yet deterministic: no block drops labels on its own
        assert torch.equal(model(x, t, y).sample, model(x, t, y).sample)


@pytest.mark.parametrize("extra", [[], ["--cache_latents", "--center_crop"]], ids=["pixels", "cached-latents"])
def test_resume_equals_straight_run(tiny_dit, image_folder, tmp_path, extra):
    """Stopped at step 3 and resumed gives bit-identical weights (EMA, bank replay, accumulation,
    epoch boundaries crossed: 12 images, 4 target samples a batch, 2 batches a step)."""
    bank = str(tmp_path / "bank")
    args = extra + ["--difftuning", "--use_ema", "--gradient_accumulation_steps", "2", "--random_flip",
            "--knowledge_bank_dir", bank, "--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--logging_steps",
            "4"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(base_args(tiny_dit, image_folder, straight, steps=6) + args)
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    run(base_args(tiny_dit, image_folder, resumed, steps=6) + args + ["--resume_from_checkpoint", "latest"])
    a = load_file(os.path.join(straight, "transformer", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(resumed, "transformer", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(os.path.join(tiny_dit, "transformer", "diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], base[k]) for k in a)


def test_compiled_model_saves_plain_weights(tiny_dit, image_folder, tmp_path):
    """`accelerate launch --dynamo_backend ...` compiles the transformer (here with dynamo's eager backend, which
    needs no compiler): checkpoints and the saved pipeline still hold the plain module's keys."""
    out = str(tmp_path / "out")
    run_script(SCRIPT, base_args(tiny_dit, image_folder, out, steps=2) + ["--difftuning", "--checkpointing_steps", "1"],
               env={"ACCELERATE_DYNAMO_BACKEND": "EAGER"})
    base = load_file(os.path.join(tiny_dit, "transformer", "diffusion_pytorch_model.safetensors"))
    tuned = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    assert base.keys() == tuned.keys()
    assert set(load_file(os.path.join(out, "checkpoint-1", "model.safetensors"))) == set(base)
    load_and_generate(out, "square")


def test_checkpoint_limit_never_prunes_resume_source(tiny_dit, image_folder, tmp_path):
    out = str(tmp_path / "out")
    run(base_args(tiny_dit, image_folder, out, steps=2) + ["--checkpointing_steps", "1"])
    assert sorted(os.listdir(out)).count("checkpoint-1") == 1
    run(base_args(tiny_dit, image_folder, out, steps=4) + ["--checkpointing_steps", "1", "--checkpoints_total_limit",
                                                           "1", "--resume_from_checkpoint",
                                                           os.path.join(out, "checkpoint-1")])
    names = sorted(d for d in os.listdir(out) if d.startswith("checkpoint"))
    assert names == ["checkpoint-1", "checkpoint-4"]  # checkpoint-1 kept: it is the resume source


def test_two_processes_on_cpu(tiny_dit, image_folder, tmp_path):
    out = str(tmp_path / "out")
    proc = run(base_args(tiny_dit, image_folder, out, steps=2) + ["--difftuning", "--train_batch_size", "3",
                                                                  "--ddp_timeout", "120"], launcher=TWO_PROCESSES)
    assert "Distributed environment: DistributedType.MULTI_CPU" in proc.stderr and "Num processes: 2" in proc.stderr
    load_and_generate(out, "cross")
    manifest = json.load(open(os.path.join(out, "knowledge_bank", "manifest.json")))
    assert manifest["count"] == 6 and len(manifest["shards"]) == 2  # one shard built by each process


def test_push_to_hub_uploads_without_checkpoints(tiny_dit, image_folder, tmp_path, captured_hub, capfd):
    """The Hub is unreachable: capture create_repo/upload_folder and check what would be sent."""
    import train_dit_difftuning as script

    out = str(tmp_path / "out")
    args = script.parse_args(base_args(tiny_dit, image_folder, out, steps=2) + [
        "--difftuning", "--push_to_hub", "--hub_model_id", "me/dit-shapes", "--checkpointing_steps", "1",
        "--report_to", "tensorboard", "--hub_token", TOKEN])
    script.main(args)
    assert_no_token(out, *capfd.readouterr())
    assert captured_hub["create"]["repo_id"] == "me/dit-shapes"
    upload = captured_hub["upload"]
    assert upload["repo_id"] == "me/dit-shapes" and upload["folder_path"] == out
    sent = files_uploaded(upload)
    assert "model_index.json" in sent and "README.md" in sent
    assert any(p.startswith("transformer/") for p in sent)
    assert not any(p.startswith(("checkpoint-", "knowledge_bank")) for p in sent)
    assert any(p.startswith("checkpoint-1") for p in os.listdir(out))
    assert 'from_pretrained("me/dit-shapes")' in open(os.path.join(out, "README.md")).read()


# ---- Bad input: one sentence, exit code 2, nothing written ----------------------------------


def test_bad_input_exits_2_with_one_sentence(tiny_dit, image_folder, tmp_path):
    """The command-line contract, once through a real process: exit code 2, an 'error: ' line, no traceback.
    The other bad inputs are checked in-process (same code path: run_cli turns ConfigError into this)."""
    proc = run(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + ["--label_column", "kind"], ok=False)
    assert "--label_column 'kind' is not a column" in error_line(proc)


def main_error(args: list[str]) -> str:
    """Run the script in-process and return its one-sentence ConfigError."""
    import train_dit_difftuning as script
    from difftuning_utils import ConfigError

    with pytest.raises(ConfigError) as err:
        script.main(script.parse_args(args))
    return str(err.value)


def test_flat_image_folder_says_how_to_lay_it_out(tiny_dit, tmp_path):
    from PIL import Image

    data = tmp_path / "flat"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 0, 0)).save(data / f"{i}.png")
    message = main_error(base_args(tiny_dit, str(data), str(tmp_path / "o")))
    assert "--label_column 'label' is not a column" in message and "one sub-folder per class" in message


def test_unreadable_image(tiny_dit, tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    with open(os.path.join(data, "circle", "broken.png"), "wb") as f:
        f.write(b"not a png at all")
    message = main_error(base_args(tiny_dit, data, str(tmp_path / "o")))
    assert "broken.png" in message and "cannot be decoded" in message


def test_too_many_classes(tmp_path):
    model = make_tiny_dit_pipeline(str(tmp_path / "m"))
    cfg_path = os.path.join(model, "transformer", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_embeds_ada_norm"] = 2  # a label table with 2 classes + null
    json.dump(cfg, open(cfg_path, "w"))
    from diffusers import DiTTransformer2DModel

    DiTTransformer2DModel.from_config(cfg).save_pretrained(os.path.join(model, "transformer"))
    data = make_image_folder(str(tmp_path / "data"), per_class=2)
    assert "3 classes but the model's label table has only 2" in main_error(base_args(model, data,
                                                                                      str(tmp_path / "o")))


def test_wrong_resolution_names_the_one_that_fits(tiny_dit, image_folder, tmp_path):
    message = main_error(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + ["--resolution", "64"])
    assert "--resolution 64" in message and "use --resolution 32" in message


def test_missing_model_offline_says_so(image_folder, tmp_path):
    message = main_error(base_args("nobody/no-such-dit", image_folder, str(tmp_path / "o")))
    assert "--pretrained_model_name_or_path" in message and "not a local folder" in message
    assert "stack trace" not in message


def test_bank_from_another_model_refused(tiny_dit, image_folder, tmp_path):
    bank = str(tmp_path / "bank")
    run(base_args(tiny_dit, image_folder, str(tmp_path / "a"), steps=1)
        + ["--difftuning", "--knowledge_bank_dir", bank])
    other = make_tiny_dit_pipeline(str(tmp_path / "other"), seed=1)
    message = main_error(base_args(other, image_folder, str(tmp_path / "b"), steps=1)
                         + ["--difftuning", "--knowledge_bank_dir", bank])
    assert "fingerprint" in message and "--knowledge_bank_dir" in message
    assert json.load(open(os.path.join(bank, "manifest.json")))["complete"]  # the bank is left intact


def test_bank_shared_across_training_seeds(tiny_dit, image_folder, tmp_path):
    """--knowledge_bank_seed makes a bank independent of --seed: another training seed reuses it; without the
    flag the bank's seed is --seed, and the refusal names it."""
    bank = str(tmp_path / "bank")

    def args(out: str, seed: str) -> list[str]:
        flags = base_args(tiny_dit, image_folder, str(tmp_path / out), steps=1)
        flags[flags.index("--seed") + 1] = seed
        return flags + ["--difftuning", "--knowledge_bank_dir", bank]

    run(args("a", "1") + ["--knowledge_bank_seed", "5"])
    before = {f: open(os.path.join(bank, f), "rb").read() for f in os.listdir(bank)}
    result = run(args("b", "2") + ["--knowledge_bank_seed", "5"])
    assert "Reusing the knowledge bank" in result.stderr + result.stdout
    assert {f: open(os.path.join(bank, f), "rb").read() for f in os.listdir(bank)} == before
    assert "seed: 5 there, 2 now" in main_error(args("c", "2"))


def test_bank_uses_the_classes_the_base_model_knows(image_folder, tmp_path):
    """A base model with id2label (trained on 2 of its 1000 rows) gets a bank of those classes only."""
    from difftuning_utils import load_knowledge_bank

    model = make_tiny_dit_pipeline(str(tmp_path / "m"), id2label={3: "cat", 7: "dog"})
    bank = str(tmp_path / "bank")
    run(base_args(model, image_folder, str(tmp_path / "o"), steps=1) + ["--difftuning", "--knowledge_bank_dir", bank])
    assert set(load_knowledge_bank(bank).conditions) == {3, 7}


def test_resume_from_missing_checkpoint(tiny_dit, image_folder, tmp_path):
    import train_dit_difftuning as script
    from difftuning_utils import ConfigError

    with pytest.raises(ConfigError, match="--resume_from_checkpoint"):
        script.parse_args(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + [
            "--resume_from_checkpoint", str(tmp_path / "nope")])
    assert not os.path.exists(tmp_path / "o")


def test_xformers_without_a_usable_gpu_is_refused(tiny_dit, image_folder, tmp_path, monkeypatch):
    """Whatever this machine has, a machine without CUDA gets one clear sentence."""
    import train_dit_difftuning as script
    from difftuning_utils import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--enable_xformers_memory_efficient_attention needs"):
        script.parse_args(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + [
            "--enable_xformers_memory_efficient_attention"])


def test_bad_flags_fail_fast():
    import train_dit_difftuning as script
    from difftuning_utils import ConfigError

    common = ["--train_data_dir", os.path.join(ROOT, "docs"), "--output_dir", "x"]
    cases = [(["--retention_ratio", "1.5"], "--retention_ratio"), (["--resolution", "30"], "--resolution"),
             (["--difftuning_tau", "-1"], "--difftuning_tau"), (["--rank", "0", "--finetune", "lora"], "--rank"),
             (["--max_grad_norm", "-1"], "--max_grad_norm"), (["--ema_decay", "1"], "--ema_decay"),
             (["--cache_latents"], "--cache_latents.*--center_crop"), (["--logging_steps", "0"], "--logging_steps")]
    for bad, flag in cases:
        with pytest.raises(ConfigError, match=flag):
            script.parse_args(common + bad)
    assert script.parse_args(common + ["--max_grad_norm", "0"]).max_grad_norm == 0  # 0 = no clipping


def test_step_assembles_target_and_bank_rows(tiny_dit):
    """DiTStep.loss: target rows keep their labels at psi timesteps, bank rows get the null label at xi
    timesteps, one forward pass over both, and the loss is target + retention_weight * bank."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    from train_dit_difftuning import DiTStep

    pipe = DiffusionPipeline.from_pretrained(tiny_dit)
    transformer, null = pipe.transformer, pipe.transformer.config.num_embeds_ada_norm
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    bank = dt.KnowledgeBank(latents, [0, 1, 2], {}, torch.stack([latents, latents], 1), torch.zeros(3, 2, 4, 8, 8))
    step = DiTStep(transformer=transformer, vae=None, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                   vb=None, psi=dt.TimestepSampler(1000, 50.0, "adaptation"),
                   xi=dt.TimestepSampler(1000, 50.0, "retention"),
                   null_class=null, label_dropout_prob=0.0, retention_weight=0.3, use_weights=False,
                   bank=dt.BankReplay(bank, "images", False, 2, 0, 0, "cpu"))
    seen: dict = {}
    handle = transformer.register_forward_hook(
        lambda _m, _a, kw, out: seen.update(t=kw["timestep"], y=kw["class_labels"], pred=out.sample), with_kwargs=True)
    batch = {"latent_mean": latents[:2], "latent_std": torch.zeros(2, 4, 8, 8), "class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        loss, logs = step.loss(batch, tp.StepGenerator(0, 0))
    handle.remove()
    assert seen["y"].tolist() == [1, 2, null, null]
    assert (seen["t"][:2] > 900).all() and (seen["t"][2:] < 100).all()  # tau 50: psi at the noisy end, xi clean
    assert torch.allclose(loss, logs["loss_adaptation"] + 0.3 * logs["loss_retention"])

