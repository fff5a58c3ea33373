"""Fixtures: tiny models and datasets built offline (the Hub is unreachable here and in CI)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
from tiny_models import make_image_folder, make_tiny_dit_pipeline  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory) -> str:
    return make_tiny_dit_pipeline(str(tmp_path_factory.mktemp("tiny-dit")))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("shapes")))
