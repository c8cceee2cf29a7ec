"""Classify stage: load checked weights and run them with numpy.

The daemon never imports torch (about 520 MB and 1.3 s here for three small matrix
products). Weights are a safetensors file (a JSON header and raw little-endian arrays:
nothing in it is executed), read with `safetensors.numpy`; the metadata JSON beside it
says what network they are for.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.numpy

from digitwatch.errors import WeightsError

FORMAT_VERSION = 2  # 1: torch's pickled zip checkpoint; 2: safetensors
PREPROCESSING_VERSION = 4  # 2: deskew; 3: hysteresis, 256 px work; 4: stroke-scale paper (issue 12)
LAYER_SIZES = (784, 128, 64, 10)

Floats = npt.NDArray[np.float32]


def metadata_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def _expected_shapes(sizes: tuple[int, ...], members: int = 1) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:], strict=False), start=1):
        shapes[f"fc{i}.weight"] = (d_out, d_in)
        shapes[f"fc{i}.bias"] = (d_out,)
    if members == 1:
        return shapes
    return {f"m{m}.{k}": v for m in range(members) for k, v in shapes.items()}


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
    def model_id(self) -> str:
        """Architecture and weights hash, as results name the model."""
        layers = "-".join(str(n) for n in self.meta["architecture"]["layers"])
        n = int(self.meta["architecture"].get("members", 1))
        return f"mlp-{layers}{f'x{n}' if n > 1 else ''}@{self.sha256[:12]}"


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
        sizes = tuple(int(n) for n in meta["architecture"]["layers"])
        members = int(meta["architecture"].get("members", 1))
        temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        expected_hash = str(meta["sha256"])
        float(meta["normalization"]["mean"]), float(meta["normalization"]["std"])
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
    if sizes != LAYER_SIZES:
        raise WeightsError(f"{meta_file}: architecture {sizes} is not the {LAYER_SIZES} MLP")
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
    expected = _expected_shapes(sizes, members)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise WeightsError(f"{path}: tensor shapes {got} do not match {members} of the {sizes} MLP")
    params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return Weights(path=path, meta=meta, params=params)


def softmax(logits: Floats) -> Floats:
    z: Floats = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def single_threaded_blas() -> bool:
    """Pin numpy's OpenBLAS to one thread; True if it worked.

    Measured here (2 cores): a (64, 784) @ (784, 128) float32 product takes ~0.2 ms on
    one thread and ~30 ms with OpenBLAS's default two, which wake and park per call.
    The batches are tiny, and decoding already uses the other core.
    """
    libs = Path(np.__file__).parent.parent / "numpy.libs"
    for lib in sorted(libs.glob("*openblas*")):
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(handle, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(1)
                return True
    return False


class Classifier:
    """The MLPs' forward pass in numpy: batches of normalized 784-vectors to probabilities.

    An ensemble answers with the mean of its members' softmax over tempered logits:
    members agree on the digits MNIST taught them and disagree on the others, which is
    what makes a low confidence mean "look at this one".
    """

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.temperature = weights.temperature
        single_threaded_blas()
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
