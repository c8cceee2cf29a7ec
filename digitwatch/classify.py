"""Classify stage: load checked MLP weights and run them with numpy.

The daemon never imports torch (about 520 MB and 1.3 s here for three small matrix
products). The checkpoint is torch's zip format; it is read with an unpickler that
knows only the handful of names a plain dict of float tensors needs, so a pickled
object of any other kind is refused, as `torch.load(weights_only=True)` would.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from digitwatch import libc
from digitwatch.errors import WeightsError

FORMAT_VERSION = 1
PREPROCESSING_VERSION = 3  # 2: to_mnist ends with a deskew; 3: hysteresis, 256 px work (issue 12)
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


_DTYPES: dict[str, type[np.generic]] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
}


class _Storage:
    def __init__(self, dtype: type[np.generic]) -> None:
        self.dtype = dtype


def _rebuild_tensor_v2(
    storage: npt.NDArray[Any],
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: object,
) -> npt.NDArray[Any]:
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view, copy=True)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a dict of tensors into numpy arrays; refuses every other global."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, file: Any) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _DTYPES:
            return _Storage(_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a plain tensor")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _Storage):
            raise pickle.UnpicklingError("unsupported storage type")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        return np.frombuffer(raw, dtype=storage_type.dtype)


def _read_state_dict(data: bytes) -> dict[str, npt.NDArray[Any]]:
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError("not a torch checkpoint (no data.pkl)")
        prefix = pkl[0].rsplit("/", 1)[0]
        state = _StateDictUnpickler(archive, prefix, io.BytesIO(archive.read(pkl[0]))).load()
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError("checkpoint is not a dict of tensors")
    return state


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
        raise WeightsError(f"{meta_file}: unsupported format_version {meta.get('format_version')}")
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
        state = _read_state_dict(data)
    except (pickle.UnpicklingError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as e:
        raise WeightsError(f"{path}: not a plain state dict of tensors ({e})") from None
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


class Classifier:
    """The MLPs' forward pass in numpy: batches of normalized 784-vectors to probabilities.

    An ensemble answers with the mean of its members' softmax over tempered logits:
    members agree on the digits MNIST taught them and disagree on the others, which is
    what makes a low confidence mean "look at this one".
    """

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.temperature = weights.temperature
        libc.single_threaded_blas()
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
