"""Loading models: from_pretrained with one-sentence errors, whole weights under DeepSpeed ZeRO-3, a
quantized frozen base through diffusers' backends, the check that LoRA targets exist in a model, and the
upstream warnings every run would print for nothing."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from difftuning_common import ConfigError


def check_lora_targets(model: torch.nn.Module, targets: str) -> None:
    """Refuse, before any sample is generated, a --lora_target_modules entry that names no module of ``model`` (peft
    matches a module whose name is the entry or ends with "." + the entry; it fails only when nothing matches, after
    a knowledge bank may have been built, and a misspelt entry among good ones would be silently ignored)."""
    names = [name for name, _ in model.named_modules()]
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing or not wanted:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora_target_modules: {', '.join(repr(t) for t in missing) or 'nothing'} names no "
                          f"module of the {type(model).__name__} (its linear layers are named e.g. "
                          f"{', '.join(linear[:12])}).")


def load_pretrained(loader: Any, flag: str, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``loader(name_or_path, **kwargs)`` (a ``from_pretrained``), or one sentence naming ``flag`` that
    says whether a local folder or the Hub was tried and the innermost cause (diffusers' own message
    says "check the stack trace above", which a one-line error does not show)."""
    try:
        with whole_weights():
            return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        cause: BaseException = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if os.path.isdir(name_or_path):
            where = f"the folder {name_or_path} could not be loaded as {what}"
        elif os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            where = (f"{name_or_path} is not a local folder and the Hub is off (HF_HUB_OFFLINE is set); pass a "
                     f"local {what} folder")
        else:
            where = f"{name_or_path} is not a local folder and could not be loaded from the Hub as {what}"
        raise ConfigError(f"{flag}: {where} ({type(cause).__name__}: {reason}).") from err


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """Models loaded in this block are whole on every process, also under DeepSpeed ZeRO-3. accelerate registers its
    ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, and transformers' ``from_pretrained`` then
    partitions every model it loads (``deepspeed.zero.Init``): the frozen text encoders, never wrapped by a DeepSpeed
    engine, would run on empty shards, and a load on the main process alone would wait for the others. The trained
    model is partitioned by ``accelerator.prepare`` instead."""
    import accelerate.state

    plugin = accelerate.state.AcceleratorState().deepspeed_plugin if accelerate.state.is_initialized() else None
    registered = getattr(plugin, "dschf", None)
    if registered is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


class _DropKnownNoise(logging.Filter):
    """Upstream warnings that every run of these scripts triggers and that say nothing actionable."""

    NOISE = ("Expected types for id2label",  # DiTPipeline's id2label is saved as JSON, so its keys are strings
             "that should be kept in float32: []",  # any .to(dtype) of a model with an empty fp32 list
             "No LoRA keys associated to")  # load_lora_weights of a LoRA without text-encoder weights

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


def quiet_known_warnings() -> None:
    """Filter :class:`_DropKnownNoise` out of diffusers' log handler (its loggers all propagate to it)."""
    import diffusers  # noqa: F401  (configures the "diffusers" logger and its handler)

    for handler in logging.getLogger("diffusers").handlers:
        if not any(isinstance(f, _DropKnownNoise) for f in handler.filters):
            handler.addFilter(_DropKnownNoise())


# --quantize_base: name -> (backend package, what it is)
QUANTIZED_BASES = {
    "nf4": ("bitsandbytes", "bitsandbytes 4-bit NormalFloat, CUDA only (diffusers' Flux QLoRA example)"),
    "int8": ("torchao", "torchao int8 weight-only, CPU or GPU"),
    "fp8": ("torchao", "torchao float8 weight-only, CPU or GPU"),
}


def check_quantization_backend(kind: str | None) -> None:
    """Refuse --quantize_base, in one sentence and before any weights load, where its backend cannot run."""
    if kind is None:
        return
    if kind == "nf4" and not torch.cuda.is_available():
        raise ConfigError("--quantize_base nf4 needs a CUDA GPU (bitsandbytes quantizes on it); use int8 or fp8 "
                          "(torchao), which also run on the CPU.")
    package = QUANTIZED_BASES[kind][0]
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ConfigError(f"--quantize_base {kind} needs {package}: `pip install {package}`.") from err


def quantization_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """diffusers' quantization config of a --quantize_base kind; ``compute_dtype``: what the layers compute in."""
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
