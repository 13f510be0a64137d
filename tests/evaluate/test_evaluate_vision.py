"""Vision tasks: pixels as the model expects them (channels, size, per-channel normalisation), the
seeded few-labels sample and held-out split of the real Fashion-MNIST and digits images, the
fine-tune data built from them, and k-NN accuracy of [CLS] features against a numpy reference."""

import jax
import numpy as np
import pytest
from flax import nnx

from es_jax import models
from es_jax.data import images
from es_jax.evaluate import evaluators, tasks
from es_jax.models import vit

IMAGENET = tasks.Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny_vit(task=None, image_size=32, num_channels=3, seed=0):
    hf = {**models.TINY_HF_CONFIGS["vit"], "image_size": image_size, "num_channels": num_channels}
    return vit.build(vit.config_from_hf(hf), task, rngs=nnx.Rngs(seed), num_labels=10)


def test_unit_range_pixels_are_x_over_127_5_minus_1():
    gray = np.arange(0, 256, 17, dtype=np.uint8).reshape(1, 4, 4, 1)
    out = images.pixels(gray, 4, 1)
    np.testing.assert_allclose(out, images.to_unit_range(gray), atol=1e-6)
    assert out.dtype == np.float32


def test_gray_images_are_widened_and_normalised_per_channel():
    gray = np.array([[0, 255], [51, 102]], np.uint8).reshape(1, 2, 2, 1)
    out = images.pixels(gray, 2, 3, IMAGENET)
    assert out.shape == (1, 2, 2, 3)
    for c, (mean, std) in enumerate(zip(IMAGENET.mean, IMAGENET.std, strict=True)):
        expected = (gray[0, :, :, 0] / 255.0 - mean) / std
        np.testing.assert_allclose(out[0, :, :, c], expected, atol=1e-6)


def test_resizing_keeps_a_constant_image_constant():
    flat = np.full((2, 8, 8, 1), 153, np.uint8)
    out = images.pixels(flat, 32, 1, tasks.Normalisation((0.2,), (0.4,)))
    assert out.shape == (2, 32, 32, 1)
    np.testing.assert_allclose(out, (153 / 255 - 0.2) / 0.4, rtol=1e-5)


def test_colour_images_are_not_squeezed_into_fewer_channels():
    with pytest.raises(ValueError, match="3 channels but the model takes 1"):
        images.pixels(np.zeros((1, 4, 4, 3), np.uint8), 4, 1)


def test_an_image_size_other_than_the_models_is_refused():
    with pytest.raises(ValueError, match="image_size=28, but the model takes 32x32 images"):
        tasks.image_input(tiny_vit(), 28, tasks.UNIT_RANGE)


def test_few_per_class_takes_exactly_that_many_of_each_class_per_seed():
    labels = np.repeat(np.arange(4), [5, 7, 6, 9])
    chosen = tasks.few_per_class(labels, 3, seed=0)
    assert list(chosen) == sorted(chosen)
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [3, 3, 3, 3])
    np.testing.assert_array_equal(chosen, tasks.few_per_class(labels, 3, seed=0))
    assert not np.array_equal(chosen, tasks.few_per_class(labels, 3, seed=1))
    with pytest.raises(ValueError, match="class 0 has only 5 examples"):
        tasks.few_per_class(labels, 6, seed=0)


def test_fashion_few_is_a_labelled_sample_of_train_and_the_first_test_images():
    settings = tasks.TaskSettings(seed=3, labels_per_class=4, max_examples=30)
    split = tasks.image_split("fashion_mnist_few", settings)
    train = images.image_arrays("fashion_mnist", "train")
    test = images.image_arrays("fashion_mnist", "test")
    chosen = tasks.few_per_class(train.labels, 4, seed=3)
    assert [r["label"] for r in split.train] == list(train.labels[chosen])
    np.testing.assert_array_equal(np.bincount([r["label"] for r in split.train]), [4] * 10)
    np.testing.assert_array_equal(split.train[5]["image"], train.images[chosen[5]])
    assert [r["label"] for r in split.evaluation] == list(test.labels[:30])


def test_digits_hold_out_the_seeds_fifth():
    split = tasks.image_split("digits", tasks.TaskSettings(seed=1))
    digits = images.image_arrays("digits", "train")
    train, held = tasks.held_out_split(1797, 1)
    assert (len(split.train), len(split.evaluation)) == (1438, 359)
    assert [r["label"] for r in split.evaluation] == list(digits.labels[held])
    np.testing.assert_array_equal(split.train[-1]["image"], digits.images[train[-1]])
    other = tasks.image_split("digits", tasks.TaskSettings(seed=2, max_examples=10))
    assert len(other.evaluation) == 10
    assert [r["label"] for r in other.evaluation] != [r["label"] for r in split.evaluation][:10]


def test_digits_finetune_data_are_the_models_pixels_of_the_split():
    model = tiny_vit("classification")
    settings = tasks.FinetuneSettings(seed=0, batch_size=16, train_batch_size=8, num_epochs=2,
                                      image_size=32, max_examples=20, normalisation=IMAGENET)
    data = tasks.build_finetune("digits", model, None, settings)
    assert data.evaluator.num_examples == 20
    assert len(data.train) == 2 * 1438 // 8  # two epochs of shuffled images, full batches
    batch = data.train[0]
    assert batch["pixel_values"].shape == (8, 32, 32, 3)
    split = tasks.image_split("digits", settings)
    expected = images.pixels(np.stack([r["image"] for r in split.train]), 32, 3, IMAGENET)
    labels = np.array([r["label"] for r in split.train])
    for row, label in zip(batch["pixel_values"], batch["label"], strict=True):
        same = np.flatnonzero(np.abs(expected - row).max(axis=(1, 2, 3)) < 1e-5)
        assert len(same)
        assert label in labels[same]
    assert tasks.num_labels("digits") == tasks.num_labels("fashion_mnist_few") == 10


def numpy_knn(bank, bank_labels, test, k, temperature, classes):
    """DINO's weighted k-NN vote, written out with numpy."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predicted = []
    for row in test @ bank.T:
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(classes)
        np.add.at(votes, bank_labels[nearest], np.exp(row[nearest] / temperature))
        predicted.append(np.argmax(votes))
    return np.array(predicted)


def test_knn_accuracy_of_cls_features_matches_numpy_and_compiles_once():
    model = tiny_vit()
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(14, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=14)

    def batches(x, y):
        out = []
        for start in range(0, len(x), 4):
            real = len(x[start : start + 4])
            padded = np.zeros((4, 32, 32, 3), np.float32)
            padded[:real] = x[start : start + 4]
            label = np.zeros(4, np.int64)
            label[:real] = y[start : start + 4]
            out.append({"pixel_values": padded, "label": label,
                        "weights": (np.arange(4) < real).astype(np.float32)})
        return out

    evaluator = evaluators.knn_classification(
        model, batches(pixels[:9], labels[:9]), batches(pixels[9:], labels[9:]),
        num_classes=3, k=5, temperature=0.07, task="toy",
    )
    _, params, _ = evaluators.split_params(model)
    features = np.asarray(model(pixels))[:, 0]
    predicted = numpy_knn(features[:9], labels[:9], features[9:], 5, 0.07, 3)
    assert evaluator(params) == pytest.approx(100 * np.mean(predicted == labels[9:]))
    halved = jax.tree.map(lambda x: x * 0.5, params)
    nnx.update(model, halved)
    features = np.asarray(model(pixels))[:, 0]
    predicted = numpy_knn(features[:9], labels[:9], features[9:], 5, 0.07, 3)
    assert evaluator(halved) == pytest.approx(100 * np.mean(predicted == labels[9:]))
    assert evaluator.compilations() == 1
    assert (evaluator.num_examples, evaluator.metric, evaluator.higher_is_better) == (
        5, "accuracy", True)


def test_digits_knn_banks_the_finetune_twins_training_images():
    model = tiny_vit(image_size=16)
    settings = tasks.TaskSettings(seed=0, batch_size=64, image_size=16, max_train_examples=40,
                                  max_examples=25)
    evaluator = tasks.build_zero_shot("digits_knn", model, None, settings)
    assert evaluator.num_examples == 25
    split = tasks.image_split("digits", settings)
    image = tasks.ImageInput(16, 3, tasks.UNIT_RANGE)
    bank = np.asarray(model(images.pixels(np.stack([r["image"] for r in split.train]), *image)))
    test = np.asarray(model(images.pixels(np.stack([r["image"] for r in split.evaluation]),
                                         *image)))
    bank_labels = np.array([r["label"] for r in split.train])
    test_labels = np.array([r["label"] for r in split.evaluation])
    predicted = numpy_knn(bank[:, 0], bank_labels, test[:, 0], 20, 0.07, 10)
    _, params, _ = evaluators.split_params(model)
    assert evaluator(params) == pytest.approx(100 * np.mean(predicted == test_labels))
    assert tasks.get("digits_knn").head == tasks.IMAGE_ENCODER
