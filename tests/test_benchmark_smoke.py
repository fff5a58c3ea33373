"""Smoke version of the miniature benchmark (a few steps, one arm pair), so it cannot rot.

Runs the real pipeline end to end: the shipped source model, the 10-shot MNIST folder, two
`train_dit_difftuning.py` runs, their evaluation, the table, and the chain-of-forgetting CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line

SOURCE = os.path.join(ROOT, "benchmark", "source_model")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_shipped_source_model_loads_and_knows_its_classes():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SOURCE)
    assert pipe.transformer.config.num_embeds_ada_norm == 1000  # 1001-row label table, null = 1000
    assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels  # learned sigma
    assert pipe.get_label_ids(["trouser"]) == [1]


@pytest.mark.parametrize("source, names", [("fashion_a", ["t-shirt/top", "trouser", "coat", "sandal", "ankle boot"]),
                                           ("fashion_b", ["pullover", "dress", "shirt", "sneaker", "bag"]),
                                           ("digits_a", ["0", "1", "2", "3", "4"])])
def test_shipped_half_sources(source, names):
    """Each decision pair's source knows its five classes (rows 0..4) and none of its target's, and its VAE is
    near-deterministic (posterior noise well below the spread of the latents)."""
    from diffusers import DiffusionPipeline

    folder = os.path.join(ROOT, "benchmark", f"{source}_source_model")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert sorted(pipe.labels, key=pipe.labels.get) == names and pipe.get_label_ids(names[-1:]) == [4]
    image = torch.full((1, 1, 32, 32), -1.0)
    image[..., 8:24, 10:22] = 0.6  # a grey garment-sized block on the sources' black background
    with torch.no_grad():
        posterior = pipe.vae.encode(image).latent_dist
    # Scaled latents spread ~0.6-0.9 per channel; the first miniature's noisy VAE had a posterior std of 0.71.
    assert (posterior.std * pipe.vae.config.scaling_factor).mean() < 0.1


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = str(tmp_path / "bench")
    cmd = [sys.executable, "-m", "benchmark.run_benchmark", "--output_dir", out,
           "--arms", "standard", "difftuning", "--seeds", "0", "--max_train_steps", "3", "--train_batch_size", "8",
           "--knowledge_bank_size", "8", "--knowledge_bank_num_inference_steps", "4", "--num_samples", "20",
           "--num_inference_steps", "4"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = open(os.path.join(out, "results.md")).read()
    assert "| standard | 1 |" in table and "| difftuning | 1 |" in table and "% vs standard" in table
    for arm in ("standard", "difftuning"):
        metrics = json.load(open(os.path.join(out, "runs", f"{arm}-seed0", "metrics.json")))
        assert metrics["num_generated"] == 20 and metrics["fid"] > 0 and 0 <= metrics["accuracy"] <= 1
        assert os.path.exists(os.path.join(out, "runs", f"{arm}-seed0", "eval_grid.png"))
    assert os.path.exists(os.path.join(out, "bank-seed0", "manifest.json"))

    # The table can be rebuilt from the finished runs, with their settings (not the runner's defaults)...
    proc = subprocess.run(cmd[:5] + ["--summarize_only"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 steps, batch 8" in proc.stdout and "4 DDPM steps" in proc.stdout and "| difftuning | 1 |" in proc.stdout
    # ...and a finished run is never silently reused for other settings: one sentence, nothing touched.
    metrics_path = os.path.join(out, "runs", "standard-seed0", "metrics.json")
    before = open(metrics_path).read()
    longer = cmd[:cmd.index("--max_train_steps") + 1] + ["4"] + cmd[cmd.index("--max_train_steps") + 2:]
    line = error_line(subprocess.run(longer, env=ENV, capture_output=True, text=True, timeout=300))
    assert "standard-seed0" in line and "--max_train_steps 3, not 4" in line
    assert open(metrics_path).read() == before

    # A sweep in its own folder is paired seed by seed with the plain runs of another (--baseline_dir)...
    sweep = tmp_path / "sweep"
    shutil.copytree(os.path.join(out, "runs", "difftuning-seed0"), sweep / "runs" / "difftuning-seed0")
    sweep_settings = sweep / "runs" / "difftuning-seed0" / "settings.json"
    stored = json.load(open(sweep_settings))
    # (the authors' EMA decay only matters to *_authors arms, so it may differ here)
    json.dump({**stored, "extra_flags": ["--retention_weight", "1"], "authors_ema_decay": "0.9999"},
              open(sweep_settings, "w"))
    proc = subprocess.run(cmd[:3] + ["--output_dir", str(sweep), "--summarize_only", "--baseline_dir", out], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"% vs standard in {out} (" in proc.stdout and "extra flags --retention_weight 1" in proc.stdout
    assert "| standard |" not in proc.stdout  # the baseline is compared with, not tabulated
    # ...and refused in one sentence when any other setting differs.
    json.dump({**stored, "max_train_steps": 4}, open(sweep_settings, "w"))
    line = error_line(subprocess.run(cmd[:3] + ["--output_dir", str(sweep), "--summarize_only", "--baseline_dir",
                                                out], env=ENV, capture_output=True, text=True, timeout=300))
    assert line == f"error: --baseline_dir {out} was run with --max_train_steps 3, not 4: its runs are not paired " \
                   "with these."

    cof = str(tmp_path / "cof")
    proc = subprocess.run([sys.executable, "-m", "benchmark.chain_of_forgetting", "--base", SOURCE,
                           "--finetuned", os.path.join(out, "runs", "standard-seed0"),
                           os.path.join(out, "runs", "difftuning-seed0"), "--reference", "mnist",
                           "--thresholds", "0", "1000", "--num_samples", "10", "--num_inference_steps", "3",
                           "--gate_threshold", "100", "--bootstrap", "10", "--output_dir", cof],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.load(open(os.path.join(cof, "gate.json")))
    assert verdict["num_models"] == 2 and verdict["verdict"] in ("PASS", "FAIL", "UNDECIDED")
    assert verdict["ci95"][0] <= verdict["ci95"][1] and len(verdict["fid_change_per_model"]) == 2
    assert f"allowed +10%: {verdict['verdict']} (only 2 fine-tuned model(s)" in proc.stdout
    rows = json.load(open(os.path.join(cof, "chain_of_forgetting.json")))["rows"]
    assert [r["threshold"] for r in rows] == [0, 1000] and all(r["fid"] > 0 for r in rows)
    assert os.path.exists(os.path.join(cof, "chain_of_forgetting.png"))


def test_chain_of_forgetting_bad_input_names_the_flag(tmp_path):
    cof = tmp_path / "cof"
    base = [sys.executable, "-m", "benchmark.chain_of_forgetting", "--reference", "mnist",
            "--output_dir", str(cof)]
    missing = str(tmp_path / "no_such_pipeline")
    line = error_line(subprocess.run(base + ["--base", missing, "--finetuned", SOURCE], env=ENV,
                                     capture_output=True, text=True, timeout=300))
    assert line.startswith("error: --base: ") and missing in line and "DiTPipeline" in line
    proc = subprocess.run(base + ["--base", SOURCE, "--finetuned", SOURCE, "--thresholds", "-1"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: --thresholds must be >= 0" in proc.stderr  # argparse's usage + error
    assert not cof.exists()  # refused before anything was written


EMOJI_SOURCE = os.path.join(ROOT, "benchmark", "emoji_source_model")
TEXT2IMAGE = os.path.join(ROOT, "benchmark", "emoji_text2image_model")
needs_emoji_models = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(p, "model_index.json")) for p in (EMOJI_SOURCE, TEXT2IMAGE)),
    reason="the emoji models are made by benchmark/pretrain_source.py --source emoji and pretrain_text2image.py")


@needs_emoji_models
def test_shipped_emoji_models_load_and_know_their_classes():
    from diffusers import DiffusionPipeline

    dit = DiffusionPipeline.from_pretrained(EMOJI_SOURCE)
    assert dit.transformer.config.num_embeds_ada_norm == 1000 and dit.vae.config.in_channels == 3
    assert len(dit.labels) == 98 and dit.get_label_ids(["face-smiling"]) == [0]  # sub-categories, in emoji order
    sd = DiffusionPipeline.from_pretrained(TEXT2IMAGE, safety_checker=None)
    assert type(sd).__name__ == "StableDiffusionPipeline"
    assert sd.tokenizer("grinning face").input_ids[1:-1] == sd.tokenizer.convert_tokens_to_ids(
        ["grinning</w>", "face</w>"])  # the learned merges make words single tokens


@needs_emoji_models
@pytest.mark.slow
def test_emoji_benchmark_smoke(tmp_path):
    """The second miniature end to end: OpenMoji from npm, the shipped emoji DiT, the authors' arm."""
    out = str(tmp_path / "bench")
    cmd = [sys.executable, "-m", "benchmark.run_benchmark", "--miniature", "emoji",
           "--output_dir", out, "--arms", "standard", "difftuning_authors", "--seeds", "0", "--max_train_steps", "3",
           "--train_batch_size", "8", "--knowledge_bank_size", "8", "--knowledge_bank_num_inference_steps", "4",
           "--num_samples", "18", "--num_inference_steps", "4"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = open(os.path.join(out, "results.md")).read()
    assert "target openmoji 16-shot" in table and "| difftuning_authors | 1 |" in table
    assert "% vs standard_authors" not in table  # its baseline was not run: no made-up comparison
    assert sorted(os.listdir(os.path.join(out, "openmoji-16shot"))) == [
        "activities", "animals-nature", "flags", "food-drink", "objects", "people-body", "smileys-emotion",
        "symbols", "travel-places"]
    settings = json.load(open(os.path.join(out, "runs", "difftuning_authors-seed0", "settings.json")))
    assert settings["miniature"] == "emoji"


@needs_emoji_models
@pytest.mark.slow
def test_controlnet_benchmark_smoke(tmp_path):
    """The ControlNet miniature end to end at a few steps: pairs, two arms through the real script,
    fidelity of every checkpoint, convergence against the stated threshold, the table and the plot."""
    out = str(tmp_path / "cn")
    cmd = [sys.executable, "-m", "benchmark.controlnet_benchmark", "--output_dir", out,
           "--arms", "none", "replay", "--seeds", "0", "--max_train_steps", "4", "--eval_every", "2",
           "--train_batch_size", "4", "--num_eval_pairs", "9", "--num_inference_steps", "2",
           "--knowledge_bank_size", "4", "--knowledge_bank_num_inference_steps", "2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(out, "runs", "replay-seed0", "result.json")))
    assert sorted(map(int, result["curve"])) == [2, 4] and 0 <= result["final_f1"] <= 1
    assert not [d for d in os.listdir(os.path.join(out, "runs", "replay-seed0")) if d.startswith("checkpoint-")]
    table = open(os.path.join(out, "results.md")).read()
    assert "| none | 1 |" in table and "| replay | 1 |" in table and "steps to converge" in table
    assert os.path.exists(os.path.join(out, "fidelity_curves.png"))
    threshold = json.load(open(os.path.join(out, "threshold.json")))["f1_threshold"]
    assert threshold > 0
    # Re-tabulating (the run logs sit beside the run folders) keeps the stated threshold and adds others.
    proc = subprocess.run(cmd[:5] + ["--summarize_only", "--other_thresholds", "0", "1.01"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(out, "threshold.json")))["f1_threshold"] == threshold
    table = open(os.path.join(out, "results.md")).read()
    assert "| >= 0.000 | >= 1.010 |" in table and "| none | 2 (2) | not all (never) |" in table
    assert "| replay | 2 (2, +0%) | not all (never) |" in table


@needs_emoji_models
@pytest.mark.slow
def test_dreambooth_benchmark_smoke(tmp_path):
    """The DreamBooth miniature end to end at a few steps: the subject folder, two arms through the real script
    (sharing one class bank), the metrics of every checkpoint in both feature spaces, the paired table."""
    from benchmark import dreambooth_benchmark as dbb

    out = str(tmp_path / "db")
    cmd = [sys.executable, "-m", "benchmark.dreambooth_benchmark", "--output_dir", out,
           "--arms", "prior", "difftuning_class", "--seeds", "0", "--max_train_steps", "4", "--eval_every", "2",
           "--samples_per_prompt", "2", "--num_class_images", "4", "--num_inference_steps", "2", "--jobs", "1",
           "--records_json", str(tmp_path / "records.json"),
           "--extra_flags", "--knowledge_bank_num_inference_steps", "2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(out, "subject"))) == [f"openmoji_cat_face-{i}.png"
                                                                for i in dbb.SUBJECT_SPLIT["train"]]
    # one folder of class images shared by both arms, and its encodings beside it
    assert sorted(os.listdir(os.path.join(out, "banks"))) == ["class-seed0", "class-seed0.knowledge_bank"]
    result = json.load(open(os.path.join(out, "runs", "difftuning_class-seed0", "result.json")))
    assert sorted(map(int, result["curve"])) == [2, 4] and result["chosen_step"] in (2, 4)
    assert set(result["chosen"]) == set(dbb.FEATURE_SPACES) and set(dbb.METRICS) <= set(result["chosen"]["openmoji"])
    table = open(os.path.join(out, "results.md")).read()
    assert "| prior | 1 |" in table and "Against `prior`" in table and "| difftuning_class |" in table
    # the records file holds every run, and tabulating it alone gives the same table
    records = json.load(open(tmp_path / "records.json"))
    assert sorted(records["runs"]) == ["difftuning_class-seed0", "prior-seed0"]
    proc = subprocess.run([sys.executable, "-m", "benchmark.dreambooth_benchmark", "--summarize_only", "--records_json",
                           str(tmp_path / "records.json"), "--table", str(tmp_path / "again.md")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open(tmp_path / "again.md").read() == table


@needs_emoji_models
@pytest.mark.slow
def test_pretrain_text2image_sd3_smoke_and_dreambooth_on_it(tmp_path):
    """The flow-matching miniature at a tiny size: pre-training a few steps gives a StableDiffusion3Pipeline without
    T5 (SD3's latent shift on the emoji VAE, 77-token prompts) that loads as SD3 without T5 loads and samples 32 px
    images; resuming from the checkpoint equals a straight run; the DreamBooth benchmark trains two arms on it."""
    from diffusers import DiffusionPipeline

    def pretrain(out: str, work: str, steps: int, stage: str = "all") -> None:
        cmd = [sys.executable, "-m", "benchmark.pretrain_text2image", "--family", "sd3", "--output_dir", out,
               "--work_dir", work, "--samples_path", str(tmp_path / "grid.png"), "--stage", stage,
               "--max_train_steps", str(steps), "--train_batch_size", "4", "--num_merges", "50",
               "--transformer_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8",
               "--text_hidden_size", "16", "--text_layers", "1", "--lr_warmup_steps", "1", "--logging_steps", "1",
               "--checkpointing_steps", "2", "--num_inference_steps", "2", "--samples_per_prompt", "2"]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    pretrain(straight, str(tmp_path / "work_a"), 3)
    for part in ("latents", "tokenizer"):  # the encoded latents and the learned merges, not made twice
        shutil.copytree(tmp_path / "work_a" / part, tmp_path / "work_b" / part)
    pretrain(resumed, str(tmp_path / "work_b"), 2, stage="train")
    pretrain(resumed, str(tmp_path / "work_b"), 3, stage="train")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert open(os.path.join(straight, weights), "rb").read() == open(os.path.join(resumed, weights), "rb").read()
    assert (tmp_path / "grid.png").exists()

    pipe = DiffusionPipeline.from_pretrained(straight, text_encoder_3=None, tokenizer_3=None)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert pipe.vae.config.shift_factor != 0 and pipe.scheduler.config.shift == 1.0
    assert pipe.transformer.config.patch_size == 2 and pipe.tokenizer.model_max_length == 77
    images = pipe(["red heart", "pizza"], height=32, width=32, num_inference_steps=2, max_sequence_length=77,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()

    out = str(tmp_path / "db")
    cmd = [sys.executable, "-m", "benchmark.dreambooth_benchmark", "--base_model", straight, "--output_dir", out,
           "--arms", "prior", "difftuning_class", "--seeds", "0", "--max_train_steps", "2", "--eval_every", "2",
           "--samples_per_prompt", "2", "--num_class_images", "4", "--jobs", "1",
           "--extra_flags", "--knowledge_bank_num_inference_steps", "2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.load(open(os.path.join(out, "runs", "difftuning_class-seed0", "settings.json")))
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (20, 4.0)  # SD3's defaults
    # the class images (upstream's names) and their encodings beside them
    assert len([f for f in os.listdir(os.path.join(out, "banks", "class-seed0")) if f.endswith(".jpg")]) == 4
    (encoded,) = [d for d in os.listdir(os.path.join(out, "banks", "class-seed0.knowledge_bank")) if d != ".lock"]
    bank = json.load(open(os.path.join(out, "banks", "class-seed0.knowledge_bank", encoded, "manifest.json")))
    assert len(bank["images"]) == 4
    assert "| difftuning_class |" in open(os.path.join(out, "results.md")).read()


def test_dreambooth_metrics_of_the_base_model_itself():
    """Samples identical to the base model's keep the prior fully and drift nowhere; identical subject samples
    have no diversity."""
    from benchmark import dreambooth_benchmark as dbb

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (len(dbb.eval_prompts()), 3, 32, 32, 3), dtype=np.uint8)
    m = dbb.metrics(base, base, "openmoji")
    assert m["prior_kept"] == pytest.approx(1.0, abs=1e-5) and m["drift"] == pytest.approx(0.0, abs=1e-5)
    same = base.copy()
    same[0] = same[0, :1]
    assert dbb.metrics(same, base, "openmoji")["div"] == pytest.approx(0.0, abs=1e-5)


HELDOUT_SOURCE = os.path.join(ROOT, "benchmark", "emoji_heldout_source_model")


@pytest.mark.skipif(not os.path.exists(os.path.join(HELDOUT_SOURCE, "model_index.json")),
                    reason="made by benchmark/pretrain_source.py --source emoji_heldout")
def test_heldout_source_model_never_learned_the_target_classes():
    """The third miniature's source knows every emoji sub-category except the target's (animals, food)."""
    from diffusers import DiffusionPipeline

    from benchmark import evaluate

    pipe = DiffusionPipeline.from_pretrained(HELDOUT_SOURCE)
    assert len(pipe.labels) == 98 - 15 and not set(evaluate.HELDOUT_CLASSES) & set(pipe.labels)
    assert pipe.vae.config.latent_channels == 8


@needs_emoji_models
def test_heldout_emoji_splits_keep_each_emoji_whole_and_apart():
    """The third miniature's target: the animals and food the emoji_heldout source never saw. Each emoji
    (its Twemoji and Noto drawings) sits in one split only, so the FID reference never holds another
    vendor's drawing of a training emoji, and the few-shot sets are nested across shot counts."""
    from benchmark import evaluate

    images, labels, codes = evaluate.heldout_arrays()
    splits = evaluate.heldout_splits(labels)
    owner = {}
    for name, index in splits.items():
        for code in set(codes[index].tolist()):
            assert owner.setdefault(code, name) == name, f"emoji {code} is in {owner[code]} and {name}"
    assert sum(len(v) for v in splits.values()) == len(labels) == len(set(np.concatenate(list(splits.values()))))
    assert np.bincount(labels[splits["train"]]).tolist() == [10] * 11  # 5 emoji x 2 vendors per class
    assert set(evaluate.heldout_splits(labels, shots_per_class=4)["train"]) < set(splits["train"])
    x_extra, y_extra = evaluate.heldout_extra_classifier_data()
    assert int(y_extra.min()) == 11 and len(x_extra) == len(y_extra) > 3000  # no target class among them


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.slow
def test_early_stopping_on_a_fashion_pair(tmp_path):
    """--eval_every keeps checkpoints, scores each on the validation split in both feature spaces and reports
    the run at the chosen one; a checkpoint's EMA weights are what the run saves when it stops there."""
    from diffusers import DiTPipeline

    from benchmark import evaluate

    out = str(tmp_path / "bench")
    cmd = [sys.executable, "-m", "benchmark.run_benchmark", "--output_dir", out,
           "--miniature", "fashion_a_to_b", "--arms", "standard", "--seeds", "0", "--max_train_steps", "4",
           "--eval_every", "2", "--train_batch_size", "8", "--num_samples", "20", "--num_inference_steps", "3",
           "--val_samples", "10", "--val_inference_steps", "2", "--jobs", "1"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = os.path.join(out, "runs", "standard-seed0")
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert [p["step"] for p in metrics["val_curve"]] == [2, 4]
    assert all(p["fid"] > 0 and p["second_fid"] > 0 and p["weights"] == "ema" for p in metrics["val_curve"])
    chosen = metrics["early_stopped"]
    assert chosen["step"] == min(metrics["val_curve"], key=lambda p: p["fid"])["step"]
    assert chosen["num_generated"] == 20 and "second_space" in chosen
    table = open(os.path.join(out, "results.md")).read()
    assert f"(steps {chosen['step']})" in table
    assert f"| {metrics['fid']:.2f} ({metrics['second_space']['fid']:.2f}) |" in table  # both spaces side by side
    assert "In parentheses: the second feature space" in table

    # --score_steps on the finished run: a fixed length scored like the final model, without training again
    trained = os.path.getmtime(os.path.join(run, "model_index.json"))
    proc = subprocess.run(cmd + ["--score_steps", "2", "4"], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    at_step = json.load(open(os.path.join(run, "metrics.json")))["at_step"]
    assert at_step["2"]["num_generated"] == 20 and at_step["2"]["settings"]["load_checkpoint"].endswith("checkpoint-2")
    assert at_step["4"]["fid"] == metrics["fid"]
    assert os.path.getmtime(os.path.join(run, "model_index.json")) == trained

    final = DiTPipeline.from_pretrained(run)
    saved = [p.clone() for p in final.transformer.parameters()]
    assert evaluate.load_checkpoint_weights(final.transformer, os.path.join(run, "checkpoint-4")) == "ema"
    assert all(torch.equal(a, b) for a, b in zip(saved, final.transformer.parameters(), strict=True))
    evaluate.load_checkpoint_weights(final.transformer, os.path.join(run, "checkpoint-2"))
    assert not all(torch.equal(a, b) for a, b in zip(saved, final.transformer.parameters(), strict=True))
