"""End-to-end tests of train_controlnet_difftuning.py: the real script, a tiny offline Stable
Diffusion, a fill-style circle dataset, a few steps at 32 px."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, TOKEN, TWO_PROCESSES, assert_no_token, error_line, files_uploaded, run_script
from safetensors.torch import load_file

import training_plumbing as tp
from benchmark.tiny_models import make_circle_dataset, make_tiny_sd_pipeline
from difftuning_utils import ConfigError

SCRIPT = os.path.join(ROOT, "train_controlnet_difftuning.py")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def circles(tmp_path_factory) -> str:
    return make_circle_dataset(str(tmp_path_factory.mktemp("circles")), n=12)


def base_args(model: str, data: str, out: str, steps: int = 2) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", str(steps),
            "--checkpointing_steps", "100", "--seed", "3", "--report_to", "none", "--num_validation_images", "1",
            "--validation_num_inference_steps", "2", "--knowledge_bank_size", "6", "--knowledge_bank_batch_size", "3",
            "--knowledge_bank_num_inference_steps", "2"]


def run(args: list[str], launcher: list[str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, launcher, ok)


def generate(model: str, controlnet_dir: str, circles: str) -> None:
    """The saved ControlNet loads into StableDiffusionControlNetPipeline and generates."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=controlnet, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    condition = Image.open(os.path.join(circles, "conditioning_images", "0.png")).resize((32, 32))
    image = pipe("a red filled circle", condition, num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
    assert image.size == (32, 32)


def assert_trained(out: str) -> dict[str, torch.Tensor]:
    """ControlNet's zero convolutions start at zero: training must have moved them."""
    weights = load_file(os.path.join(out, WEIGHTS))
    zero_init = [k for k in weights if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero_init and any(weights[k].abs().sum() > 0 for k in zero_init)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    return weights


@pytest.fixture(scope="module")
def replay_run(tiny_sd, circles, tmp_path_factory) -> tuple[str, list[str]]:
    """Replay with accumulation, empty-prompt dropout, a checkpoint at step 3 and a cosine schedule:
    12 pairs, 4 target + 1 bank sample a batch, 2 batches a step, so epochs end mid-step."""
    out = str(tmp_path_factory.mktemp("replay") / "out")
    args = base_args(tiny_sd, circles, out, steps=6) + [
        "--difftuning", "--retention", "replay", "--train_batch_size", "5", "--gradient_accumulation_steps", "2",
        "--proportion_empty_prompts", "0.5", "--checkpointing_steps", "3", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "2", "--learning_rate", "1e-4"]
    run(args)
    return out, args


def test_replay_trains_builds_bank_and_generates(replay_run, tiny_sd, circles):
    out, _ = replay_run
    assert_trained(out)
    generate(tiny_sd, out, circles)
    manifest = json.load(open(os.path.join(out, "knowledge_bank", "manifest.json")))
    assert manifest["complete"] and manifest["count"] == 6 and manifest["latent_shape"] == [4, 8, 8]
    assert os.path.exists(os.path.join(out, "knowledge_bank", "preview.png"))
    generate(tiny_sd, os.path.join(out, "checkpoint-3", "controlnet"), circles)  # upstream's checkpoint layout
    assert not os.path.exists(os.path.join(out, "checkpoint-3", "model.safetensors"))  # weights not stored twice
    card = open(os.path.join(out, "README.md")).read()
    assert "knowledge-bank replay" in card and os.path.exists(os.path.join(out, "samples.png"))
    assert os.path.dirname(out) not in card and os.path.dirname(tiny_sd) not in card  # no local path reaches the Hub


def test_resume_equals_straight_run(replay_run, tmp_path):
    """Stopped at step 3 and resumed: bit-identical weights (bank replay, accumulation, prompt dropout,
    lr schedule and data order all restored, batches already seen skipped)."""
    straight, args = replay_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    shutil.copytree(os.path.join(straight, "knowledge_bank"), os.path.join(resumed, "knowledge_bank"))
    run([resumed if a == straight else a for a in args] + ["--resume_from_checkpoint", "latest"])
    a, b = load_file(os.path.join(straight, WEIGHTS)), load_file(os.path.join(resumed, WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(os.path.join(straight, "checkpoint-3", "controlnet", WEIGHTS))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # steps 4-6 did change the weights


@pytest.mark.parametrize("extra", [
    pytest.param(["--validation_steps", "1"], id="standard"),
    pytest.param(["--difftuning", "--retention", "distill", "--timestep_sampling", "weighting", "--cache_latents",
                  "--max_grad_norm", "0"], id="distill-cached-latents-no-clipping"),
    pytest.param(["--difftuning", "--retention", "replay", "--controlnet_lora", "--rank", "2",
                  "--retention_empty_prompt", "--learning_rate", "1e-3"], id="lora-replay"),
])
def test_retention_modes_train_save_and_generate(tiny_sd, circles, tmp_path, extra):
    out = str(tmp_path / "out")
    args = base_args(tiny_sd, circles, out) + extra
    if "--validation_steps" in extra:
        args += ["--validation_prompt", "a red filled circle", "a blue filled circle", "--validation_image",
                 os.path.join(circles, "conditioning_images", "1.png")]
    if "distill" in extra:  # the other way in: a local dataset through --dataset_name
        args[args.index("--train_data_dir")] = "--dataset_name"
    run(args)
    weights = assert_trained(out)
    generate(tiny_sd, out, circles)
    card = open(os.path.join(out, "README.md")).read()
    assert ("Diff-Tuning (psi tau" in card) == ("--difftuning" in extra)
    assert os.path.exists(os.path.join(out, "knowledge_bank")) == ("--controlnet_lora" in extra)  # replay only
    if "--controlnet_lora" in extra:
        from diffusers import UNet2DConditionModel

        import train_controlnet_difftuning as script

        adapter = load_file(os.path.join(out, "controlnet_lora", script.LORA_WEIGHT_NAME))
        assert adapter and all("lora_" in k for k in adapter)
        unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
        reloaded = script.load_controlnet_lora(os.path.join(out, "controlnet_lora"), unet).state_dict()
        assert reloaded.keys() == weights.keys()
        assert all(torch.allclose(reloaded[k], weights[k], atol=1e-6) for k in weights)
        trunk = {k: v for k, v in unet.state_dict().items() if k in weights}  # layers copied from the UNet
        changed = {k for k in trunk if not torch.equal(trunk[k], weights[k])}
        assert changed and all(k.split(".")[-2] in {"to_q", "to_k", "to_v", "0"} for k in changed)


def test_two_processes_on_cpu(tiny_sd, circles, tmp_path):
    out = str(tmp_path / "out")
    proc = run(base_args(tiny_sd, circles, out) + ["--difftuning", "--retention", "replay", "--train_batch_size", "3",
                                                   "--ddp_timeout", "120"],
               launcher=TWO_PROCESSES)
    assert "Distributed environment: DistributedType.MULTI_CPU" in proc.stderr and "Num processes: 2" in proc.stderr
    assert_trained(out)
    generate(tiny_sd, out, circles)
    manifest = json.load(open(os.path.join(out, "knowledge_bank", "manifest.json")))
    assert manifest["count"] == 6 and len(manifest["shards"]) == 2  # one shard built by each process


def test_push_to_hub_uploads_without_checkpoints(tiny_sd, circles, tmp_path, captured_hub, capfd):
    """The Hub is unreachable: capture create_repo/upload_folder and check what would be sent.
    Also the run (in-process, for speed) of the adaptation-only mode, --retention none."""
    import train_controlnet_difftuning as script

    out = str(tmp_path / "out")
    script.main(script.parse_args(base_args(tiny_sd, circles, out) + [
        "--difftuning", "--retention", "none", "--push_to_hub", "--hub_model_id", "me/controlnet-circles",
        "--checkpointing_steps", "1", "--report_to", "tensorboard", "--hub_token", TOKEN]))
    assert_no_token(out, *capfd.readouterr())
    assert_trained(out)
    generate(tiny_sd, out, circles)
    assert not os.path.exists(os.path.join(out, "knowledge_bank"))
    upload = captured_hub["upload"]
    assert captured_hub["create"]["repo_id"] == upload["repo_id"] == "me/controlnet-circles"
    sent = files_uploaded(upload)
    assert {"config.json", WEIGHTS, "README.md", "samples.png"} <= set(sent)
    assert not any(p.startswith("checkpoint-") for p in sent)
    assert os.path.isdir(os.path.join(out, "checkpoint-1", "controlnet"))


# ---- Bad input: one sentence, exit code 2 ----------------------------------------------------


def test_missing_conditioning_column(tiny_sd, circles, tmp_path):
    proc = run(base_args(tiny_sd, circles, str(tmp_path / "o")) + ["--conditioning_image_column", "hint"], ok=False)
    assert "--conditioning_image_column 'hint' is not a column" in error_line(proc)


def test_mismatched_image_and_condition_sizes(tiny_sd, tmp_path):
    from PIL import Image

    import train_controlnet_difftuning as script

    data = make_circle_dataset(str(tmp_path / "data"), n=4)
    Image.open(os.path.join(data, "conditioning_images", "2.png")).resize((24, 24)).save(
        os.path.join(data, "conditioning_images", "2.png"))
    with pytest.raises(ConfigError, match=r"Row 2: image is 40x40 but conditioning_image is 24x24"):
        script.main(script.parse_args(base_args(tiny_sd, data, str(tmp_path / "o"))))


def test_bank_from_another_model_refused(replay_run, tiny_sd, circles, tmp_path):
    import train_controlnet_difftuning as script

    bank = os.path.join(replay_run[0], "knowledge_bank")
    other = make_tiny_sd_pipeline(str(tmp_path / "other"), seed=1)
    with pytest.raises(ConfigError, match="fingerprint.*--knowledge_bank_dir"):
        script.main(script.parse_args(base_args(other, circles, str(tmp_path / "o"))
                                      + ["--difftuning", "--retention", "replay", "--knowledge_bank_dir", bank]))
    assert json.load(open(os.path.join(bank, "manifest.json")))["complete"]  # the bank is left intact


def test_bad_flags_fail_fast(tiny_sd, circles):
    import train_controlnet_difftuning as script

    common = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", circles]
    image = os.path.join(circles, "conditioning_images", "0.png")
    cases = [(["--resolution", "30"], "--resolution must be divisible by 8"),
             (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts"),
             (["--validation_prompt", "a"], "--validation_prompt and --validation_image"),
             (["--validation_prompt", "a", "b", "--validation_image", image, image, image], "2 --validation_prompt"),
             (["--validation_prompt", "a", "--validation_image", "nope.png"], "--validation_image nope.png"),
             (["--controlnet_lora", "--rank", "0"], "--rank")]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            script.parse_args(common + bad)


def test_fp16_on_cpu_refused_in_one_sentence(tiny_sd, circles, tmp_path):
    """Without CUDA autocast the float32 ControlNet meets fp16 inputs: refused before any model is loaded."""
    result = run(base_args(tiny_sd, circles, str(tmp_path / "out"), 1) + ["--mixed_precision", "fp16"], ok=False)
    assert "--mixed_precision fp16 needs a GPU" in error_line(result)
    assert not os.path.exists(tmp_path / "out")


# Every flag of diffusers' examples/controlnet/train_controlnet.py and its default.
UPSTREAM_DEFAULTS = {
    "controlnet_model_name_or_path": None, "revision": None, "variant": None, "tokenizer_name": None,
    "output_dir": "controlnet-model", "cache_dir": None, "resolution": 512, "train_batch_size": 4,
    "num_train_epochs": 1, "max_train_steps": None, "checkpointing_steps": 500, "checkpoints_total_limit": None,
    "resume_from_checkpoint": None, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
    "learning_rate": 5e-6, "scale_lr": False, "lr_scheduler": "constant", "lr_warmup_steps": 500, "lr_num_cycles": 1,
    "lr_power": 1.0, "use_8bit_adam": False, "dataloader_num_workers": 0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "push_to_hub": False, "hub_token": None,
    "hub_model_id": None, "logging_dir": "logs", "report_to": "tensorboard",
    "mixed_precision": None, "enable_xformers_memory_efficient_attention": False, "set_grads_to_none": False,
    "dataset_name": None, "dataset_config_name": None, "image_column": "image",
    "conditioning_image_column": "conditioning_image", "caption_column": "text", "max_train_samples": None,
    "proportion_empty_prompts": 0, "validation_prompt": None, "validation_image": None, "num_validation_images": 4,
    "validation_steps": 100, "tracker_project_name": "train_controlnet"}


def test_upstream_flags_and_defaults(circles):
    import train_controlnet_difftuning as script

    args = vars(script.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", circles]))
    assert {k: args[k] for k in UPSTREAM_DEFAULTS} == UPSTREAM_DEFAULTS
    # --difftuning alone is psi sampling without a bank: the mode our ControlNet benchmark found best.
    assert args["retention"] == "none" and not args["difftuning"]
    # The deliberate differences: TF32 is on unless --no-allow_tf32 (upstream: off unless --allow_tf32), and
    # --seed defaults to 0 (upstream: None, unseeded), so the same command trains the same model.
    assert args["allow_tf32"] is True and args["seed"] == 0
    assert not vars(script.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", circles,
                                       "--no-allow_tf32"]))["allow_tf32"]


def _controlnet_step(tiny_sd: str, **overrides):
    """A ControlNetStep over the tiny SD pipeline and a fresh ControlNet; tau 50 puts psi at the noisy end and
    xi at the clean end, so which rows got which schedule is visible in their timesteps."""
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

    import difftuning_utils as dt
    from train_controlnet_difftuning import ControlNetStep, tokenize

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 64))
    settings = dict(controlnet=controlnet, unet=pipe.unet, text_encoder=pipe.text_encoder, vae=None,
                    noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                    psi=dt.TimestepSampler(1000, 50.0, "adaptation"), xi=dt.TimestepSampler(1000, 50.0, "retention"),
                    empty_ids=tokenize(pipe.tokenizer, [""]), proportion_empty_prompts=0.0, retention_weight=0.3,
                    use_weights=False, weight_dtype=torch.float32)
    return ControlNetStep(**{**settings, **overrides}), pipe, controlnet


def _pair_batch(pipe, rows: int) -> dict:
    from train_controlnet_difftuning import tokenize

    gen = torch.Generator().manual_seed(1)
    return {"latent_mean": torch.randn(rows, 4, 8, 8, generator=gen), "latent_std": torch.zeros(rows, 4, 8, 8),
            "input_ids": tokenize(pipe.tokenizer, [f"circle {i}" for i in range(rows)]),
            "conditioning_pixel_values": torch.rand(rows, 3, 32, 32, generator=gen)}


def test_step_replays_bank_rows_with_their_prompts_and_a_null_control(tiny_sd):
    """ControlNetStep.loss with replay: target pairs at psi timesteps with their control, bank latents at xi
    timesteps with their own prompts and an all-zero control, one pass; loss = target + weight * bank."""
    import difftuning_utils as dt
    from train_controlnet_difftuning import tokenize

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["bank a", "bank b", "bank c"]
    contents = dt.KnowledgeBank(latents, prompts, {}, torch.stack([latents, latents], 1), torch.zeros(3, 2, 4, 8, 8))
    _, pipe, _ = _controlnet_step(tiny_sd)
    bank_ids = tokenize(pipe.tokenizer, prompts)
    step, pipe, controlnet = _controlnet_step(tiny_sd, num_retention=2, bank_input_ids=bank_ids,
                                              bank=dt.BankReplay(contents, "images", False, 2, 0, 0, "cpu"))
    seen: dict = {}
    handle = controlnet.register_forward_hook(lambda _m, args, kw, _out: seen.update(
        t=args[1], cond=kw["controlnet_cond"], context=kw["encoder_hidden_states"]), with_kwargs=True)
    batch = _pair_batch(pipe, 2)
    with torch.no_grad():
        loss, logs = step.loss(batch, tp.StepGenerator(0, 0))
        expected_context = pipe.text_encoder(torch.cat([batch["input_ids"], bank_ids]), return_dict=False)[0]
    assert not any(torch.allclose(expected_context[0], expected_context[2 + i]) for i in range(3))
    handle.remove()
    assert seen["cond"].shape[0] == 4
    assert torch.equal(seen["cond"][:2], batch["conditioning_pixel_values"]) and not seen["cond"][2:].any()
    assert (seen["t"][:2] > 900).all() and (seen["t"][2:] < 100).all()
    for row in (2, 3):  # each bank row carries one of the bank's own prompts
        assert any(torch.allclose(seen["context"][row], expected_context[2 + i]) for i in range(3))
    assert torch.allclose(seen["context"][:2], expected_context[:2])
    assert torch.allclose(loss, logs["loss_adaptation"] + 0.3 * logs["loss_retention"])


def test_step_distills_the_frozen_unet_without_control(tiny_sd):
    """ControlNetStep.loss with distill: the batch's last rows are retention rows at xi timesteps whose target is
    the frozen UNet's own prediction without the ControlNet's residuals (not the noise)."""
    step, pipe, _ = _controlnet_step(tiny_sd, num_retention=1, distill=True)
    calls: list = []
    handle = pipe.unet.register_forward_hook(lambda _m, args, kw, out: calls.append(
        (args[1], "down_block_additional_residuals" in kw, out.sample)), with_kwargs=True)
    with torch.no_grad():
        loss, logs = step.loss(_pair_batch(pipe, 3), tp.StepGenerator(0, 0))
    handle.remove()
    (t_student, controlled, student), (t_teacher, teacher_controlled, teacher) = calls
    assert controlled and not teacher_controlled and teacher.shape[0] == 1
    assert (t_student[:2] > 900).all() and (t_student[2:] < 100).all() and torch.equal(t_teacher, t_student[2:])
    assert torch.allclose(logs["loss_retention"], ((student[2:] - teacher) ** 2).mean(), rtol=1e-4)
    assert torch.allclose(loss, logs["loss_adaptation"] + 0.3 * logs["loss_retention"])
