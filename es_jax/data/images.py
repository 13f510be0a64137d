"""Image sets as arrays, DINO-style augmentation (numpy + PIL) and grain pre-training pipelines.

Images are uint8 arrays (H, W, C) until the last step, `to_unit_range`, maps them to float32 in
[-1, 1]: the normalisation of every es_jax model trained here. Every augmentation draws from the
`np.random.Generator` it is given and from nothing else, so a view is a pure function of the image
and the generator's state. Inside `pretraining_dataset` grain seeds each element's generator from
(seed, epoch, position), so the iterator's `get_state()` / `set_state()` resume gives the same
batches bit for bit.
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import grain
import jax
import numpy as np
from PIL import Image, ImageFilter

from es_jax.data.pipelines import _check_positive, host_shard
from es_jax.data.sources import is_local, source

IMAGE_SPLITS = {"fashion_mnist": ("train", "test"), "digits": ("train",)}
SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default, as DINO uses it
_CROP_TRIES = 10


class Normalisation(NamedTuple):
    """Per-channel pixel normalisation, (x / 255 - mean) / std; one value applies to every
    channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


UNIT_RANGE = Normalisation((0.5,), (0.5,))  # pixels in [-1, 1]: ViT-in21k and models trained here


class ImageSet(NamedTuple):
    """Images uint8 (N, H, W, C) and their labels int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray


class CropBox(NamedTuple):
    """A crop: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


class MultiCrop(NamedTuple):
    """DINO's multi-crop: 2 global views and `local_crops` local ones, sizes in pixels.

    A scale is the range of the crop's area as a fraction of the image's.
    """

    global_size: int
    local_crops: int
    local_size: int
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)


def image_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """All images and labels of "fashion_mnist" (train | test) or "digits" (train).

    Order: the source files' (sorted by the `index` feature) for local builders, the data
    source's for the tfds catalogue's `fashion_mnist` (used where the Debian files are absent).
    Nothing is cached beyond the tfds dataset prepared in the data dir.
    """
    if name not in IMAGE_SPLITS:
        raise ValueError(f"image_arrays takes one of {sorted(IMAGE_SPLITS)}, not {name!r}")
    if split not in IMAGE_SPLITS[name]:
        raise ValueError(f"{name!r} has splits {list(IMAGE_SPLITS[name])}, not {split!r}")
    records = source(name, split, data_dir)
    rows = records.__getitems__(range(len(records)))  # one bulk read: much faster than singles
    if is_local(name):
        rows.sort(key=lambda row: int(row["index"]))
    images = np.stack([np.asarray(row["image"], dtype=np.uint8) for row in rows])
    labels = np.array([int(row["label"]) for row in rows], dtype=np.int32)
    return ImageSet(images, labels)


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 `x / 127.5 - 1`: 0 -> -1.0, 255 -> 1.0.

    The normalisation of every es_jax model trained here, in training and in evaluation.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(
            f"to_unit_range takes uint8 pixels (0..255), got {pixels.dtype}; were they "
            "normalised already?"
        )
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def crop_box(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """torchvision RandomResizedCrop's box in an image of `shape` (height, width).

    Up to 10 tries: area = height * width * uniform(scale), aspect w/h = exp(uniform(log ratio)),
    w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first that fits is placed
    uniformly at random. If none fits: a centre crop of the whole image, narrowed to the nearest
    aspect ratio in `ratio` when the image's lies outside it.
    """
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
    image_height, image_width = shape
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_TRIES):
        area = image_height * image_width * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        width = round(math.sqrt(area * aspect))
        height = round(math.sqrt(area / aspect))
        if 0 < width <= image_width and 0 < height <= image_height:
            top = int(rng.integers(0, image_height - height + 1))
            left = int(rng.integers(0, image_width - width + 1))
            return CropBox(top, left, height, width)
    aspect = image_width / image_height
    height, width = image_height, image_width
    if aspect < ratio[0]:
        height = round(width / ratio[0])
    elif aspect > ratio[1]:
        width = round(height * ratio[1])
    return CropBox((image_height - height) // 2, (image_width - width) // 2, height, width)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """The `crop_box` of `image` (H, W, C uint8) resized to (size, size, C), bilinear (PIL)."""
    _check_image(image)
    _check_positive(size=size)
    box = crop_box(image.shape[:2], rng, scale, ratio)
    corners = (box.left, box.top, box.left + box.width, box.top + box.height)
    return _per_channel(
        image, lambda channel: channel.resize((size, size), Image.Resampling.BILINEAR, corners)
    )


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """`image` mirrored left-right with probability `p` (one draw of `rng.random()`)."""
    return image[:, ::-1] if rng.random() < p else image


def intensity_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    p: float = 0.8,
) -> np.ndarray:
    """Colour jitter's brightness and contrast (grayscale stand-in), applied with probability `p`.

    Factors b ~ uniform(max(0, 1 - brightness), 1 + brightness), c likewise from `contrast`;
    the two steps run in random order, each rounding and clipping to 0..255 as uint8 images do:
    brightness x -> b * x; contrast x -> c * x + (1 - c) * mean(x) (mean over the whole image).
    """
    if rng.random() >= p:
        return image
    factors = (
        rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
        rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
    )
    pixels = image.astype(np.float32)
    for step in rng.permutation(2):
        factor = factors[step]
        mean = pixels.mean() if step == 1 else 0.0
        pixels = np.clip(np.rint(factor * pixels + (1 - factor) * mean), 0, 255)
    return pixels.astype(np.uint8)


def gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, p: float, sigma: tuple[float, float] = (0.1, 2.0)
) -> np.ndarray:
    """With probability `p`, PIL's GaussianBlur with radius (std) ~ uniform(sigma), as DINO."""
    if rng.random() >= p:
        return image
    blur = ImageFilter.GaussianBlur(radius=rng.uniform(sigma[0], sigma[1]))
    return _per_channel(image, lambda channel: channel.filter(blur))


def solarize(image: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """With probability `p`, pixels >= 128 become 255 - x (PIL's ImageOps.solarize)."""
    if rng.random() >= p:
        return image
    return np.where(image >= SOLARIZE_THRESHOLD, 255 - image, image)


def multi_crop(image: np.ndarray, rng: np.random.Generator, crops: MultiCrop) -> dict:
    """DINO's views of one image: "global" (2, G, G, C), "local" (L, l, l, C), float32 in [-1, 1].

    Every view: random resized crop, flip, intensity jitter; then global 1 blur p=1.0; global 2
    blur p=0.1 and solarize p=0.2; each local blur p=0.5.
    """
    _check_multi_crop(crops)
    first = _view(image, rng, crops.global_size, crops.global_scale, blur=1.0)
    second = _view(image, rng, crops.global_size, crops.global_scale, blur=0.1, solarized=0.2)
    local = [
        _view(image, rng, crops.local_size, crops.local_scale, blur=0.5)
        for _ in range(crops.local_crops)
    ]
    shape = (0, crops.local_size, crops.local_size, image.shape[-1])
    local = np.stack(local) if local else np.zeros(shape, np.uint8)
    return {"global": to_unit_range(np.stack([first, second])), "local": to_unit_range(local)}


def supervised_view(
    image: np.ndarray, rng: np.random.Generator, size: int, scale: tuple[float, float] = (0.4, 1.0)
) -> np.ndarray:
    """A random resized crop (size, size, C), flipped with p=0.5, as float32 in [-1, 1]."""
    return to_unit_range(horizontal_flip(random_resized_crop(image, rng, size, scale), rng))


def pretraining_dataset(
    images: ImageSet,
    kind: str,
    batch_size: int,
    *,
    seed: int,
    crops: MultiCrop | None = None,
    image_size: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Endless augmented batches for pre-training, resumable through the iterator's state.

    Each host takes every `shard_count`-th image from `shard_index` (defaults: jax process
    index/count; images beyond an equal share are dropped so hosts step together). Each epoch
    shuffles the host's images anew with `seed` and cuts them into batches of `batch_size`, the
    remainder dropped; views are drawn from a generator seeded by (seed, epoch, position).
    kind "supervised" (needs `image_size`): {"pixel_values": (B, S, S, C) float32 from
    `supervised_view`, "label": (B,) int32}. kind "multicrop" (needs `crops`): {"global":
    (B, 2, G, G, C), "local": (B, L, l, l, C)} float32 from `multi_crop`, no labels.
    """
    augment = _augmentation(kind, crops, image_size)
    _check_positive(batch_size=batch_size)
    index, count = host_shard(shard_index, shard_count)
    per_host = len(images.images) // count
    if per_host < batch_size:
        raise ValueError(
            f"{len(images.images)} images over {count} hosts do not fill a batch of "
            f"{batch_size}; use a smaller batch"
        )
    positions = grain.MapDataset.range(per_host * count)[index::count].shuffle(seed=seed)
    views = positions.random_map(
        lambda position, rng: augment(images.images[position], images.labels[position], rng),
        seed=seed,
    )
    batches = views.batch(batch_size, drop_remainder=True).repeat(None)
    # Images are in memory and a view costs well under a millisecond: reading threads measured
    # no faster here (2 cores), so none, as packed_lm_dataset.
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def evaluation_batches(images: ImageSet, batch_size: int, image_size: int) -> list[dict]:
    """Fixed-shape batches of all images in order, the last padded: see `padded_image_batch`."""
    _check_positive(batch_size=batch_size, image_size=image_size)
    if not len(images.images):
        raise ValueError("evaluation_batches got no images")
    return [
        padded_image_batch(
            images.images[start : start + batch_size],
            images.labels[start : start + batch_size],
            batch_size,
            image_size,
        )
        for start in range(0, len(images.images), batch_size)
    ]


def padded_image_batch(
    images: np.ndarray,
    labels: Sequence[int],
    batch_size: int,
    image_size: int,
    channels: int | None = None,
    normalisation: Normalisation = UNIT_RANGE,
) -> dict[str, np.ndarray]:
    """A batch of uint8 images (n, H, W, C) padded to `batch_size` rows.

    "pixel_values" (batch_size, image_size, image_size, channels) float32: `pixels` of the images
    (channels: the images' own by default; [-1, 1] by default); "label" int32; "weights" float32,
    1 for an image and 0 for a padding row (all zeros).
    """
    rows = len(images)
    if rows > batch_size:
        raise ValueError(f"{rows} images do not fit a batch of {batch_size}")
    values = pixels(images, image_size, channels or images.shape[-1], normalisation)
    batch = np.zeros((batch_size, *values.shape[1:]), np.float32)
    batch[:rows] = values
    label = np.zeros(batch_size, np.int32)
    label[:rows] = labels
    weights = (np.arange(batch_size) < rows).astype(np.float32)
    return {"pixel_values": batch, "label": label, "weights": weights}


def pixels(
    images: np.ndarray, image_size: int, channels: int, normalisation: Normalisation = UNIT_RANGE
) -> np.ndarray:
    """uint8 NHWC images as a model's float32 input: scaled to [0, 1], a single channel repeated
    to `channels`, resized to image_size x image_size (bilinear), then (x - mean) / std per
    channel."""
    x = np.asarray(images, np.float32) / 255.0
    if x.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {x.shape}.")
    if x.shape[-1] != channels:
        if x.shape[-1] != 1:
            raise ValueError(
                f"images have {x.shape[-1]} channels but the model takes {channels}; only "
                "single-channel images are widened (repeated) to fit a model."
            )
        x = np.repeat(x, channels, axis=-1)
    if x.shape[1:3] != (image_size, image_size):
        shape = (len(x), image_size, image_size, channels)
        x = np.asarray(jax.image.resize(x, shape, method="bilinear"))
    mean = np.broadcast_to(np.asarray(normalisation.mean, np.float32), (channels,))
    std = np.broadcast_to(np.asarray(normalisation.std, np.float32), (channels,))
    return (x - mean) / std


def _check_image(image: np.ndarray) -> None:
    """Refuse anything but a uint8 (H, W, C) array."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"augmentations take one uint8 image (H, W, C), got {image.dtype} {image.shape}"
        )


def _per_channel(image: np.ndarray, operation: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """`operation` applied to each channel of `image` as an 8-bit PIL image; channels restacked."""
    channels = [
        np.asarray(operation(Image.fromarray(np.ascontiguousarray(image[..., c]))))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _view(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    *,
    blur: float,
    solarized: float = 0.0,
) -> np.ndarray:
    """One DINO view, uint8: crop, flip, jitter, blur with p=`blur`, solarize with p=`solarized`."""
    view = intensity_jitter(horizontal_flip(random_resized_crop(image, rng, size, scale), rng), rng)
    return solarize(gaussian_blur(view, rng, blur), rng, solarized)


def _check_multi_crop(crops: MultiCrop) -> None:
    """Refuse non-positive sizes or a negative number of local crops."""
    _check_positive(global_size=crops.global_size, local_size=crops.local_size)
    if not isinstance(crops.local_crops, int) or crops.local_crops < 0:
        raise ValueError(f"local_crops must be a non-negative integer, got {crops.local_crops!r}")


def _augmentation(
    kind: str, crops: MultiCrop | None, image_size: int | None
) -> Callable[[np.ndarray, int, np.random.Generator], dict]:
    """The per-image transform (image, label, rng) -> element of a pre-training kind."""
    if kind == "supervised":
        if image_size is None or crops is not None:
            raise ValueError("kind 'supervised' takes image_size and no crops")
        _check_positive(image_size=image_size)
        return lambda image, label, rng: {
            "pixel_values": supervised_view(image, rng, image_size),
            "label": np.int32(label),
        }
    if kind == "multicrop":
        if crops is None or image_size is not None:
            raise ValueError("kind 'multicrop' takes crops (a MultiCrop) and no image_size")
        _check_multi_crop(crops)
        return lambda image, label, rng: multi_crop(image, rng, crops)
    raise ValueError(f"kind must be 'supervised' or 'multicrop', not {kind!r}")
