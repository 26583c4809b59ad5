"""The recipe's GPU path (``--amp``, ``--channels-last``), checked on the CPU where it can be: bfloat16 autocast,
channels-last training and evaluation, one read-back per iteration, and nothing CUDA-only on the way."""
from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gradscope.data import read_cifar10_pixels
from gradscope.errors import GradscopeError
from gradscope.models import build
from gradscope.pipeline.options import Options
from gradscope.study import recipe as R
from gradscope.study.recipe_train import mixed_precision, train_run
from tests.fixtures.cifar_folder import write_cifar

TINY = R.Recipe(name="tiny", iterations=3, milestones=(2,), batch_size=16, train_images=128, eval_every=100,
                record_every=100)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train_x, train_y, test_x, test_y = read_cifar10_pixels(write_cifar(tmp_path_factory.mktemp("cifar")))
    return R.prepare(train_x, train_y, test_x, test_y, TINY)


def test_amp_on_the_cpu_runs_the_forward_in_bfloat16_and_keeps_the_first_loss(data, one_thread):
    with mixed_precision(torch.device("cpu"), True):
        assert torch.nn.Conv2d(3, 4, 3)(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16
    plain = train_run("resnet20", TINY, data, seed=0)
    amp = train_run("resnet20", TINY, data, seed=0, amp=True)
    first, first_amp = plain.losses["loss"].iloc[0], amp.losses["loss"].iloc[0]
    # the same weights and batch: bfloat16 (8 significant bits) moves the loss a little, not more
    assert first_amp != first and first_amp == pytest.approx(first, rel=3e-2)
    assert amp.losses["loss"].map(math.isfinite).all() and amp.config["finished"] is True
    values = amp.frame["value"].to_numpy()
    assert amp.frame["value"].dtype == "float64" and len(values) and all(map(math.isfinite, values))


def test_amp_on_a_device_without_bfloat16_autocast_is_refused_with_the_fix():
    with pytest.raises(GradscopeError, match="--amp.*'meta'.*without --amp"):
        mixed_precision(torch.device("meta"), True)
    assert isinstance(mixed_precision(torch.device("meta"), False), type(mixed_precision(torch.device("cpu"),
                                                                                          False)))


def test_cudnn_picks_its_fastest_algorithms_on_cuda_only_and_the_setting_comes_back(data, one_thread, monkeypatch):
    """``torch.backends.cudnn.benchmark`` can be set without a GPU: on a CUDA device the recipe turns it on, on any
    other it leaves it alone, and a run restores it however it ends (here interrupted at its second iteration)."""
    from gradscope.study import recipe_train

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert recipe_train.cudnn_autotune(torch.device("cpu")) is None and torch.backends.cudnn.benchmark is False
    assert recipe_train.cudnn_autotune(torch.device("cuda", 0)) is False and torch.backends.cudnn.benchmark is True
    torch.backends.cudnn.benchmark = False
    during = []
    real = recipe_train.cudnn_autotune
    monkeypatch.setattr(recipe_train, "cudnn_autotune", lambda device: real(torch.device("cuda")))  # as on a GPU

    def stop(iteration):
        during.append(torch.backends.cudnn.benchmark)
        if iteration == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run("resnet20", TINY, data, seed=0, on_iteration=stop)
    assert during == [True, True] and torch.backends.cudnn.benchmark is False


class _Formats:
    """Records, for every convolution called, whether its input and weight are channels-last."""

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, module, args):
        if isinstance(module, torch.nn.Conv2d):
            self.seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                              module.weight.is_contiguous(memory_format=torch.channels_last)))


def test_channels_last_trains_in_that_format_with_the_contiguous_numbers(data, one_thread):
    formats = _Formats()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(formats)
    try:
        last = train_run("resnet20", TINY, data, seed=0, channels_last=True)
    finally:
        handle.remove()
    assert formats.seen and all(x and w for x, w in formats.seen)  # training forwards and the evaluation's
    plain = train_run("resnet20", TINY, data, seed=0)
    assert last.losses["loss"].iloc[0] == pytest.approx(plain.losses["loss"].iloc[0], rel=1e-4)
    assert last.losses["loss"].tolist() == pytest.approx(plain.losses["loss"].tolist(), rel=1e-3)
    assert last.losses["test_error"].iloc[-1] == pytest.approx(plain.losses["test_error"].iloc[-1], abs=1 / 60)
    first = lambda run: run.frame[run.frame["phase"] == "init"].set_index(["step", "block", "metric", "call"])  # noqa
    a, b = first(last)["value"], first(plain)["value"]
    # the signals at initialisation agree to 0.5% (convolutions sum in another order; gradient norms differ most)
    assert len(a) == len(b) > 0 and (a - b.loc[a.index]).abs().le(5e-3 * b.loc[a.index].abs() + 1e-6).all()


def test_error_rate_counts_like_a_loop_in_either_memory_format(data, one_thread):
    net = build("resnet20", seed=0)
    x, y = data.test_x[:50], data.test_y[:50]
    net.eval()
    with torch.no_grad():
        expected = sum(int(net(x[i:i + 1]).argmax(1).item() != y[i].item()) for i in range(len(x))) / len(x)
    net.train()
    assert R.error_rate(net, x, y, torch.device("cpu"), batch_size=16) == pytest.approx(expected)
    last = build("resnet20", seed=0).to(memory_format=torch.channels_last)
    assert R.error_rate(last, x, y, torch.device("cpu"), batch_size=16, channels_last=True) == pytest.approx(expected)
    assert net.training  # the mode is given back


class _Reads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host (each a synchronisation on a GPU)."""

    NAMES = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"}

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_an_iteration_that_neither_records_nor_evaluates_reads_back_once(data, one_thread):
    recipe = R.Recipe(name="tiny", iterations=6, milestones=(3,), batch_size=16, train_images=128, eval_every=100,
                      record_every=100)
    marks = []
    with _Reads() as reads:
        train_run("resnet20", recipe, data, seed=0, amp=True, channels_last=True,
                  on_iteration=lambda i: marks.append(len(reads.calls)))
    # iteration 0 is recorded and the last (5) evaluates; iterations 1..4 read the loss and batch error in one go
    between = [reads.calls[a:b] for a, b in zip(marks, marks[1:])]
    assert between[:4] == [["tolist"]] * 4
    assert between[4] == ["tolist", "__int__", "__int__"]  # the last: one read per evaluation (validation, test)


def test_no_cuda_only_call_is_made_on_the_cpu(data, monkeypatch, one_thread):
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA-only call on the CPU path")

    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", refuse)
    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    monkeypatch.setattr(torch.amp, "GradScaler", refuse)
    monkeypatch.setattr(torch.cuda, "current_stream", refuse)
    run = train_run("resnet20", TINY, data, seed=0, amp=True, channels_last=True)
    assert run.config["finished"] is True and len(run.losses) == TINY.iterations


def test_amp_without_a_recipe_is_refused():
    with pytest.raises(GradscopeError, match="--amp applies to --recipe"):
        Options.of({"amp": True})


def test_profile_hands_amp_and_channels_last_to_the_recipe_run(tmp_path, monkeypatch, one_thread):
    """``gradscope.profile(recipe=..., amp=True, channels_last=True)`` (what ``--amp --channels-last`` call) trains
    with both: the flags reach ``train_run`` and the study finishes on a generated CIFAR folder."""
    import gradscope
    from gradscope.study import recipe_train

    seen = []
    real = recipe_train.train_run

    def spy(*args, **kwargs):
        seen.append((kwargs["amp"], kwargs["channels_last"], kwargs["device"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe_train, "train_run", spy)
    results = gradscope.profile(recipe="he2016-short", iterations=3, models=["resnet20"], seeds=[0], device="cpu",
                                data=str(write_cifar(tmp_path)), amp=True, channels_last=True, workers=1)
    assert seen == [(True, True, "cpu")]
    assert not results.interrupted and list(results.configs) == ["resnet20-bn-s0"]
