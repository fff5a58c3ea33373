"""Test launcher: run a training script under accelerate's FSDP or DeepSpeed on CPU processes (gloo).

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/sharding_on_cpu.py train_dit_difftuning.py ...

accelerate (1.15) turns FSDP and DeepSpeed on only for GPUs and other accelerators: on a CPU-only machine the
scripts' ``Accelerator(cpu=True)`` sets up plain multi-CPU data parallelism, which the scripts refuse when the
config asks for sharding (training_plumbing.check_sharding). torch's FSDP2 (``fully_shard``) and DeepSpeed's CPU
accelerator (deepspeed >= 0.14, gloo) do run on CPU, so this launcher makes accelerate select them there, then runs
the script unchanged: every accelerate and script code path after that choice is the one a GPU run takes. Test
use only; it is no part of the scripts.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys

import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env


def _fsdp_on_cpu() -> None:
    """After accelerate's own set-up (multi-CPU), switch the state to FSDP with the plugin from the config."""
    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs) -> None:  # noqa: ANN001
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def _deepspeed_on_cpu() -> None:
    """Let accelerate initialise DeepSpeed (``not cpu``) on a gloo multi-CPU backend: DeepSpeed then picks its CPU
    accelerator and the processes run on the CPU device."""
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.MULTI_CPU)
    init = accelerate.Accelerator.__init__

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN001
        init(self, *args, **{**kwargs, "cpu": False})

    accelerate.Accelerator.__init__ = __init__


if __name__ == "__main__":
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        _fsdp_on_cpu()
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        _deepspeed_on_cpu()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
        exit_code = 0
    except SystemExit as stop:
        exit_code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    # Skip the interpreter's teardown. FSDP2 over gloo (possible only through this launcher) can leave collective
    # work held by gloo's worker threads; destroying it during finalisation aborts a process that has finished
    # ("terminate called without an active exception"; seen once in CI), and torchrun then kills the other rank
    # mid-save. GPU runs use NCCL and never come here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
