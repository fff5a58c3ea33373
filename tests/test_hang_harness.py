"""The subprocess runner itself: a hung multi-process run must end, report stacks and leave nothing behind."""

from __future__ import annotations

import os
import subprocess

import psutil
from conftest import TWO_PROCESSES, run_command

HANGING_SCRIPT = """
import time, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    time.sleep(1000)  # rank 0 waits in the barrier below forever
dist.barrier()
"""


def test_hung_two_process_run_is_aborted_with_stacks(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_SCRIPT)
    # Generous: on a loaded 2-core machine, starting two workers that import torch and join gloo takes > 8 s.
    result = run_command(TWO_PROCESSES + [str(script)], timeout=30)
    assert isinstance(result, str) and "hung for 30 s" in result
    assert "in barrier" in result and 'hang.py", line 5' in result  # both workers' stacks
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]


def test_finished_run_is_returned(tmp_path):
    result = run_command(["python3", "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 3 and result.stdout == "out\n" and os.path.basename(result.args[0]) == "python3"


STUCK_COLLECTIVE_SCRIPT = """
import argparse, sys, time
sys.path.insert(0, {root!r})
import training_plumbing as tp
args = argparse.Namespace(gradient_accumulation_steps=1, mixed_precision="no", report_to="none", output_dir={out!r},
                          logging_dir="logs", seed=0, allow_tf32=True, ddp_timeout=5)
accelerator, _ = tp.setup_accelerator(args)
if accelerator.process_index == 1:
    time.sleep(60)  # never reaches the barrier in time
accelerator.wait_for_everyone()
"""


def test_stuck_collective_fails_with_a_traceback_within_ddp_timeout(tmp_path):
    """The scripts' --ddp_timeout reaches gloo: a collective one process never joins fails in seconds, with the
    traceback of where the other waited, instead of hanging until the test's own timeout."""
    from conftest import ROOT

    script = tmp_path / "stuck.py"
    script.write_text(STUCK_COLLECTIVE_SCRIPT.format(root=ROOT, out=str(tmp_path / "out")))
    result = run_command(TWO_PROCESSES + [str(script)], timeout=90)
    assert isinstance(result, subprocess.CompletedProcess), result  # not hung
    assert result.returncode != 0
    assert "wait_for_everyone" in result.stderr and "stuck.py" in result.stderr
