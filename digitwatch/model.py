"""The two networks (the 784-128-64-10 MLP and a small CNN), and saving them with the
metadata that describes them.

Training and evaluation use this torch definition; the daemon runs the same weights
through `digitwatch.classify`, which reads the safetensors file without importing torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from digitwatch.classify import (
    CNN_CHANNELS,
    CNN_HIDDEN,
    FORMAT_VERSION,
    LAYER_SIZES,
    PREPROCESSING_VERSION,
    cnn_flat_size,
    metadata_path,
    onnx_path,
)


@dataclass(frozen=True)
class MLPConfig:
    sizes: tuple[int, ...] = LAYER_SIZES
    dropout: float = 0.1


class MLP(nn.Module):
    """784 -> 128 -> 64 -> 10 with ReLU; dropout after the first layer only while training."""

    def __init__(self, config: MLPConfig | None = None) -> None:
        super().__init__()
        self.config = config or MLPConfig()
        d_in, h1, h2, d_out = self.config.sizes
        self.fc1 = nn.Linear(d_in, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, d_out)
        self.drop = nn.Dropout(self.config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) or (B, 784) -> (B, 784)
        x = self.drop(torch.relu(self.fc1(x)))  # (B, 128)
        x = torch.relu(self.fc2(x))  # (B, 64)
        logits: torch.Tensor = self.fc3(x)  # (B, 10)
        return logits


@dataclass(frozen=True)
class CNNConfig:
    channels: tuple[int, ...] = CNN_CHANNELS  # one 3x3 conv + ReLU + 2x2 max-pool block each
    hidden: int = CNN_HIDDEN
    dropout: float = 0.25


class CNN(nn.Module):
    """Conv blocks (3x3, padding 1, ReLU, 2x2 max-pool rounding up) then one hidden layer.

    With (16, 32, 64): 28x28 -> 14x14 -> 7x7 -> 4x4, 1,024 features, 128 hidden, 10 out.
    """

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or CNNConfig()
        chans = (1, *self.config.channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1)
            for c_in, c_out in zip(chans, chans[1:], strict=False)
        )
        self.fc1 = nn.Linear(cnn_flat_size(self.config.channels), self.config.hidden)
        self.fc2 = nn.Linear(self.config.hidden, 10)
        self.drop = nn.Dropout(self.config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 28, 28)  # (B, 784) or (B, 1, 28, 28)
        for conv in self.convs:
            x = F.max_pool2d(torch.relu(conv(x)), 2, ceil_mode=True)  # (B, C, ceil(H/2), ...)
        x = self.drop(torch.relu(self.fc1(x.flatten(1))))  # (B, hidden)
        logits: torch.Tensor = self.fc2(x)  # (B, 10)
        return logits


Net = MLP | CNN


def architecture(model: Net) -> dict[str, Any]:
    """The metadata's `architecture` entry: what classify.py builds the forward pass from."""
    if isinstance(model, CNN):
        return {
            "name": "cnn",
            "channels": list(model.config.channels),
            "kernel": 3,
            "pool": "max2-ceil",
            "hidden": model.config.hidden,
            "activation": "relu",
            "dropout": model.config.dropout,
        }
    return {
        "name": "mlp",
        "layers": list(model.config.sizes),
        "activation": "relu",
        "dropout": model.config.dropout,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    models: Net | list[Net],
    path: Path,
    *,
    mean: float,
    std: float,
    training: dict[str, Any],
    test_accuracy: float | None,
    temperature: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the state dict (safetensors) and its JSON metadata atomically; return the metadata.

    One model keeps the plain `fc1.weight`... keys; an ensemble prefixes each member's
    keys with `m0.`, `m1.`, ... in one file, so one hash covers them all.
    """
    members = models if isinstance(models, list) else [models]
    model = members[0]
    state = {
        (f"m{i}.{k}" if len(members) > 1 else k): v.detach()
        .cpu()
        .clone(memory_format=torch.contiguous_format)
        for i, m in enumerate(members)
        for k, v in m.state_dict().items()
    }
    data = safetensors.torch.save(state)  # no pickle: classify.py reads it with numpy
    _atomic_write(path, data)
    runtime: dict[str, Any] = {}
    if isinstance(model, CNN):
        graph = export_onnx([m for m in members if isinstance(m, CNN)])
        _atomic_write(onnx_path(path), graph)
        runtime = {
            "onnx": {"file": onnx_path(path).name, "sha256": hashlib.sha256(graph).hexdigest()}
        }
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "weights_file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "architecture": architecture(model) | {"members": len(members)},
        **runtime,
        # Logits are divided by this before the softmax (fit on the validation split).
        "calibration": {"temperature": temperature},
        "input_size": [28, 28],
        "normalization": {"mean": mean, "std": std},
        "preprocessing_version": PREPROCESSING_VERSION,
        "mnist_test_accuracy": test_accuracy,
        "training": training,
        "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "torch_version": torch.__version__,
        "config": asdict(model.config),
    }
    if extra:
        meta.update(extra)
    _atomic_write(metadata_path(path), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


class _Stacked(nn.Module):
    """Every member's logits side by side, (B, 10 * M): one graph for an ensemble."""

    def __init__(self, models: list[CNN]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)


def export_onnx(models: list[CNN]) -> bytes:
    """The CNN as an ONNX graph, which the service runs with onnxruntime (see classify).

    (B, 1, 28, 28) normalized input, (B, 10 * members) logits; the batch axis is dynamic.
    The TorchScript exporter: the newer one needs onnxscript and makes the same graph here.
    """
    import io
    import warnings

    modes = [m.training for m in models]
    net = _Stacked(models).eval()  # the exporter restores the wrapper's mode on every member
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net,
            (torch.zeros(2, 1, 28, 28),),
            buf,  # type: ignore[arg-type]  # a file object works; the stub names paths
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return buf.getvalue()


def load_torch_models(path: Path) -> list[Net]:
    """Load checked weights into torch networks, one per ensemble member (evaluation mode)."""
    from digitwatch.classify import load_weights

    weights = load_weights(path)
    arch = weights.meta["architecture"]
    dropout = float(arch.get("dropout", 0.0))
    models: list[Net] = []
    for params in weights.members:
        model: Net
        if weights.arch == "cnn":
            channels = tuple(int(c) for c in arch["channels"])
            model = CNN(CNNConfig(channels=channels, hidden=int(arch["hidden"]), dropout=dropout))
        else:
            model = MLP(MLPConfig(dropout=dropout))
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
        models.append(model.eval())
    return models


def load_torch_model(path: Path) -> Net:
    """The first member as a torch network: what a single-model baseline runs."""
    return load_torch_models(path)[0]
