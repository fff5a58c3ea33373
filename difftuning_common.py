"""The bottom floor: helpers every other module may import and that import nothing of ours.

One error type for bad input, seeds derived from named parts, atomic JSON writes and a full-disk
guard. The method (difftuning_utils), the plumbing (training_plumbing), the model families and the
benchmark tools all build on these, so they live below all of them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator


class ConfigError(ValueError):
    """Bad input from the user (a flag, a file, a dataset): reported as one sentence, no traceback."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (e.g. base seed, rank, epoch) and nothing else."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def atomic_write_json(path: str, data: dict) -> None:
    """Write then rename: an interrupted run never leaves a half-written file that looks finished."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC as each writer reports it: an OSError, torch's zip writer ("unexpected pos", "file write failed")
    or safetensors' SafetensorError ("I/O error: No space left on device (os error 28)"), which is none of
    OSError and RuntimeError."""
    text = str(err)
    return (getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text
            or "file write failed" in text or "os error 28" in text)


@contextlib.contextmanager
def disk_space_guard(folder: str, what: str, partial: str | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``what`` into ``folder`` into one sentence (the folder, the free bytes,
    and the size of what was being written when known), after removing the ``partial`` file or folder."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - each writer raises its own kind (safetensors: SafetensorError)
        if isinstance(err, ConfigError) or not _is_disk_full(err):
            raise
        written = 0
        if partial and os.path.isdir(partial):
            written = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(partial) for f in files)
            shutil.rmtree(partial, ignore_errors=True)
        elif partial and os.path.exists(partial):
            os.remove(partial)
        free = shutil.disk_usage(folder if os.path.exists(folder) else os.path.dirname(folder) or ".").free
        raise ConfigError(f"The disk is full: writing {what} into {folder} failed with {free / 2**20:.0f} MiB free"
                          f"{f' after {written / 2**20:.0f} MiB were written' if written else ''}; free space "
                          "there (earlier checkpoints are intact) and resume with --resume_from_checkpoint "
                          "latest.") from err
