"""Fixtures: tiny models and datasets built offline (the Hub is unreachable here and in CI)."""

from __future__ import annotations

import os
import subprocess
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


SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}


def run_script(script: str, args: list[str], launcher: list[str] | None = None,
               ok: bool = True) -> subprocess.CompletedProcess:
    """Run a training script as a user would (a subprocess); with ``ok``, fail the test on a non-zero exit."""
    proc = subprocess.run((launcher or [sys.executable]) + [script] + args, env=SCRIPT_ENV, capture_output=True,
                          text=True, timeout=600)
    if ok and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-sentence error of a bad-input run: exit code 2, an 'error: ' line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


@pytest.fixture
def captured_hub(monkeypatch) -> dict:
    """The Hub is unreachable: record create_repo/upload_folder calls instead (keys 'create', 'upload')."""
    import training_plumbing

    calls: dict = {}

    class Repo:
        def __init__(self, repo_id: str) -> None:
            self.repo_id = repo_id

    monkeypatch.setattr(training_plumbing, "create_repo",
                        lambda **kw: calls.setdefault("create", kw) and Repo(kw["repo_id"]))
    monkeypatch.setattr(training_plumbing, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    return calls


def files_uploaded(upload: dict) -> list[str]:
    """Paths under the uploaded folder that the upload's ignore patterns let through."""
    import fnmatch

    root = upload["folder_path"]
    paths = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
    return [p for p in paths if not any(fnmatch.fnmatch(p, pat) for pat in upload["ignore_patterns"])]
