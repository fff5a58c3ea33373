"""The accelerator and the processes: set-up, mixed-precision dtype, FSDP2/DeepSpeed checks and wrapping,
torch.compile of the training step, gathering and resharding weights, unwrapping accelerate's and
torch.compile's wrappers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

from difftuning_common import ConfigError

from .models import quiet_known_warnings

logger = get_logger(__name__)


def setup_accelerator(args: argparse.Namespace) -> tuple[Accelerator, torch.dtype]:
    """Accelerator and the dtype of frozen weights (trainable ones stay float32)."""
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # `accelerate launch --cpu --num_processes N` silently runs one process; forcing CPU here when no
        # GPU exists makes `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` or torchrun work.
        cpu=not torch.cuda.is_available(),
    )
    expected = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"WORLD_SIZE is {expected} but accelerate started {accelerator.num_processes} process(es).")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    quiet_known_warnings()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
    # --output_dir was made (empty) for its lock (claims_output_dir), which removes it again when the run is
    # refused before anything is written into it.
    check_sharding(accelerator, args)
    return accelerator, mixed_precision_dtype(accelerator)


def mixed_precision_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of mixed precision (float32 without): the frozen weights' and autocast's."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# The units FSDP shards for models whose diffusers class declares no _no_split_modules (see fsdp_wrap_classes).
FSDP_UNITS = {
    # DiT's forward reads the first block's timestep and label embedding from outside that block, so a whole
    # BasicTransformerBlock cannot be a unit (its shards would not be gathered there): its attention and MLP
    # layers are, and the adaLN modulation layers stay in the root unit.
    "DiTTransformer2DModel": ("Attention", "FeedForward"),
    "ControlNetModel": ("BasicTransformerBlock", "ResnetBlock2D"),
}


def sharded_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the trained model's parameters (FSDP, DeepSpeed ZeRO-3). Then
    reading the weights whole (a checkpoint's inference copy, validation, the final save) is a collective that
    every process must join, and a copy of the parameters (an EMA) is a copy of one shard."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and zero_stage(accelerator) == 3


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage of the run's config."""
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def check_sharding(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Refuse, in one sentence, an accelerate config these scripts cannot honour, before any weights load; fill
    the DeepSpeed entries the flags decide (gradient clipping, left "auto" by configs/accelerate/)."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    kind = accelerator.distributed_type
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(env) and kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            import accelerate

            raise ConfigError(f"The accelerate config asks for {name}, but accelerate {accelerate.__version__} set up "
                              f"{kind.value} ({name} is only turned on for GPUs or other accelerators; torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s)): launch on GPUs, or without the config.")
    configured = accelerator.gradient_accumulation_steps  # accelerate lets its config's value win over ours
    if configured != args.gradient_accumulation_steps:
        raise ConfigError(f"The accelerate config sets gradient_accumulation_steps {configured} but "
                          f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: remove it from the "
                          "config (the flag decides) or pass the same value.")
    if getattr(args, "torch_compile", False):
        if accelerator.state.dynamo_plugin.backend.value != "NO":
            raise ConfigError("--torch_compile and accelerate's dynamo_backend both compile the model: keep one.")
        if kind == DistributedType.DEEPSPEED:
            raise ConfigError("--torch_compile cannot wrap DeepSpeed's engine (it gathers and frees parameters in "
                              "hooks torch.compile does not trace): leave the flag out, or use FSDP or DDP.")
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("The accelerate config uses FSDP1 (fsdp_version: 1); these scripts support FSDP2 "
                          "(fsdp_version: 2, as configs/accelerate/fsdp.yaml), which shards LoRA and frozen weights "
                          "together and clips a subset of parameters by their global norm.")
    if kind != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, ours in (("optimizer", "AdamW from the --adam_* flags"), ("scheduler", "--lr_scheduler")):
        if key in ds:
            raise ConfigError(f"The DeepSpeed config defines its own {key}; these scripts build theirs ({ours}): "
                              "remove it from the config.")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas != "auto" and int(gas) != args.gradient_accumulation_steps:
        raise ConfigError(f"The DeepSpeed config sets gradient_accumulation_steps {gas} but "
                          f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: set it to \"auto\".")
    clipping = ds.get("gradient_clipping", "auto")
    if clipping == "auto":  # DeepSpeed clips inside its own step (0 = off); accelerator.clip_grad_norm_ does not
        ds["gradient_clipping"] = args.max_grad_norm
    elif float(clipping) != args.max_grad_norm:
        raise ConfigError(f"The DeepSpeed config sets gradient_clipping {clipping} but --max_grad_norm is "
                          f"{args.max_grad_norm} (DeepSpeed clips inside its own step): set it to \"auto\".")
    if zero_stage(accelerator) == 3:
        if getattr(args, "use_ema", False):
            raise ConfigError("--use_ema cannot be used with DeepSpeed ZeRO-3, which partitions the parameters "
                              "across processes: use FSDP or ZeRO-2, or leave --use_ema out.")
        if not ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False):
            raise ConfigError("DeepSpeed ZeRO-3 needs zero3_save_16bit_model: true in the accelerate config "
                              "(stage3_gather_16bit_weights_on_model_save): the model is saved from gathered weights.")


def fsdp_wrap_classes(model: torch.nn.Module) -> list[str]:
    """The classes FSDP shards as units of ``model``: one all-gather per block, just before it runs, instead of the
    whole model at once. diffusers declares them in ``_no_split_modules`` for SD3 (JointTransformerBlock), Flux
    (FluxTransformerBlock, FluxSingleTransformerBlock) and the UNet; DiT and ControlNet declare none and take
    :data:`FSDP_UNITS`. Only classes the model has (accelerate refuses others); none leaves one unit, the model."""
    present = {type(module).__name__ for module in model.modules()}
    declared = getattr(model, "_no_split_modules", None) or FSDP_UNITS.get(type(model).__name__, ())
    return [name for name in declared if name in present]


def prepare_training(accelerator: Accelerator, params: list[torch.nn.Parameter], model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, dataloader: torch.utils.data.DataLoader, *more: Any
                     ) -> tuple[list, list[torch.nn.Parameter]]:
    """``accelerator.prepare(model, optimizer, dataloader, *more)`` and the trained parameters as the prepared model
    holds them. FSDP2 replaces every parameter by a sharded DTensor, so a list taken before would be stale:
    accelerate's clipping fails on it (mixed Tensor and DTensor) and an EMA of it would never move. Under FSDP
    the blocks to shard are named (:func:`fsdp_wrap_classes`) unless the config lists them; under DeepSpeed a
    fixed micro-batch size in its config must be the loader's (the bank rows a step adds are not counted)."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
            logger.info(f"FSDP shards {type(model).__name__} by {', '.join(plugin.transformer_cls_names_to_wrap)}")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        micro = ds.get("train_micro_batch_size_per_gpu", "auto")
        if micro != "auto" and int(micro) != dataloader.batch_size:
            raise ConfigError(f"The DeepSpeed config sets train_micro_batch_size_per_gpu {micro} but each process "
                              f"loads batches of {dataloader.batch_size} (from --train_batch_size): set it to "
                              "\"auto\" (and train_batch_size too).")
        total = ds.get("train_batch_size", "auto")
        expected = dataloader.batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
        if total != "auto" and int(total) != expected:
            raise ConfigError(f"The DeepSpeed config sets train_batch_size {total} but the run's is {expected} "
                              f"({dataloader.batch_size} per process x {accelerator.gradient_accumulation_steps} "
                              f"accumulation steps x {accelerator.num_processes} processes): set it to \"auto\".")
    prepared = accelerator.prepare(model, optimizer, dataloader, *more)
    if accelerator.distributed_type == DistributedType.FSDP:
        params = [p for p in prepared[0].parameters() if p.requires_grad]
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision in ("bf16", "fp16"):
        cast_io_to_weights(unwrap(accelerator, prepared[0]), mixed_precision_dtype(accelerator))
    return list(prepared), params


def cast_io_to_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 mode casts the trained model's weights to ``dtype`` and runs it without autocast,
    where accelerate's other modes autocast and return float32: so cast its floating-point inputs to its dtype and
    its outputs back to float32, as the loss code expects (what upstream scripts do by hand at each call)."""
    from accelerate.utils.operations import convert_to_fp32, recursively_apply

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    model.register_forward_pre_hook(lambda _m, args, kwargs: (recursively_apply(cast, args),
                                                              recursively_apply(cast, kwargs)), with_kwargs=True)
    model.register_forward_hook(lambda _m, _args, output: convert_to_fp32(output))


def prepare_lr_scheduler(accelerator: Accelerator, scheduler: Any) -> Any:
    """The prepared lr scheduler (built on the prepared optimizer). accelerate wraps and checkpoints a scheduler
    prepared on its own, after the model (the schedule's length needs the per-process loader), except under
    DeepSpeed, where it would return it as is: stepped at every micro-batch instead of once per optimizer step
    (x processes, as elsewhere), and never saved. There it is wrapped as everywhere else and saved with the
    checkpoint's registered objects."""
    from accelerate.scheduler import AcceleratedScheduler
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare(scheduler)
    wrapped = AcceleratedScheduler(scheduler, scheduler.optimizer,
                                   step_with_optimizer=accelerator.step_scheduler_with_optimizer,
                                   split_batches=accelerator.split_batches)
    accelerator.register_for_checkpointing(wrapped)
    return wrapped


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prepared model's whole state dict (plain keys), on the main process. With sharded parameters it is
    gathered (:func:`sharded_parameters`: every process must call this; the others get ``{}``); otherwise it is
    the module's own ``state_dict()``, no copy."""
    if not sharded_parameters(accelerator):
        return unwrap(accelerator, model).state_dict()
    state = accelerator.get_state_dict(model)
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()} if accelerator.is_main_process else {}


def plain_copy(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], torch.nn.Module]
               ) -> torch.nn.Module | None:
    """The trained model as a plain module on the main process, None on the others: the prepared module itself
    (unwrapped) when its parameters are whole; with sharded parameters a module made by ``build`` (the same
    structure: adapters, added parameters) given the gathered weights, a collective every process must join."""
    if not sharded_parameters(accelerator):
        return unwrap(accelerator, model) if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    plain = build()
    plain.load_state_dict(state)
    return plain


def sampling_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to the frozen parts' half precision ``dtype`` while sampling from the trained model (kept in float32,
    or cast by DeepSpeed): ``accelerator.autocast`` is the same thing, except under DeepSpeed, where it does nothing
    and the half-precision VAE would meet float32 latents."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def reshard(model: torch.nn.Module) -> None:
    """Drop the gathered copies FSDP keeps after a forward pass without a backward one (the root unit keeps its
    parameters gathered until the backward pass): weights written into the shards after sampling (an EMA restore)
    would otherwise be ignored by the next training forward, which reuses the gathered copy. No-op unsharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class LocalShardsState:
    """Checkpoint state of an EMA whose shadow parameters are FSDP2 shards (DTensors): each process keeps its own
    local shards in its ``process_<rank>.pt``, since accelerate saves registered objects from the main process only
    (every process would resume with the main process's shards)."""

    def __init__(self, ema: Any) -> None:
        self.ema = ema

    @staticmethod
    def _local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.ema.state_dict())
        state["shadow_params"] = [self._local(p).detach().cpu().clone() for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for shadow, saved in zip(self.ema.shadow_params, state.pop("shadow_params"), strict=True):
            self._local(shadow).copy_(saved)
        self.ema.load_state_dict(state)


def checkpoint_ema(accelerator: Accelerator, ema: Any, per_process_state: dict[str, Any]) -> None:
    """Save ``ema`` with every checkpoint: as one of accelerate's registered objects when it holds whole parameters,
    per process (:class:`LocalShardsState`) when they are sharded."""
    if sharded_parameters(accelerator):
        per_process_state["ema"] = LocalShardsState(ema)
    else:
        accelerator.register_for_checkpointing(ema)


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_local_main_process


def compile_for_training(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``model`` as the training step calls it: under --torch_compile a torch.compile wrapper of the prepared model
    (DDP included, so its gradient buckets are kept), else the model itself. Only the step calls the wrapper:
    accumulation, checkpoints, saving and validation use the prepared model, so no state-dict key carries
    torch.compile's ``_orig_mod.`` prefix and sampling never waits on a recompile for its batch shapes."""
    return torch.compile(model) if args.torch_compile else model


def end_collectives(accelerator: Accelerator) -> None:
    """Call after the last collective of a run, on every process: all ranks destroy their process group here,
    together, as torch asks (one point on every rank). When the other ranks destroyed theirs at exit while the
    main process was still saving, one two-process CPU run (gloo) left the main process hung at exit after its
    model was written. The main process then saves, samples and uploads alone, and no rank waits for it (a
    barrier after a long upload would hit --ddp_timeout). accelerate's ``end_training`` at the very end still
    closes the trackers; its own destroy is then a no-op."""
    accelerator.wait_for_everyone()
    accelerator.state.destroy_process_group()


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind accelerate's wrappers and, with ``accelerate launch --dynamo_backend ...``,
    behind torch.compile's (whose state-dict keys carry an ``_orig_mod.`` prefix), as diffusers does."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def cast(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)``. For diffusers models with nothing to keep in float32 it goes through
    torch's own ``to``, which skips diffusers' warning about an empty list of such modules."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device, dtype=dtype)
    return torch.nn.Module.to(module, device, dtype=dtype)
