"""Fixtures: tiny models and datasets built offline (the Hub is unreachable here and in CI)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from benchmark.tiny_models import (
    make_image_folder,
    make_subject_folder,
    make_tiny_dit_pipeline,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sd_pipeline,
    make_tiny_sdxl_pipeline,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory) -> str:
    return make_tiny_dit_pipeline(str(tmp_path_factory.mktemp("tiny-dit")))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A tiny StableDiffusionPipeline folder (ControlNet and DreamBooth tests)."""
    return make_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return make_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    return make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def subject(tmp_path_factory) -> str:
    """A DreamBooth subject folder (four jittered images of one red square with a blue dot)."""
    return make_subject_folder(str(tmp_path_factory.mktemp("subject")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    """A tiny FluxPipeline folder with the guidance input, CLIP and T5 (DreamBooth tests)."""
    return make_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("shapes")))


# PYTHONFAULTHANDLER: a hung run is stopped with SIGABRT, so every Python process in it prints its stacks.
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_command(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess | str:
    """Run ``cmd``; on a timeout, abort it and its children (torchrun starts each worker in a session of
    its own) and return the stderr tail, which holds each process's stacks, instead of a result."""
    import psutil  # an accelerate dependency

    proc = subprocess.Popen(cmd, env={**SCRIPT_ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        tree = launcher.children(recursive=True)[::-1] + [launcher]
        # Freeze the launcher so it can neither respawn nor terminate (without stacks) the workers, then abort
        # one process at a time: faulthandler's dumps of processes sharing a stderr would interleave mid-line.
        with contextlib.suppress(psutil.Error):
            launcher.suspend()
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGABRT)
                if process is launcher:
                    process.resume()
            psutil.wait_procs([process], timeout=10)
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(tree, timeout=20)
        stderr = proc.communicate()[1]
        return f"{' '.join(cmd[:6])} ... hung for {timeout:.0f} s; the end of its stderr, stacks included:\n" \
               f"{stderr[-12000:]}"


def run_script(script: str, args: list[str], launcher: list[str] | None = None, ok: bool = True,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a training script as a user would (a subprocess); with ``ok``, fail the test on a non-zero exit.

    No retry: a multi-process run passes ``--ddp_timeout`` shorter than this timeout, so a collective
    that never completes fails inside the run with the traceback of where it waited, and a run that
    hangs anywhere else is aborted with every process's stacks (see :func:`run_command`).
    """
    cmd = (launcher or [sys.executable]) + [script] + args
    result = run_command(cmd, 300 if launcher else 600, env)
    if not isinstance(result, subprocess.CompletedProcess):
        raise AssertionError(result)
    if ok and result.returncode != 0:
        # A native crash's faulthandler dump ends with a long "Extension modules: ..." line; drop it so the
        # tail shown keeps the stacks and the error that matter.
        stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("Extension modules:"))
        raise AssertionError(f"script failed ({result.returncode}):\n{stderr[-12000:]}")
    return result


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
    import training_plumbing.hub

    calls: dict = {}

    class Repo:
        def __init__(self, repo_id: str) -> None:
            self.repo_id = repo_id

    monkeypatch.setattr(training_plumbing.hub, "create_repo",
                        lambda **kw: calls.setdefault("create", kw) and Repo(kw["repo_id"]))
    monkeypatch.setattr(training_plumbing.hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    return calls


def files_uploaded(upload: dict) -> list[str]:
    """Paths under the uploaded folder that the upload's ignore patterns let through."""
    import fnmatch

    root = upload["folder_path"]
    paths = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
    return [p for p in paths if not any(fnmatch.fnmatch(p, pat) for pat in upload["ignore_patterns"])]


TOKEN = "hf_NotARealTokenButSecret0123456789"


def assert_no_token(folder: str, *texts: str) -> None:
    """No file under ``folder`` (logs, TensorBoard events, card, weights, checkpoints) and no text (captured
    console output) holds :data:`TOKEN`."""
    for text in texts:
        assert TOKEN not in text
    for directory, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(directory, name)
