"""What a careless or unlucky user meets: each case ends in one sentence (exit 2, before the first step where
the input allows it) or is handled, and nothing written before is damaged. docs/what_happens_when.md lists
the same cases with their messages."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, run_script
from PIL import Image

import difftuning_utils as dt
import knowledge_bank
import training_plumbing as tp
from benchmark.tiny_models import make_circle_dataset, make_image_folder

DIT = os.path.join(ROOT, "train_dit_difftuning.py")
CONTROLNET = os.path.join(ROOT, "train_controlnet_difftuning.py")


def dit_args(model: str, data: str, out: str, steps: int = 2) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--checkpointing_steps", "1", "--seed", "0",
            "--report_to", "none", "--validation_num_inference_steps", "2", "--num_validation_images", "1"]


def dit_error(args: list[str]) -> str:
    """The DiT script run in-process; its one-sentence ConfigError."""
    import train_dit_difftuning as script

    with pytest.raises(dt.ConfigError) as err:
        script.main(script.parse_args(args))
    return str(err.value)


def truncated_png(path: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # the header reads, the pixels do not


SMALL_BANK = ["--difftuning", "--knowledge_bank_size", "4", "--knowledge_bank_num_inference_steps", "2"]
# (case, extra flags, the sentence's words): refused when the flags are parsed or before the first step,
# and no --output_dir is written.
EARLY = [
    ("learning rate inf", ["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf."),
    ("learning rate nan", ["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan."),
    ("tau nan", ["--difftuning", "--difftuning_tau", "nan"], "--difftuning_tau must be a finite number, got nan."),
    ("resolution 0", ["--resolution", "0"], "--resolution must be >= 8, got 0."),
    ("no checkpoints kept", ["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0."),
    ("adam beta 1", ["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1.0."),
    ("unknown validation class", ["--validation_class_labels", "triangle"],
     "--validation_class_labels: 'triangle' is not a class of the dataset"),
    ("push offline", ["--push_to_hub"], "--push_to_hub: the Hub repository 'out' could not be created"),
    ("token to wandb", ["--report_to", "wandb", "--hub_token", "hf_x"], "--report_to wandb with --hub_token would "
     "expose the token"),
    ("seed -1", ["--seed", "-1"], "--seed must be in [0, 4294967295], got -1."),
    ("no sampling steps", ["--validation_num_inference_steps", "0"],
     "--validation_num_inference_steps must be >= 1, got 0."),
    # checked once the model's module names are known, before the bank (in --output_dir) is built
    ("LoRA targets match nothing", ["--finetune", "lora", "--lora_target_modules", "to_q,to_qq", *SMALL_BANK],
     "--lora_target_modules: 'to_qq' names no module of the DiTTransformer2DModel"),
    ("fewer images than a batch", ["--train_batch_size", "64", *SMALL_BANK],
     "The dataset has 12 images, fewer than one batch of 51 target samples"),
]


@pytest.mark.parametrize("case, flags, words", EARLY, ids=[c[0] for c in EARLY])
def test_refused_before_the_first_step(tiny_dit, image_folder, tmp_path, monkeypatch, case, flags, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = str(tmp_path / "out")
    assert words in dit_error(dit_args(tiny_dit, image_folder, out) + flags)
    assert not os.path.exists(out)


def test_output_folders_that_cannot_work(tiny_dit, image_folder, tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    message = dit_error(dit_args(tiny_dit, data, os.path.join(data, "out")))
    assert f"--output_dir {data}/out is inside --train_data_dir {data}" in message
    file = tmp_path / "a-file"
    file.write_text("mine")
    assert f"--output_dir {file} is a file" in dit_error(dit_args(tiny_dit, image_folder, str(file)))
    message = dit_error(dit_args(tiny_dit, image_folder, str(tmp_path / "o")) + [
        "--difftuning", "--knowledge_bank_dir", str(file)])
    assert f"--knowledge_bank_dir {file} is a file" in message
    assert file.read_text() == "mine"


def test_truncated_images_named_before_the_first_step_or_skipped(tiny_dit, tiny_sd, tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=3)
    truncated_png(os.path.join(data, "circle", "cut.png"))
    message = dit_error(dit_args(tiny_dit, data, str(tmp_path / "o")))
    assert "--image_column" in message and "cut.png cannot be decoded" in message and "--skip_bad_images" in message
    assert not os.path.exists(tmp_path / "o")
    result = run_script(DIT, dit_args(tiny_dit, data, str(tmp_path / "skip"), steps=1) + ["--skip_bad_images"])
    assert "Skipping training image --image_column" in result.stderr and "left out 1 of 10 rows" in result.stderr

    circles = make_circle_dataset(str(tmp_path / "circles"), n=6)
    truncated_png(os.path.join(circles, "conditioning_images", "3.png"))
    import train_controlnet_difftuning as script

    with pytest.raises(dt.ConfigError, match=r"--conditioning_image_column \S+3\.png cannot be decoded"):
        script.main(script.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", circles,
                                       "--output_dir", str(tmp_path / "cn"), "--resolution", "32"]))


@pytest.mark.parametrize("mode, value, expected", [("I;16", 32896, 128), ("I", 65535, 255), ("I", 200, 200),
                                                   ("F", 0.5, 128)])
def test_high_bit_depth_images_keep_their_values(mode, value, expected):
    """PIL would clip these to 0..255: a 16-bit photo becomes solid white."""
    array = np.full((4, 4), value, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    image = Image.fromarray(array)
    assert image.mode == mode
    assert np.asarray(tp.convert_image(image, "L")).max() == expected
    assert np.asarray(tp.convert_image(image, "RGB"))[0, 0].tolist() == [expected] * 3


def test_sixteen_bit_png_trains_as_grey_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        tensor = tp.preprocess_image(image, 8, True, False, np.random.default_rng(0), channels=1)
    assert abs(tensor.mean().item()) < 0.01  # mid-grey in [-1, 1], not 1.0


def test_pandas_parquet_with_plain_image_structs(tiny_dit, tmp_path):
    """pandas writes image columns as plain {bytes, path} structs: they are read as images."""
    import pandas as pd

    rows = []
    for i in range(8):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(buffer, "PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": f"{i}.png"}, "label": i % 2})
    folder = tmp_path / "parquet"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "train.parquet")
    args = dit_args(tiny_dit, "", str(tmp_path / "o"), steps=1)
    args[args.index("--train_data_dir"):args.index("--train_data_dir") + 2] = ["--dataset_name", str(folder)]
    run_script(DIT, args)
    assert os.path.exists(tmp_path / "o" / "model_index.json")


@pytest.fixture(scope="module")
def three_checkpoints(tiny_dit, image_folder, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ckpt") / "run")
    run_script(DIT, dit_args(tiny_dit, image_folder, out, steps=3))
    return out


def copy_run(run: str, tmp_path) -> str:
    copy = str(tmp_path / "run")
    shutil.copytree(run, copy)
    return copy


def test_latest_skips_a_damaged_checkpoint(tiny_dit, image_folder, three_checkpoints, tmp_path):
    out = copy_run(three_checkpoints, tmp_path)
    model = os.path.join(out, "checkpoint-3", "model.safetensors")
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    open(os.path.join(out, "checkpoint-2", "random_states_0.pkl"), "w").close()  # empty
    result = run_script(DIT, dit_args(tiny_dit, image_folder, out, steps=4) + ["--resume_from_checkpoint", "latest"])
    assert "skipping" in result.stderr and "checkpoint-3" in result.stderr and "is damaged" in result.stderr
    assert "random_states_0.pkl is empty" in result.stderr
    assert "Resuming from checkpoint" in result.stdout + result.stderr and "checkpoint-1" in result.stdout


@pytest.mark.parametrize("damage, words", [
    ("optimizer.bin", "has no optimizer.bin"),
    ("process_0.pt", "has no process_0.pt (was it saved with another number of processes"),
])
def test_missing_piece_named(tiny_dit, image_folder, three_checkpoints, tmp_path, damage, words):
    out = copy_run(three_checkpoints, tmp_path)
    os.remove(os.path.join(out, "checkpoint-2", damage))
    line = error_line(run_script(DIT, dit_args(tiny_dit, image_folder, out, steps=4) + [
        "--resume_from_checkpoint", os.path.join(out, "checkpoint-2")], ok=False))
    assert line.startswith("error: --resume_from_checkpoint: ") and words in line


def test_checkpoint_of_another_set_up_refused(tiny_dit, tiny_sd, image_folder, three_checkpoints, tmp_path):
    out = copy_run(three_checkpoints, tmp_path)
    checkpoint = os.path.join(out, "checkpoint-3")
    before = sorted(os.listdir(checkpoint))
    line = error_line(run_script(DIT, dit_args(tiny_dit, image_folder, out, steps=4) + [
        "--resume_from_checkpoint", checkpoint, "--finetune", "bitfit"], ok=False))
    assert "was saved by another set-up (--finetune 'full' there, 'bitfit' now)" in line
    circles = make_circle_dataset(str(tmp_path / "circles"), n=4)
    line = error_line(run_script(CONTROLNET, ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", circles,
                                              "--output_dir", str(tmp_path / "cn"), "--resolution", "32",
                                              "--max_train_steps", "1", "--report_to", "none",
                                              "--resume_from_checkpoint", checkpoint], ok=False))
    assert "script 'train_dit_difftuning.py' there, 'train_controlnet_difftuning.py' now" in line
    assert sorted(os.listdir(checkpoint)) == before


def test_full_disk_at_a_checkpoint(tmp_path):
    """One sentence naming the folder; the half-written checkpoint is removed and the earlier one kept."""
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "model.safetensors").write_bytes(b"earlier")

    def full_disk(folder: str) -> None:
        os.makedirs(folder)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"x" * 1024)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1111")

    accelerator = SimpleNamespace(is_main_process=True, process_index=0, save_state=full_disk,
                                  wait_for_everyone=lambda: None)
    args = SimpleNamespace(output_dir=str(out), checkpoints_total_limit=None)
    with pytest.raises(dt.ConfigError, match=rf"The disk is full: writing checkpoint-2 into {out} failed with"):
        tp.save_checkpoint(accelerator, args, 2, {})
    assert sorted(os.listdir(out)) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / "model.safetensors").read_bytes() == b"earlier"
    with pytest.raises(dt.ConfigError, match="The disk is full: writing the model"):
        with dt.disk_space_guard(str(out), "the model"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="Permission denied"):  # other errors pass through unchanged
        with dt.disk_space_guard(str(out), "the model"):
            raise OSError(errno.EACCES, "Permission denied")


def test_a_saved_checkpoint_records_its_set_up(three_checkpoints):
    info = json.load(open(os.path.join(three_checkpoints, "checkpoint-1", tp.CHECKPOINT_INFO)))
    assert info["script"] == "train_dit_difftuning.py" and info["finetune"] == "full"
    assert "/" not in info["pretrained_model_name_or_path"]  # by last component: a moved model still matches


DREAMBOOTH_EARLY = [case for case in EARLY if case[0] not in ("unknown validation class", "tau nan",
                                                               "LoRA targets match nothing",
                                                               "fewer images than a batch")] + [
    ("tau nan", ["--difftuning", "--difftuning_tau", "nan"], "--difftuning_tau must be a finite number, got nan."),
]


@pytest.mark.parametrize("case, flags, words", DREAMBOOTH_EARLY, ids=[c[0] for c in DREAMBOOTH_EARLY])
def test_dreambooth_passes_the_same_table(tiny_sd, tmp_path, monkeypatch, case, flags, words):
    import huggingface_hub.constants

    import train_dreambooth_lora_difftuning as script
    from benchmark.tiny_models import make_subject_folder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    subject = make_subject_folder(str(tmp_path / "subject"))
    out = str(tmp_path / "out")
    args = ["--pretrained_model_name_or_path", tiny_sd, "--instance_data_dir", subject, "--output_dir", out,
            "--instance_prompt", "a sks square", "--resolution", "32", "--max_train_steps", "1", "--report_to",
            "none"]
    if case == "resolution 0":
        args = args[:args.index("--resolution")] + args[args.index("--resolution") + 2:]
    with pytest.raises(dt.ConfigError) as err:
        script.main(script.parse_args(args + flags))
    assert words in str(err.value) and not os.path.exists(out)


def test_dreambooth_truncated_subject_image(tiny_sd, tmp_path):
    import train_dreambooth_lora_difftuning as script
    from benchmark.tiny_models import make_subject_folder

    subject = make_subject_folder(str(tmp_path / "subject"))
    truncated_png(os.path.join(subject, "cut.png"))
    out = str(tmp_path / "out")
    with pytest.raises(dt.ConfigError, match=r"--image_column \S+cut\.png cannot be decoded"):
        script.main(script.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--instance_data_dir", subject,
                                       "--output_dir", out, "--instance_prompt", "a sks square", "--resolution",
                                       "32", "--max_train_steps", "1", "--report_to", "none"]))
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# Second round (issue 38)
# ----------------------------------------------------------------------------------------------


def dreambooth_args(model: str, subject: str, out: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject, "--output_dir", out,
            "--instance_prompt", "a sks square", "--resolution", "32", "--max_train_steps", "1", "--report_to",
            "none", "--train_batch_size", "2", "--checkpointing_steps", "1", "--num_validation_images", "1",
            "--validation_num_inference_steps", "2", "--rank", "2"]


def dreambooth_error(args: list[str]) -> str:
    import train_dreambooth_lora_difftuning as script

    with pytest.raises(dt.ConfigError) as err:
        script.main(script.parse_args(args))
    return str(err.value)


def fake_pipeline(path, class_name: str) -> str:
    """A model folder with only its model_index.json: enough for the checks made before any weights load, and
    a load error (not the expected sentence) if the script got as far as loading weights."""
    os.makedirs(path)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name, "_diffusers_version": "0.42.0"}, f)
    return str(path)


PRIOR = ["--with_prior_preservation", "--class_prompt", "a square", "--num_class_images", "2", "--sample_batch_size",
         "2", "--knowledge_bank_num_inference_steps", "2"]
# (case, model: "sd" or a family's pipeline class for a weightless folder, extra flags, the sentence's words);
# "{subject}" in a flag is the subject folder. Refused before any class sample is generated: no --output_dir,
# no bank.
DREAMBOOTH_SECOND_ROUND = [
    ("blank instance prompt", "sd", ["--instance_prompt", "   "], "--instance_prompt is required"),
    ("class_data_dir inside the subject", "sd", [*PRIOR, "--class_data_dir", "{subject}/bank"],
     "--class_data_dir {subject}/bank is inside --instance_data_dir {subject}"),
    ("LoRA targets match nothing", "sd", [*PRIOR, "--lora_target_modules", "to_k,to_kk"],
     "--lora_target_modules: 'to_kk' names no module of the UNet2DConditionModel"),
    ("fewer subject images than a batch", "sd", [*PRIOR, "--train_batch_size", "8"],
     "There are 4 subject images, fewer than one batch of 8"),
    ("Flux guidance -50", "FluxPipeline", ["--guidance_scale", "-50"], "--guidance_scale must be >= 0, got -50.0."),
    ("SD3 logit mean 1e6", "StableDiffusion3Pipeline", ["--logit_mean", "1e6"],
     "--logit_mean 1000000.0 with --logit_std 1.0 (--weighting_scheme logit_normal) puts 100% of the training "
     "timesteps on one sigma"),
]


@pytest.mark.parametrize("case, model, flags, words", DREAMBOOTH_SECOND_ROUND,
                         ids=[c[0] for c in DREAMBOOTH_SECOND_ROUND])
def test_dreambooth_refused_before_any_sample(tiny_sd, tmp_path, case, model, flags, words):
    from benchmark.tiny_models import make_subject_folder

    subject = make_subject_folder(str(tmp_path / "subject"))
    before = sorted(os.listdir(subject))
    model = tiny_sd if model == "sd" else fake_pipeline(tmp_path / "model", model)
    out = str(tmp_path / "out")
    flags = [flag.replace("{subject}", subject) for flag in flags]
    assert words.replace("{subject}", subject) in dreambooth_error(dreambooth_args(model, subject, out) + flags)
    assert not os.path.exists(out) and sorted(os.listdir(subject)) == before


@pytest.mark.parametrize("script", ["train_dit_difftuning", "train_controlnet_difftuning",
                                    "train_dreambooth_lora_difftuning"])
@pytest.mark.parametrize("flag, value", [("--lr_scheduler", "cosin"), ("--report_to", "tensorbord")])
def test_misspelt_choice_refused_as_flags_are_parsed(script, flag, value, tmp_path, capsys):
    """Enumerations are argparse choices: a misspelling ends the parse (exit 2, argparse's one line) instead of
    failing in get_scheduler or accelerate after the bank was built."""
    import importlib

    module = importlib.import_module(script)
    args = ["--pretrained_model_name_or_path", "m", "--train_data_dir" if "dreambooth" not in script else
            "--instance_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--instance_prompt", "a",
            flag, value]
    if "dreambooth" not in script:
        args = args[:6] + args[8:]
    with pytest.raises(SystemExit) as err:
        module.parse_args(args)
    assert err.value.code == 2 and f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_every_numeric_flag_has_its_range_in_one_table():
    """tp.FLAG_RANGES is where each numeric flag of the three scripts gets its range: a new flag without one fails
    here. (--logit_mean is checked with the density it shapes, --lora_alpha by tp.lora_alpha (any value but 0, as
    upstream); --precondition_outputs is a choice.)"""
    import importlib

    checked_elsewhere = {"logit_mean", "precondition_outputs", "lora_alpha"}
    for script in ("train_dit_difftuning", "train_controlnet_difftuning", "train_dreambooth_lora_difftuning"):
        parser = importlib.import_module(script).build_parser()
        numeric = {a.dest for a in parser._actions if a.type in (int, float)}
        assert numeric - checked_elsewhere <= set(tp.FLAG_RANGES), (script, numeric - set(tp.FLAG_RANGES))
        assert tp.LR_SCHEDULERS == next(a.choices for a in parser._actions if a.dest == "lr_scheduler")
    from diffusers.optimization import SchedulerType

    assert set(tp.LR_SCHEDULERS) <= {t.value for t in SchedulerType}


def read_only(path, monkeypatch) -> None:
    """Make ``path`` read-only; root ignores permission bits, so there os.access is told the same."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (
            os.path.realpath(p).startswith(str(path)) and mode & os.W_OK) and real(p, mode, **kw))


@pytest.mark.parametrize("case", ["output_dir", "bank under a read-only folder"])
def test_read_only_output_refused_before_the_first_step(tiny_dit, image_folder, tmp_path, monkeypatch, case):
    locked = tmp_path / "locked"
    read_only(locked, monkeypatch)
    try:
        if case == "output_dir":
            message = dit_error(dit_args(tiny_dit, image_folder, str(locked)))
            assert f"--output_dir {locked} is not writable ({locked} is read-only for this user)" in message
        else:
            message = dit_error(dit_args(tiny_dit, image_folder, str(tmp_path / "out")) + [
                *SMALL_BANK, "--knowledge_bank_dir", str(locked / "bank")])
            assert f"--knowledge_bank_dir {locked}/bank is not writable ({locked} is read-only" in message
            assert not os.path.exists(tmp_path / "out")
    finally:
        os.chmod(locked, 0o755)
    assert os.listdir(locked) == []


def test_read_only_finished_bank_is_reused(tmp_path, monkeypatch):
    """A finished bank (a shared, read-only one, say) is only read: its folder need not be writable. One without
    its preview would get it written, so it must be."""
    banks = {}
    for name, files in (("finished", ("preview.png",)), ("no preview yet", ())):
        bank = tmp_path / name
        bank.mkdir()
        (bank / dt.MANIFEST_NAME).write_text(json.dumps({"complete": True}))
        for file in files:
            (bank / file).write_bytes(b"png")
        read_only(bank, monkeypatch)
        banks[name] = bank
    try:
        tp.check_output_paths(SimpleNamespace(output_dir=str(tmp_path / "out"), knowledge_bank_dir=str(
            banks["finished"]), train_data_dir=None), "--train_data_dir")
        with pytest.raises(dt.ConfigError, match="--knowledge_bank_dir .* is not writable"):
            tp.check_output_paths(SimpleNamespace(output_dir=str(tmp_path / "out"), knowledge_bank_dir=str(
                banks["no preview yet"]), train_data_dir=None), "--train_data_dir")
    finally:
        for bank in banks.values():
            os.chmod(bank, 0o755)


def test_folder_without_images_named(tiny_dit, tmp_path):
    data = tmp_path / "notes"
    (data / "circle").mkdir(parents=True)
    (data / "circle" / "a.txt").write_text("not an image")
    (data / "b.csv").write_text("x\n1\n")
    assert f"--train_data_dir {data} holds no image files." in dit_error(dit_args(tiny_dit, str(data),
                                                                                   str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("script", ["dit", "dreambooth"])
def test_output_dir_is_not_the_base_models_folder(tiny_dit, tiny_sd, image_folder, tmp_path, script):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_dit if script == "dit" else tiny_sd, model)
    with open(os.path.join(model, "README.md"), "w") as f:
        f.write("---\nlicense: openrail\n---\nThe base model's card.\n")
    before = {name: os.path.getmtime(os.path.join(model, name)) for name in os.listdir(model)}
    if script == "dit":
        message = dit_error(dit_args(model, image_folder, model))
    else:
        from benchmark.tiny_models import make_subject_folder

        message = dreambooth_error(dreambooth_args(model, make_subject_folder(str(tmp_path / "subject")), model))
    assert f"--output_dir {model} is the folder of --pretrained_model_name_or_path" in message
    assert {name: os.path.getmtime(os.path.join(model, name)) for name in os.listdir(model)} == before
    assert open(os.path.join(model, "README.md")).read().endswith("The base model's card.\n")


def snapshot(folder: str) -> dict[str, tuple[int, float]]:
    """Every file under ``folder``: (size, modification time)."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.path.getsize(os.path.join(d, f)),
                                                           os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


def test_second_run_on_one_output_dir_refused(tiny_dit, image_folder, three_checkpoints, tmp_path):
    """The first run holds the folder's lock (here: this test); the second is refused and writes nothing."""
    import fcntl

    out = copy_run(three_checkpoints, tmp_path)
    before = snapshot(out)
    handle = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = dit_error(dit_args(tiny_dit, image_folder, out, steps=4) + ["--resume_from_checkpoint", "latest"])
    finally:
        os.close(handle)
    assert f"--output_dir {out} is in use by another run" in message
    assert snapshot(out) == before


def disk_full_safetensors(monkeypatch, fails: Callable[[str], bool]) -> None:
    """safetensors' save_file writes half the file and raises what it raises on a full disk (SafetensorError, which
    is neither OSError nor RuntimeError) for the paths ``fails`` picks."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if not fails(str(filename)):
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(knowledge_bank, "save_file", save_file)


@pytest.mark.parametrize("script", ["dit", "dreambooth"])
def test_full_disk_at_the_final_save(tiny_dit, tiny_sd, image_folder, tmp_path, monkeypatch, script):
    """The final weights go to a temporary folder renamed when complete: a full disk there ends in the full-disk
    sentence, the partial folder is removed, the checkpoints and the bank are kept."""
    out = str(tmp_path / "out")
    disk_full_safetensors(monkeypatch, lambda path: "checkpoint" not in path and "knowledge_bank" not in path)
    if script == "dit":
        message = dit_error(dit_args(tiny_dit, image_folder, out) + SMALL_BANK)
        what, unwanted = "the fine-tuned pipeline", ["transformer", "vae", "model_index.json"]
    else:
        from benchmark.tiny_models import make_subject_folder

        subject = make_subject_folder(str(tmp_path / "subject"))
        message = dreambooth_error(dreambooth_args(tiny_sd, subject, out) + PRIOR)
        what, unwanted = "the LoRA weights", ["pytorch_lora_weights.safetensors"]
    assert message.startswith(f"The disk is full: writing {what} into {out} failed with")
    left = os.listdir(out)
    assert not [name for name in left if name in unwanted or ".tmp" in name], left
    bank = "knowledge_bank" if script == "dit" else "class_images.knowledge_bank"  # DreamBooth's class images' bank
    assert "checkpoint-1" in left and bank in left and (script == "dit" or len(os.listdir(f"{out}/class_images")) == 2)


def test_full_disk_at_a_bank_shard(tmp_path, monkeypatch):
    bank = str(tmp_path / "bank")
    disk_full_safetensors(monkeypatch, lambda path: "shard-00001" in path)
    with pytest.raises(dt.ConfigError, match=rf"The disk is full: writing knowledge-bank shard 1 into {bank} failed"):
        dt.build_knowledge_bank(bank, lambda batch, gen: torch.randn(len(batch), 4, 2, 2, generator=gen),
                                list(range(6)), 2, 0, {"model": "x"})
    assert sorted(os.listdir(bank)) == [".lock", dt.MANIFEST_NAME, "shard-00000.safetensors"]


def test_bank_finished_with_other_settings_while_waiting_refused(tmp_path, monkeypatch):
    """Run A holds the bank's lock and finishes it with its own settings while run B (this call) waits: B refuses
    instead of writing its manifest over A's samples."""
    import contextlib

    bank = str(tmp_path / "bank")
    theirs = {"format_version": dt.BANK_FORMAT_VERSION, "complete": True, "count": 2,
              "settings": {"model": "x", "prompt": "a dog", "seed": 0, "size": 2, "batch_size": 2}}

    @contextlib.contextmanager
    def lock_released_after_the_other_run(bank_dir, is_main_process):
        os.makedirs(bank_dir, exist_ok=True)
        dt.atomic_write_json(os.path.join(bank_dir, dt.MANIFEST_NAME), theirs)
        yield

    monkeypatch.setattr(knowledge_bank, "_build_lock", lock_released_after_the_other_run)
    sampled = []
    with pytest.raises(dt.ConfigError, match=r"was built with other settings \(prompt: 'a dog' there, 'a cat' now"):
        dt.build_knowledge_bank(bank, lambda batch, gen: sampled.append(batch) or torch.zeros(len(batch), 4, 2, 2),
                                [0, 1], 2, 0, {"model": "x", "prompt": "a cat"})
    assert json.load(open(os.path.join(bank, dt.MANIFEST_NAME))) == theirs and not sampled


def test_diverged_run_names_a_checkpoint_that_trains(tiny_dit, image_folder, tmp_path):
    """Adam moves every weight by about the learning rate at the first step: with --learning_rate 1e30 checkpoint-1
    holds finite weights of 1e30 whose loss (first computed at step 2) is nan. The sentence must not send the
    user back to it."""
    out = str(tmp_path / "out")
    message = dit_error(dit_args(tiny_dit, image_folder, out) + ["--learning_rate", "1e30", "--logging_steps", "100",
                                                                  "--max_grad_norm", "0"])
    assert message.startswith("The loss became non-finite by step 2") and "resume from that checkpoint" not in message
    assert ("no checkpoint's weights were seen to give a finite loss (checkpoint-1 was saved after the last finite "
            "loss, so its weights may already have diverged); start again with a lower --learning_rate") in message
    assert os.listdir(out).count("checkpoint-1") == 1 and "checkpoint-2" not in os.listdir(out)


def test_non_finite_weights_stop_before_a_checkpoint(tmp_path):
    """The weights are checked before each checkpoint (and the final save): an optimizer step can make them
    non-finite while the loss read at that step, computed before it, was finite. The advice names the newest
    checkpoint whose weights gave a finite loss."""
    accelerator = SimpleNamespace(log=lambda logs, step: None, num_processes=1)
    weight = torch.nn.Parameter(torch.ones(3))
    log = tp.TrainingLog(accelerator, logging_steps=10, images_per_step=1, checkpointing_steps=2, params=[weight],
                         output_dir=str(tmp_path))
    for step in (1, 2):
        log.add({"loss": torch.tensor(0.5)})
        assert (log.step(step, 1e-4) is None) == (step == 1)  # read before the checkpoint only: no sync in between
    (tmp_path / "checkpoint-2").mkdir()
    with torch.no_grad():
        weight[1] = float("nan")
    log.add({"loss": torch.tensor(0.5)})
    assert log.step(3, 1e-4) is None
    log.add({"loss": torch.tensor(0.5)})
    with pytest.raises(tp.NonFiniteLoss, match="The trained weights became non-finite at step 4") as err:
        log.step(4, 1e-4)  # before checkpoint-4
    assert ("resume from checkpoint-2, the newest checkpoint whose weights gave a finite loss, with a lower "
            f"--learning_rate (or set --max_grad_norm): --resume_from_checkpoint {tmp_path}/checkpoint-2."
            ) in str(err.value)
    (tmp_path / "checkpoint-4").mkdir()  # had it been saved, its weights would not have met the data yet
    log.add({"loss": torch.tensor(float("inf"))})
    with pytest.raises(tp.NonFiniteLoss, match="The loss became non-finite by step 5") as err:
        log.step(5, 1e-4, force=True)
    assert "resume from checkpoint-2, the newest checkpoint whose weights gave a finite loss (checkpoint-4 was " \
           "saved after the last finite loss" in str(err.value)


def exif_rotated_png(path: str, size: tuple[int, int], orientation: int) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)


@pytest.mark.parametrize("case, image_size, orientation, condition_size, accepted", [
    ("rotated photo, upright condition", (60, 40), 6, (40, 60), True),  # training sees the photo as 40x60
    ("rotated photo, condition of its raw size", (60, 40), 6, (60, 40), False),
    ("no rotation", (60, 40), 1, (60, 40), True),
])
def test_controlnet_pairs_compared_as_training_sees_them(tmp_path, case, image_size, orientation, condition_size,
                                                         accepted):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    import train_controlnet_difftuning as script

    exif_rotated_png(str(tmp_path / "image.png"), image_size, orientation)
    Image.new("RGB", condition_size).save(tmp_path / "condition.png")
    dataset = Dataset.from_dict({"image": [str(tmp_path / "image.png")],
                                 "conditioning_image": [str(tmp_path / "condition.png")]})
    dataset = dataset.cast_column("image", ImageFeature()).cast_column("conditioning_image", ImageFeature())
    assert dataset[0]["image"].size == (image_size[::-1] if orientation == 6 else image_size)  # what training reads
    args = SimpleNamespace(image_column="image", conditioning_image_column="conditioning_image", skip_bad_images=False)
    if accepted:
        assert len(script.check_image_pairs(args, dataset)) == 1
    else:
        with pytest.raises(dt.ConfigError, match="Row 0: image is 40x60 but conditioning_image is 60x40"):
            script.check_image_pairs(args, dataset)
