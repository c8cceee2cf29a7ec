"""MNIST through torchvision: read from a data folder, download only when absent and allowed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from digitwatch.errors import DataError

# Published statistics of the MNIST training images (pixel values scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]


def load_mnist(data_dir: Path, *, train: bool, download: bool = True) -> tuple[Images, Labels]:
    """Return (N, 28, 28) uint8 images with bright ink and (N,) int64 labels."""
    import torchvision

    split = "training" if train else "test"
    try:
        ds = torchvision.datasets.MNIST(root=str(data_dir), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(
                f"MNIST {split} set not found in {data_dir}/MNIST/raw and download is off"
            ) from None
        try:
            ds = torchvision.datasets.MNIST(root=str(data_dir), train=train, download=True)
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"MNIST {split} set not found in {data_dir}/MNIST/raw and could not be "
                f"downloaded ({type(e).__name__}: {e}); set --data-dir or DIGITWATCH_DATA_DIR"
            ) from None
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64)
