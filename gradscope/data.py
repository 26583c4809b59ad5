"""Data for the paper's experiments: a synthetic CIFAR-shaped default and a reader for a local CIFAR-10 copy.

:func:`synthetic` needs nothing from the network: a deterministic, seeded classification set of 3x32x32 images in
10 classes whose labels a small network can learn (each class is a smooth spatial/colour template, shown shifted,
at a random contrast, under class-independent smooth clutter and pixel noise). :func:`load_cifar10` reads the
standard python version of CIFAR-10 from disk; there is deliberately no download code. :func:`loaders` wraps
either pair in seeded ``DataLoader`` objects.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradscope.errors import DataError

#: Per-channel statistics of the CIFAR-10 training images (pixel values in [0, 1]), the usual normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"

_NUM_WAVES = 4  # sinusoids per template channel
_MAX_FREQ = 3  # cycles per image: smooth, low-frequency templates
_NUM_CLUTTER = 8  # shared smooth fields that the class-independent clutter is mixed from


# --- synthetic ------------------------------------------------------------------------------------------------
def smooth_fields(count: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, channels, size, size)`` random smooth fields with unit RMS per field.

    Each channel is a sum of :data:`_NUM_WAVES` plane waves with whole frequencies of at most :data:`_MAX_FREQ`
    cycles per image, so every field is periodic and a circular shift moves it without seams. A random colour
    offset per channel makes fields differ in mean colour as well as in shape.
    """
    shape = (count, channels, _NUM_WAVES)
    freqs = torch.randint(-_MAX_FREQ, _MAX_FREQ + 1, (*shape, 2), generator=generator).float()
    amps = torch.randn(shape, generator=generator)
    phases = torch.rand(shape, generator=generator) * 2 * math.pi
    grid = torch.arange(size, dtype=torch.float32) * (2 * math.pi / size)
    # angle[k, c, w, i, j] = 2 pi (fy i + fx j) / size + phase
    angle = (freqs[..., 0, None, None] * grid[:, None] + freqs[..., 1, None, None] * grid[None, :]
             + phases[..., None, None])
    fields = (amps[..., None, None] * torch.cos(angle)).sum(dim=2)
    fields = fields + 0.5 * torch.randn(count, channels, 1, 1, generator=generator)
    rms = fields.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return fields / rms


def _shift(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Circularly shift each image ``(N, C, H, W)`` by its own ``(dy[n], dx[n])`` pixels."""
    n, c, h, w = images.shape
    rows = (torch.arange(h)[None, :] - dy[:, None]) % h
    cols = (torch.arange(w)[None, :] - dx[:, None]) % w
    images = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return images.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _samples(templates: torch.Tensor, clutter: torch.Tensor, n: int, noise: float, max_shift: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` raw images and labels: balanced classes, template x contrast, shifted, plus clutter and noise."""
    num_classes = templates.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=generator)
    images = contrast * _shift(templates[labels], dy, dx)
    mix = torch.randn(n, clutter.shape[0], generator=generator) / math.sqrt(clutter.shape[0])
    images = images + (mix @ clutter.flatten(1)).view_as(images)
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images, labels


def _check_count(option: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"{option}={value!r} must be an integer >= {minimum}")
    return value


def synthetic(n_train: int = 5000, n_test: int = 1000, seed: int = 0, *, num_classes: int = 10,
              image_size: int = 32, channels: int = 3, noise: float = 1.5, clutter: float = 1.0,
              max_shift: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """A seeded CIFAR-shaped classification set: ``(train, test)`` TensorDatasets of (image, label).

    Images are float32 ``(channels, image_size, image_size)``, labels int64 in ``[0, num_classes)``, classes
    balanced. Class ``k`` is a smooth template (unit RMS) shown at a random contrast in ``[0.5, 1.5)``,
    circularly shifted by up to ``max_shift`` pixels each way (default ``image_size // 2``: any position, so
    the class lies in the pattern and its colour rather than in where it sits), plus class-independent smooth
    clutter (RMS ``clutter`` on average) and Gaussian pixel noise of standard deviation ``noise``. At the
    defaults a linear classifier reaches about 75% test accuracy and a small convolutional net more.

    Both splits are normalised per channel with the training split's mean and standard deviation, so the
    training images have zero mean and unit variance per channel. The templates depend only on ``seed`` (and
    the shapes), and each split has its own stream, so changing ``n_train`` leaves the test split as it was.
    Same arguments, same tensors.
    """
    _check_count("n_train", n_train, 1)
    _check_count("n_test", n_test, 0)
    _check_count("num_classes", num_classes, 2)
    _check_count("image_size", image_size, 1)
    _check_count("channels", channels, 1)
    for option, value in (("noise", noise), ("clutter", clutter)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DataError(f"{option}={value!r} must be a finite number >= 0")
    max_shift = image_size // 2 if max_shift is None else _check_count("max_shift", max_shift, 0)
    streams = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
    shapes = torch.Generator().manual_seed(streams[0])
    templates = smooth_fields(num_classes, channels, image_size, shapes)
    clutter_fields = clutter * smooth_fields(_NUM_CLUTTER, channels, image_size, shapes)
    train_stream, test_stream = (torch.Generator().manual_seed(s) for s in streams[1:])
    x_train, y_train = _samples(templates, clutter_fields, n_train, noise, max_shift, train_stream)
    x_test, y_test = _samples(templates, clutter_fields, n_test, noise, max_shift, test_stream)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
    return TensorDataset((x_train - mean) / std, y_train), TensorDataset((x_test - mean) / std, y_test)


def loaders(train_ds: TensorDataset, test_ds: TensorDataset, batch_size: int = 128, seed: int = 0, *,
            shuffle: bool = True, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train, test)`` DataLoaders: the training one reshuffles every epoch from ``seed``, the test one keeps order.

    Two calls with the same ``seed`` give the same batches in the same order.
    """
    _check_count("batch_size", batch_size, 1)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                       num_workers=num_workers)
    test = DataLoader(test_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train, test


# --- CIFAR-10 from a local copy -------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and bytes only: a CIFAR batch needs nothing else, and pickle runs code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # files pickled by numpy 1 (or Python 2)
        return super().find_class(module, name)


def _expected() -> str:
    return (f"a '{CIFAR10_DIR}' folder holding {', '.join(CIFAR10_TRAIN_FILES)} and {CIFAR10_TEST_FILE} "
            f"(the 'CIFAR-10 python version' of https://www.cs.toronto.edu/~kriz/cifar.html, unpacked)")


def cifar10_dir(root: str | Path) -> Path:
    """The folder holding the CIFAR-10 batches: ``root`` itself or ``root/cifar-10-batches-py``."""
    root = Path(root).expanduser()
    tried = [root, root / CIFAR10_DIR]
    for folder in tried:
        if all((folder / name).is_file() for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)):
            return folder
    folder = next((f for f in reversed(tried) if f.is_dir()), root)
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (folder / n).is_file()]
    raise DataError(f"no CIFAR-10 at {str(root)!r}: expected {_expected()}; tried "
                    f"{' and '.join(repr(str(f)) for f in tried)}; missing in {str(folder)!r}: {', '.join(missing)}")


def _field(batch: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``(data uint8 (N, 3072), labels int64 (N,))``, checked, else a DataError."""
    problem = f"{str(path)!r} is not a CIFAR-10 python batch"
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(handle, encoding="bytes").load()
        data, labels = np.asarray(_field(batch, "data")), np.asarray(_field(batch, "labels"))
    except Exception as error:  # a fuzzed file may raise anything from Overflow- to MemoryError: a data error
        raise DataError(f"{problem} (a pickled dict with b'data' and b'labels'): {type(error).__name__}: {error}; "
                        f"expected {_expected()}") from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{problem}: b'data' should be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{problem}: b'labels' should be {data.shape[0]} integers in 0..9, "
                        f"got {labels.dtype} {labels.shape}")
    return data, labels.astype(np.int64)


def _to_dataset(parts: list[tuple[np.ndarray, np.ndarray]]) -> TensorDataset:
    """uint8 rows -> float32 ``(N, 3, 32, 32)`` normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`."""
    data = torch.from_numpy(np.concatenate([d for d, _ in parts])).view(-1, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([y for _, y in parts]))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return TensorDataset((data.float() / 255 - mean) / std, labels)


def read_cifar10_pixels(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw CIFAR-10 images of a local copy: ``(train_x, train_y, test_x, test_y)``.

    Images are uint8 ``(N, 3, 32, 32)`` exactly as stored (50,000 training and 10,000 test images, 150 MB in
    all), labels int64. For recipes that normalise their own way, e.g. He et al.'s per-pixel mean subtraction;
    :func:`load_cifar10` gives the usual per-channel normalised floats instead.
    """
    folder = cifar10_dir(root)
    parts = [read_batch(folder / name) for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)]

    def stack(chosen: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.from_numpy(np.concatenate([d for d, _ in chosen])).view(-1, 3, 32, 32)
        return data, torch.from_numpy(np.concatenate([y for _, y in chosen]))

    return (*stack(parts[:-1]), *stack(parts[-1:]))


def load_cifar10(root: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` TensorDatasets from a local CIFAR-10 copy in the standard python format.

    ``root`` is the ``cifar-10-batches-py`` folder or its parent. Images come out as float32 ``(3, 32, 32)``
    normalised per channel with the usual CIFAR-10 statistics, labels as int64; 50,000 training images take
    about 600 MB. Only arrays, lists and dicts are unpickled. A missing or malformed folder raises
    :class:`gradscope.errors.DataError` naming the expected files and the path tried.
    """
    folder = cifar10_dir(root)
    train = _to_dataset([read_batch(folder / name) for name in CIFAR10_TRAIN_FILES])
    test = _to_dataset([read_batch(folder / CIFAR10_TEST_FILE)])
    return train, test
