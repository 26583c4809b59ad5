"""The benchmark scripts still run and measure what they say (no timing is asserted: machines are noisy)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gradscope.models import build

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def overhead(monkeypatch):
    module = _load("overhead")
    monkeypatch.setattr(module, "make_model", lambda name: build("mlp", depth=3, width=16, bn=True, seed=0))
    g = torch.Generator().manual_seed(0)
    small = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    monkeypatch.setattr(module, "batch_for", lambda name: small)
    return module


def test_overhead_times_every_configuration_and_every10_records_one_step_in_ten(overhead, monkeypatch, one_thread):
    configs = ["baseline", "floor", "every1", "every10", "naive"]
    times = overhead.time_model("mlp50-bn", repeats=2, steps_per_repeat=10, configs=configs)
    assert set(times) == set(configs) and all(len(v) == 2 and min(v) > 0 for v in times.values())
    ratios = overhead.ratios(times)
    assert ratios["baseline"]["median"] == 1.0 and ratios["every1"]["step_ms"] > 0

    recorded = []
    real = overhead.instrument

    def spy(config, model, opt, step=0):
        scope = real(config, model, opt, step)
        if config == "every10":
            recorded.append(scope.recording)
        return scope

    monkeypatch.setattr(overhead, "instrument", spy)
    overhead.time_model("mlp50-bn", repeats=2, steps_per_repeat=10, configs=["baseline", "every10"])
    assert len(recorded) == 21 and sum(recorded) == 3  # warm-up step 0, then steps 10 and 20


def test_floor_reads_every_block_output_gradient_and_parameter_gradient(overhead, one_thread):
    model = build("mlp", depth=3, width=16, bn=True, seed=0)
    floor = overhead.Floor(model)
    x, y = overhead.batch_for("mlp50-bn")
    torch.nn.functional.cross_entropy(model(x), y).backward()
    blocks = len(floor.handles)
    assert len(floor.kept) == 3 * blocks  # mean + norm per output, a norm per output gradient
    floor.step()
    assert floor.kept == []
    floor.detach()
    assert all(not m._forward_hooks for m in model.modules())


def test_gpu_check_compares_frames_and_flags_a_difference(one_thread):
    gpu_check = _load("gpu_check")
    frame, errors, reads, syncs = gpu_check.recorded_frame("cpu", check_sync=False)
    assert errors == [] and reads == ["tolist"] and syncs == 1  # parameter norms: one transfer at scope.step()
    assert gpu_check.compare(frame, frame.copy(), 1e-3) == []
    changed = frame.copy()
    changed.loc[3, "value"] *= 1.01
    problems = gpu_check.compare(changed, frame, 1e-3)
    assert len(problems) == 1 and frame.loc[3, "metric"] in problems[0]


def test_gpu_check_counts_one_read_back_per_compiled_recorded_step(one_thread):
    """The dry run of gpu_check's compiled case: every measurement of the checked step comes back in one transfer
    (the count a GPU run takes from set_sync_debug_mode), and the values equal the eager CPU run's."""
    gpu_check = _load("gpu_check")
    frame, errors, reads, syncs = gpu_check.recorded_frame("cpu", False, "encoder", "aot_eager")
    assert errors == [] and reads == ["tolist"] and syncs == 1
    eager, _, _, _ = gpu_check.recorded_frame("cpu", False, "encoder", None)
    assert len(frame) == len(eager) > 0 and gpu_check.compare(frame, eager, 1e-4) == []


def test_compile_overhead_times_compiled_twins_and_counts_graphs(monkeypatch, one_thread):
    bench = _load("compile_overhead")
    model = build("mlp", depth=3, width=16, bn=True, seed=0)
    g = torch.Generator().manual_seed(0)
    small = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    monkeypatch.setattr(bench, "make_model", lambda name: (model, small, loss, "auto"))
    r = bench.time_model("mlp", "aot_eager", repeats=1, steps=10)
    assert r["baseline"]["median"] == 1.0 and r["every1"]["step_ms"] > 0 and r["recompile_limit_hits"] == 0
    # each instrumented twin: no graph break; every1 one graph, every10 its recorded and unrecorded variants
    assert [r[c]["graph_breaks"] for c in bench.CONFIGS] == [0, 0, 0]
    assert [r[c]["graphs"] for c in bench.CONFIGS] == [1, 1, 2]


def test_streaming_memory_records_every_step_and_fits_a_slope(one_thread):
    module = _load("streaming_memory")
    assert module.slope_per_1000([(0, 10.0), (1000, 23.0), (2000, 36.0)]) == pytest.approx(13.0)
    points, after, rows = module.run(steps=30, report=10, flush_every=5)
    assert [s for s, _ in points] == [10, 20, 30] and all(mb > 0 for _, mb in points) and after > 0
    from gradscope import schema as S
    # per block: the default metrics less those that need optimizer= (not passed here) and the per-step batch_size
    per_block = len(S.DEFAULT_METRICS) - len(S.OPTIMIZER_METRICS) - len(S.BATCH_METRICS)
    # the first block's input does not require grad (no grad_in_norm); batch_size is one row per step
    assert rows == 30 * (20 * per_block - 1 + len(S.BATCH_METRICS))


def test_study_layout_times_twins_that_compute_the_same_step(one_thread):
    """benchmarks/study_layout.py: the twins start from the same weights in two layouts, give the same loss, and a
    short comparison returns positive medians and their ratio."""
    bench = _load("study_layout")
    contiguous, last = bench.twins("resnet20")
    conv = next(m for m in last.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.randn(4, 3, 16, 16)
    a, b = contiguous(x), last(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    slow, fast, ratio = bench.compare("plain20", steps=2, warmup=1, batch=4)
    assert slow > 0 and fast > 0 and abs(ratio - fast / slow) < 1e-12
