"""Weights that describe themselves: round trip, and refusal of anything else."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from digitwatch.classify import Classifier, load_weights, metadata_path
from digitwatch.errors import WeightsError
from digitwatch.model import MLP, MLPConfig, load_torch_model, save_checkpoint


def _save(path: Path, model: MLP | None = None) -> MLP:
    model = model or MLP(MLPConfig(dropout=0.1))
    save_checkpoint(model, path, mean=0.1307, std=0.3081, training={"seed": 0}, test_accuracy=None)
    return model


def test_round_trip_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _save(tmp_path / "w.pt").eval()
    weights = load_weights(tmp_path / "w.pt")
    x = torch.randn(5, 784)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy()
    got = Classifier(weights).probabilities(x.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert weights.model_id.startswith("mlp-784-128-64-10@")
    reloaded = load_torch_model(tmp_path / "w.pt")
    assert torch.equal(reloaded.fc1.weight, model.fc1.weight)


def test_checkpoint_loads_with_torch_weights_only(tmp_path: Path) -> None:
    _save(tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(state) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def test_metadata_describes_the_model(tmp_path: Path) -> None:
    _save(tmp_path / "w.pt")
    meta = json.loads(metadata_path(tmp_path / "w.pt").read_text())
    assert meta["architecture"]["layers"] == [784, 128, 64, 10]
    assert meta["input_size"] == [28, 28]
    assert meta["normalization"] == {"mean": 0.1307, "std": 0.3081}
    for key in ("sha256", "preprocessing_version", "training", "created_at", "torch_version"):
        assert key in meta


def test_tampered_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    _save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"w\.pt: sha256 .* does not match"):
        load_weights(path)


def test_truncated_file_is_refused_even_with_a_matching_hash(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"w\.pt: sha256 .* does not match"):
        load_weights(path)
    _rewrite_with_hash(path, data[: len(data) // 2])  # as if the metadata were rewritten
    with pytest.raises(WeightsError, match=r"w\.pt: "):
        load_weights(path)


def _rewrite_with_hash(path: Path, data: bytes) -> None:
    import hashlib

    path.write_bytes(data)
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    meta_file.write_text(json.dumps(meta))


def test_wrong_shape_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    _save(path)
    state = {k: v for k, v in MLP().state_dict().items()}
    state["fc2.weight"] = torch.zeros(32, 128)
    buf = io.BytesIO()
    torch.save(state, buf)
    _rewrite_with_hash(path, buf.getvalue())  # even with a matching hash
    with pytest.raises(WeightsError, match=r"w\.pt: tensor shapes"):
        load_weights(path)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickle_payload_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.pt"
    _save(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"fc1.weight": _Payload()}))
    _rewrite_with_hash(path, buf.getvalue())
    with pytest.raises(WeightsError, match=r"w\.pt: not a plain state dict .*builtins\.print"):
        load_weights(path)
    assert "pwned" not in capsys.readouterr().out


def test_plain_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    _save(path)
    _rewrite_with_hash(path, pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match=r"w\.pt: not a plain state dict"):
        load_weights(path)


def test_missing_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nope\.pt: cannot read weights"):
        load_weights(tmp_path / "nope.pt")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"w\.json: cannot read weights metadata"):
        load_weights(tmp_path / "w.pt")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    _save(path)
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError) as info:
        load_weights(path)
    assert "\n" not in str(info.value)


def test_no_code_unpickles_weights_outside_the_restricted_loader() -> None:
    """Weights are read only by classify.load_weights: no torch.load, no weights_only=False."""
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
    assert "class _StateDictUnpickler" in text[Path("digitwatch/classify.py")]


def test_ensemble_round_trip_averages_tempered_members(tmp_path: Path) -> None:
    torch.manual_seed(1)
    models = [MLP(MLPConfig(dropout=0.1)).eval() for _ in range(3)]
    path = tmp_path / "w.pt"
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
    assert torch.load(path, weights_only=True).keys() == {
        f"m{m}.fc{i}.{p}" for m in range(3) for i in (1, 2, 3) for p in ("weight", "bias")
    }
    assert torch.equal(load_torch_model(path).fc2.bias, models[0].fc2.bias)


def test_ensemble_with_a_member_missing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    save_checkpoint([MLP(), MLP()], path, mean=0.1307, std=0.3081, training={}, test_accuracy=None)
    meta_file = metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["architecture"]["members"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=r"w\.pt: tensor shapes .* do not match 3 of"):
        load_weights(path)
