"""End-to-end tests of train_dit_difftuning.py: the real script, tiny models, a few steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, TWO_PROCESSES, error_line, files_uploaded, run_script
from safetensors.torch import load_file
from tiny_models import make_image_folder, make_tiny_dit_pipeline

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
])
def test_train_save_reload_generate(tiny_dit, image_folder, tmp_path, extra):
    out = str(tmp_path / "out")
    run(base_args(tiny_dit, image_folder, out) + extra + ["--validation_class_labels", "square",
                                                          "--validation_steps", "2"])
    load_and_generate(out, "square")
    assert os.path.exists(os.path.join(out, "README.md")) and os.path.exists(os.path.join(out, "samples.png"))
    card = open(os.path.join(out, "README.md")).read()
    assert ("Diff-Tuning (psi tau" in card) == ("--difftuning" in extra)
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
        assert os.path.exists(os.path.join(out, "knowledge_bank", "preview.png"))


def test_difffit_export_matches_training_model(tiny_dit):
    """Folding DiffFit gammas into the output projections gives the same function."""
    import argparse

    from diffusers import DiTTransformer2DModel

    import train_dit_difftuning as script

    model = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer")
    script.configure_finetuning(model, argparse.Namespace(finetune="difffit"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "difffit_gamma" in name:
                param.uniform_(0.5, 1.5)
    exported = script.export_transformer(model, "difffit")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 1000])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y).sample, exported(x, t, y).sample, atol=1e-5)


def test_per_block_label_dropout_disabled(tiny_dit):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    import train_dit_difftuning as script

    model = DiTTransformer2DModel.from_pretrained(tiny_dit, subfolder="transformer").train()
    assert any(m.dropout_prob > 0 for m in model.modules() if isinstance(m, LabelEmbedding))
    script.disable_per_block_label_dropout(model)
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 50), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # train mode, yet deterministic: no block drops labels on its own
        assert torch.equal(model(x, t, y).sample, model(x, t, y).sample)


def test_resume_equals_straight_run(tiny_dit, image_folder, tmp_path):
    """Stopped at step 3 and resumed gives bit-identical weights (EMA, bank replay, accumulation,
    epoch boundaries crossed: 12 images, 4 target samples a batch, 2 batches a step)."""
    bank = str(tmp_path / "bank")
    args = ["--difftuning", "--use_ema", "--gradient_accumulation_steps", "2", "--random_flip",
            "--knowledge_bank_dir", bank, "--checkpointing_steps", "3", "--lr_scheduler", "cosine"]
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
    proc = run(base_args(tiny_dit, image_folder, out, steps=2) + ["--difftuning", "--train_batch_size", "3"],
               launcher=TWO_PROCESSES)
    assert "Distributed environment: DistributedType.MULTI_CPU" in proc.stderr and "Num processes: 2" in proc.stderr
    load_and_generate(out, "cross")
    manifest = json.load(open(os.path.join(out, "knowledge_bank", "manifest.json")))
    assert manifest["count"] == 6 and len(manifest["shards"]) == 2  # one shard built by each process


def test_push_to_hub_uploads_without_checkpoints(tiny_dit, image_folder, tmp_path, captured_hub):
    """The Hub is unreachable: capture create_repo/upload_folder and check what would be sent."""
    import train_dit_difftuning as script

    out = str(tmp_path / "out")
    args = script.parse_args(base_args(tiny_dit, image_folder, out, steps=2) + [
        "--difftuning", "--push_to_hub", "--hub_model_id", "me/dit-shapes", "--checkpointing_steps", "1"])
    script.main(args)
    assert captured_hub["create"]["repo_id"] == "me/dit-shapes"
    upload = captured_hub["upload"]
    assert upload["repo_id"] == "me/dit-shapes" and upload["folder_path"] == out
    sent = files_uploaded(upload)
    assert "model_index.json" in sent and "README.md" in sent
    assert any(p.startswith("transformer/") for p in sent)
    assert not any(p.startswith(("checkpoint-", "knowledge_bank")) for p in sent)
    assert any(p.startswith("checkpoint-1") for p in os.listdir(out))


# ---- Bad input: one sentence, exit code 2, nothing written ----------------------------------


def test_missing_label_column(tiny_dit, image_folder, tmp_path):
    proc = run(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + ["--label_column", "kind"], ok=False)
    assert "--label_column 'kind' is not a column" in error_line(proc)


def test_unreadable_image(tiny_dit, tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    with open(os.path.join(data, "circle", "broken.png"), "wb") as f:
        f.write(b"not a png at all")
    proc = run(base_args(tiny_dit, data, str(tmp_path / "o")), ok=False)
    line = error_line(proc)
    assert "broken.png" in line and "cannot be read" in line


def test_too_many_classes(tmp_path):
    model = make_tiny_dit_pipeline(str(tmp_path / "m"))
    cfg_path = os.path.join(model, "transformer", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_embeds_ada_norm"] = 2  # a label table with 2 classes + null
    json.dump(cfg, open(cfg_path, "w"))
    from diffusers import DiTTransformer2DModel

    DiTTransformer2DModel.from_config(cfg).save_pretrained(os.path.join(model, "transformer"))
    data = make_image_folder(str(tmp_path / "data"), per_class=2)
    proc = run(base_args(model, data, str(tmp_path / "o")), ok=False)
    assert "3 classes but the model's label table has only 2" in error_line(proc)


def test_bank_from_another_model_refused(tiny_dit, image_folder, tmp_path):
    bank = str(tmp_path / "bank")
    run(base_args(tiny_dit, image_folder, str(tmp_path / "a"), steps=1)
        + ["--difftuning", "--knowledge_bank_dir", bank])
    other = make_tiny_dit_pipeline(str(tmp_path / "other"), seed=1)
    proc = run(base_args(other, image_folder, str(tmp_path / "b"), steps=1)
               + ["--difftuning", "--knowledge_bank_dir", bank], ok=False)
    line = error_line(proc)
    assert "fingerprint" in line and "--knowledge_bank_dir" in line
    assert json.load(open(os.path.join(bank, "manifest.json")))["complete"]  # the bank is left intact


def test_bank_uses_the_classes_the_base_model_knows(image_folder, tmp_path):
    """A base model with id2label (trained on 2 of its 1000 rows) gets a bank of those classes only."""
    from difftuning_utils import load_knowledge_bank

    model = make_tiny_dit_pipeline(str(tmp_path / "m"), id2label={3: "cat", 7: "dog"})
    bank = str(tmp_path / "bank")
    run(base_args(model, image_folder, str(tmp_path / "o"), steps=1) + ["--difftuning", "--knowledge_bank_dir", bank])
    assert set(load_knowledge_bank(bank).conditions) == {3, 7}


def test_resume_from_missing_checkpoint(tiny_dit, image_folder, tmp_path):
    proc = run(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + [
        "--resume_from_checkpoint", str(tmp_path / "nope")], ok=False)
    assert "--resume_from_checkpoint" in error_line(proc)
    assert not os.path.exists(tmp_path / "o")


def test_xformers_unavailable(tiny_dit, image_folder, tmp_path):
    proc = run(base_args(tiny_dit, image_folder, str(tmp_path / "o")) + [
        "--enable_xformers_memory_efficient_attention"], ok=False)
    assert "--enable_xformers_memory_efficient_attention needs" in error_line(proc)


def test_bad_flags_fail_fast():
    import train_dit_difftuning as script
    from difftuning_utils import ConfigError

    common = ["--train_data_dir", ROOT, "--output_dir", "x"]
    cases = [(["--retention_ratio", "1.5"], "--retention_ratio"), (["--resolution", "30"], "--resolution"),
             (["--difftuning_tau", "-1"], "--difftuning_tau"), (["--rank", "0", "--finetune", "lora"], "--rank")]
    for bad, flag in cases:
        with pytest.raises(ConfigError, match=flag):
            script.parse_args(common + bad)
