"""Tokens that carry an image's content, and weights that keep it, for drawing maps.

Random weights route at random, so a map drawn with them would lie about a content-aware
mechanism (BRA's routing, deformable offsets). By default the tokens are per-patch
statistics of the image itself, embedded to ``dim`` by a fixed orthonormal map (so dot
products between tokens are dot products between their statistics), and the query, key
and value projections are the identity (times a sharpness), so attention follows
similarity of content.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

FEATURES = "per-patch mean and std of R, G, B, mean gradient magnitude, 4-bin gradient orientation histogram"
NUM_FEATURES = 11


def sample_image_path() -> Path:
    """The photograph matplotlib ships in its sample data (nothing is downloaded)."""
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


# natural photographs among the images scikit-image ships in its wheel (skimage/data/);
# left out: drawings, charts, text, synthetic patterns and the second of a stereo pair
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg",
                  "rocket.jpg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def sample_images() -> list[Path]:
    """grace_hopper.jpg and, where scikit-image is installed, its natural photographs; all
    from files already on disk (scikit-image is found, not imported)."""
    import importlib.util

    images = [sample_image_path()]
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        images += [data / name for name in SKIMAGE_PHOTOS if (data / name).is_file()]
    return images


def images_in(path: Path | str) -> list[Path]:
    """A JPEG/PNG file, or the JPEGs and PNGs directly in a folder (sorted); a ValueError
    for a path that does not exist or a folder without one."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise ValueError(f"folder '{path}' holds no image (looked for {', '.join(IMAGE_SUFFIXES)})")
        return found
    if not path.exists():
        raise ValueError(f"image '{path}' does not exist")
    if not path.is_file():
        raise ValueError(f"image '{path}' is not a file or a folder")
    return [path]


def load_square(path: Path | str, size: int) -> np.ndarray:
    """RGB in [0, 1], (size, size, 3): the image's central square, resized. Every image then
    has the same token grid, so figures over images are over one setting."""
    img = _open_rgb(Path(path))
    side = min(img.width, img.height)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def image_size(path: Path | str | None, width: int | None) -> tuple[int, int]:
    """(width, height) the image will have, read from its header without decoding it."""
    path = Path(path) if path is not None else sample_image_path()
    if not path.is_file():
        raise ValueError(f"image '{path}' does not exist or is not a file")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image '{path}' cannot be read as a JPEG or PNG ({exc})") from None
    return (width, max(1, round(h * width / w))) if width else (w, h)


def load_image(path: Path | str | None, width: int | None, stride: int) -> np.ndarray:
    """RGB in [0, 1], (H, W, 3), resized to ``width`` (aspect kept) and cropped to whole
    ``stride`` patches. Raises ValueError for a missing or unreadable file."""
    path = Path(path) if path is not None else sample_image_path()
    if not path.is_file():
        raise ValueError(f"image '{path}' does not exist or is not a file")
    img = _open_rgb(path)
    if width:
        height = round(img.height * width / img.width)
        img = img.resize((width, height), Image.BICUBIC)
    w, h = (img.width // stride) * stride, (img.height // stride) * stride
    if w < stride or h < stride:
        raise ValueError(f"the image ({img.width}x{img.height}) is smaller than one {stride}-pixel patch")
    return np.asarray(img.crop((0, 0, w, h)), dtype=np.float32) / 255.0


def _open_rgb(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image '{path}' cannot be read as a JPEG or PNG ({exc})") from None


def patch_features(image: np.ndarray, stride: int) -> np.ndarray:
    """(Hg, Wg, NUM_FEATURES) statistics of each stride x stride patch, standardised."""
    H, W, _ = image.shape
    Hg, Wg = H // stride, W // stride
    patches = image.reshape(Hg, stride, Wg, stride, 3).transpose(0, 2, 1, 3, 4).reshape(Hg, Wg, -1, 3)
    gray = image.mean(-1)
    gy, gx = np.gradient(gray)
    mag = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), math.pi)  # orientation, sign-free
    bins = np.minimum((angle / math.pi * 4).astype(int), 3)
    mag_p = mag.reshape(Hg, stride, Wg, stride).transpose(0, 2, 1, 3).reshape(Hg, Wg, -1)
    bins_p = bins.reshape(Hg, stride, Wg, stride).transpose(0, 2, 1, 3).reshape(Hg, Wg, -1)
    hist = np.stack([(mag_p * (bins_p == b)).sum(-1) for b in range(4)], -1)
    hist = hist / (hist.sum(-1, keepdims=True) + 1e-8)
    feats = np.concatenate([patches.mean(2), patches.std(2), mag_p.mean(-1, keepdims=True), hist], -1)
    return (feats - feats.mean((0, 1))) / (feats.std((0, 1)) + 1e-6)


def content_tokens(image: np.ndarray, stride: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(1, Hg, Wg, dim): patch statistics embedded by a fixed orthonormal map."""
    feats = torch.from_numpy(patch_features(image, stride)).float()
    if dim < feats.shape[-1]:
        raise ValueError(f"--dim {dim} is too small for the {feats.shape[-1]} content features; use >= {feats.shape[-1]}")
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, feats.shape[-1], generator=g))  # orthonormal columns
    return (feats @ basis.t()).unsqueeze(0)


ROLES = ("q", "k", "v", "pool")


def sharpness(heads: int) -> float:
    """What queries and keys are scaled by: 2 at 2 heads, and by sqrt(heads / 2) more at more
    heads. A head sees dim / heads channels of the tokens' embedding, so about 2 / heads of
    their dot product; without this the same content split over 8 heads would attend about 4
    times more softly than over 2 (nearly uniformly at 64x64 tokens), whatever the mechanism."""
    return (2.0 * heads) ** 0.5


def declared_projections(module: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """The module's ``projections`` as {module name: [(role, rows), ...]}; a ValueError that
    names what to declare where there is no declaration or it does not fit the module."""
    declared = getattr(module, "projections", None)
    name = getattr(module, "mechanism", type(module).__name__)
    if not declared:
        raise ValueError(
            f"{name} does not declare its projections, which content weights need: give its class "
            "`projections = {'qkv': 'qkv'}` (each Linear that makes queries, keys or values, with the roles "
            "of its output rows in order, e.g. {'q': 'q', 'kv': 'kv'}), or use random weights")
    layers = dict(module.named_modules())
    out = {}
    for path, roles in declared.items():
        layer = layers.get(path)
        if layer is None:
            raise ValueError(f"{name} declares projection '{path}', which is not one of its modules")
        if roles == "pool":
            if not (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.in_channels == layer.out_channels):
                raise ValueError(f"{name}'s '{path}' is declared 'pool' but is not a channel-preserving Conv2d")
            out[path] = [("pool", layer.out_channels)]
            continue
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name}'s projection '{path}' is a {type(layer).__name__}, not a Linear")
        parts = [(r, layer.out_features // len(roles)) for r in roles] if isinstance(roles, str) else list(roles)
        if any(r not in ROLES[:3] for r, _ in parts) or sum(n for _, n in parts) != layer.out_features:
            raise ValueError(f"{name}'s projection '{path}' ({layer.out_features} output rows) is declared as "
                             f"{roles!r}: give roles from q, k, v whose rows add up to its {layer.out_features}")
        out[path] = parts
    return out


@torch.no_grad()
def use_content_weights(module: nn.Module, scale: float | None = None) -> nn.Module:
    """The content proxy, set through what the mechanism declares (``projections`` and
    ``output_projection``): each query, key and value block an identity (the first rows of
    one, where a block is narrower than the tokens), queries and keys times ``scale`` (by
    default :func:`sharpness` of the module's heads),
    the output projection an identity, biases zero, a ``pool`` conv the mean of its cell. So
    attention logits are scaled dot products of the tokens themselves, for every mechanism
    alike. The softmax scale is head_dim^-0.5 everywhere (BRA's own qk_dim^-0.5 would make
    its attention softer than the others' on the same tokens). Nothing else is touched."""
    projections = declared_projections(module)
    scale = sharpness(module.num_heads) if scale is None else scale
    if isinstance(getattr(module, "scale", None), float) and hasattr(module, "head_dim"):
        module.scale = module.head_dim**-0.5
    layers = dict(module.named_modules())
    for path, parts in projections.items():
        layer = layers[path]
        if parts[0][0] == "pool":
            layer.weight.zero_()
            area = layer.kernel_size[0] * layer.kernel_size[1]
            for c in range(layer.in_channels):
                layer.weight[c, c] = 1.0 / area
        else:
            eye = torch.eye(layer.out_features, layer.in_features)  # unused rows are sliced off below
            blocks = [eye[:rows] * (scale if role in ("q", "k") else 1.0) for role, rows in parts]
            layer.weight.copy_(torch.cat(blocks))
        if layer.bias is not None:
            layer.bias.zero_()
    out = layers.get(module.output_projection or "")
    if isinstance(out, nn.Linear) and out.in_features == out.out_features:
        out.weight.copy_(torch.eye(out.in_features))
        if out.bias is not None:
            out.bias.zero_()
    return module
