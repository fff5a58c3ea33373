"""What leaves the run: trackers (without secrets), logged images, the model card, the Hub upload."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from accelerate import Accelerator
from huggingface_hub import create_repo, upload_folder
from PIL import Image

from difftuning_common import ConfigError, disk_space_guard

from .flags import display_path, public_flags

# Never uploaded: resumable checkpoints, the knowledge bank, half-written files.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "knowledge_bank/**", "class_images/**",
                       "class_images.knowledge_bank/**", "*.tmp*", "step_*", "epoch_*"]


def start_trackers(accelerator: Accelerator, args: argparse.Namespace, default_project: str) -> None:
    """``init_trackers`` on the main process with the scalar flags as the run's config (TensorBoard writes them to
    ``hparams.yml`` and its event files, which ``--push_to_hub`` uploads with ``logs/``): secrets left out."""
    if accelerator.is_main_process:
        tracked = {k: v for k, v in public_flags(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name or default_project, config=tracked)


def log_images(accelerator: Accelerator, images: Sequence[Image.Image], captions: Sequence[str], step: int,
               tag: str = "validation") -> None:
    """Send images to whichever trackers are active (TensorBoard and/or wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            arrays = np.stack([np.asarray(img.convert("RGB")) for img in images])
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img, caption=c) for img, c in zip(images, captions, strict=False)]})


def hub_repo_id(args: argparse.Namespace) -> str | None:
    """Create the Hub repository at start (so a bad token fails before training), like upstream."""
    if not args.push_to_hub:
        return None
    name = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as err:  # offline mode, no network, no or a bad token: all before any training
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--push_to_hub: the Hub repository {name!r} could not be created ({type(err).__name__}: "
                          f"{reason}); check the network, HF_HUB_OFFLINE and the token (--hub_token or `hf auth "
                          "login`), or leave --push_to_hub out and upload later.") from err


def usage_reference(args: argparse.Namespace, repo_id: str | None) -> str:
    """What a model card's usage snippet loads: the Hub repository when pushed, else the output folder's name
    (never an absolute local path)."""
    return repo_id or os.path.basename(os.path.normpath(args.output_dir))


def hub_id(name_or_path: str) -> str | None:
    """The Hub id of a base model: the name itself when it is not a local path, the repository of a local copy in
    the Hub's cache (``.../models--org--name/snapshots/<revision>``), else None (a folder of unknown origin)."""
    if not os.path.exists(name_or_path):
        return name_or_path
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", os.path.abspath(name_or_path))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def save_model_card(args: argparse.Namespace, base_model: str, description: str,
                    tags: list[str], images: Sequence[Image.Image] = (), license: str = "apache-2.0",
                    widget_prompt: str | None = None, **card_data: Any) -> str:
    """Write README.md (the model card: metadata, ``description`` with its usage snippet, a sample grid
    and the training flags) into ``output_dir``. ``base_model`` goes into the metadata only when its Hub id is
    known (:func:`hub_id`): a local path means nothing on the Hub. ``widget_prompt``: also save each image as
    image_<i>.png and list them as the card's widget (the Hub's gallery), as diffusers' LoRA cards do;
    ``card_data``: more metadata (license_name, license_link, instance_prompt)."""
    from diffusers.utils import make_image_grid
    from huggingface_hub import ModelCard, ModelCardData

    if widget_prompt is not None:
        card_data["widget"] = []
        for i, image in enumerate(images):
            image.save(os.path.join(args.output_dir, f"image_{i}.png"))
            card_data["widget"].append({"text": widget_prompt, "output": {"url": f"image_{i}.png"}})
    if images:
        cols = min(len(images), 8)
        rows = math.ceil(len(images) / cols)
        images = list(images) + [images[0].point(lambda _: 0)] * (rows * cols - len(images))
        with disk_space_guard(args.output_dir, "the model card's samples.png"):
            make_image_grid(list(images), rows=rows, cols=cols).save(os.path.join(args.output_dir, "samples.png"))
        description += "\n\n## Samples\n\n![samples](./samples.png)\n"
    flags = {k: display_path(v) for k, v in sorted(public_flags(args).items()) if v not in (None, False)}
    description += ("\n\n## Training flags\n\n" + "\n".join(f"- `--{k}`: `{v}`" for k, v in flags.items()) + "\n")
    # Built locally (never fetched): the Hub may be unreachable, and a stale card must not win.
    metadata = ModelCardData(license=license, library_name="diffusers", tags=tags, base_model=hub_id(base_model),
                             **card_data)
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{description}")
    path = os.path.join(args.output_dir, "README.md")
    with disk_space_guard(args.output_dir, "the model card"):
        card.save(path)
    return path


def push_output_dir(args: argparse.Namespace, repo_id: str) -> None:
    """Upload the output folder without checkpoints, the knowledge bank or temporary files."""
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                  ignore_patterns=HUB_IGNORE_PATTERNS, token=args.hub_token)
