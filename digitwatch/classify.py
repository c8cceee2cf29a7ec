"""Classify stage: load checked weights and run them with numpy.

The daemon never imports torch (about 520 MB and 1.3 s here for three small matrix
products). Weights are a safetensors file (a JSON header and raw little-endian arrays:
nothing in it is executed), read with `safetensors.numpy`; the metadata JSON beside it
says what network they are for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.numpy

from digitwatch import libc
from digitwatch.errors import WeightsError

FORMAT_VERSION = 2  # 1: torch's pickled zip checkpoint; 2: safetensors
PREPROCESSING_VERSION = 4  # 2: deskew; 3: hysteresis, 256 px work; 4: stroke-scale paper (issue 12)
LAYER_SIZES = (784, 128, 64, 10)  # the MLP
CNN_CHANNELS = (16, 32, 64)  # the CNN's conv blocks (3x3 conv, ReLU, 2x2 max-pool rounding up)
CNN_HIDDEN = 128

Floats = npt.NDArray[np.float32]


def metadata_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def onnx_path(weights: Path) -> Path:
    """The CNN's graph for OpenCV's DNN module, written beside its weights by training."""
    return weights.with_suffix(".onnx")


def cnn_flat_size(channels: tuple[int, ...]) -> int:
    """Features after the conv blocks: each 2x2 pool halves 28 px, rounding up (28, 14, 7, 4)."""
    side = 28
    for _ in channels:
        side = (side + 1) // 2
    return channels[-1] * side * side


@dataclass(frozen=True)
class Architecture:
    """What the metadata says the tensors are for; `name` picks the forward pass."""

    name: str  # "mlp" or "cnn"
    sizes: tuple[int, ...]  # the MLP's layers, or the CNN's channels then its hidden width

    @property
    def label(self) -> str:
        return f"{self.name}-{'-'.join(str(n) for n in self.sizes)}"

    def shapes(self, members: int = 1) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if self.name == "cnn":
            *channels, hidden = self.sizes
            for i, (c_in, c_out) in enumerate(zip((1, *channels), channels, strict=False)):
                shapes[f"convs.{i}.weight"] = (c_out, c_in, 3, 3)
                shapes[f"convs.{i}.bias"] = (c_out,)
            sizes: tuple[int, ...] = (cnn_flat_size(tuple(channels)), hidden, 10)
        else:
            sizes = self.sizes
        for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:], strict=False), start=1):
            shapes[f"fc{i}.weight"] = (d_out, d_in)
            shapes[f"fc{i}.bias"] = (d_out,)
        if members == 1:
            return shapes
        return {f"m{m}.{k}": v for m in range(members) for k, v in shapes.items()}


class _Unsupported(ValueError):
    """An architecture this digitwatch cannot run."""


def _architecture(meta: dict[str, Any]) -> Architecture:
    """The architecture the metadata names; _Unsupported for one this digitwatch cannot run."""
    arch = meta["architecture"]
    name = arch.get("name", "mlp")
    if name == "mlp":
        sizes = tuple(int(n) for n in arch["layers"])
        if sizes != LAYER_SIZES:
            raise _Unsupported(f"architecture {sizes} is not the {LAYER_SIZES} MLP")
        return Architecture("mlp", sizes)
    if name == "cnn":
        channels = tuple(int(c) for c in arch["channels"])
        if (arch.get("kernel"), arch.get("pool")) != (3, "max2-ceil") or not 1 <= len(
            channels
        ) <= 4:
            raise _Unsupported("a CNN architecture other than 1-4 blocks of 3x3 conv + 2x2 pool")
        return Architecture("cnn", (*channels, int(arch["hidden"])))
    raise _Unsupported(f"unknown architecture {name!r} (this digitwatch runs mlp and cnn)")


def _read_tensors(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """The arrays of a safetensors file; ValueError when it is not one."""
    try:
        return dict(safetensors.numpy.load(data))
    except safetensors.SafetensorError as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else "unreadable header") from None


@dataclass(frozen=True)
class Weights:
    path: Path
    meta: dict[str, Any]
    params: dict[str, npt.NDArray[np.float32]]
    graph: bytes | None = None  # the CNN's ONNX export (the same tensors), checked by hash

    @property
    def sha256(self) -> str:
        return str(self.meta["sha256"])

    @property
    def mean(self) -> float:
        return float(self.meta["normalization"]["mean"])

    @property
    def std(self) -> float:
        return float(self.meta["normalization"]["std"])

    @property
    def temperature(self) -> float:
        """Logits are divided by this before the softmax; weights without one mean 1."""
        return float(self.meta.get("calibration", {}).get("temperature", 1.0))

    @property
    def members(self) -> list[dict[str, npt.NDArray[np.float32]]]:
        """Each ensemble member's parameters under the plain `fc1.weight`... keys."""
        n = int(self.meta["architecture"].get("members", 1))
        if n == 1:
            return [self.params]
        return [
            {k.split(".", 1)[1]: v for k, v in self.params.items() if k.startswith(f"m{m}.")}
            for m in range(n)
        ]

    @property
    def architecture(self) -> Architecture:
        return _architecture(self.meta)  # checked by load_weights

    @property
    def arch(self) -> str:
        """ "mlp" or "cnn"."""
        return self.architecture.name

    @property
    def model_id(self) -> str:
        """Architecture and weights hash, as results name the model: mlp-784-128-64-10@..."""
        n = int(self.meta["architecture"].get("members", 1))
        return f"{self.architecture.label}{f'x{n}' if n > 1 else ''}@{self.sha256[:12]}"


def load_weights(path: Path) -> Weights:
    """Read weights and metadata, check the hash and every shape; one-line error otherwise."""
    meta_file = metadata_path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weights ({e.strerror or e})") from None
    try:
        meta = json.loads(meta_file.read_text())
    except OSError as e:
        raise WeightsError(f"{meta_file}: cannot read weights metadata ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{meta_file}: metadata is not valid JSON ({e.msg})") from None
    try:
        arch = _architecture(meta)
        members = int(meta["architecture"].get("members", 1))
        temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        expected_hash = str(meta["sha256"])
        float(meta["normalization"]["mean"]), float(meta["normalization"]["std"])
    except _Unsupported as e:
        raise WeightsError(f"{meta_file}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise WeightsError(
            f"{meta_file}: metadata lacks architecture, sha256 or normalization"
        ) from None
    if not 1 <= members <= 16 or not 0.05 <= temperature <= 20:
        raise WeightsError(
            f"{meta_file}: {members} ensemble members or temperature {temperature} out of range"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        hint = " (a pickled torch checkpoint: retrain, or resave as safetensors)"
        raise WeightsError(
            f"{meta_file}: unsupported format_version {meta.get('format_version')}"
            f"{hint if meta.get('format_version') == 1 else ''}"
        )
    if meta.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise WeightsError(
            f"{meta_file}: trained for preprocessing version {meta.get('preprocessing_version')}"
            f", this digitwatch preprocesses with version {PREPROCESSING_VERSION}"
        )
    actual_hash = hashlib.sha256(data).hexdigest()
    if actual_hash != expected_hash:
        raise WeightsError(
            f"{path}: sha256 {actual_hash[:12]}... does not match metadata {expected_hash[:12]}..."
        )
    try:
        state = _read_tensors(data)
    except ValueError as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    if not all(np.issubdtype(v.dtype, np.floating) for v in state.values()):
        raise WeightsError(f"{path}: tensors are not all floating point")
    expected = arch.shapes(members)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise WeightsError(
            f"{path}: tensor shapes {got} do not match {members} of the {arch.label}"
            f" {arch.name.upper()} its metadata names"
        )
    params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return Weights(path=path, meta=meta, params=params, graph=_read_graph(path, meta, arch))


def _read_graph(path: Path, meta: dict[str, Any], arch: Architecture) -> bytes | None:
    """The CNN's ONNX graph, checked against the hash its metadata records."""
    if arch.name != "cnn":
        return None
    graph_file = onnx_path(path)
    try:
        expected = str(meta["onnx"]["sha256"])
        graph = graph_file.read_bytes()
    except (KeyError, TypeError):
        raise WeightsError(
            f"{metadata_path(path)}: a CNN's metadata lacks its onnx sha256"
        ) from None
    except OSError as e:
        raise WeightsError(f"{graph_file}: cannot read the CNN's graph ({e.strerror})") from None
    actual = hashlib.sha256(graph).hexdigest()
    if actual != expected:
        raise WeightsError(
            f"{graph_file}: sha256 {actual[:12]}... does not match metadata {expected[:12]}..."
        )
    return graph


def softmax(logits: Floats) -> Floats:
    z: Floats = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _onnx_session(graph: bytes) -> Any:
    """onnxruntime on the CNN's ONNX graph, on the calling thread only.

    Chosen by benchmarks/bench_cnn.py (batches of 64, one core, a loaded machine): about
    2x faster per image than OpenCV's DNN module on the same graph and 6x faster than numpy
    im2col + matmul, all three within 1e-5 of torch; the daemon's burst rate is what the
    difference buys. Imported only for CNN weights: the MLP path neither loads nor pays
    for it (~40 MB of RSS, ~80 MB on disk).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny batches; the workers decode on the other core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are not ours to log
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class Classifier:
    """The networks' forward pass in numpy: batches of normalized 784-vectors to probabilities.

    An ensemble answers with the mean of its members' softmax over tempered logits:
    members agree on the digits MNIST taught them and disagree on the others, which is
    what makes a low confidence mean "look at this one".
    """

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.temperature = weights.temperature
        libc.single_threaded_blas()
        if weights.graph is not None:
            self._members = len(weights.members)
            self._session = _onnx_session(weights.graph)
            self.logits = self._cnn_logits  # type: ignore[method-assign]
            return
        # Stacked once: (M, d_in, d_out) and (M, 1, d_out), so each layer of every member
        # is one batched product.
        self._layers = [
            (
                np.stack([p[f"fc{i}.weight"].T for p in weights.members]),
                np.stack([p[f"fc{i}.bias"][None, :] for p in weights.members]),
            )
            for i in (1, 2, 3)
        ]

    def logits(self, x: Floats) -> Floats:
        """(B, 784) normalized float32 -> (M, B, 10) logits of each member."""
        h = x[None]  # (1, B, 784), broadcast over the members
        for i, (w, b) in enumerate(self._layers):
            h = h @ w + b  # (M, B, d_out)
            if i < len(self._layers) - 1:
                np.maximum(h, 0, out=h)
        return np.asarray(h, dtype=np.float32)

    def _cnn_logits(self, x: Floats) -> Floats:
        """(B, 784) normalized float32 -> (M, B, 10) logits of each CNN member."""
        batch = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
        out = np.asarray(self._session.run(None, {"x": batch})[0], dtype=np.float32)  # (B, 10M)
        return np.ascontiguousarray(out.reshape(len(x), self._members, 10).transpose(1, 0, 2))

    def probabilities(self, x: Floats) -> Floats:
        """(B, 784) normalized float32 -> (B, 10) probabilities."""
        logits = self.logits(x)
        if self.temperature != 1.0:
            logits /= self.temperature
        m, b, _ = logits.shape
        probs = softmax(logits.reshape(m * b, -1)).reshape(m, b, -1)
        return np.asarray(probs.mean(axis=0), dtype=np.float32)

    def normalize(self, images: npt.NDArray[np.uint8]) -> Floats:
        """(B, 28, 28) uint8 with bright ink -> (B, 784) float32 with the training mean/std."""
        x = images.reshape(len(images), -1).astype(np.float32)
        x *= 1.0 / 255.0
        x -= self.weights.mean
        x /= self.weights.std
        return x
