"""tfds builders (array_record, no TensorFlow) for the offline image sets: Fashion-MNIST, digits.

Fashion-MNIST is read from the IDX files of the Debian package `dataset-fashion-mnist`; digits
are scikit-learn's bundled 8x8 images. Images are stored as raw uint8 tensors (no codec is needed
to read them back) and every record carries an `index` feature, its position in the source,
because tfds data sources return records in shuffled order.
"""

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from es_jax.data.builders import _OfflineBuilder

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes
DIGITS_LEVELS = 16  # scikit-learn's digits hold values 0..16


class IdxPair(NamedTuple):
    """Paths of one Fashion-MNIST split's gzipped IDX files."""

    images: Path
    labels: Path


def fashion_mnist_files(split: str) -> IdxPair:
    """The gzipped IDX files of split "train" or "test" in `FASHION_MNIST_DIR`."""
    if split not in _FASHION_MNIST_PREFIX:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    prefix = _FASHION_MNIST_PREFIX[split]
    return IdxPair(
        FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz",
        FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz",
    )


def fashion_mnist_installed() -> bool:
    """Whether all four Fashion-MNIST IDX files exist (the Debian package is installed)."""
    files = [path for split in _FASHION_MNIST_PREFIX for path in fashion_mnist_files(split)]
    return all(path.is_file() for path in files)


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array of a gzipped IDX file, shaped as its header says (big-endian dims)."""
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes; reinstall it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    values = np.frombuffer(raw, np.uint8, offset=header)
    if values.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: the header promises shape {shape} but {values.size} values follow; the "
            "file is truncated: reinstall it"
        )
    return values.reshape(shape)


def fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28, 1) and labels uint8 (N,) of a split, in file order."""
    files = fashion_mnist_files(split)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise ValueError(
            f"Fashion-MNIST file {missing[0]} is missing: install the Debian package "
            f"(sudo apt-get install {FASHION_MNIST_PACKAGE}), or read the tfds catalogue's "
            "'fashion_mnist' instead (es_jax does so by itself where the files are absent)"
        )
    images, labels = read_idx(files.images), read_idx(files.labels)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{files.images} and {files.labels} hold shapes {images.shape} and {labels.shape}, "
            "not (N, 28, 28) and (N,); reinstall the package"
        )
    return images[..., None], labels


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 (1797, 8, 8, 1) as round(v * 255 / 16), labels (1797,).

    Rounding is numpy's (half to even): 8 becomes 128 (127.5 rounded), 16 becomes 255.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ValueError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or es-jax[offline])"
        ) from error
    digits = load_digits()
    scaled = np.rint(digits.images * (255 / DIGITS_LEVELS)).astype(np.uint8)
    return scaled[..., None], digits.target.astype(np.int64)


def _image_features(shape: tuple[int, int, int], classes: tfds.features.ClassLabel) -> dict:
    """Features of an image record: index, raw uint8 image tensor, label."""
    return {
        "index": np.int32,
        "image": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="bytes"),
        "label": classes,
    }


def _image_records(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
    """(key, record) pairs of images and labels in source order; the key is the index."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield index, {"index": index, "image": image, "label": int(label)}


class EsFashionMnist(_OfflineBuilder):
    """Fashion-MNIST from the Debian package's IDX files: train (60,000) and test (10,000)."""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: index, image (28, 28, 1) uint8, label (10 classes)."""
        classes = tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017) read from the IDX files of the Debian "
            f"package {FASHION_MNIST_PACKAGE} in {FASHION_MNIST_DIR}.",
            features=tfds.features.FeaturesDict(_image_features((28, 28, 1), classes)),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        """Splits `train` and `test`."""
        del dl_manager
        return {split: self._generate_examples(split) for split in _FASHION_MNIST_PREFIX}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        """One example per image of `split`, in file order."""
        yield from _image_records(*fashion_mnist_split(split))


class EsDigits(_OfflineBuilder):
    """scikit-learn's digits: one `train` split of 1,797 8x8 images scaled to 0..255."""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: index, image (8, 8, 1) uint8, label (10 classes)."""
        return tfds.core.DatasetInfo(
            builder=self,
            description="Optical recognition of handwritten digits (UCI), scikit-learn's "
            "load_digits(); values 0..16 scaled to 0..255 as round(v * 255 / 16).",
            features=tfds.features.FeaturesDict(
                _image_features((8, 8, 1), tfds.features.ClassLabel(num_classes=10))
            ),
            supervised_keys=("image", "label"),
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        """One example per image, in scikit-learn's order."""
        yield from _image_records(*digits_arrays())
