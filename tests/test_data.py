"""gradscope.data: the synthetic default set, the seeded loaders, and the local CIFAR-10 reader."""
from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradscope.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, loaders, synthetic
from gradscope.errors import DataError, GradscopeError


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py


# --- synthetic ------------------------------------------------------------------------------------------------
def test_shapes_types_and_balance():
    train, test = synthetic(1000, 300, seed=0)
    x, y = train.tensors
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.bincount(y).tolist() == [100] * 10
    assert test.tensors[0].shape == (300, 3, 32, 32)
    assert set(test.tensors[1].tolist()) == set(range(10))


def test_normalised_per_channel():
    (x, _), (x_test, _) = (ds.tensors for ds in synthetic(2000, 1000, seed=1))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    # the test split uses the training statistics: close to, not exactly, standard
    assert torch.allclose(x_test.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.15)
    assert torch.allclose(x_test.std(dim=(0, 2, 3)), torch.ones(3), atol=0.15)


def test_deterministic_and_seeded():
    a_train, a_test = synthetic(200, 100, seed=5)
    b_train, b_test = synthetic(200, 100, seed=5)
    c_train, _ = synthetic(200, 100, seed=6)
    for a, b in zip(a_train.tensors + a_test.tensors, b_train.tensors + b_test.tensors):
        assert torch.equal(a, b)
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])
    assert not torch.equal(a_train.tensors[0][:100], a_test.tensors[0])


def test_test_split_does_not_depend_on_the_training_size():
    """Same raw test images whatever n_train; only the per-channel affine normalisation (from train) differs."""
    _, (t1, y1) = (ds.tensors for ds in synthetic(400, 50, seed=2))
    _, (t2, y2) = (ds.tensors for ds in synthetic(800, 50, seed=2))
    assert torch.equal(y1, y2)
    for channel in range(3):
        pair = torch.stack([t1[:, channel].flatten(), t2[:, channel].flatten()])
        assert torch.corrcoef(pair)[0, 1] > 0.99999
    assert not torch.equal(t1, t2)  # the statistics did change


def test_fast():
    """2,000 images well under a second of CPU (CPU time, so that a busy runner does not make it flaky)."""
    synthetic(10, 10)  # warm up torch's kernels
    start = time.process_time()
    synthetic(2000, 0)
    assert time.process_time() - start < 0.6


def test_each_class_is_one_template_shifted_and_rescaled():
    """Without noise and clutter, same-class images are exact rescaled circular shifts of each other."""
    train, _ = synthetic(60, 0, seed=0, noise=0.0, clutter=0.0, max_shift=0)
    x, y = train.tensors
    x = x - x.mean(dim=(2, 3), keepdim=True)  # undo the per-channel offset of the normalisation
    for label in range(10):
        assert torch.corrcoef(x[y == label].flatten(1)).min() > 0.9999  # one template, up to contrast
    shifted, _ = synthetic(60, 0, seed=0, noise=0.0, clutter=0.0)
    xs, ys = shifted.tensors
    # a circular shift keeps the amplitude spectrum of each channel; different classes have different spectra
    spectrum = torch.fft.fft2(xs - xs.mean(dim=(2, 3), keepdim=True)).abs().flatten(1)
    spectrum = spectrum / spectrum.norm(dim=1, keepdim=True)
    same = torch.stack([torch.corrcoef(spectrum[ys == k]).min() for k in range(10)])
    assert same.min() > 0.9999
    firsts = spectrum[[int((ys == k).nonzero()[0]) for k in range(10)]]
    assert (torch.corrcoef(firsts) - torch.eye(10)).max() < 0.9
    # smooth, not white noise: neighbouring pixels are strongly correlated
    assert torch.corrcoef(torch.stack([xs[..., :-1].flatten(), xs[..., 1:].flatten()]))[0, 1] > 0.9


def test_a_small_net_learns_it():
    """A linear softmax classifier, three epochs of SGD: far above the 10% of chance on held-out images."""
    train, test = synthetic(2000, 500, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_loader, test_loader = loaders(train, test, batch_size=64, seed=0)
    for _ in range(3):
        for xb, yb in train_loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimiser.step()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in test_loader)
    assert correct / len(test) > 0.5


@pytest.mark.parametrize("options, word", [
    ({"n_train": 0}, "n_train=0"), ({"num_classes": 1}, "num_classes=1"), ({"noise": -1.0}, "noise=-1.0"),
    ({"noise": float("nan")}, "noise=nan"), ({"image_size": 2.5}, "image_size=2.5"),
    ({"clutter": -0.1}, "clutter=-0.1"), ({"max_shift": -1}, "max_shift=-1"),
])
def test_bad_arguments(options, word):
    with pytest.raises(DataError, match=word):
        synthetic(**options)


def test_other_shapes():
    train, test = synthetic(30, 20, num_classes=3, image_size=16, channels=1, seed=0)
    assert train.tensors[0].shape == (30, 1, 16, 16) and set(train.tensors[1].tolist()) == {0, 1, 2}


# --- loaders --------------------------------------------------------------------------------------------------
def test_loaders_are_seeded_and_the_test_loader_ordered():
    train, test = synthetic(100, 30, seed=0)
    order = [yb for _, yb in loaders(train, test, 16, seed=3)[0]]
    again = [yb for _, yb in loaders(train, test, 16, seed=3)[0]]
    other = [yb for _, yb in loaders(train, test, 16, seed=4)[0]]
    assert [len(b) for b in order] == [16] * 6 + [4]
    assert all(torch.equal(a, b) for a, b in zip(order, again))
    assert not all(torch.equal(a, b) for a, b in zip(order, other))
    assert not torch.equal(torch.cat(order), train.tensors[1])  # shuffled
    assert torch.equal(torch.sort(torch.cat(order)).values, torch.sort(train.tensors[1]).values)
    test_labels = torch.cat([yb for _, yb in loaders(train, test, 16, seed=3)[1]])
    assert torch.equal(test_labels, test.tensors[1])
    unshuffled = torch.cat([yb for _, yb in loaders(train, test, 16, shuffle=False)[0]])
    assert torch.equal(unshuffled, train.tensors[1])


def test_loaders_reject_a_bad_batch_size():
    train, test = synthetic(10, 10)
    with pytest.raises(DataError, match="batch_size=0"):
        loaders(train, test, 0)


# --- CIFAR-10 reader ------------------------------------------------------------------------------------------
SIZES = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 2, "data_batch_4": 1, "data_batch_5": 2,
         "test_batch": 3}


def pixel(index: int, channel: int, row: int, col: int) -> int:
    """The fixture's uint8 value at (image, channel, row, col): distinct enough to catch a layout mix-up."""
    return (index * 11 + channel * 7 + row * 3 + col) % 256


def fixture_batch(offset: int, size: int) -> dict:
    """A batch in the CIFAR-10 python format: rows are R (32x32 row-major), then G, then B."""
    data = np.zeros((size, 3072), dtype=np.uint8)
    for i in range(size):
        for c in range(3):
            for r in range(32):
                data[i, c * 1024 + r * 32: c * 1024 + r * 32 + 32] = [pixel(offset + i, c, r, w) for w in range(32)]
    labels = [(offset + i) % 10 for i in range(size)]
    return {b"batch_label": b"fixture", b"data": data, b"labels": labels,
            b"filenames": [b"img%d.png" % (offset + i) for i in range(size)]}


def write_fixture(root: Path, python2_names: bool = False) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    offset = 0
    for name, size in SIZES.items():
        blob = pickle.dumps(fixture_batch(offset, size), protocol=2)
        if python2_names:  # the real files were written by Python 2 and numpy 1
            blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (folder / name).write_bytes(blob)
        offset += size
    return folder


@pytest.mark.parametrize("python2_names", [False, True])
def test_reads_the_standard_format(tmp_path, python2_names):
    folder = write_fixture(tmp_path, python2_names)
    train, test = load_cifar10(folder)
    x, y = train.tensors
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [i % 10 for i in range(10)]  # data_batch_1 .. 5 in order
    assert test.tensors[0].shape == (3, 3, 32, 32) and test.tensors[1].tolist() == [0, 1, 2]
    for index, channel, row, col in [(0, 0, 0, 0), (4, 1, 5, 9), (9, 2, 31, 30)]:
        expected = (pixel(index, channel, row, col) / 255 - CIFAR10_MEAN[channel]) / CIFAR10_STD[channel]
        assert x[index, channel, row, col].item() == pytest.approx(expected, abs=1e-5)
    expected = (pixel(11, 2, 7, 8) / 255 - CIFAR10_MEAN[2]) / CIFAR10_STD[2]
    assert test.tensors[0][1, 2, 7, 8].item() == pytest.approx(expected, abs=1e-5)


def test_accepts_the_parent_folder(tmp_path):
    write_fixture(tmp_path)
    train, _ = load_cifar10(str(tmp_path))
    assert len(train) == 10


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as caught:
        load_cifar10(tmp_path / "nowhere")
    message = str(caught.value)
    assert isinstance(caught.value, GradscopeError)
    assert str(tmp_path / "nowhere") in message and "data_batch_1" in message and "test_batch" in message


def test_missing_file_is_named(tmp_path):
    folder = write_fixture(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing in .*: data_batch_4$"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("content, word", [
    (b"not a pickle", "data_batch_2"),
    (pickle.dumps({b"labels": [0]}, protocol=2), "b'data'"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2), "uint8"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2), "(N, 3072)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2), "0..9"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2), "2 integers"),
    # fuzzed files: a byte string longer than any index (OverflowError), one of 16 TiB (MemoryError)
    (b"\x80\x04\x8e" + (2 ** 63 - 1).to_bytes(8, "little") + b"x", "OverflowError|too large"),
    (b"\x80\x04\x8e" + (2 ** 44).to_bytes(8, "little") + b"x", "MemoryError"),
])
def test_malformed_batch_is_named(tmp_path, content, word):
    folder = write_fixture(tmp_path)
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_cifar10(folder)
    assert "data_batch_2" in str(caught.value) and re.search(word, str(caught.value)), str(caught.value)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_refuses_to_run_code_from_a_pickle(tmp_path):
    folder = write_fixture(tmp_path)
    _Payload.target = str(tmp_path / "pwned")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}))
    with pytest.raises(DataError, match="refusing"):
        load_cifar10(folder)
    assert not (tmp_path / "pwned").exists()
