"""Training data: loading and checking every image before the first step, image conversion and
augmentation, a deterministic order per epoch, and the per-step random numbers drawn from the seed (so a
resumed run draws what an uninterrupted one would)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from PIL import Image
from tqdm.auto import tqdm

from difftuning_common import ConfigError, derive_seed

from .distributed import is_main_process

logger = get_logger(__name__)


class StepGenerator:
    """The one source of randomness of a training step (noise, timesteps, label dropout).

    Per process: a CPU ``torch.Generator`` for small draws (timesteps, dropout masks) and, on a
    GPU, a device generator for the noise tensors so they are drawn where they are used (no
    host-to-device copy per step). Both states are saved in every checkpoint, so a resumed run
    draws exactly what a straight run would.
    """

    def __init__(self, seed: int, rank: int, device: torch.device | str = "cpu") -> None:
        seed = derive_seed(seed, "step", rank)
        self.generator = torch.Generator().manual_seed(seed)
        device = torch.device(device)
        self.device_generator = (torch.Generator(device).manual_seed(seed + 1) if device.type != "cpu"
                                 else self.generator)

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.device_generator, device=self.device_generator.device,
                           dtype=dtype).to(device)

    def rand(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator).to(device, non_blocking=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "device_generator": self.device_generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.device_generator.set_state(state["device_generator"])


def load_train_dataset(args: argparse.Namespace, required_columns: dict[str, str],
                       data_dir_flag: str = "--train_data_dir") -> Any:
    """Load ``--dataset_name`` or ``--train_data_dir`` and check the columns exist.

    ``required_columns`` maps flag names to column names, e.g. {"--image_column": "image"}, so a
    missing column is reported with the flag that names it.
    """
    from datasets import load_dataset

    if args.dataset_name is not None:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    else:
        from datasets.data_files import EmptyDatasetError
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        extensions = tuple(ImageFolder.EXTENSIONS)
        if not any(name.lower().endswith(extensions) for _, _, files in os.walk(args.train_data_dir)
                   for name in files):  # datasets' own error for it is a traceback ("corresponds to no data")
            raise ConfigError(f"{data_dir_flag} {args.train_data_dir} holds no image files.")
        try:
            dataset = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir,
                                   split="train")
        except EmptyDatasetError as err:
            raise ConfigError(f"{data_dir_flag} {args.train_data_dir} holds no image files.") from err
    from datasets import Image as ImageFeature

    for flag, column in required_columns.items():
        if column in dataset.column_names and "image" in flag:
            feature = dataset.features[column]
            # pandas-written parquet keeps images as plain {bytes, path} structs; paths as strings also cast
            if isinstance(feature, dict) and "bytes" in feature or getattr(feature, "dtype", None) == "string":
                dataset = dataset.cast_column(column, ImageFeature())
            elif not isinstance(feature, ImageFeature):
                raise ConfigError(f"{flag} '{column}' holds {feature}, not images.")
        if column not in dataset.column_names:
            layout = ""
            if args.train_data_dir is not None and flag == "--label_column":
                layout = (f" An image folder gets a '{column}' column from one sub-folder per class: "
                          f"{args.train_data_dir}/<class name>/<image files>.")
            raise ConfigError(f"{flag} '{column}' is not a column of the dataset; it has: "
                              f"{', '.join(dataset.column_names)}.{layout}")
    if args.max_train_samples is not None:  # a seeded random subset, as upstream does
        dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ConfigError("The training dataset is empty.")
    return dataset


EXIF_ORIENTATION = 0x0112


def _decode_fully(item: dict) -> tuple[int, int] | str:
    """An image cell as stored (``{"bytes", "path"}``) decoded to the last pixel: its size as training sees it
    (after the EXIF rotation datasets applies), or why it failed."""
    import io

    try:
        with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
            image.load()  # headers alone do not catch a truncated file
            # Training sees the image as datasets decodes it, EXIF orientation applied: 5-8 swap width and height.
            rotated = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            return (image.height, image.width) if rotated else image.size
    except Exception as err:  # noqa: BLE001 - every decoder failure is reported the same way
        return f"{type(err).__name__}: {err}"


def check_images(dataset: Any, columns: dict[str, str], skip_bad: bool) -> tuple[Any, list[tuple]]:
    """Decode every image of ``columns`` (flag -> column) once, in threads, before the first step.

    An unreadable or truncated image stops the run naming its file (or, with ``--skip_bad_images``, its row
    is dropped with a warning naming the file, and a count). Returns the dataset (without dropped rows) and,
    per kept row, the (width, height) of each column's image, for checks such as ControlNet's alignment.
    """
    from concurrent.futures import ThreadPoolExecutor

    from datasets import Image as ImageFeature

    names = list(columns.values())
    raw = dataset.select_columns(names)
    for column in names:
        raw = raw.cast_column(column, ImageFeature(decode=False))
    flag_of = {column: flag for flag, column in columns.items()}
    bad: dict[int, str] = {}
    sizes: dict[int, list] = {}
    chunk = 1000  # rows in memory at a time: the encoded bytes of a large dataset would not fit at once
    progress = tqdm(total=len(raw), desc="Checking images", disable=len(raw) < 2000 or not is_main_process())
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        for start, records in zip(range(0, len(raw), chunk), raw.iter(batch_size=chunk), strict=True):
            cells = [(start + i, column, item) for column in names for i, item in enumerate(records[column])]
            for (row, column, item), result in zip(cells, pool.map(lambda cell: _decode_fully(cell[2]), cells),
                                                   strict=True):
                if isinstance(result, str):
                    bad.setdefault(row, f"{flag_of[column]} {item.get('path') or f'of row {row}'} cannot be "
                                        f"decoded ({result})")
                else:
                    sizes.setdefault(row, []).append(result)
            progress.update(len(records[names[0]]))
    progress.close()
    if bad and not skip_bad:
        more = f" ({len(bad) - 1} more unreadable; --skip_bad_images leaves them out)" if len(bad) > 1 else (
            " (--skip_bad_images leaves such rows out)")
        raise ConfigError(f"Training image {next(iter(bad.values()))}{more}.")
    if bad:
        for reason in bad.values():
            logger.warning(f"Skipping training image {reason}.")
        logger.warning(f"--skip_bad_images: left out {len(bad)} of {len(dataset)} rows.")
        if len(bad) == len(dataset):
            raise ConfigError("Every training image is unreadable.")
        dataset = dataset.select([row for row in range(len(dataset)) if row not in bad])
    return dataset, [tuple(sizes[row]) for row in range(len(raw)) if row not in bad]


HIGH_BIT_DEPTH_SCALE = {"I;16": 1 / 257, "I;16L": 1 / 257, "I;16B": 1 / 257, "I;16N": 1 / 257}


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)`` that keeps the real values of high-bit-depth images: PIL clips 16-bit grey
    (``I;16``) and 32-bit (``I``, ``F``) pixels to 0..255, which turns most 16-bit photos solid white.
    They are rescaled to 8 bits first (``I``: as 16-bit when any value exceeds 255; ``F``: as [0, 1] when
    no value exceeds 1)."""
    if image.mode in HIGH_BIT_DEPTH_SCALE or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode in HIGH_BIT_DEPTH_SCALE or (image.mode == "I" and array.max() > 255):
            array = array / 257
        elif image.mode == "F" and array.max() <= 1.0:
            array = array * 255
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def describe_image_conversion(dataset: Any, image_column: str, channels: int, resolution: int) -> None:
    """Say once, before training, when the first training image will be converted to fit the model
    (colour to grey or back, resized), so a mismatch is visible rather than silent."""
    image = dataset[0][image_column]
    model_mode = "L" if channels == 1 else "RGB"
    changes = []
    if image.mode != model_mode:
        changes.append(f"converted from {image.mode} to {model_mode}")
    if min(image.size) != resolution:
        changes.append(f"resized from {image.width}x{image.height} (short side) to {resolution} and cropped")
    if changes:
        logger.info(f"Training images (the first is {image.mode} {image.width}x{image.height}) are "
                    f"{' and '.join(changes)}: the model works on {channels}-channel {resolution}x{resolution} images.")


class SampleKey(NamedTuple):
    """What :class:`EpochShuffleSampler` yields and a training dataset's ``__getitem__`` receives: the
    row to read and the epoch, so per-sample augmentation can be seeded from both (see :func:`sample_rng`)."""

    epoch: int
    index: int


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation per epoch, from (seed, epoch) alone, the same on every process.

    It yields :class:`SampleKey` (epoch, index) so the dataset can derive per-sample augmentation
    from the epoch without shared state (works with worker processes). accelerate shards its batches
    across processes and ``skip_first_batches`` resumes mid-epoch exactly.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[SampleKey]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "data", self.epoch))
        return (SampleKey(self.epoch, i) for i in torch.randperm(self.num_items, generator=generator).tolist())


def make_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, sampler: EpochShuffleSampler,
                    num_workers: int) -> torch.utils.data.DataLoader:
    """The training DataLoader: workers that live across epochs, pinned memory on a GPU machine."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       drop_last=True, persistent_workers=num_workers > 0,
                                       pin_memory=torch.cuda.is_available())


def epoch_loader(accelerator: Accelerator, train_dataloader: Any, sampler: EpochShuffleSampler, epoch: int,
                 global_step: int, updates_per_epoch: int, gradient_accumulation_steps: int) -> Any:
    """The dataloader for ``epoch``, skipping the batches a resumed run has already seen in it.

    Both the sampler and accelerate's dataloader get the epoch explicitly (accelerate's own
    counter restarts at 0 after a resume), so the order is the straight run's.
    """
    sampler.set_epoch(epoch)
    train_dataloader.set_epoch(epoch)
    first_epoch = global_step // updates_per_epoch
    skip = (global_step % updates_per_epoch) * gradient_accumulation_steps if epoch == first_epoch else 0
    return accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader


def resize_crop_flip(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: np.random.Generator | None, resample: Image.Resampling = Image.BICUBIC
                     ) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the short side to ``resolution``, crop a square (centre or random), maybe flip. Returns the
    square image, the original (height, width) and the crop's (top, left) in the resized image as it is
    shown (mirrored with the flip): SDXL's size-and-crop conditioning."""
    original_size = (image.height, image.width)
    scale = resolution / min(image.size)
    if scale != 1:
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, resample)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left = int(rng.integers(0, image.width - resolution + 1))
        top = int(rng.integers(0, image.height - resolution + 1))
    width = image.width
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = width - left - resolution
    return image, original_size, (top, left)


def to_model_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A square PIL image -> [channels, H, W] float32 in [-1, 1] (PIL and numpy only: no torchvision here)."""
    image = convert_image(image, "L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def preprocess_image(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                     rng: np.random.Generator, channels: int = 3,
                     resample: Image.Resampling = Image.BICUBIC) -> torch.Tensor:
    """Resize the short side to ``resolution`` (``resample``: upstream ControlNet uses bilinear), crop a
    square (centre or random), maybe flip; return [channels, H, W] float32 in [-1, 1]."""
    image = convert_image(image, "L" if channels == 1 else "RGB")
    return to_model_tensor(resize_crop_flip(image, resolution, center_crop, random_flip, rng, resample)[0], channels)


def sample_rng(seed: int, key: SampleKey) -> np.random.Generator:
    """The augmentation RNG of one sample in one epoch: the same in every process, worker and resume."""
    return np.random.default_rng(derive_seed(seed, "augment", key.epoch, key.index))
