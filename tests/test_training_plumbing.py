"""Unit tests of the training_plumbing package: the shared pieces the three scripts rely on for exact resumes, correct
crops, schedules and honest model cards."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import training_plumbing as tp


def test_epoch_order_depends_on_seed_and_epoch_only():
    """Every process and every resume sees the same permutation for (seed, epoch); epochs differ."""
    first, again = tp.EpochShuffleSampler(50, 7), tp.EpochShuffleSampler(50, 7)
    first.set_epoch(3)
    again.set_epoch(3)
    order = [key.index for key in first]
    assert order == [key.index for key in again] and sorted(order) == list(range(50))
    again.set_epoch(4)
    assert order != [key.index for key in again]
    assert all(key.epoch == 4 for key in again)
    a = tp.sample_rng(7, tp.SampleKey(3, 11)).random()
    assert a == tp.sample_rng(7, tp.SampleKey(3, 11)).random() != tp.sample_rng(7, tp.SampleKey(4, 11)).random()


def test_resize_crop_flip_reports_what_sdxl_conditions_on():
    image = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3))  # 60 wide, 40 high
    square, original, crop = tp.resize_crop_flip(image, 20, True, False, None)
    assert square.size == (20, 20) and original == (40, 60) and crop == (0, 5)  # resized to 30x20: 5 each side
    rng = np.random.default_rng(0)
    for _ in range(20):
        square, _, (top, left) = tp.resize_crop_flip(image, 20, False, True, rng)
        assert square.size == (20, 20) and top == 0 and 0 <= left <= 10
    tensor = tp.to_model_tensor(Image.new("RGB", (4, 4), (255, 0, 128)))
    assert tensor.shape == (3, 4, 4) and tensor[0].eq(1).all() and tensor[1].eq(-1).all()


def test_mirrored_crop_position_is_the_mirror_image():
    """With a flip, the crop's left edge is measured in the mirrored image, as the model sees it."""
    image = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    for seed in range(30):
        _, _, (_, left) = tp.resize_crop_flip(image, 20, False, False, np.random.default_rng(seed))
        _, _, (_, flipped_left) = tp.resize_crop_flip(image, 20, False, True, np.random.default_rng(seed))
        assert flipped_left in (left, 40 - left - 20)


@pytest.mark.parametrize("batches, accumulation, epochs, steps, expected", [
    (10, 1, 3, None, (30, 3)), (10, 4, 2, None, (6, 2)), (10, 1, 1, 25, (25, 3)), (7, 2, 1, 100, (100, 25))])
def test_training_length(batches, accumulation, epochs, steps, expected):
    args = argparse.Namespace(gradient_accumulation_steps=accumulation, num_train_epochs=epochs, max_train_steps=steps)
    assert tp.resolve_training_length(args, batches) == expected


def test_model_card_references_never_leak_local_paths(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path / "runs" / "my-lora"))
    assert tp.usage_reference(args, None) == "my-lora"
    assert tp.usage_reference(args, "me/my-lora") == "me/my-lora"
    assert tp.display_path(str(tmp_path / "base-model")) == "base-model"
    assert tp.display_path("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    identity = tp.checkpoint_identity(argparse.Namespace(pretrained_model_name_or_path=str(tmp_path / "m"),
                                                         finetune="lora", rank=4), "/x/train_dit_difftuning.py")
    assert identity == {"script": "train_dit_difftuning.py", "pretrained_model_name_or_path": "m", "finetune": "lora",
                        "rank": 4}


def test_step_generator_state_round_trips():
    """A resumed run draws exactly what the straight run draws."""
    rng = tp.StepGenerator(5, 0)
    rng.rand(3, "cpu")
    state = rng.state_dict()
    expected = (rng.rand(4, "cpu"), rng.randn((2, 3), torch.device("cpu")))
    restored = tp.StepGenerator(99, 1)
    restored.load_state_dict(state)
    assert torch.equal(restored.rand(4, "cpu"), expected[0])
    assert torch.equal(restored.randn((2, 3), torch.device("cpu")), expected[1])
    assert not torch.equal(tp.StepGenerator(5, 1).rand(4, "cpu"), tp.StepGenerator(5, 0).rand(4, "cpu"))
