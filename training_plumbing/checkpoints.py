"""What a run writes that must survive it: the output folder's lock, checkpoints (atomic save, pruning,
the identity of what saved them, exact resume that skips a damaged newest one) and the final weights
(written whole, then renamed)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from difftuning_common import ConfigError, atomic_write_json, disk_space_guard

from .flags import display_path

logger = get_logger(__name__)


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def claims_output_dir(main: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Decorate a script's ``main``: the run holds an exclusive lock on ``--output_dir`` (an ``flock`` on the folder
    itself, taken by the main process, released when the run ends or dies), so a second run given the same folder
    is refused in one sentence instead of replacing the first run's checkpoints and weights. A folder created for
    the lock is removed again when the run is refused before writing anything into it."""

    @functools.wraps(main)
    def locked(args: argparse.Namespace) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # one lock per run, held by its main process
            return main(args)
        created = not os.path.exists(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        handle = os.open(args.output_dir, os.O_RDONLY)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"--output_dir {args.output_dir} is in use by another run (it holds the folder's "
                                  "lock); wait for that run to end or pass another --output_dir.") from None
            try:
                main(args)
            except ConfigError:
                if created:
                    with contextlib.suppress(OSError):
                        os.rmdir(args.output_dir)  # only when empty: nothing written is ever removed
                raise
        finally:
            os.close(handle)

    return locked


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoint folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if CHECKPOINT_PATTERN.match(d)]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(CHECKPOINT_PATTERN.match(d)[1]))]


CHECKPOINT_INFO = "checkpoint_info.json"


# The flags that decide what a checkpoint holds: resuming across a change in any of them cannot work.
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "controlnet_model_name_or_path", "finetune", "controlnet_lora",
                  "rank", "lora_alpha", "lora_target_modules", "use_ema", "train_text_encoder")


# Identity flags added later, recorded only when not at these defaults, so older checkpoints still match.
OPTIONAL_IDENTITY_FLAGS = {"use_dora": False, "optimizer": "adamw"}


def checkpoint_identity(args: argparse.Namespace, script: str) -> dict:
    """What a checkpoint was saved by: the script and the flags that shape its state (models by last path
    component, so a moved model folder still matches)."""
    identity = {"script": os.path.basename(script)}
    for flag in IDENTITY_FLAGS:
        if hasattr(args, flag):
            identity[flag] = display_path(getattr(args, flag))
    if hasattr(args, "lora_alpha") and args.lora_alpha is None:  # not given: the alpha trained with is the rank
        identity["lora_alpha"] = args.rank
    for flag, default in OPTIONAL_IDENTITY_FLAGS.items():
        if getattr(args, flag, default) != default:
            identity[flag] = getattr(args, flag)
    return identity


def checkpoint_pieces(accelerator: Accelerator) -> list[tuple[str, ...]]:
    """What accelerate's ``save_state`` writes, by distributed type, besides the per-process files: each entry
    lists the names (file or folder) one of which must exist."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return [("pytorch_model",)]  # the engine's own folder: weights and optimizer states
    if accelerator.distributed_type == DistributedType.FSDP:  # folders when sharded, files when gathered
        return [("pytorch_model_fsdp_0", "pytorch_model_fsdp_0.bin"), ("optimizer_0", "optimizer_0.bin"),
                ("scheduler.bin",)]
    return [("optimizer.bin",), ("scheduler.bin",)]


def _check_checkpoint(path: str, identity: dict, accelerator: Accelerator) -> None:
    """Refuse, in one sentence, a checkpoint of another script or set-up, or one with a missing or empty piece."""
    import json

    info_path = os.path.join(path, CHECKPOINT_INFO)
    if os.path.exists(info_path):
        saved = json.load(open(info_path))
        now = {**{k: v for k, v in OPTIONAL_IDENTITY_FLAGS.items() if k in saved}, **identity}
        # a key an older checkpoint lacks is skipped, or compared with its default where one is known
        differ = [k for k in now if (k in saved or k in OPTIONAL_IDENTITY_FLAGS)
                  and saved.get(k, OPTIONAL_IDENTITY_FLAGS.get(k)) != now[k]]
        if differ:
            raise ConfigError(f"--resume_from_checkpoint {path} was saved by another set-up ("
                              + ", ".join(f"{'' if k == 'script' else '--'}{k} {saved.get(k)!r} there, "
                                          f"{now[k]!r} now" for k in differ)
                              + "); resume with the same script and flags, or start a new --output_dir.")
    for names in [(f"process_{accelerator.process_index}.pt",), *checkpoint_pieces(accelerator)]:
        if not any(os.path.exists(os.path.join(path, name)) for name in names):
            raise _UnreadableCheckpoint(f"{path} has no {names[0]}" + (
                " (was it saved with another number of processes, or by another script?)"
                if names[0].startswith("process_") else " (was it saved under another accelerate config?)"))
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file) and os.path.getsize(file) == 0:
            raise _UnreadableCheckpoint(f"{file} is empty")
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(file, "pt"):
                    pass
            except Exception as err:  # noqa: BLE001 - a damaged file, whatever the parser says
                raise _UnreadableCheckpoint(f"{file} is damaged ({type(err).__name__}: {err})") from err


class _UnreadableCheckpoint(ConfigError):
    """A checkpoint that cannot be loaded (``latest`` falls back to the one before it)."""


def resume(accelerator: Accelerator, args: argparse.Namespace, per_process_state: dict[str, Any],
           identity: dict) -> tuple[int, str | None]:
    """(global step, checkpoint) of --resume_from_checkpoint; (0, None) for a new run. With "latest", a
    checkpoint that cannot be loaded is skipped with a warning for the one before it ("latest" with none
    found starts a new run, as upstream); a checkpoint of another script or set-up is refused."""
    if not args.resume_from_checkpoint:
        return 0, None
    latest = args.resume_from_checkpoint == "latest"
    candidates = list_checkpoints(args.output_dir)[::-1] if latest else [args.resume_from_checkpoint]
    if not candidates:
        logger.info("--resume_from_checkpoint latest: no checkpoint in --output_dir; starting a new run.")
        return 0, None
    for path in candidates:
        try:
            _check_checkpoint(path, identity, accelerator)
            return load_checkpoint(accelerator, path, per_process_state), path
        except _UnreadableCheckpoint as err:
            if not latest:
                raise ConfigError(f"--resume_from_checkpoint: {err}.") from err
            logger.warning(f"--resume_from_checkpoint latest: skipping {path}: {err}.")
    raise ConfigError(f"--resume_from_checkpoint latest: none of the {len(candidates)} checkpoints in "
                      f"{args.output_dir} can be loaded (see the warnings above); delete them or start a new "
                      "--output_dir.")


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, global_step: int,
                    per_process_state: dict[str, Any], keep: str | None = None, identity: dict | None = None) -> str:
    """Save a resumable checkpoint atomically at ``output_dir/checkpoint-<global_step>``.

    Old checkpoints are pruned first to respect ``--checkpoints_total_limit``, never ``keep``
    (the one this run resumed from). Everything is written to ``checkpoint-N.tmp`` and renamed
    once complete, so a crash mid-save leaves the previous checkpoints intact. Each process adds
    its own ``process_<rank>.pt`` with the objects in ``per_process_state`` (step generator,
    replay stream) because accelerate saves custom objects from the main process only; ``identity``
    (:func:`checkpoint_identity`) goes into ``checkpoint_info.json`` so a resume with another set-up is refused.
    """
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    tmp = f"{final}.tmp"
    if accelerator.is_main_process:
        if args.checkpoints_total_limit is not None:
            existing = [c for c in list_checkpoints(args.output_dir) if c != final]
            removable = [c for c in existing if keep is None or os.path.abspath(c) != os.path.abspath(keep)]
            excess = len(existing) + 1 - args.checkpoints_total_limit
            for path in removable[:max(0, excess)]:
                logger.info(f"Removing old checkpoint {path}")
                shutil.rmtree(path)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with disk_space_guard(args.output_dir, f"checkpoint-{global_step}", tmp):
        accelerator.save_state(tmp)
        state = {name: obj.state_dict() for name, obj in per_process_state.items()}
        torch.save({"global_step": global_step, **state},
                   os.path.join(tmp, f"process_{accelerator.process_index}.pt"))
        if accelerator.is_main_process and identity is not None:
            atomic_write_json(os.path.join(tmp, CHECKPOINT_INFO), identity)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str, per_process_state: dict[str, Any]) -> int:
    """Restore everything :func:`save_checkpoint` wrote; returns the global step. A piece that fails to
    load is an :class:`_UnreadableCheckpoint` naming the checkpoint."""
    own = os.path.join(path, f"process_{accelerator.process_index}.pt")
    accelerator.print(f"Resuming from checkpoint {path}")
    try:
        accelerator.load_state(path)
        state = torch.load(own, weights_only=False)
        for name, obj in per_process_state.items():
            obj.load_state_dict(state[name])
    except Exception as err:  # noqa: BLE001 - torch, safetensors and pickle each raise their own kind
        reason = (str(err).strip().splitlines() or [""])[0]
        raise _UnreadableCheckpoint(f"{path} cannot be loaded ({type(err).__name__}: {reason})") from err
    return int(state["global_step"])


def save_final(output_dir: str, what: str, write: Callable[[str], None]) -> None:
    """Write the final weights atomically: ``write(folder)`` fills a temporary folder inside ``output_dir``, whose
    entries then replace their namesakes in ``output_dir`` by rename. A full disk (or any failure) while writing
    leaves the earlier files as they were, removes the partial folder and, for a full disk, ends in one sentence."""
    tmp = os.path.join(output_dir, "final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_space_guard(output_dir, what, tmp):
            os.makedirs(tmp)
            write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in sorted(os.listdir(tmp)):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)  # a folder (transformer/, vae/) cannot be renamed over
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)
