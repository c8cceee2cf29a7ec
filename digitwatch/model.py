"""The 784-128-64-10 ReLU MLP, and saving it with the metadata that describes it.

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
from torch import nn

from digitwatch.classify import (
    FORMAT_VERSION,
    LAYER_SIZES,
    PREPROCESSING_VERSION,
    metadata_path,
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
    models: MLP | list[MLP],
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
        (f"m{i}.{k}" if len(members) > 1 else k): v.detach().cpu().clone()
        for i, m in enumerate(members)
        for k, v in m.state_dict().items()
    }
    data = safetensors.torch.save(state)  # no pickle: classify.py reads it with numpy
    _atomic_write(path, data)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "weights_file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "architecture": {
            "name": "mlp",
            "layers": list(model.config.sizes),
            "activation": "relu",
            "dropout": model.config.dropout,
            "members": len(members),
        },
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


def load_torch_models(path: Path) -> list[MLP]:
    """Load checked weights into torch MLPs, one per ensemble member (evaluation mode)."""
    from digitwatch.classify import load_weights

    weights = load_weights(path)
    dropout = float(weights.meta["architecture"].get("dropout", 0.0))
    models = []
    for params in weights.members:
        model = MLP(MLPConfig(dropout=dropout))
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
        models.append(model.eval())
    return models


def load_torch_model(path: Path) -> MLP:
    """The first member as a torch MLP: what a single-model baseline runs."""
    return load_torch_models(path)[0]
