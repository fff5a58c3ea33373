"""Colour emoji artwork from the npm registry: the data of the second CPU miniature.

Three openly licensed emoji sets, each an npm package this project's machines can install:

* ``emoji-datasource-twitter@16.0.0``: Twemoji (graphics CC-BY 4.0, Twitter Inc. and contributors);
* ``emoji-datasource-google@16.0.0``: Noto Emoji (graphics Apache 2.0, Google);
* ``openmoji@17.0.0``: OpenMoji (CC-BY-SA 4.0, HfG Schwäbisch Gmünd), SVG only, rasterised here;
* ``@iconify-json/fluent-emoji-flat@1.2.6`` (Microsoft's Fluent Emoji Flat, MIT) and
  ``@iconify-json/emojione-v1@1.2.3`` (Emoji One v1, CC-BY-SA 4.0): SVG bodies in Iconify's JSON, rasterised
  here; only the DreamBooth miniature's subjects are drawn from them.

Twemoji + Noto are the *source* domain (what the pre-trained models learn); OpenMoji, with its
black outlines and flat fills, is the *target* style the source models never saw. The emoji-datasource
packages hold sprite sheets (``img/<vendor>/sheets-clean/<S>.png``: tile (x, y) at pixel
(x*(S+2)+1, y*(S+2)+1), S x S, RGBA) and ``emoji.json`` (name, category, sub-category, sheet position).

Packages are fetched once with ``npm pack`` into ``$DIFFTUNING_DATA_DIR`` (default
``~/.cache/difftuning-benchmark``); a folder with the unpacked packages can be given instead.
Everything is composited on white and returned as uint8 RGB arrays.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PACKAGES = {"twitter": "emoji-datasource-twitter@16.0.0", "google": "emoji-datasource-google@16.0.0",
            "openmoji": "openmoji@17.0.0"}
# Other vendors' artwork, as Iconify JSON (SVG bodies by CLDR-style slug): the DreamBooth miniature's subjects in
# styles the base model never saw. Microsoft's Fluent Emoji Flat (MIT) and EmojiOne v1 (CC-BY-SA 4.0).
ICONIFY_PACKAGES = {"fluent_flat": "@iconify-json/fluent-emoji-flat@1.2.6",
                    "emojione_v1": "@iconify-json/emojione-v1@1.2.3"}
CREDITS = ("Twemoji (c) Twitter, Inc. and other contributors, CC-BY 4.0; Noto Emoji (c) Google, Apache 2.0; "
           "OpenMoji (c) HfG Schwäbisch Gmünd and contributors, CC-BY-SA 4.0; Fluent Emoji (c) Microsoft, MIT; "
           "Emoji One v1 (c) Emoji One, CC-BY-SA 4.0")
# Emoji groups shared by the three sets (Unicode's CLDR groups); "Component" (skin-tone swatches) is left out.
GROUPS = ("smileys-emotion", "people-body", "animals-nature", "food-drink", "travel-places", "activities",
          "objects", "symbols", "flags")
# Left out of the emoji_heldout source (benchmark/pretrain_source.py) and made the third miniature's target.
HELDOUT_GROUPS = ("animals-nature", "food-drink")


def data_dir() -> Path:
    return Path(os.environ.get("DIFFTUNING_DATA_DIR", Path.home() / ".cache" / "difftuning-benchmark"))


def npm_package(spec: str, root: Path | None = None) -> Path:
    """The unpacked ``package/`` folder of ``spec`` (``name@version``), fetched once with ``npm pack``.

    Extracted into a temporary folder and renamed, so an interrupted fetch never leaves a partial
    package that looks complete.
    """
    root = root or data_dir()
    target = root / spec.replace("@", "-").replace("/", "_")
    if (target / "package" / "package.json").exists():
        return target / "package"
    if shutil.which("npm") is None:
        raise RuntimeError(f"The emoji benchmark needs the npm package {spec}; install Node.js/npm, or unpack "
                           f"`npm pack {spec}` into {target}.")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        done = subprocess.run(["npm", "pack", spec, "--pack-destination", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`npm pack {spec}` failed: {done.stderr.strip().splitlines()[-1:]}")
        tarball = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tarball) as tar:
            tar.extractall(Path(tmp) / "unpacked", filter="data")
        try:
            os.replace(Path(tmp) / "unpacked", target)
        except OSError:  # another process (a parallel test worker) unpacked it first
            if not (target / "package" / "package.json").exists():
                raise
    return target / "package"


@dataclass
class EmojiSet:
    """``images`` uint8 [N, S, S, 3] on white; per image its name, group, sub-group, code point and set."""

    images: np.ndarray
    names: list[str]
    groups: list[str]
    subgroups: list[str]
    codes: list[str]
    vendors: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: np.ndarray | list[int]) -> EmojiSet:
        index = np.asarray(index, dtype=np.int64)
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        return EmojiSet(self.images[index], pick(self.names), pick(self.groups), pick(self.subgroups),
                        pick(self.codes), pick(self.vendors))

    @staticmethod
    def concatenate(sets: list[EmojiSet]) -> EmojiSet:
        return EmojiSet(np.concatenate([s.images for s in sets]), *(
            [v for s in sets for v in getattr(s, field)] for field in ("names", "groups", "subgroups", "codes",
                                                                        "vendors")))


def _group_key(category: str) -> str:
    """emoji-datasource's "Smileys & Emotion" -> CLDR's "smileys-emotion"."""
    return category.lower().replace(" & ", "-").replace(" ", "-")


def _code_key(code: str) -> str:
    """Code points without variation selectors, upper case: the two packages' spellings agree then."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


@functools.lru_cache(maxsize=1)
def cldr_names() -> dict[str, str]:
    """CLDR short names ("grinning face", "flag: Egypt") by code point, from OpenMoji's metadata.

    emoji-datasource names are Unicode character names ("RUNNER", "HASH KEY"); the CLDR names are
    what people type, so the text-to-image captions use them where they exist."""
    entries = json.loads((npm_package(PACKAGES["openmoji"]) / "data" / "openmoji.json").read_text())
    return {_code_key(e["hexcode"]): e["annotation"] for e in entries}


def load_vendor(vendor: str, size: int = 32) -> EmojiSet:
    """Every emoji of an emoji-datasource set (no skin-tone variants, no components) at ``size`` px."""
    from PIL import Image

    package = npm_package(PACKAGES[vendor])
    entries = json.loads((package / "emoji.json").read_text())
    sheet = Image.open(package / "img" / vendor / "sheets-clean" / f"{size}.png").convert("RGBA")
    names = cldr_names()
    images, kept = [], []
    for entry in sorted(entries, key=lambda e: e["sort_order"]):
        if not entry.get(f"has_img_{vendor}") or entry["category"] == "Component":
            continue
        x, y = entry["sheet_x"] * (size + 2) + 1, entry["sheet_y"] * (size + 2) + 1
        tile = sheet.crop((x, y, x + size, y + size))
        canvas = Image.new("RGBA", tile.size, (255, 255, 255, 255))
        canvas.alpha_composite(tile)
        images.append(np.asarray(canvas.convert("RGB")))
        kept.append(entry)
    return EmojiSet(np.stack(images),
                    [names.get(_code_key(e["unified"]), e["name"].lower()) for e in kept],
                    [_group_key(e["category"]) for e in kept], [e["subcategory"] for e in kept],
                    [_code_key(e["unified"]) for e in kept], [vendor] * len(kept))


def load_openmoji(size: int = 32) -> EmojiSet:
    """OpenMoji's colour emoji of the :data:`GROUPS` (no skin-tone variants, no OpenMoji extras),
    rasterised from SVG with resvg at ``size`` px on white; cached as an .npz next to the package."""
    package = npm_package(PACKAGES["openmoji"])
    entries = [e for e in json.loads((package / "data" / "openmoji.json").read_text())
               if not e["skintone"] and e["group"] in GROUPS]
    cache = package.parent / f"openmoji-{size}px.npz"
    if cache.exists():
        images = np.load(cache)["images"]
    else:
        import resvg_py
        from PIL import Image

        images = np.stack([np.asarray(Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(
            svg_path=str(package / "color" / "svg" / f"{e['hexcode']}.svg"), width=size, height=size,
            background="#ffffff")))).convert("RGB")) for e in entries])
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: parallel writers never share it
        np.savez_compressed(tmp, images=images)
        os.replace(tmp, cache)
    return EmojiSet(images, [e["annotation"] for e in entries], [e["group"] for e in entries],
                    [e["subgroups"] for e in entries], [_code_key(e["hexcode"]) for e in entries],
                    ["openmoji"] * len(entries))


def load_iconify(vendor: str, icons: list[str], size: int = 32) -> np.ndarray:
    """uint8 [len(icons), size, size, 3] on white: the named icons of an :data:`ICONIFY_PACKAGES` set, rasterised
    from their SVG bodies with resvg (an alias is drawn as its parent, flipped as the alias says)."""
    import resvg_py
    from PIL import Image

    data = json.loads((npm_package(ICONIFY_PACKAGES[vendor]) / "icons.json").read_text())
    images = []
    for name in icons:
        alias = data.get("aliases", {}).get(name, {})
        icon = data["icons"].get(alias.get("parent", name))
        if icon is None:
            raise KeyError(f"{ICONIFY_PACKAGES[vendor]} has no icon {name!r}")
        width, height = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
        body = icon["body"]
        if alias.get("hFlip"):
            body = f'<g transform="translate({width} 0) scale(-1 1)">{body}</g>'
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
               f'viewBox="{icon.get("left", 0)} {icon.get("top", 0)} {width} {height}">{body}</svg>')
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff")
        images.append(np.asarray(Image.open(io.BytesIO(bytes(png))).convert("RGB")))
    return np.stack(images)


def load_source(size: int = 32) -> EmojiSet:
    """The source domain: Twemoji and Noto Emoji, about 3,800 images."""
    return EmojiSet.concatenate([load_vendor("twitter", size), load_vendor("google", size)])


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
