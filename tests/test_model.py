"""Weights that describe themselves, the continental synthesis, and honest confidence."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import corpus
import numpy as np
import pytest
import safetensors.torch
import torch

from digitwatch.classify import Classifier, load_weights, metadata_path, onnx_path
from digitwatch.codec import Limits
from digitwatch.errors import WeightsError
from digitwatch.evaluate import flagged_shares
from digitwatch.mnist import load_mnist
from digitwatch.model import (
    CNN,
    MLP,
    CNNConfig,
    MLPConfig,
    load_torch_model,
    load_torch_models,
    save_checkpoint,
)
from digitwatch.pipeline import Input, Pipeline
from digitwatch.preprocess import deskew_all
from digitwatch.settings import Settings
from digitwatch.training import TrainConfig, _continental_epoch, continental_ones, crossed_sevens


def _save(path: Path, model: MLP | None = None) -> MLP:
    model = model or MLP(MLPConfig(dropout=0.1))
    save_checkpoint(model, path, mean=0.1307, std=0.3081, training={"seed": 0}, test_accuracy=None)
    return model


def test_round_trip_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _save(tmp_path / "w.safetensors").eval()
    weights = load_weights(tmp_path / "w.safetensors")
    x = torch.randn(5, 784)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy()
    got = Classifier(weights).probabilities(x.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert weights.model_id.startswith("mlp-784-128-64-10@")
    reloaded = load_torch_model(tmp_path / "w.safetensors")
    assert torch.equal(reloaded.fc1.weight, model.fc1.weight)


def test_checkpoint_is_plain_safetensors(tmp_path: Path) -> None:
    _save(tmp_path / "w.safetensors")
    state = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert set(state) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def test_metadata_describes_the_model(tmp_path: Path) -> None:
    _save(tmp_path / "w.safetensors")
    meta = json.loads(metadata_path(tmp_path / "w.safetensors").read_text())
    assert meta["architecture"]["layers"] == [784, 128, 64, 10]
    assert meta["input_size"] == [28, 28]
    assert meta["normalization"] == {"mean": 0.1307, "std": 0.3081}
    for key in ("sha256", "preprocessing_version", "training", "created_at", "torch_version"):
        assert key in meta


def test_tampered_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"w\.safetensors: sha256 .* does not match"):
        load_weights(path)


def test_truncated_file_is_refused_even_with_a_matching_hash(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"w\.safetensors: sha256 .* does not match"):
        load_weights(path)
    _rewrite_with_hash(path, data[: len(data) // 2])  # as if the metadata were rewritten
    with pytest.raises(WeightsError, match=r"w\.safetensors: "):
        load_weights(path)


def _rewrite_with_hash(path: Path, data: bytes) -> None:
    import hashlib

    path.write_bytes(data)
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    meta_file.write_text(json.dumps(meta))


def test_wrong_shape_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _save(path)
    state = {k: v for k, v in MLP().state_dict().items()}
    state["fc2.weight"] = torch.zeros(32, 128)
    _rewrite_with_hash(path, safetensors.torch.save(state))  # even with a matching hash
    with pytest.raises(WeightsError, match=r"w\.safetensors: tensor shapes"):
        load_weights(path)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickled_checkpoints_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A torch.save checkpoint, even with a matching hash, is not read: nothing is unpickled."""
    path = tmp_path / "w.safetensors"
    _save(path)
    buf = io.BytesIO()
    torch.save({"fc1.weight": torch.zeros(128, 784)}, buf)
    for data in (buf.getvalue(), pickle.dumps({"fc1.weight": _Payload()})):
        _rewrite_with_hash(path, data)
        with pytest.raises(WeightsError, match=r"w\.safetensors: not a safetensors file"):
            load_weights(path)
    assert "pwned" not in capsys.readouterr().out


def test_integer_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _save(path)
    state = {k: v.to(torch.int32) for k, v in MLP().state_dict().items()}
    _rewrite_with_hash(path, safetensors.torch.save(state))
    with pytest.raises(WeightsError, match=r"not all floating point"):
        load_weights(path)


def test_format_1_metadata_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _save(path)
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=r"format_version 1 \(a pickled torch checkpoint"):
        load_weights(path)


def test_missing_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nope\.safetensors: cannot read weights"):
        load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"w\.json: cannot read weights metadata"):
        load_weights(tmp_path / "w.safetensors")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _save(path)
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError) as info:
        load_weights(path)
    assert "\n" not in str(info.value)


def test_no_code_unpickles_weights() -> None:
    """Weights are safetensors everywhere: no torch.load, no pickle, no weights_only=False."""
    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("digitwatch", "train", "benchmarks") for p in root.glob(f"{d}/*.py")]
    assert len(sources) > 10
    text = {p.relative_to(root): p.read_text() for p in sources}
    calls = [
        f"{p}: {line.strip()}"
        for p, t in text.items()
        for line in t.splitlines()
        if "torch.load(" in line.split("#")[0].replace("`torch.load(", "")
    ]
    assert calls == [], f"torch.load outside the restricted loader: {calls}"
    assert not [p for p, t in text.items() if "weights_only=False" in t]
    assert not [p for p, t in text.items() if "import pickle" in t or "Unpickler" in t]
    assert "safetensors.numpy.load(" in text[Path("digitwatch/classify.py")]


def test_ensemble_round_trip_averages_tempered_members(tmp_path: Path) -> None:
    torch.manual_seed(1)
    models = [MLP(MLPConfig(dropout=0.1)).eval() for _ in range(3)]
    path = tmp_path / "w.safetensors"
    meta = save_checkpoint(
        models,
        path,
        mean=0.1307,
        std=0.3081,
        training={"seed": 0},
        test_accuracy=None,
        temperature=1.5,
    )
    assert meta["architecture"]["members"] == 3
    assert meta["calibration"] == {"temperature": 1.5}
    weights = load_weights(path)
    assert weights.model_id.startswith("mlp-784-128-64-10x3@")
    x = torch.randn(4, 784)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x) / 1.5, dim=1) for m in models]).mean(0)
    got = Classifier(weights).probabilities(x.numpy())
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert safetensors.torch.load_file(path).keys() == {
        f"m{m}.fc{i}.{p}" for m in range(3) for i in (1, 2, 3) for p in ("weight", "bias")
    }
    assert torch.equal(load_torch_model(path).fc2.bias, models[0].fc2.bias)


def test_ensemble_with_a_member_missing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_checkpoint([MLP(), MLP()], path, mean=0.1307, std=0.3081, training={}, test_accuracy=None)
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["architecture"]["members"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=r"w\.safetensors: tensor shapes .* do not match 3 of"):
        load_weights(path)


def _stem() -> torch.Tensor:
    """Two 1s as plain vertical stems, 2 px wide, rows 4-23."""
    x = torch.zeros(2, 28, 28)
    x[:, 4:24, 13:15] = 1.0
    return x


def test_continental_ones_get_a_flag_down_to_the_left_of_the_stem() -> None:
    x = _stem()
    out = continental_ones(x, torch.Generator().manual_seed(0), foot_p=0.0)
    added = (out - x).clamp_min(0)
    assert torch.all(out >= x)  # strokes are only added
    for img in added:
        ys, xs = torch.nonzero(img > 0.5, as_tuple=True)
        assert len(ys) >= 3, "no flag drawn"
        assert int(xs.min()) < 12 and int(xs.max()) <= 15  # to the left of the stem
        assert int(ys.min()) >= 3 and int(ys.max()) < 14  # from the top, in the upper half
    footed = continental_ones(x, torch.Generator().manual_seed(0), foot_p=1.0)
    assert torch.all(footed[:, 23, 9:19] > 0.5)  # a foot across the bottom of the stem


def test_continental_epoch_changes_only_the_chosen_digits_and_keeps_their_labels() -> None:
    raw = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    raw[:, 0, 4:24, 13:15] = 255
    labels = torch.tensor([1, 1, 4, 7])
    cfg = TrainConfig(continental_1=1.0, crossed_7=0.0)
    out = _continental_epoch(raw, raw.clone(), labels, cfg, torch.Generator().manual_seed(0))
    changed = (out != raw).flatten(1).any(1).tolist()
    assert changed == [True, True, False, False]  # every 1, nothing else
    assert out.dtype == torch.uint8 and out.shape == raw.shape
    cfg = TrainConfig(continental_1=0.0, crossed_7=1.0)
    out = _continental_epoch(raw, raw.clone(), labels, cfg, torch.Generator().manual_seed(0))
    assert (out != raw).flatten(1).any(1).tolist() == [False, False, False, True]


def test_without_continental_shares_the_epoch_draws_nothing() -> None:
    """Recipes without the synthesis consume no random numbers: they train as before."""
    raw = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(5)
    cfg = TrainConfig(continental_1=0.0, crossed_7=0.0)
    out = _continental_epoch(raw, raw, torch.tensor([1, 7, 3]), cfg, gen)
    assert out is raw
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state())


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="trained with the continental synthesis the shipped weights read most of these 1s"
    " (the corpus's continental kinds went from 78-80% to 86-87%), not yet 98%: issue 12",
)
def test_shipped_weights_read_continental_ones_and_crossed_sevens(
    mnist_dir: Path, weights_path: Path
) -> None:
    """MNIST's own test 1s with a flag, and 7s with a crossbar, as the pipeline hands them."""
    images, labels = load_mnist(mnist_dir, train=False, download=False)
    gen = torch.Generator().manual_seed(12)  # not a training seed; these are test digits
    classifier = Classifier(load_weights(weights_path))
    for digit, make in ((1, continental_ones), (7, crossed_sevens)):
        x = make(torch.from_numpy(images[labels == digit]).float() / 255, gen)
        u8 = deskew_all((x * 255).round().to(torch.uint8).numpy())
        read = classifier.probabilities(classifier.normalize(u8)).argmax(1)
        assert (read == digit).mean() >= 0.98, f"{digit}: {(read == digit).mean():.1%}"


CALIBRATION_PER_KIND = 60  # 1,620 files, ~15 s on one idle core


@pytest.mark.slow
def test_uncertain_flags_most_wrong_answers_and_few_right_ones(
    mnist_dir: Path, weights_path: Path
) -> None:
    """Issue 12's bounds at the default threshold, on corpus seed 0 (it was chosen on seed 1).

    Fails as well when `uncertain` is always false (no wrong answer flagged) as when it
    is always true (every right answer flagged).
    """
    images, labels = load_mnist(mnist_dir, train=False, download=False)
    samples = []
    for kind in corpus.kinds():
        if kind.startswith("mnist_"):
            continue
        idx = corpus.pick(labels, CALIBRATION_PER_KIND, 0, kind)
        samples += corpus.make_kind(kind, images[idx], labels[idx], seed=0)
    below = Settings().uncertain_below
    with Pipeline(load_weights(weights_path), limits=Limits(), uncertain_below=below) as pipe:
        records = [r.record for r in pipe.run([Input(s.name, s.data) for s in samples])]
    right = np.array([r.digit == s.label for r, s in zip(records, samples, strict=True)])
    flagged = np.array([r.uncertain for r in records])
    wrong_flagged, right_flagged = flagged_shares(right, flagged)
    assert (~right).sum() >= 30, "too few wrong answers to measure"
    assert wrong_flagged >= 0.70, f"{wrong_flagged:.1%} of {(~right).sum()} wrong answers flagged"
    assert right_flagged <= 0.05, f"{right_flagged:.2%} of {right.sum()} right answers flagged"


# --- the CNN (issue 16) -------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CNN = REPO / "weights" / "mnist-cnn.safetensors"


def _save_cnn(path: Path, models: list[CNN], temperature: float = 1.0) -> None:
    save_checkpoint(
        models if len(models) > 1 else models[0],
        path,
        mean=0.1307,
        std=0.3081,
        training={"seed": 0},
        test_accuracy=None,
        temperature=temperature,
    )


@pytest.mark.parametrize("members", [1, 2])
def test_cnn_service_forward_matches_torch_on_a_batch(tmp_path: Path, members: int) -> None:
    """The service's forward pass (onnxruntime on the exported graph) is torch's, batch of 64."""
    torch.manual_seed(2)
    models = [CNN(CNNConfig()).eval() for _ in range(members)]
    path = tmp_path / "c.safetensors"
    _save_cnn(path, models, temperature=1.4)
    weights = load_weights(path)
    assert weights.arch == "cnn"
    assert weights.model_id.startswith(f"cnn-16-32-64-128{'x2' if members == 2 else ''}@")
    x = torch.randn(64, 784)
    with torch.no_grad():
        logits = torch.stack([m(x) for m in models])  # (M, 64, 10)
    expected = torch.softmax(logits / 1.4, dim=2).mean(0).numpy()
    classifier = Classifier(weights)
    np.testing.assert_allclose(classifier.logits(x.numpy()), logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(classifier.probabilities(x.numpy()), expected, atol=1e-6)
    np.testing.assert_allclose(classifier.probabilities(x.numpy()[:1]), expected[:1], atol=1e-6)
    reloaded = load_torch_models(path)
    assert all(isinstance(m, CNN) for m in reloaded)
    assert torch.equal(reloaded[-1].convs[1].weight, models[-1].convs[1].weight)


def test_cnn_metadata_names_the_network_and_its_graph(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _save_cnn(path, [CNN()])
    meta = json.loads(metadata_path(path).read_text())
    assert meta["architecture"] | {"dropout": None} == {
        "name": "cnn",
        "channels": [16, 32, 64],
        "kernel": 3,
        "pool": "max2-ceil",
        "hidden": 128,
        "activation": "relu",
        "dropout": None,
        "members": 1,
    }
    assert meta["onnx"]["file"] == "c.onnx"
    assert sum(v.numel() for v in CNN().state_dict().values()) < 1_000_000


def _edit_meta(path: Path, edit: Any) -> None:
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def test_an_architecture_mismatch_is_refused(tmp_path: Path) -> None:
    """Metadata naming one network over the other's tensors: one line naming both."""
    cnn, mlp = tmp_path / "c.safetensors", tmp_path / "m.safetensors"
    _save_cnn(cnn, [CNN()])
    _save(mlp)
    cnn_arch = json.loads(metadata_path(cnn).read_text())["architecture"]
    mlp_arch = json.loads(metadata_path(mlp).read_text())["architecture"]

    _edit_meta(cnn, lambda m: m.update(architecture=mlp_arch))
    with pytest.raises(WeightsError, match=r"c\.safetensors: tensor shapes .* mlp-784-128-64-10"):
        load_weights(cnn)
    _edit_meta(mlp, lambda m: m.update(architecture=cnn_arch, onnx={"sha256": "0"}))
    with pytest.raises(WeightsError, match=r"m\.safetensors: tensor shapes .* cnn-16-32-64-128"):
        load_weights(mlp)
    _edit_meta(cnn, lambda m: m.update(architecture={**cnn_arch, "channels": [8, 16]}))
    with pytest.raises(WeightsError, match=r"tensor shapes .* cnn-8-16-128 CNN"):
        load_weights(cnn)
    _edit_meta(cnn, lambda m: m.update(architecture={**cnn_arch, "name": "resnet"}))
    with pytest.raises(WeightsError, match=r"c\.json: unknown architecture 'resnet'"):
        load_weights(cnn)
    _edit_meta(cnn, lambda m: m.update(architecture={**cnn_arch, "kernel": 5}))
    with pytest.raises(WeightsError, match=r"c\.json: a CNN architecture other than"):
        load_weights(cnn)


def test_the_cnn_graph_is_checked_like_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    _save_cnn(path, [CNN()])
    graph = onnx_path(path)
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"c\.onnx: sha256 .* does not match"):
        load_weights(path)
    graph.unlink()
    with pytest.raises(WeightsError, match=r"c\.onnx: cannot read the CNN's graph"):
        load_weights(path)
    _edit_meta(path, lambda m: m.pop("onnx"))
    with pytest.raises(WeightsError, match=r"c\.json: a CNN's metadata lacks its onnx sha256"):
        load_weights(path)


def test_loading_the_cnn_does_not_import_torch() -> None:
    code = (
        "import sys; from pathlib import Path; from digitwatch.classify import *;"
        f"c = Classifier(load_weights(Path({str(SHIPPED_CNN)!r})));"
        "import numpy as np; c.probabilities(np.zeros((2, 784), np.float32));"
        "print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    code = code.replace(str(SHIPPED_CNN), str(REPO / "weights" / "mnist-mlp.safetensors"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]  # the MLP path never loads onnxruntime


@pytest.mark.slow
def test_predict_with_the_shipped_cnn_end_to_end(tmp_path: Path) -> None:
    from daemon_helpers import digit_png

    images = [tmp_path / f"{d}.png" for d in ("seven", "one")]
    images[0].write_bytes(digit_png())
    images[1].write_bytes(corpus_png(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    cmd = [sys.executable, "-m", "digitwatch", "predict", *map(str, images)]
    out = subprocess.run(
        [*cmd, "--weights", str(SHIPPED_CNN), "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["digit"] for r in records] == [7, 1]
    assert all(r["model"].startswith("cnn-16-32-64-128@") for r in records)
    assert all(isinstance(r["uncertain"], bool) for r in records)


def corpus_png(digit: int) -> bytes:
    """A plain vertical stroke on white, as a person might draw a 1."""
    from digitwatch.codec import encode_png

    img = np.full((28, 28), 255, np.uint8)
    img[4:24, 13:16] = 0
    return encode_png(img)
