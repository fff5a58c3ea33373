"""`python -m benchmark.try_script`: a training script run offline on a tiny pipeline, as README.md shows."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
from conftest import run_command
from PIL import Image

from benchmark import try_script
from benchmark.tiny_models import make_circle_dataset, make_subject_folder
from difftuning_common import ConfigError


def test_try_dit_runs_the_script_and_loads_its_result(tmp_path) -> None:
    """End to end: the real script trains (a checkpoint, the model card, the pipeline), the result loads and
    draws a 32 px sample, and the console shows the command and how to load the result. A second try empties
    the first's folder; a folder the tool did not make is refused in one sentence and left as it was."""
    out = tmp_path / "try"
    result = run_command([sys.executable, "-m", "benchmark.try_script", "dit", "--output_dir", str(out),
                          "--max_train_steps", "2"], timeout=600)
    assert not isinstance(result, str), result  # a hang: every process's stacks
    assert result.returncode == 0, result.stderr[-3000:]
    model = out / "model"
    assert (model / "model_index.json").exists() and (model / "README.md").exists()
    assert (model / "checkpoint-2").is_dir() and (model / "knowledge_bank" / "manifest.json").exists()
    assert Image.open(out / "sample.png").size == (32, 32)
    assert "train_dit_difftuning.py --pretrained_model_name_or_path" in result.stdout
    assert "--difftuning" in result.stdout
    assert f'DiffusionPipeline.from_pretrained("{os.path.relpath(model)}")' in result.stdout
    assert "Steps: 100%" in result.stderr  # the script's own progress bar reaches the console

    try_script.prepare_folder(str(out))  # a second try starts afresh
    assert os.listdir(out) == [try_script.MARKER]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="--output_dir .* was not made by this tool"):
        try_script.prepare_folder(str(mine))
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("name", ["controlnet", "dreambooth"])
def test_try_script_flags_parse_in_the_script(name, tiny_sd, tmp_path) -> None:
    """The flags try_script gives ControlNet and DreamBooth are the scripts' own (their parsers and checks accept
    them), with --difftuning unless --no-difftuning; the data builders make what the flags point at."""
    data = (make_circle_dataset if name == "controlnet" else make_subject_folder)(str(tmp_path / "data"))
    script = importlib.import_module(try_script.SCRIPTS[name].removesuffix(".py"))
    for difftuning in (True, False):
        flags = try_script.script_flags(name, tiny_sd, data, str(tmp_path / "model"), 3, difftuning)
        args = script.parse_args(flags)
        assert args.difftuning is difftuning and args.max_train_steps == 3 and args.resolution == 32
        if name == "controlnet":
            assert all(os.path.exists(path) for path in args.validation_image)
        else:
            assert args.with_prior_preservation and args.class_prompt == "a photo of a square"
    assert try_script.parse_args([name]).output_dir.endswith(os.path.join("outputs", f"try_{name}"))
