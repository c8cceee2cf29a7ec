"""Training recipe: Adam + one-cycle schedule + batched affine augmentation on tensors.

Augmentation runs on whole batches with `affine_grid`/`grid_sample` (per-sample PIL
transforms in a DataLoader are an order of magnitude slower on 2 cores). A validation
split is carved from the training set; the test set is never used to choose anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from digitwatch.corrections import Corrections
from digitwatch.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from digitwatch.model import CNN, MLP, CNNConfig, MLPConfig, Net, save_checkpoint
from digitwatch.preprocess import deskew_all


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "mlp"  # or "cnn" (train/recipe-cnn.toml)
    channels: tuple[int, ...] = CNNConfig.channels  # the CNN's conv blocks
    hidden: int = CNNConfig.hidden  # the CNN's hidden layer
    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3  # one-cycle peak
    weight_decay: float = 0.0
    dropout: float = 0.1
    val_size: int = 5000
    seed: int = 0
    rotate_deg: float = 5.0  # slant is removed by deskewing; this is what remains
    scale: float = 0.10
    shear: float = 0.0  # deskewing normalizes shear away
    shift: float = 0.03  # inputs are centered by mass, so small shifts suffice
    thickness_p: float = 0.0  # probability of a random 3x3 dilation or erosion per image
    label_smoothing: float = 0.0
    elastic_alpha: float = 1.5  # elastic distortion strength (Simard et al. 2003)
    elastic_grid: int = 4  # control points per side of the displacement field
    continental_1: float = 0.3  # share of 1s given a flag (sometimes a foot) each epoch
    crossed_7: float = 0.2  # share of 7s given a crossbar each epoch
    members: int = 1  # an ensemble of this many MLPs, seeds seed, seed + 1, ...
    train_limit: int | None = None  # use only the first N training images (tests)
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    models: list[Net]  # the ensemble's members, in seed order
    history: list[EpochReport]
    seconds: float
    temperature: float  # fit on the validation split; logits are divided by it
    val_accuracy: float  # the ensemble's, on the validation split


BatchCallback = Callable[[int, int, float], None]  # (batch index, batches, running loss)
EpochCallback = Callable[[EpochReport], None]


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float().div_(255.0) - MNIST_MEAN) / MNIST_STD


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, scale, shear and shift for a (B, 1, 28, 28) batch in [0, 1]."""
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    scale = uniform(1 - cfg.scale, 1 + cfg.scale)
    shear = uniform(-cfg.shear, cfg.shear)
    tx, ty = uniform(-cfg.shift, cfg.shift) * 2, uniform(-cfg.shift, cfg.shift) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, tx], dim=1),
            torch.stack([sin, cos + shear * sin, ty], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3): output -> input sampling grid
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, 28, 28, 2)
    if cfg.elastic_alpha > 0:
        grid = grid + _elastic_field(x.shape[0], x.shape[-1], cfg, gen)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    if cfg.thickness_p > 0:
        pick = torch.rand(b, generator=gen)
        thicker = F.max_pool2d(x, 3, stride=1, padding=1)
        thinner = -F.max_pool2d(-x, 3, stride=1, padding=1)
        half = cfg.thickness_p / 2
        x = torch.where((pick < half).view(b, 1, 1, 1), thicker, x)
        x = torch.where(((pick >= half) & (pick < cfg.thickness_p)).view(b, 1, 1, 1), thinner, x)
    return x


def _elastic_field(b: int, size: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """A smooth random displacement field in grid units, (B, size, size, 2).

    Random coefficients on the lowest 2-D cosine modes (B C B^T, two small matrix
    products): as smooth as Gaussian-blurred noise (Simard et al. 2003) and far cheaper
    than blurring on this CPU.
    """
    k = cfg.elastic_grid
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    basis = torch.cos(math.pi * t[:, None] * torch.arange(1, k + 1, dtype=torch.float32))
    coeff = torch.randn(b, 2, k, k, generator=gen) / k
    field = torch.einsum("ik,bckl,jl->bijc", basis, coeff, basis)  # (B, size, size, 2)
    return field * (cfg.elastic_alpha * 2.0 / size)


def _segment_ink(
    p0: torch.Tensor, p1: torch.Tensor, width: torch.Tensor, size: int = 28
) -> torch.Tensor:
    """Anti-aliased straight strokes from p0 to p1 ((K, 2) x, y in pixels), (K, size, size)."""
    grid = torch.arange(size, dtype=torch.float32)
    py, px = grid.view(1, size, 1), grid.view(1, 1, size)
    x0, y0 = p0[:, 0].view(-1, 1, 1), p0[:, 1].view(-1, 1, 1)
    dx, dy = (p1[:, 0] - p0[:, 0]).view(-1, 1, 1), (p1[:, 1] - p0[:, 1]).view(-1, 1, 1)
    t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
    dist = torch.hypot(px - (x0 + t * dx), py - (y0 + t * dy))  # (K, size, size)
    return (width.view(-1, 1, 1) / 2 + 0.5 - dist).clamp(0, 1)


def _strokes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top row, bottom row, height and stroke width of (K, 28, 28) digits in [0, 1].

    The width is the ink per inked row, which for a 1 (one near-vertical stroke) is the
    pen's own width: added strokes then look like the writer's.
    """
    rows = (x > 0.5).any(2)  # (K, 28)
    top = rows.float().argmax(1)
    bottom = x.shape[1] - 1 - rows.flip(1).float().argmax(1)
    height = (bottom - top + 1).float()
    width = (x.sum((1, 2)) / rows.sum(1).clamp_min(1)).clamp(1.0, 4.0)
    return top, bottom, height, width


def _column_at(x: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ink's mean column in one row of each image, and whether that row has ink."""
    line = x[torch.arange(len(x)), row.clamp(0, x.shape[1] - 1)]  # (K, 28)
    mass = line.sum(1)
    cols = torch.arange(x.shape[2], dtype=torch.float32)
    return (line * cols).sum(1) / mass.clamp_min(1e-6), mass > 0.5


def continental_ones(x: torch.Tensor, gen: torch.Generator, foot_p: float = 0.3) -> torch.Tensor:
    """Give (K, 28, 28) 1s in [0, 1] a continental flag, and some a foot.

    The flag leaves the top of the stem down to the left (15-60 degrees below the
    horizontal, 20-50% of the digit's height): a 7's bar is horizontal and longer,
    and that difference is what the model must learn.
    """
    k = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(k, generator=gen) * (hi - lo) + lo

    top, bottom, height, width = _strokes(x)
    tx, _ = _column_at(x, top)
    bx, _ = _column_at(x, bottom)
    length, angle = height * uniform(0.2, 0.5), uniform(15, 60) * math.pi / 180
    start = torch.stack([tx, top.float()], 1)
    end = torch.stack([tx - length * torch.cos(angle), top + length * torch.sin(angle)], 1)
    ink = _segment_ink(start, end, width)
    half = height * uniform(0.12, 0.3)
    foot = _segment_ink(
        torch.stack([bx - half, bottom.float()], 1),
        torch.stack([bx + half, bottom.float()], 1),
        width,
    )
    ink = torch.maximum(ink, foot * (torch.rand(k, generator=gen) < foot_p).view(k, 1, 1))
    peak = x.amax((1, 2)).view(k, 1, 1)
    return torch.maximum(x, ink * peak)


def crossed_sevens(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Give (K, 28, 28) 7s in [0, 1] a short crossbar through the middle of the stem."""
    k = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(k, generator=gen) * (hi - lo) + lo

    top, _, height, width = _strokes(x)
    row = (top + height * uniform(0.4, 0.65)).long()
    cx, inked = _column_at(x, row)
    half, tilt = height * uniform(0.1, 0.22), uniform(-1.5, 1.5)
    y = row.float()
    ink = _segment_ink(
        torch.stack([cx - half, y - tilt], 1), torch.stack([cx + half, y + tilt], 1), width
    )
    peak = x.amax((1, 2)).view(k, 1, 1)
    return torch.maximum(x, ink * peak * inked.view(k, 1, 1))


def _continental_epoch(
    raw: torch.Tensor,
    deskewed: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """This epoch's training images: fresh continental 1s and crossed 7s among the rest.

    Strokes are added to the raw digits and the result deskewed, as the pipeline would
    deskew a real continental 1 (its flag tilts the moments).
    """
    if cfg.continental_1 <= 0 and cfg.crossed_7 <= 0:
        return deskewed  # and no random draw, so recipes without them train as they did
    out = deskewed.clone()
    pick = torch.rand(len(labels), generator=gen)
    makers: list[tuple[int, float, Callable[[torch.Tensor, torch.Generator], torch.Tensor]]] = [
        (1, cfg.continental_1, continental_ones),
        (7, cfg.crossed_7, crossed_sevens),
    ]
    for digit, share, make in makers:
        idx = torch.nonzero((labels == digit) & (pick < share)).flatten()
        if len(idx) == 0:
            continue
        x = make(raw[idx, 0].float() / 255.0, gen)
        u8 = (x * 255).round().to(torch.uint8).numpy()
        out[idx, 0] = torch.from_numpy(deskew_all(u8))
    return out


@torch.no_grad()
def _logits(models: list[Net], images: torch.Tensor) -> torch.Tensor:
    """(M, N, 10) logits of every member for (N, 1, 28, 28) uint8 images."""
    for m in models:
        m.eval()
    x = _normalize(images)
    return torch.stack(
        [torch.cat([m(x[i : i + 2000]) for i in range(0, len(x), 2000)]) for m in models]
    )


def _probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ensemble's answer: the mean of its members' tempered softmax, (N, 10)."""
    return torch.softmax(logits / temperature, dim=2).mean(0)


def accuracy(models: Net | list[Net], images: torch.Tensor, labels: torch.Tensor) -> float:
    members: list[Net] = models if isinstance(models, list) else [models]
    pred = _probabilities(_logits(members, images), 1.0).argmax(1)
    return float((pred == labels).float().mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the ensemble's negative log-likelihood.

    A grid over 0.5-4 is enough for one scalar and needs no optimiser to tune. It
    changes no answer, only what a confidence means: on held-out MNIST a confidence of
    0.9 is then right about 90% of the time.
    """
    grid = torch.linspace(0.5, 4.0, 71)
    nll = [
        float(
            -torch.log(
                _probabilities(logits, float(t))[torch.arange(len(labels)), labels] + 1e-12
            ).mean()
        )
        for t in grid
    ]
    return round(float(grid[int(np.argmin(nll))]), 3)


def _train_member(
    cfg: TrainConfig,
    seed: int,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    on_batch: BatchCallback | None,
    on_epoch: EpochCallback | None,
    history: list[EpochReport],
) -> Net:
    x_raw, x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model: Net
    if cfg.arch == "cnn":
        config = CNNConfig(channels=tuple(cfg.channels), hidden=cfg.hidden, dropout=cfg.dropout)
        # Channels-last: oneDNN's convolutions ran ~3-5x faster so on this CPU.
        model = CNN(config).to(memory_format=torch.channels_last)
    else:
        model = MLP(MLPConfig(dropout=cfg.dropout))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        x_epoch = _continental_epoch(x_raw, x_train, y_train, cfg, gen)
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = _augment(x_epoch[idx].float().div_(255.0), cfg, gen)
            logits = model((x - MNIST_MEAN) / MNIST_STD)
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += loss.detach().item()
            if on_batch is not None:
                on_batch(step + 1, steps_per_epoch, total / (step + 1))
        report = EpochReport(
            epoch=len(history) + 1,
            epochs=cfg.epochs * cfg.members,
            train_loss=total / steps_per_epoch,
            val_accuracy=accuracy(model, x_val, y_val) if len(x_val) else float("nan"),
            seconds=time.perf_counter() - t0,
        )
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
    model.eval()
    return model


def train(
    cfg: TrainConfig,
    data_dir: Path,
    *,
    download: bool = True,
    on_batch: BatchCallback | None = None,
    on_epoch: EpochCallback | None = None,
    extra: Corrections | None = None,
) -> TrainResult:
    """Train the ensemble; each member's last epoch is kept (no best-epoch picking)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    raw_np, labels_np = load_mnist(data_dir, train=True, download=download)
    images_np = deskew_all(raw_np)  # the model sees what preprocess.to_mnist outputs
    # One split for every member, so the validation digits are unseen by all of them.
    order = np.random.default_rng(cfg.seed).permutation(len(images_np))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    raw, images, labels = raw_np[train_idx], images_np[train_idx], labels_np[train_idx]
    if extra is not None and len(extra.labels):
        # People's corrections, already preprocessed (deskewed too), repeated so they make
        # up corrections.SHARE of each epoch.
        k = extra.repeats(len(labels))
        raw = np.concatenate([raw, np.tile(extra.images, (k, 1, 1))])
        images = np.concatenate([images, np.tile(extra.images, (k, 1, 1))])
        labels = np.concatenate([labels, np.tile(extra.labels, k)])
    data = (
        torch.from_numpy(raw).unsqueeze(1),  # (N, 1, 28, 28) uint8, not deskewed
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels),
        torch.from_numpy(images_np[val_idx]).unsqueeze(1),
        torch.from_numpy(labels_np[val_idx]),
    )
    history: list[EpochReport] = []
    start = time.perf_counter()
    models = [
        _train_member(cfg, cfg.seed + m, data, on_batch, on_epoch, history)
        for m in range(cfg.members)
    ]
    x_val, y_val = data[3], data[4]
    temperature, val_acc = 1.0, float("nan")
    if len(x_val):
        temperature = fit_temperature(_logits(models, x_val), y_val)
        val_acc = accuracy(models, x_val, y_val)
    return TrainResult(
        models=models,
        history=history,
        seconds=time.perf_counter() - start,
        temperature=temperature,
        val_accuracy=val_acc,
    )


def test_accuracy(models: list[Net], data_dir: Path, *, download: bool = True) -> float:
    images, labels = load_mnist(data_dir, train=False, download=download)
    images = deskew_all(images)
    return accuracy(models, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels))


def train_and_save(
    cfg: TrainConfig,
    data_dir: Path,
    out: Path,
    *,
    download: bool = True,
    on_batch: BatchCallback | None = None,
    on_epoch: EpochCallback | None = None,
    extra: Corrections | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train, score the final ensemble on the test set, and write weights + metadata."""
    result = train(
        cfg, data_dir, download=download, on_batch=on_batch, on_epoch=on_epoch, extra=extra
    )
    acc = test_accuracy(result.models, data_dir, download=download)
    training = asdict(cfg) | {
        "optimizer": "Adam",
        "loss": "CrossEntropyLoss",
        "schedule": "OneCycleLR",
        "seconds": round(result.seconds, 1),
        "final_val_accuracy": result.val_accuracy,
        "torch_threads": torch.get_num_threads(),
    }
    if extra is not None:
        training["extra_labels"] = {"images": len(extra.labels), "left_out": extra.left_out}
    meta = save_checkpoint(
        result.models,
        out,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        training=training,
        test_accuracy=acc,
        temperature=result.temperature,
    )
    return result, meta


def load_recipe(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a TOML recipe's [train] table, then command-line overrides."""
    import tomllib

    from digitwatch.errors import ConfigError

    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = dict(tomllib.loads(path.read_text()).get("train", {}))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot read recipe ({e})") from None
    values.update(overrides)
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    if values.get("arch", "mlp") not in ("mlp", "cnn"):
        raise ConfigError(f"unknown architecture {values['arch']!r}: mlp or cnn")
    if "channels" in values:
        values["channels"] = tuple(int(c) for c in values["channels"])
    return TrainConfig(**values)
