"""Image sets (Fashion-MNIST from the Debian IDX files, scikit-learn's digits), augmentation,
and the grain pre-training and evaluation pipelines."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from es_jax import data
from es_jax.data import image_builders
from es_jax.evaluate.tasks import encode_images

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_debian_files = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install it)",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One fresh data dir for the module: each builder runs once here."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def digits(data_dir):
    """scikit-learn's digits through the local builder."""
    return data.image_arrays("digits", "train", data_dir)


def idx_bytes(name: str, header: int) -> np.ndarray:
    """The values of a gzipped IDX file after its `header` bytes, read independently."""
    with gzip.open(DEBIAN_DIR / name) as stream:
        return np.frombuffer(stream.read()[header:], np.uint8)


def batches(dataset, count: int) -> list[dict]:
    """The first `count` batches of a fresh iterator."""
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    """Batch lists equal bit for bit."""
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# Builders and readers.


@needs_debian_files
def test_fashion_mnist_test_split_equals_the_idx_files(data_dir):
    images = data.image_arrays("fashion_mnist", "test", data_dir)
    assert images.images.shape == (10_000, 28, 28, 1)
    assert images.images.dtype == np.uint8
    assert images.labels.dtype == np.int32
    np.testing.assert_array_equal(images.images.ravel(), idx_bytes("t10k-images-idx3-ubyte.gz", 16))
    np.testing.assert_array_equal(images.labels, idx_bytes("t10k-labels-idx1-ubyte.gz", 8))
    assert np.bincount(images.labels).tolist() == [1000] * 10


@needs_debian_files
def test_fashion_mnist_train_split_starts_as_the_idx_files(data_dir):
    images = data.image_arrays("fashion_mnist", "train", data_dir)
    assert images.images.shape == (60_000, 28, 28, 1)
    np.testing.assert_array_equal(images.labels, idx_bytes("train-labels-idx1-ubyte.gz", 8))
    assert images.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    first_pixels = idx_bytes("train-images-idx3-ubyte.gz", 16)[: 3 * 784]
    np.testing.assert_array_equal(images.images[:3].ravel(), first_pixels)


@needs_debian_files
def test_fashion_mnist_records_hold_a_raw_tensor_and_their_index(data_dir):
    assert data.is_local("fashion_mnist")
    records = data.source("fashion_mnist", "test", data_dir)
    record = records[0]
    assert set(record) == {"index", "image", "label"}
    assert record["image"].dtype == np.uint8
    assert record["image"].shape == (28, 28, 1)
    assert sorted(int(records[i]["index"]) for i in range(len(records))) == list(range(10_000))


def test_fashion_mnist_falls_back_to_the_catalogue_without_the_debian_files(monkeypatch, tmp_path):
    monkeypatch.setattr(image_builders, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert not data.is_local("fashion_mnist")
    assert data.is_local("digits")
    with tfds.testing.mock_data(num_examples=3):
        records = data.source("fashion_mnist", "test", data_dir=tmp_path)
        assert len(records) == 3
        assert set(records[0]) == {"image", "label"}
        assert records[0]["image"].shape == (28, 28, 1)


def test_local_fashion_mnist_without_the_files_says_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setattr(image_builders, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        data.local_builder("fashion_mnist", tmp_path)


def test_digits_equal_scikit_learn_scaled_to_bytes(digits):
    reference = load_digits()
    assert digits.images.shape == (1797, 8, 8, 1)
    assert digits.images.dtype == np.uint8
    np.testing.assert_array_equal(digits.labels, reference.target)
    scaled = np.array([round(v * 255 / 16) for v in range(17)], np.uint8)
    assert scaled[[0, 1, 8, 15, 16]].tolist() == [0, 16, 128, 239, 255]
    levels = reference.images.astype(np.int64)
    np.testing.assert_array_equal(levels, reference.images)
    np.testing.assert_array_equal(digits.images[..., 0], scaled[levels])


@pytest.mark.parametrize(
    ("name", "split", "message"),
    [("mnist", "train", "digits"), ("digits", "test", "train"), ("fashion_mnist", "dev", "test")],
)
def test_unknown_image_sets_and_splits_are_refused(data_dir, name, split, message):
    with pytest.raises(ValueError, match=message):
        data.image_arrays(name, split, data_dir)


# Augmentation.


def test_to_unit_range_maps_bytes_to_minus_one_one():
    pixels = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(data.to_unit_range(pixels), [-1.0, -0.6, 1.0], atol=1e-7)
    assert data.to_unit_range(pixels).dtype == np.float32
    with pytest.raises(ValueError, match="uint8"):
        data.to_unit_range(pixels / 255)


def test_full_crop_at_the_same_size_is_the_image(digits):
    image = digits.images[5]
    crop = data.random_resized_crop(image, np.random.default_rng(0), 8, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_array_equal(crop, image)


def bilinear_weights(inputs: int, outputs: int) -> np.ndarray:
    """(outputs, inputs) weights of an antialiased bilinear (triangle) resize, pixel centres."""
    scale = inputs / outputs
    support = max(scale, 1.0)
    centres = (np.arange(outputs) + 0.5) * scale
    distance = (np.arange(inputs)[None, :] + 0.5 - centres[:, None]) / support
    weights = np.maximum(0.0, 1.0 - np.abs(distance))
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("size", [14, 20, 40])
def test_full_crop_is_the_bilinear_resize_of_the_whole_image(digits, size):
    image = np.kron(digits.images[7, ..., 0], np.ones((4, 4), np.uint8))[..., None]  # 32x32
    crop = data.random_resized_crop(image, np.random.default_rng(1), size, (1.0, 1.0), (1, 1))
    weights = bilinear_weights(32, size)
    expected = weights @ image[..., 0].astype(np.float64) @ weights.T
    assert crop.shape == (size, size, 1)
    assert np.abs(crop[..., 0] - expected).max() <= 1.0  # PIL rounds between its two passes


def test_a_quarter_area_square_crop_is_a_window_of_the_image(digits):
    image = np.kron(digits.images[3, ..., 0], np.ones((4, 4), np.uint8))[..., None]  # 32x32
    for seed in range(5):
        rng = np.random.default_rng(seed)
        crop = data.random_resized_crop(image, rng, 16, (0.25, 0.25), (1.0, 1.0))
        windows = np.lib.stride_tricks.sliding_window_view(image[..., 0], (16, 16))
        assert (windows == crop[..., 0]).all(axis=(2, 3)).any()


def test_crop_boxes_follow_scale_and_aspect_ranges():
    tops, lefts = set(), set()
    for seed in range(300):
        box = data.crop_box((400, 600), np.random.default_rng(seed), (0.08, 1.0))
        assert box.top >= 0
        assert box.left >= 0
        assert box.top + box.height <= 400
        assert box.left + box.width <= 600
        assert 0.08 * 0.99 <= box.height * box.width / (400 * 600) <= 1.0
        assert 0.75 * 0.99 <= box.width / box.height <= 4 / 3 * 1.01
        tops.add(box.top)
        lefts.add(box.left)
    assert len(tops) > 100
    assert len(lefts) > 100
    again = data.crop_box((400, 600), np.random.default_rng(7), (0.08, 1.0))
    assert again == data.crop_box((400, 600), np.random.default_rng(7), (0.08, 1.0))


def test_crop_falls_back_to_a_centre_crop_of_the_nearest_aspect():
    rng = np.random.default_rng(0)
    assert data.crop_box((28, 28), rng, (1.0, 1.0), (3.0, 3.0)) == data.CropBox(9, 0, 9, 28)
    assert data.crop_box((28, 28), rng, (1.0, 1.0), (1 / 3, 1 / 3)) == data.CropBox(0, 9, 28, 9)
    assert data.crop_box((20, 30), rng, (2.0, 2.0), (0.5, 2.0)) == data.CropBox(0, 0, 20, 30)


def test_bad_crop_ranges_are_refused(digits):
    with pytest.raises(ValueError, match="scale"):
        data.random_resized_crop(digits.images[0], np.random.default_rng(0), 8, (0.5, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        data.random_resized_crop(digits.images[0], np.random.default_rng(0), 8, (0.1, 1), (0, 1))
    with pytest.raises(ValueError, match="uint8"):
        data.random_resized_crop(digits.images[0] / 255, np.random.default_rng(0), 8, (0.1, 1))


def test_flip_and_solarize_by_hand(digits):
    image = digits.images[0]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(data.horizontal_flip(image, rng, p=1.0), image[:, ::-1])
    np.testing.assert_array_equal(data.horizontal_flip(image, rng, p=0.0), image)
    values = np.array([0, 127, 128, 200, 255], np.uint8).reshape(1, 5, 1)
    assert data.solarize(values, rng, p=1.0).ravel().tolist() == [0, 127, 127, 55, 0]
    np.testing.assert_array_equal(data.solarize(values, rng, p=0.0), values)


def test_brightness_jitter_scales_every_pixel_by_one_factor(digits):
    image = digits.images[10]
    for seed in range(5):
        out = data.intensity_jitter(image, np.random.default_rng(seed), contrast=0.0, p=1.0)
        unclipped = (out < 255) & (image > 0)
        brightest = np.argmax(np.where(unclipped, image, 0))
        factor = out.flat[brightest] / image.flat[brightest]
        assert 0.6 - 0.01 <= factor <= 1.4 + 0.01
        expected = np.clip(np.rint(factor * image.astype(np.float64)), 0, 255)
        assert np.abs(out - expected).max() <= 1.0


def test_contrast_jitter_pulls_pixels_to_the_mean(digits):
    image = digits.images[10].astype(np.float64)
    for seed in range(5):
        out = data.intensity_jitter(
            digits.images[10], np.random.default_rng(seed), brightness=0.0, p=1.0
        )
        centred = image - image.mean()
        unclipped = (out > 0) & (out < 255)
        fitted = centred[unclipped]
        factor = np.sum(fitted * (out[unclipped] - image.mean())) / np.sum(fitted**2)
        assert 0.6 - 0.02 <= factor <= 1.4 + 0.02
        expected = np.clip(factor * centred + image.mean(), 0, 255)
        assert np.abs(out - expected).max() <= 1.0


def test_jitter_and_blur_do_nothing_when_not_drawn_or_neutral(digits):
    image = digits.images[20]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(data.intensity_jitter(image, rng, p=0.0), image)
    np.testing.assert_array_equal(data.intensity_jitter(image, rng, 0.0, 0.0, p=1.0), image)
    np.testing.assert_array_equal(data.gaussian_blur(image, rng, p=0.0), image)
    flat = np.full((8, 8, 1), 77, np.uint8)
    np.testing.assert_array_equal(data.gaussian_blur(flat, rng, p=1.0), flat)


def test_blur_smooths_the_image(digits):
    image = np.kron(digits.images[30, ..., 0], np.ones((4, 4), np.uint8))[..., None]
    blurred = data.gaussian_blur(image, np.random.default_rng(0), p=1.0, sigma=(1.5, 2.0))

    def edge_energy(pixels: np.ndarray) -> float:
        pixels = pixels[..., 0].astype(np.float64)
        return (np.diff(pixels, axis=0) ** 2).sum() + (np.diff(pixels, axis=1) ** 2).sum()

    assert edge_energy(blurred) < 0.5 * edge_energy(image)
    assert abs(blurred.astype(np.float64).mean() - image.mean()) < 2.0


def test_multi_crop_views_have_their_shapes_and_range(digits):
    crops = data.MultiCrop(global_size=8, local_crops=3, local_size=4)
    views = data.multi_crop(digits.images[0], np.random.default_rng(0), crops)
    assert views["global"].shape == (2, 8, 8, 1)
    assert views["local"].shape == (3, 4, 4, 1)
    for view in views.values():
        assert view.dtype == np.float32
        assert np.abs(view).max() <= 1.0
    no_locals = crops._replace(local_crops=0)
    none = data.multi_crop(digits.images[0], np.random.default_rng(0), no_locals)
    assert none["local"].shape == (0, 4, 4, 1)
    np.testing.assert_array_equal(none["global"], views["global"])


def test_views_are_a_function_of_the_generator(digits):
    crops = data.MultiCrop(global_size=8, local_crops=2, local_size=4)
    image = digits.images[1]
    same = [data.multi_crop(image, np.random.default_rng(5), crops) for _ in range(2)]
    np.testing.assert_array_equal(same[0]["local"], same[1]["local"])
    other = data.multi_crop(image, np.random.default_rng(6), crops)
    assert not np.array_equal(same[0]["global"], other["global"])
    view = data.supervised_view(image, np.random.default_rng(5), 16)
    assert view.shape == (16, 16, 1)
    assert view.dtype == np.float32
    np.testing.assert_array_equal(view, data.supervised_view(image, np.random.default_rng(5), 16))


# Pre-training pipelines.


def test_supervised_batches_have_their_shapes(digits):
    dataset = data.pretraining_dataset(
        digits, "supervised", 16, seed=0, image_size=12, shard_index=0, shard_count=1
    )
    batch = batches(dataset, 1)[0]
    assert set(batch) == {"pixel_values", "label"}
    assert batch["pixel_values"].shape == (16, 12, 12, 1)
    assert batch["pixel_values"].dtype == np.float32
    assert batch["label"].shape == (16,)
    assert batch["label"].dtype == np.int32
    assert np.abs(batch["pixel_values"]).max() <= 1.0


def test_multicrop_batches_have_their_shapes(digits):
    crops = data.MultiCrop(global_size=8, local_crops=2, local_size=4)
    dataset = data.pretraining_dataset(
        digits, "multicrop", 4, seed=0, crops=crops, shard_index=0, shard_count=1
    )
    batch = batches(dataset, 1)[0]
    assert set(batch) == {"global", "local"}
    assert batch["global"].shape == (4, 2, 8, 8, 1)
    assert batch["local"].shape == (4, 2, 4, 4, 1)
    assert batch["global"].dtype == batch["local"].dtype == np.float32


def test_batches_depend_on_the_seed_alone(digits):
    crops = data.MultiCrop(global_size=8, local_crops=1, local_size=4)

    def dataset(seed):
        return data.pretraining_dataset(
            digits, "multicrop", 4, seed=seed, crops=crops, shard_index=0, shard_count=1
        )

    assert_same_batches(batches(dataset(3), 3), batches(dataset(3), 3))
    first, other = batches(dataset(3), 1)[0], batches(dataset(4), 1)[0]
    assert not np.array_equal(first["global"], other["global"])


def test_resumed_iterator_gives_the_same_batches(digits):
    small = data.ImageSet(digits.images[:24], digits.labels[:24])  # 3 batches an epoch
    crops = data.MultiCrop(global_size=8, local_crops=2, local_size=4)
    dataset = data.pretraining_dataset(
        small, "multicrop", 8, seed=1, crops=crops, shard_index=0, shard_count=1
    )
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = iter(dataset)
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(2)], expected)


def test_epochs_are_reshuffled_and_augmented_anew(digits):
    ids = data.ImageSet(digits.images[:24], np.arange(24, dtype=np.int32))
    dataset = data.pretraining_dataset(
        ids, "supervised", 8, seed=0, image_size=8, shard_index=0, shard_count=1
    )
    stream = batches(dataset, 6)
    first = np.concatenate([b["label"] for b in stream[:3]])
    second = np.concatenate([b["label"] for b in stream[3:]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(24))
    assert first.tolist() != second.tolist()
    pixels = {
        int(label): view
        for b in stream[:3]
        for label, view in zip(b["label"], b["pixel_values"], strict=True)
    }
    again = {
        int(label): view
        for b in stream[3:]
        for label, view in zip(b["label"], b["pixel_values"], strict=True)
    }
    assert sum(np.array_equal(pixels[i], again[i]) for i in range(24)) < 6


def test_host_shards_are_disjoint_and_cover_an_equal_share(digits):
    ids = data.ImageSet(digits.images[:50], np.arange(50, dtype=np.int32))  # 16 a host, 2 dropped
    seen = []
    for index in range(3):
        dataset = data.pretraining_dataset(
            ids, "supervised", 4, seed=0, image_size=8, shard_index=index, shard_count=3
        )
        seen.append({int(i) for b in batches(dataset, 4) for i in b["label"]})
    assert [len(s) for s in seen] == [16, 16, 16]
    assert sum(len(s) for s in seen) == len(seen[0] | seen[1] | seen[2])  # disjoint
    assert seen[0] | seen[1] | seen[2] == set(range(48))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "rotation", "image_size": 8}, "supervised"),
        ({"kind": "supervised"}, "image_size"),
        ({"kind": "multicrop", "image_size": 8}, "crops"),
        ({"kind": "supervised", "image_size": 8, "batch_size": 2000}, "batch of 2000"),
    ],
)
def test_bad_pipeline_arguments_are_refused(digits, kwargs, message):
    arguments = {"batch_size": 4, "seed": 0, "shard_index": 0, "shard_count": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        data.pretraining_dataset(digits, **arguments)


# Evaluation batches.


def test_evaluation_batches_cover_every_image_in_order_with_padding(digits):
    evaluation = data.evaluation_batches(digits, 500, 8)
    assert len(evaluation) == 4
    weights = np.concatenate([b["weights"] for b in evaluation])
    assert weights.sum() == 1797
    assert weights[1797:].tolist() == [0.0] * 203
    pixels = np.concatenate([b["pixel_values"] for b in evaluation])[:1797]
    np.testing.assert_array_equal(pixels, digits.images.astype(np.float32) / 127.5 - 1)
    labels = np.concatenate([b["label"] for b in evaluation])
    np.testing.assert_array_equal(labels[:1797], digits.labels)
    assert not labels[1797:].any()
    assert not np.concatenate([b["pixel_values"] for b in evaluation])[1797:].any()


def test_evaluation_batches_match_the_evaluators_encoding(digits):
    last = data.evaluation_batches(digits, 100, 16)[-1]
    rows = [
        {"image": image, "label": label}
        for image, label in zip(digits.images[1700:], digits.labels[1700:], strict=True)
    ]
    expected = encode_images(rows, 100, 16, channels=1)
    assert last.keys() == expected.keys()
    for key in expected:
        assert last[key].dtype == expected[key].dtype
        np.testing.assert_allclose(last[key], expected[key], atol=1e-6)


def test_pil_and_numpy_agree_on_channels(digits):
    rgb = np.repeat(digits.images[2], 3, axis=-1)
    crop = data.random_resized_crop(rgb, np.random.default_rng(0), 6, (0.5, 0.5), (1.0, 1.0))
    assert crop.shape == (6, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(crop[..., channel], crop[..., 0])
    whole = Image.fromarray(digits.images[2, ..., 0]).resize((6, 6), Image.Resampling.BILINEAR)
    full = data.random_resized_crop(digits.images[2], np.random.default_rng(0), 6, (1, 1), (1, 1))
    np.testing.assert_array_equal(full[..., 0], np.asarray(whole))
