"""The knowledge bank of Diff-Tuning's retention objective: the pre-trained model's own samples (or, for
DreamBooth, the class images) kept as latents: built resumably and atomically, one shard per batch, with a
manifest that records what made them (base model fingerprint, sampler, seed) so a bank of another set-up is
refused; loaded, replayed in a deterministic stream that resumes exactly, previewed.

Part of the method: difftuning_utils re-exports every name, so the scripts use it as ``dt.*``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from difftuning_common import ConfigError, atomic_write_json, derive_seed, disk_space_guard

logger = get_logger(__name__)

BANK_FORMAT_VERSION = 2  # 2: shards also hold the re-encoded posterior of each sample (both flips)
MANIFEST_NAME = "manifest.json"
SampleFn = Callable[[list, torch.Generator], torch.Tensor]
ReencodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
REPLAY_MODES = ("images", "latents")


def _check_format(bank_dir: str, manifest: dict) -> None:
    """Refuse, leaving it as it is, a bank written by an earlier version of the scripts."""
    if manifest.get("format_version") != BANK_FORMAT_VERSION:
        raise ConfigError(f"Knowledge bank {bank_dir} was written by an earlier version of these scripts (format "
                          f"{manifest.get('format_version')}, before bank samples were re-encoded); delete the "
                          "folder to rebuild it, or pass another --knowledge_bank_dir.")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable identity of a model's weights: sha256 over names, shapes and a strided
    subsample of every tensor. Different checkpoints of the same architecture differ in it, so
    a bank built from another base model is caught without hashing gigabytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _read_manifest(bank_dir: str) -> dict | None:
    path = os.path.join(bank_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"Knowledge bank manifest {path} is not valid JSON ({err}).") from err


def build_knowledge_bank(bank_dir: str, sample_fn: SampleFn, conditions: Sequence[int] | Sequence[str],
                         batch_size: int, seed: int, settings: dict[str, Any],
                         state: PartialState | None = None, reencode_fn: ReencodeFn | None = None) -> dict:
    """Generate the knowledge bank with the frozen pre-trained model; resumable and multi-process.

    ``sample_fn(conditions_batch, generator)`` returns the sampler's final latents
    [b, C, H, W] for a list of class ids or prompts. ``reencode_fn(latents)`` returns the VAE
    posterior (mean, std), each [b, 2, C, H, W], of the samples decoded to 8-bit images, unflipped
    and flipped: what the authors' bank, a folder of images replayed through the data pipeline, is
    encoded to. Stored beside the raw latents, it lets replay draw exactly that distribution without
    a VAE pass per step (:func:`replay_tensors`). Shard i holds conditions
    ``[i*batch_size, (i+1)*batch_size)`` and uses a CPU generator seeded with (seed, i), so the
    bank is the same whatever the number of processes; processes take shards round-robin.
    Every shard is written to a temporary file and renamed, so a finished shard is always
    complete and an interrupted build resumes by skipping the shards that exist. ``settings``
    (base model id, revision, fingerprint, scheduler, steps, guidance, ...) go into the
    manifest; a partial bank built with other settings is refused rather than mixed.
    Returns the final manifest.
    """
    state = state or PartialState()
    if batch_size < 1:
        raise ConfigError(f"--knowledge_bank_batch_size must be >= 1, got {batch_size}.")
    conditions = list(conditions)
    num_shards = math.ceil(len(conditions) / batch_size)
    build_settings = {**settings, "seed": seed, "size": len(conditions), "batch_size": batch_size}
    existing = _check_settings(bank_dir, build_settings)
    if existing is not None and existing.get("complete"):
        if state.is_main_process:
            logger.info(f"Reusing the knowledge bank in {bank_dir} ({existing.get('count')} samples).")
        return existing
    with _build_lock(bank_dir, state.is_main_process):
        state.wait_for_everyone()
        # Another run may have built it while this one waited, with these settings (reuse it) or others (refuse:
        # writing this run's manifest over its samples would mislabel them).
        existing = _check_settings(bank_dir, build_settings)
        if existing is not None and existing.get("complete"):
            return existing
        if state.is_main_process:
            os.makedirs(bank_dir, exist_ok=True)
            atomic_write_json(os.path.join(bank_dir, MANIFEST_NAME),
                              {"format_version": BANK_FORMAT_VERSION, "complete": False, "settings": build_settings})
        state.wait_for_everyone()

        my_shards = [i for i in range(num_shards) if i % state.num_processes == state.process_index]
        todo = [i for i in my_shards if not os.path.exists(os.path.join(bank_dir, _shard_name(i)))]
        if state.is_main_process:
            done = num_shards - len(todo) * state.num_processes
            logger.info(f"Building the knowledge bank in {bank_dir}: {len(conditions)} samples of the frozen "
                        f"pre-trained model ({settings.get('num_inference_steps')} sampling steps, guidance "
                        f"{settings.get('guidance_scale')}), {num_shards} shards of {batch_size}"
                        f"{f', {done} already done' if done > 0 else ''}. This runs once: later runs with the same "
                        "settings and --knowledge_bank_dir reuse it, and an interrupted build resumes. The progress "
                        "bar below gives the time left.")
        for shard_index in tqdm(todo, desc="Building knowledge bank", disable=not state.is_local_main_process):
            batch = conditions[shard_index * batch_size:(shard_index + 1) * batch_size]
            generator = torch.Generator().manual_seed(derive_seed(seed, "bank", shard_index))
            latents = sample_fn(batch, generator).detach().to("cpu", torch.float32).contiguous()
            if latents.shape[0] != len(batch):
                raise RuntimeError(f"The bank sampler returned {latents.shape[0]} latents for {len(batch)} conditions.")
            tensors = {"latents": latents}
            if reencode_fn is not None:
                mean, std = reencode_fn(latents)
                tensors["posterior_mean"] = mean.detach().to("cpu", torch.float32).contiguous()
                tensors["posterior_std"] = std.detach().to("cpu", torch.float32).contiguous()
            metadata = {}
            if isinstance(batch[0], str):
                metadata["prompts"] = json.dumps(batch)
            else:
                tensors["class_labels"] = torch.tensor(batch, dtype=torch.int64)
            path = os.path.join(bank_dir, _shard_name(shard_index))
            tmp = f"{path}.tmp{os.getpid()}"  # one per process: two builders never share a half-written file
            with disk_space_guard(bank_dir, f"knowledge-bank shard {shard_index}", tmp):
                save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        state.wait_for_everyone()

        manifest = {"format_version": BANK_FORMAT_VERSION, "complete": True, "settings": build_settings}
        if state.is_main_process:
            shards = []
            for i in range(num_shards):
                path = os.path.join(bank_dir, _shard_name(i))
                shards.append({"file": _shard_name(i), "sha256": _sha256_file(path)})
            first = load_file(os.path.join(bank_dir, _shard_name(0)))["latents"]
            manifest.update(count=len(conditions), latent_shape=list(first.shape[1:]), dtype=str(first.dtype),
                            shards=shards)
            atomic_write_json(os.path.join(bank_dir, MANIFEST_NAME), manifest)
        state.wait_for_everyone()
        return _read_manifest(bank_dir)


def _check_settings(bank_dir: str, build_settings: dict) -> dict | None:
    """The bank's manifest (None when there is none yet), refused when it was written with other settings."""
    existing = _read_manifest(bank_dir)
    if existing is not None:
        _check_format(bank_dir, existing)
    if existing is not None and existing.get("settings") != json.loads(json.dumps(build_settings)):
        raise ConfigError(f"Knowledge bank {bank_dir} was built with other settings "
                          f"({_describe_mismatch(existing.get('settings', {}), build_settings)}); "
                          "delete it or pass another --knowledge_bank_dir.")
    return existing


@contextlib.contextmanager
def _build_lock(bank_dir: str, is_main_process: bool) -> Iterator[None]:
    """An exclusive lock on ``bank_dir`` while a run builds it (the main process of each run takes it), so two
    runs given one new bank folder build it once: the second waits, then finds it complete."""
    if not is_main_process:
        yield
        return
    import fcntl

    os.makedirs(bank_dir, exist_ok=True)
    with open(os.path.join(bank_dir, ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning(f"Another run is building the knowledge bank in {bank_dir}; waiting for it to finish.")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _describe_mismatch(found: dict, expected: dict) -> str:
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in keys) or "unknown difference"


@dataclass
class KnowledgeBank:
    """A loaded, validated bank: the sampler's latents [N, C, H, W] (float32, CPU), the conditions used
    and, from format 2 on, the re-encoded posterior of each sample, mean and std [N, 2, C, H, W]
    (view 0 unflipped, view 1 flipped)."""

    latents: torch.Tensor
    conditions: list
    manifest: dict
    posterior_mean: torch.Tensor | None = None
    posterior_std: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]


def load_knowledge_bank(bank_dir: str, fingerprint: str | None = None,
                        latent_shape: Sequence[int] | None = None) -> KnowledgeBank:
    """Load a complete bank, refusing one built for another model or with a corrupt shard.

    ``fingerprint`` is :func:`model_fingerprint` of the base model in use; ``latent_shape`` is
    the [C, H, W] the model trains on. Every shard's sha256 is checked against the manifest.
    """
    manifest = _read_manifest(bank_dir)
    if manifest is None:
        raise ConfigError(f"No knowledge bank in {bank_dir}: {MANIFEST_NAME} is missing.")
    _check_format(bank_dir, manifest)
    if not manifest.get("complete"):
        raise ConfigError(f"Knowledge bank {bank_dir} is incomplete; run the training script again to finish it.")
    built_for = manifest["settings"].get("fingerprint")
    if fingerprint is not None and built_for != fingerprint:
        raise ConfigError(f"Knowledge bank {bank_dir} was built from another base model "
                         f"({manifest['settings'].get('base_model')!r}, fingerprint {str(built_for)[:12]}) than "
                         f"the one in use (fingerprint {fingerprint[:12]}); pass another --knowledge_bank_dir.")
    if latent_shape is not None and list(manifest["latent_shape"]) != list(latent_shape):
        raise ConfigError(f"Knowledge bank {bank_dir} holds latents of shape {manifest['latent_shape']}, "
                         f"but the model trains on {list(latent_shape)}.")
    latents, conditions, means, stds = [], [], [], []
    for shard in manifest["shards"]:
        path = os.path.join(bank_dir, shard["file"])
        if not os.path.exists(path) or _sha256_file(path) != shard["sha256"]:
            raise ConfigError(f"Knowledge bank shard {path} is missing or corrupt (sha256 mismatch); "
                             "delete the bank folder to rebuild it.")
        tensors = load_file(path)
        latents.append(tensors["latents"])
        if "posterior_mean" in tensors:
            means.append(tensors["posterior_mean"])
            stds.append(tensors["posterior_std"])
        if "class_labels" in tensors:
            conditions.extend(tensors["class_labels"].tolist())
        else:
            conditions.extend(_read_prompts(path))
    reencoded = len(means) == len(latents)
    return KnowledgeBank(torch.cat(latents), conditions, manifest, torch.cat(means) if reencoded else None,
                         torch.cat(stds) if reencoded else None)


# ----------------------------------------------------------------------------------------------
# Knowledge bank of images (the DreamBooth script's class images): each image encoded once
# ----------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ENCODED_FORMAT_VERSION = 1
# encode_fn(paths) -> (posterior mean, std), each [b, 2, C, H, W] (the image and its mirror), and each image's
# (height, width) as loaded.
EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]]


def image_files(folder: str) -> list[str]:
    """The image files in ``folder`` in index order: upstream names its class images "<index>-<sha1>.jpg", so
    "10-..." comes after "9-..."; other names follow, alphabetically. Anything else in the folder is ignored."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]

    def order(name: str) -> tuple[int, int, str]:
        index = name.split("-", 1)[0]
        return (0, int(index), name) if index.isdigit() else (1, 0, name)

    return [os.path.join(folder, n) for n in sorted(names, key=order)]


def class_image_bank(image_dir: str, cache_dir: str, num_images: int, generate_fn: Callable[[list[int]], None],
                     encode_fn: EncodeFn, settings: dict[str, Any], batch_size: int, condition: str,
                     state: PartialState | None = None) -> tuple[KnowledgeBank, list[tuple[int, int]]]:
    """The knowledge bank of a folder of images, as diffusers' DreamBooth scripts treat their class images: the
    images there are used (the first ``num_images`` in index order), the missing ones are generated first
    (``generate_fn(indices)`` writes images ``indices`` into ``image_dir``, ``batch_size`` a call, the calls shared
    round-robin between the processes), and every image is encoded once (``encode_fn``).

    The encodings are cached in ``cache_dir`` (beside the images, which keep the folder upstream's: images only),
    keyed on each file's sha256 and on ``settings`` (the VAE and the resolution; one subfolder per setting): a run
    with another seed, count or batch size reuses them and encodes only images it has not seen. Generation and
    encoding run under the cache's lock, so two runs sharing the folder do not both fill it. Returns the bank
    (``condition`` as every sample's prompt) and each image's (height, width)."""
    state = state or PartialState()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    bank_dir = os.path.join(cache_dir, f"encoded-{key}")
    try:
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"Cannot create {err.filename} for the class images and their encodings "
                          f"({err.strerror}); pass a --class_data_dir whose parent folder is writable.") from err
    with _build_lock(cache_dir, state.is_main_process):
        state.wait_for_everyone()
        paths = image_files(image_dir)
        if len(paths) < num_images:
            missing = list(range(len(paths), num_images))
            batches = [missing[i:i + batch_size] for i in range(0, len(missing), batch_size)]
            if state.is_main_process:
                logger.info(f"Generating {len(missing)} class images into {image_dir} ({len(paths)} there, "
                            f"--num_class_images {num_images}); later runs use them as they are.")
            for batch in tqdm(batches[state.process_index::state.num_processes], desc="Generating class images",
                              disable=not state.is_local_main_process):
                generate_fn(batch)
            state.wait_for_everyone()
            paths = image_files(image_dir)
        paths = paths[:num_images]
        hashes = [_sha256_file(path) for path in paths]
        manifest = _read_manifest(bank_dir) or {"format_version": ENCODED_FORMAT_VERSION, "settings": settings,
                                                "images": {}, "shards": {}}
        new = {h: p for h, p in zip(hashes, paths, strict=True) if h not in manifest["images"]}  # once per content
        batches = [list(new)[i:i + batch_size] for i in range(0, len(new), batch_size)]
        shard_names = [f"shard-{hashlib.sha256(''.join(b).encode()).hexdigest()[:16]}.safetensors" for b in batches]
        if new and state.is_main_process:
            logger.info(f"Encoding {len(new)} class images into {bank_dir} (once: later runs read them back).")
        for batch, name in list(zip(batches, shard_names, strict=True))[state.process_index::state.num_processes]:
            mean, std, sizes = encode_fn([new[h] for h in batch])
            path = os.path.join(bank_dir, name)
            tmp = f"{path}.tmp{os.getpid()}"
            os.makedirs(bank_dir, exist_ok=True)
            with disk_space_guard(bank_dir, "the class images' encodings", tmp):
                save_file({"posterior_mean": mean.to("cpu", torch.float32).contiguous(),
                           "posterior_std": std.to("cpu", torch.float32).contiguous()}, tmp,
                          metadata={"images": json.dumps(batch), "sizes": json.dumps(sizes)})
            os.replace(tmp, path)
        state.wait_for_everyone()
        if new and state.is_main_process:
            for name in shard_names:
                path = os.path.join(bank_dir, name)
                manifest["shards"][name] = _sha256_file(path)
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata()
                for row, (image, size) in enumerate(zip(json.loads(meta["images"]), json.loads(meta["sizes"]),
                                                        strict=True)):
                    manifest["images"][image] = {"shard": name, "row": row, "size": size}
            atomic_write_json(os.path.join(bank_dir, MANIFEST_NAME), manifest)
        state.wait_for_everyone()
        manifest = _read_manifest(bank_dir)
    if manifest.get("format_version") != ENCODED_FORMAT_VERSION or manifest.get("settings") != json.loads(
            json.dumps(settings)):
        raise ConfigError(f"{bank_dir} holds encodings of other settings or of another version of this script; "
                          "delete it to encode the class images again.")
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name in dict.fromkeys(manifest["images"][h]["shard"] for h in hashes):
        path = os.path.join(bank_dir, name)
        if not os.path.exists(path) or _sha256_file(path) != manifest["shards"][name]:
            raise ConfigError(f"{path} is missing or corrupt (sha256 mismatch); delete {bank_dir} to encode the "
                              "class images again.")
        shards[name] = load_file(path)
    entries = [manifest["images"][h] for h in hashes]
    mean = torch.stack([shards[e["shard"]]["posterior_mean"][e["row"]] for e in entries])
    std = torch.stack([shards[e["shard"]]["posterior_std"][e["row"]] for e in entries])
    return (KnowledgeBank(mean[:, 0], [condition] * len(entries), manifest, mean, std),
            [tuple(e["size"]) for e in entries])


def replay_tensors(bank: KnowledgeBank, mode: str, random_flip: bool,
                   bank_dir: str = "") -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """What replay draws from: (means [N*V, C, H, W], stds or None, V views per sample).

    ``images`` (the authors' recipe): V = 2 views (unflipped, flipped) with ``random_flip``, else 1,
    and a posterior sample mean + std * noise per step, as encoding the bank's images each step
    would give. ``latents``: the sampler's raw latents, V = 1, no noise. Rows of sample i are
    i*V .. i*V+V-1 (see :func:`replay_rows`)."""
    if mode == "latents":
        return bank.latents, None, 1
    if mode != "images":
        raise ConfigError(f"--knowledge_bank_replay must be one of {REPLAY_MODES}, got {mode!r}.")
    if bank.posterior_mean is None:  # built through the API without a reencode_fn
        raise ConfigError(f"Knowledge bank {bank_dir} holds no re-encoded samples, so it cannot be replayed as "
                          "images: pass --knowledge_bank_replay latents, or rebuild it with a re-encoding function.")
    views = 2 if random_flip else 1
    return (bank.posterior_mean[:, :views].flatten(0, 1).contiguous(),
            bank.posterior_std[:, :views].flatten(0, 1).contiguous(), views)


def replay_rows(indices: torch.Tensor, num_views: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows of :func:`replay_tensors` for bank samples ``indices`` [B] (CPU): a uniformly random view
    (flip) of each, as RandomHorizontalFlip picks one for an image."""
    if num_views == 1:
        return indices
    return indices * num_views + torch.randint(num_views, indices.shape, generator=generator)


def _read_prompts(path: str) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("prompts", "[]"))


class ReplayStream:
    """Infinite, shuffled stream of bank indices; exactly resumable.

    Each pass over the bank is a permutation drawn from a generator seeded by (seed, rank, pass),
    so every process replays its own order, and the whole state is four integers:
    ``state_dict()`` / ``load_state_dict()`` make a resumed run continue the same stream.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0) -> None:
        if num_items < 1:
            raise ConfigError("The knowledge bank is empty.")
        self.num_items, self.batch_size, self.seed, self.rank = num_items, batch_size, seed, rank
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "replay", self.rank, epoch))
        return torch.randperm(self.num_items, generator=generator)

    def next_indices(self) -> torch.Tensor:
        """The next ``batch_size`` indices (int64, CPU), crossing into a new pass if needed."""
        chunks, needed = [], self.batch_size
        while needed > 0:
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(needed, self.num_items - self.position)
            chunks.append(self._order[self.position:self.position + take])
            self.position += take
            needed -= take
        return torch.cat(chunks)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.rank = state["seed"], state["rank"]
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


class BankReplay:
    """The retention half of each batch: the next bank samples of a :class:`ReplayStream`, a random
    view (flip) of each and, for ``images`` replay, a posterior sample (see :func:`replay_tensors`).
    The bank's tensors live on ``device`` (small: no per-step host-to-device copy but the indices);
    the replay state is the stream's, saved in checkpoints."""

    def __init__(self, bank: KnowledgeBank, mode: str, random_flip: bool, batch_size: int, seed: int, rank: int,
                 device: torch.device | str, bank_dir: str = "") -> None:
        means, stds, self.views = replay_tensors(bank, mode, random_flip, bank_dir)
        self.means = means.to(device)
        self.stds = stds.to(device) if stds is not None else None
        self.stream = ReplayStream(len(bank), batch_size, seed, rank)
        self.device = torch.device(device)

    def next(self, generator: torch.Generator | None,
             randn: Callable[[torch.Size], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [b, C, H, W], bank indices [b]) on the device; ``generator`` (CPU) picks the views,
        ``randn(shape)`` draws the posterior noise on the device."""
        indices = self.stream.next_indices()
        rows = replay_rows(indices, self.views, generator).to(self.device, non_blocking=True)
        latents = self.means[rows]
        if self.stds is not None:
            latents = latents + self.stds[rows] * randn(latents.shape)
        return latents, rows // self.views

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


def save_bank_preview(latents: torch.Tensor, decode_fn: Callable[[torch.Tensor], list], path: str,
                      rows: int = 4) -> None:
    """Decode a few bank latents with ``decode_fn`` (latents -> PIL images) and save a grid."""
    from diffusers.utils import make_image_grid

    images = decode_fn(latents)
    cols = math.ceil(len(images) / rows)
    images = images + [images[0].copy().point(lambda _: 0)] * (rows * cols - len(images))
    tmp = f"{path}.tmp.png"
    with disk_space_guard(os.path.dirname(path) or ".", "the knowledge-bank preview", tmp):
        make_image_grid(images, rows=rows, cols=cols).save(tmp)
    os.replace(tmp, path)


