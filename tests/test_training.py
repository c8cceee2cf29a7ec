"""Training for real, on a small MNIST subset, and the shipped weights' score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from digitwatch.classify import load_weights, metadata_path
from digitwatch.errors import DataError
from digitwatch.evaluate import evaluate
from digitwatch.mnist import load_mnist
from digitwatch.training import TrainConfig, load_recipe, train_and_save

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_training_run_beats_80_percent(mnist_dir: Path, tmp_path: Path) -> None:
    # No augmentation: 63 steps are too few to learn through random affines.
    plain = {"rotate_deg": 0.0, "scale": 0.0, "shear": 0.0, "shift": 0.0}
    cfg = TrainConfig(epochs=1, train_limit=2000, val_size=1000, seed=1, batch_size=32, **plain)
    out = tmp_path / "w.safetensors"
    epochs: list[float] = []
    result, meta = train_and_save(
        cfg, mnist_dir, out, download=False, on_epoch=lambda r: epochs.append(r.val_accuracy)
    )
    assert meta["mnist_test_accuracy"] > 0.80
    assert len(epochs) == 1 and epochs[0] > 0.75  # validation accuracy reported per epoch
    assert load_weights(out).sha256 == meta["sha256"]
    assert meta["training"]["seed"] == 1 and meta["training"]["train_limit"] == 2000


@pytest.mark.slow
def test_same_seed_same_weights(mnist_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, train_limit=500, val_size=100, seed=3, threads=1)
    a = train_and_save(cfg, mnist_dir, tmp_path / "a.safetensors", download=False)[1]
    b = train_and_save(cfg, mnist_dir, tmp_path / "b.safetensors", download=False)[1]
    assert a["sha256"] == b["sha256"]


@pytest.mark.slow
def test_shipped_weights_score_at_least_99_percent(mnist_dir: Path, weights_path: Path) -> None:
    ev = evaluate(weights_path, mnist_dir, download=False)
    assert ev.accuracy >= 0.990
    recorded = json.loads(metadata_path(weights_path).read_text())["mnist_test_accuracy"]
    assert ev.accuracy == pytest.approx(recorded, abs=1e-4)


def test_missing_mnist_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found in .* download is off"):
        load_mnist(tmp_path, train=False, download=False)


def test_recipe_file_is_the_shipped_configuration(weights_path: Path) -> None:
    cfg = load_recipe(REPO / "train" / "recipe.toml", {})
    shipped = json.loads(metadata_path(weights_path).read_text())["training"]
    for field in ("epochs", "batch_size", "lr", "seed", "shift", "rotate_deg", "dropout"):
        assert getattr(cfg, field) == shipped[field], field


SHIPPED_CNN = REPO / "weights" / "mnist-cnn.safetensors"


@pytest.mark.slow
def test_a_short_cnn_run_learns_and_repeats_bit_for_bit(mnist_dir: Path, tmp_path: Path) -> None:
    plain = {"rotate_deg": 0.0, "scale": 0.0, "shear": 0.0, "shift": 0.0, "elastic_alpha": 0.0}
    cfg = TrainConfig(
        arch="cnn", epochs=1, train_limit=1500, val_size=500, seed=4, threads=1, **plain
    )
    a = train_and_save(cfg, mnist_dir, tmp_path / "a.safetensors", download=False)[1]
    b = train_and_save(cfg, mnist_dir, tmp_path / "b.safetensors", download=False)[1]
    assert a["architecture"]["name"] == "cnn" and a["mnist_test_accuracy"] > 0.45  # chance is 0.10
    assert a["sha256"] == b["sha256"] and a["onnx"]["sha256"] == b["onnx"]["sha256"]
    assert load_weights(tmp_path / "a.safetensors").arch == "cnn"


@pytest.mark.slow
def test_shipped_cnn_scores_at_least_99_5_percent(mnist_dir: Path) -> None:
    ev = evaluate(SHIPPED_CNN, mnist_dir, download=False)
    assert ev.accuracy >= 0.995
    assert ev.model.startswith("cnn-16-32-64-128@")
    recorded = json.loads(metadata_path(SHIPPED_CNN).read_text())["mnist_test_accuracy"]
    assert ev.accuracy == pytest.approx(recorded, abs=1e-4)


def test_cnn_recipe_is_the_shipped_configuration() -> None:
    cfg = load_recipe(REPO / "train" / "recipe-cnn.toml", {})
    shipped = json.loads(metadata_path(SHIPPED_CNN).read_text())
    for field in ("arch", "epochs", "batch_size", "lr", "seed", "val_size", "dropout", "threads"):
        assert getattr(cfg, field) == shipped["training"][field], field
    assert list(cfg.channels) == shipped["architecture"]["channels"]
    assert cfg.hidden == shipped["architecture"]["hidden"]
    mlp = load_recipe(REPO / "train" / "recipe.toml", {})
    same = ("val_size", "seed", "rotate_deg", "scale", "shift", "elastic_alpha", "continental_1")
    for field in same:  # the MLP's split and augmentation
        assert getattr(cfg, field) == getattr(mlp, field), field


def test_an_unknown_arch_is_a_clear_error() -> None:
    from digitwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown architecture 'vit'"):
        load_recipe(None, {"arch": "vit"})
