"""What a careless or unlucky user meets: each case ends in one sentence (exit 2, before the first step where
the input allows it) or is handled, and nothing written before is damaged. docs/what_happens_when.md lists
the same cases with their messages."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, error_line, run_script
from PIL import Image

import difftuning_utils as dt
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


# (case, extra flags, the sentence's words): refused when the flags are parsed or before the first step,
# and no --output_dir is written.
EARLY = [
    ("learning rate inf", ["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf."),
    ("learning rate nan", ["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan."),
    ("tau nan", ["--difftuning", "--difftuning_tau", "nan"], "--difftuning_tau must be a finite number, got nan."),
    ("resolution 0", ["--resolution", "0"], "--resolution must be >= 8, got 0."),
    ("no checkpoints kept", ["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1, got 0."),
    ("adam beta 1", ["--adam_beta2", "1"], "--adam_beta2 must be < 1, got 1.0."),
    ("unknown validation class", ["--validation_class_labels", "triangle"],
     "--validation_class_labels: 'triangle' is not a class of the dataset"),
    ("push offline", ["--push_to_hub"], "--push_to_hub: the Hub repository 'out' could not be created"),
    ("token to wandb", ["--report_to", "wandb", "--hub_token", "hf_x"], "--report_to wandb with --hub_token would "
     "expose the token"),
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


DREAMBOOTH_EARLY = [case for case in EARLY if case[0] not in ("unknown validation class", "tau nan")] + [
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
