"""The benchmark scripts still run and measure what they say (no timing is asserted: machines are noisy)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope.models import build

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
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


def test_overhead_interval_over_repeats_is_students_t_on_log_ratios(overhead):
    import math
    lo, hi = overhead.repeat_interval([1.0, math.exp(0.1), math.exp(0.2)])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), by hand
    assert lo == pytest.approx(math.exp(0.1 - half), rel=1e-4) and hi == pytest.approx(math.exp(0.1 + half), rel=1e-4)
    assert overhead.repeat_interval([1.03, 1.03, 1.03]) == pytest.approx((1.03, 1.03))
    assert overhead.repeat_interval([1.0, 1.1]) is None
    assert overhead.ratios({"baseline": [1.0, 1.0, 1.0], "x": [1.0, 1.1, 1.2]})["x"]["interval"][0] < 1.1


def test_overhead_judges_a_target_met_only_when_the_whole_interval_is_below_it(overhead, capsys):
    """A target inside the interval is unresolved (the run cannot tell), above it met, below it not met; without
    three repeats there is no interval and no verdict."""
    assert overhead.judge({"interval": (1.001, 1.015)}, 1.02) == "met"
    assert overhead.judge({"interval": (1.021, 1.05)}, 1.02) == "not met"
    assert overhead.judge({"interval": (1.01, 1.03)}, 1.02).startswith("unresolved (x1.02 lies in")
    assert overhead.judge({"interval": None}, 1.02).startswith("unresolved (fewer than 3 repeats")
    ratio = {"rotations": 1.3, "median": 1.2, "interval": (1.25, 1.35)}
    overhead.print_targets("mlp50-bn", {"every10": {**ratio, "rotations": None, "median": 1.05}},
                           {"every1": ratio})
    out = capsys.readouterr().out.splitlines()
    assert out == ["  target: every step / floor at most x1.10: x1.300, not met",
                   "  target: every 10th step at most x1.01: x1.050, not met"]


def test_overhead_times_every_configuration_and_every10_records_one_step_in_ten(overhead, one_thread):
    configs = ["baseline", "baseline2", "floor", "every1", "every1-noupd", "every10", "naive"]
    last = {}
    times = overhead.time_model("mlp50-bn", repeats=2, steps_per_repeat=10, configs=configs, last=last)
    assert set(times) == set(configs) and all(len(v) == 2 and min(v) > 0 for v in times.values())
    ratios = overhead.ratios(times)
    assert ratios["baseline"]["median"] == 1.0 and ratios["every1"]["step_ms"] > 0
    assert overhead.ratios(times, against="floor")["floor"]["median"] == 1.0
    assert ratios["every1"]["rotations"] is None  # 2 repeats of 7 configs: no whole rotation
    whole = overhead.ratios({"baseline": [1.0, 2.0, 9.0], "every1": [2.0, 2.0, 1.0]})
    # 2 configs: the first 2 repeats are a whole rotation, the third is left out of it
    assert whole["every1"]["rotations"] == 4.0 / 3.0 and whole["every1"]["median"] == 1.0
    # the last repeat's scopes: every10 recorded its untimed first step and one of the ten timed ones
    assert sorted(last["every10"].frame().step.unique()) == [0, 10]
    every1 = last["every1"].frame()
    assert sorted(every1.step.unique()) == list(range(11)) and "update_ratio" in set(every1.metric)
    assert "update_ratio" not in set(last["every1-noupd"].frame().metric)


def test_twins_do_the_same_arithmetic(overhead, one_thread):
    twins = overhead.make_twins("mlp50-bn", 3)
    x, y = overhead.batch_for("mlp50-bn")
    for model, opt in twins:
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    first = list(twins[0][0].parameters())
    assert all(torch.equal(a, b) for model, _ in twins[1:] for a, b in zip(first, model.parameters()))


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
    assert bench.target_lines("mlp", r) == []  # issue 23 sets no target for it
    lines = bench.target_lines("resnet20", r)  # one repeat: no interval, so no verdict on the ratios
    assert len(lines) == 3 and all("unresolved (fewer than 3 repeats" in line for line in lines[:2])
    assert lines[2] == "  target: no graph break: 0, met"
    r["every10"]["graph_breaks"] = 2
    assert bench.target_lines("encoder", r)[2] == "  target: no graph break: 2, not met"


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


def test_gpu_check_runs_the_recipe_on_generated_cifar_and_prints_a_summary(one_thread):
    """The CPU dry run of check 4: ResNet-20 through train_run (the function --recipe uses) on a generated
    CIFAR-format folder, float32 and bf16 + channels-last, a few iterations of a small batch."""
    gpu_check = _load("gpu_check")
    rows = gpu_check.recipe_checks("cpu", iterations=4, batch_size=16, n_train=160, n_test=60)
    assert [name for name, _, _ in rows] == ["recipe resnet20 float32", "recipe resnet20 bf16 + channels-last"]
    assert all(ok for _, ok, _ in rows) and all("it/s over 4 iterations" in detail for _, _, detail in rows)
    from gradscope.study.recipe import HE2016

    data = gpu_check.recipe_data(160, 60, n_val=30, recipe=HE2016)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (130, 30, 60)
    r = gpu_check.check_recipe("cpu", 5, False, False, data, batch_size=16, warmup=1, window=3)
    assert r["iterations"] == 5 and r["finished"] and r["finite"] and r["per_second"] > 0
    assert 0 <= r["train_error"] <= 1 and 0 <= r["test_error"] <= 1
    lines = gpu_check.summary(rows + [("sync", False, "2 (target 1)")], 12.0)
    assert lines[0] == "summary (12 s):" and "FAIL" in lines[-2] and lines[-1].endswith("1 FAILED")


def test_a_run_that_diverges_fails_the_recipe_check(monkeypatch, one_thread):
    """A non-finite loss stops a recipe run early: the check says FAIL (and why), it does not just report a speed."""
    gpu_check = _load("gpu_check")
    from gradscope.study.recipe import HE2016

    data = gpu_check.recipe_data(160, 60, n_val=30, recipe=HE2016)
    data.train_x[:] = float("nan")
    r = gpu_check.check_recipe("cpu", 3, False, False, data, batch_size=16, warmup=0)
    assert not r["finite"] and r["iterations"] == 1 and not r["finished"]
    monkeypatch.setattr(gpu_check, "recipe_data", lambda *args, **kwargs: data)
    rows = gpu_check.recipe_checks("cpu", iterations=3, batch_size=16, n_train=160, n_test=60)
    assert [ok for _, ok, _ in rows] == [False, False] and all("losses finite: False" in d for _, _, d in rows)


def test_recipe_cost_arithmetic_by_hand():
    speed = _load("recipe_speed")
    from gradscope.study.recipe import HE2016, HE2016_SHORT, Recipe

    assert speed.evaluations(HE2016) == 64 and speed.evaluated_images(HE2016) == 15_000
    # he2016-short evaluates every 250 iterations, the last time at iteration 4000
    assert HE2016_SHORT.eval_every == 250 and speed.evaluations(HE2016_SHORT) == 16
    # the interval the shortening alone gives: round(1000 * 4000 / 64000) = 62, 64 times, then at iteration 4000
    assert speed.evaluations(HE2016.shortened(4_000)) == 65
    # (2 init passes + 64,000 iterations) x 50 ms + 64 evaluations x 15,000 images x 0.1 ms
    assert speed.run_seconds(HE2016, 0.05, 1e-4) == pytest.approx(64_002 * 0.05 + 64 * 15_000 * 1e-4)
    assert speed.run_seconds(HE2016, 0.05, 1e-4) == pytest.approx(3296.1)
    # the line through (20, 1.0) and (110, 5.5): 0.05 s per layer, no intercept; plain20 takes resnet20's figure
    filled = speed.fill_by_depth(["resnet20", "plain20", "resnet56", "resnet110"], {"resnet20": 1.0, "resnet110": 5.5})
    assert filled == {"resnet20": (1.0, True), "plain20": (1.0, False), "resnet56": (pytest.approx(2.8), False),
                      "resnet110": (5.5, True)}
    assert speed.fill_by_depth(["resnet110"], {"resnet20": 2.0}) == {"resnet110": (pytest.approx(11.0), False)}
    with pytest.raises(ValueError):
        speed.fill_by_depth(["resnet20"], {})
    # 3 seeds of two nets over a 1,000-iteration recipe evaluating every 500 on 5k + 10k images
    small = Recipe(name="small", iterations=1_000, milestones=(500,), eval_every=500)
    hours = speed.study_hours(small, ["resnet20", "resnet110"], 3, {"resnet20": 0.02, "resnet110": 0.1},
                              {"resnet20": 1e-5, "resnet110": 5e-5}, init_batches=0)
    by_hand = 3 * ((1_000 * 0.02 + 2 * 15_000 * 1e-5) + (1_000 * 0.1 + 2 * 15_000 * 5e-5)) / 3600
    assert hours == pytest.approx(by_hand) and by_hand == pytest.approx(3 * (20.3 + 101.5) / 3600)
    lines = speed.cost_lines([speed.Timing("resnet20", 0.02, 1e-5, 4, True),
                              speed.Timing("resnet110", 0.1, 5e-5, 4, True)], seeds=5, unit="GPU-hours")
    assert any(line.strip().startswith("~ resnet56:") for line in lines)  # estimated, marked
    assert sum("all 9 nets x 5 seeds" in line for line in lines) == 2  # the full recipe and the short one


def test_the_short_recipe_column_of_the_cost_table_is_its_arithmetic():
    """docs/recipe.md's he2016-short column, rebuilt from the same row's seconds per iteration and milliseconds per
    evaluated image (one figure was off by 0.1 h when the column was first recomputed by hand)."""
    import re

    speed = _load("recipe_speed")
    from gradscope.study.recipe import HE2016_SHORT

    rows = re.findall(r"^\| ResNet-(\d+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ CPU-hours \| ([\d.]+) CPU-hours \|$",
                      (BENCHMARKS.parent / "docs" / "recipe.md").read_text(), flags=re.M)
    assert [r[0] for r in rows] == ["20", "56", "110"]
    for _, per_iteration, ms_per_image, hours in rows:
        seconds = speed.run_seconds(HE2016_SHORT, float(per_iteration), float(ms_per_image) / 1e3)
        assert float(hours) == round(seconds / 3600, 1)


def test_recipe_speed_times_an_iteration_and_an_evaluation(one_thread):
    speed = _load("recipe_speed")
    t = speed.measure("resnet20", iterations=2, device="cpu", warmup=1, eval_images=8, batch_size=8)
    assert t.model == "resnet20" and t.iterations == 2 and t.finite
    assert t.per_iteration > 0 and t.per_image > 0


def test_gpu_check_keeps_going_past_a_broken_check_and_skips_what_the_budget_does_not_allow(capsys):
    """On a lent GPU the check runs once: an exception in one check becomes a FAIL row, and past the deadline a
    check is skipped, so the summary table always prints."""
    import math
    import time

    gpu_check = _load("gpu_check")

    def broken():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    rows = gpu_check.guarded("resnet20 inductor", math.inf, False, broken)
    assert rows == [("resnet20 inductor", False, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")]
    assert gpu_check.guarded("late", time.perf_counter() - 1, False, broken)[0][1] is None
    fine = gpu_check.guarded("fine", math.inf, False, lambda: [("fine", True, "1 (target 1)")])
    lines = gpu_check.summary(rows + [("late", None, "skipped")] + fine, 3.0)
    assert [line.split()[-1] for line in lines[2:5]] == ["GiB", "skipped", "1)"]
    assert "skip" in lines[3] and lines[-1] == "  1 of 3 checks passed; 1 FAILED; 1 skipped"
    assert "FAIL resnet20 inductor: RuntimeError" in capsys.readouterr().out


def test_recipe_verdict_judges_learning_only_in_runs_long_enough():
    gpu_check = _load("gpu_check")
    ran = {"finite": True, "finished": True, "iterations": 300, "train_error": 0.05}
    assert gpu_check.recipe_verdict(ran, 300) == (True, "yes")
    assert gpu_check.recipe_verdict({**ran, "train_error": 0.45}, 300)[0] is False  # bf16 broke the learning
    assert gpu_check.recipe_verdict({**ran, "train_error": float("nan")}, 300)[0] is False
    assert gpu_check.recipe_verdict({**ran, "finite": False}, 300)[0] is False
    assert gpu_check.recipe_verdict({**ran, "iterations": 299}, 300)[0] is False  # stopped early
    short = {**ran, "iterations": 4, "train_error": 0.85}
    assert gpu_check.recipe_verdict(short, 4) == (True, "not judged (under 150 iterations)")


def test_gpu_check_main_dry_run_prints_every_check_in_its_summary(monkeypatch, capsys, one_thread):
    """``python benchmarks/gpu_check.py --device cpu`` wired end to end (the ResNet-56 overhead timing replaced by
    a stand-in, the recipe runs shortened): every check gets a summary row and the exit status is 0."""
    gpu_check = _load("gpu_check")
    monkeypatch.setattr(gpu_check, "overhead", lambda device, steps: {"every1": 1.01, "every10": 1.0,
                                                                       "baseline_ms": 5.0})
    status = gpu_check.main(["--device", "cpu", "--no-compile", "--recipe-iterations", "3", "--recipe-batch", "8"])
    out = capsys.readouterr().out
    table = out[out.index("summary ("):].splitlines()
    names = ["resnet20 eager: no sync in hooks", "resnet20 eager: host syncs per recorded step",
             "resnet20 eager: same values as CPU", "resnet56 overhead", "recipe resnet20 float32",
             "recipe resnet20 bf16 + channels-last"]
    assert status == 0 and all(any(line.strip().startswith(n) for line in table) for n in names)
    assert table[-1] == "  6 of 6 checks passed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the session script runs the real checks")
def test_gpu_session_script_saves_its_logs_and_says_why_without_a_gpu(tmp_path):
    import os
    import subprocess

    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=300)
    assert done.returncode == 2  # gpu_check's status: no CUDA device
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.txt", "recipe_speed.txt", "nvidia-smi.txt"}
    assert "no CUDA device" in (tmp_path / "gpu_check.txt").read_text()
    assert "no CUDA device" in (tmp_path / "recipe_speed.txt").read_text()


def test_step_parts_times_four_parts_and_its_stubs_replace_only_the_reductions(overhead, one_thread):
    parts_mod = _load("step_parts")
    parts_mod.install_stubs()
    try:
        parts = parts_mod.measure(overhead, "mlp50-bn", ["baseline", "every1", "stub-forward", "stub-both"],
                                  repeats=2, steps=3)
        assert all(len(p) == 4 and all(len(v) == 6 for v in p) for p in parts.values())
        assert parts_mod.STUB == {"forward": False, "grad": False}  # the flags are off between twins' steps
        model = build("mlp", depth=3, width=16, bn=True, seed=0)
        x, y = overhead.batch_for("mlp50-bn")
        scope = gradscope.attach(model)
        parts_mod.STUB["forward"] = True
        torch.nn.functional.cross_entropy(model(x), y).backward()
        parts_mod.STUB["forward"] = False
        scope.step()
        frame = scope.frame()
        assert set(frame[frame.metric == "act_mean"].value) == {0.0}  # stubbed: a constant, not a measurement
        assert (frame[frame.metric == "grad_norm"].value > 0).all()  # the gradient norms were real
        scope.detach()
    finally:
        from gradscope.engine import gradwatch, probes
        probes.activation_sums, gradwatch.squared_norm = parts_mod._real_sums, parts_mod._real_norm


def test_peak_rss_of_a_child_does_not_carry_the_parents_peak(overhead):
    """getrusage's ru_maxrss keeps the parent's peak across fork and exec on Linux; the benchmark's children read
    VmHWM, which starts afresh."""
    import subprocess

    big = torch.ones(400 * 2**20 // 4)  # the parent's peak: >= 400 MiB resident
    code = (f"import importlib.util as u; s = u.spec_from_file_location('o', {str(BENCHMARKS / 'overhead.py')!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.peak_rss_kib())")
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert big.sum().item() > 0 and 0 < child < 390 * 1024


def test_compile_ablation_variants_each_drop_exactly_their_metric_group():
    from gradscope import schema as S

    variants = _load("compile_ablation").variants()
    assert variants["full"] == S.DEFAULT_METRICS
    assert set(S.DEFAULT_METRICS) - set(variants["no_grads"]) == {S.GRAD_NORM, S.GRAD_IN_NORM}
    assert set(S.DEFAULT_METRICS) - set(variants["no_forward"]) == set(S.FORWARD_METRICS) & set(S.DEFAULT_METRICS)


def test_reductions_candidates_count_the_same_zeros_and_are_timed_both_ways(one_thread):
    red = _load("reductions")
    x = torch.tensor([0.0, -0.0, 1e-42, 2.0, -3.0, 0.0, 5.0])  # a denormal is not a zero, -0.0 is
    assert {name: fn(x) for name, fn in red.CANDIDATES.items()} == {name: 4.0 for name in red.CANDIDATES}
    block, inp = red.blocks()["MLP block, 64x256"]
    with torch.no_grad():
        y = block.eval()(inp).reshape(-1)
    situ, loop = red.after_block(block, inp, reps=3), red.in_loop(y, reps=3)
    assert set(situ) == set(loop) == set(red.CANDIDATES) | set(red.REFERENCES) and all(v > 0 for v in loop.values())
    long = torch.relu(torch.randn(8 * 255 * 3 + 13))  # whole blocks of 255 words and a tail
    long[:8 * 255] = 1.0  # every lane of the first block at 255, the most a byte holds
    assert red.byte_lanes(long) == float((long != 0).sum())


def test_profile_walltime_takes_turns_with_another_revision_and_compares_answers(capsys):
    """Two tiny studies, HEAD in a temporary git worktree and this checkout, each in its own process: every run
    prints its CPU-seconds and claims, the medians close with a ratio, and the worktree is removed again."""
    import subprocess

    bench = _load("profile_walltime")
    root = BENCHMARKS.parent
    before = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    bench.main(["--against", "HEAD", "--", "--models", "plain20", "--seeds", "0", "--steps", "2",
                "--init-batches", "1", "--train-size", "64", "--format", "records", "--bn", "on"])
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if " CPU-s (about " in line]
    assert [line.split(":")[0].strip() for line in runs] == ["HEAD", "this"]
    assert all("claims: bn_forward " in line and "degradation " in line for line in runs)
    assert "answers the same in every run" in out and "CPU-s ratio this / HEAD: x" in out
    after = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == before


def test_profile_walltime_prints_each_claim_with_its_interval():
    bench = _load("profile_walltime")
    summary = {"claims": [{"key": "bn_forward", "answer": "yes", "estimate": None},
                          {"key": "degradation", "answer": "yes", "estimate": 1.2409, "low": 0.7642, "high": 1.7176}]}
    assert bench.claims_line(summary) == "bn_forward yes, degradation yes +1.24 [+0.76, +1.72]"
    assert bench.claims_line({}) == "(no claims)"


def test_alert_rules_benchmark_counts_false_alarms_and_faults():
    """benchmarks/alert_rules.py: a healthy series' alerts are counted per seed, the four isolated faults fire, and
    the cost figures are positive (no timing asserted)."""
    module = _load("alert_rules")
    from gradscope.engine import alerts

    counts = module.false_alarms(alerts, steps=300, seeds=2)
    assert set(counts) >= {"loss: exponential (batch 1)", "grad_norm: log-normal sd 0.3"}
    assert all(isinstance(c, int) and c >= 0 for c in counts.values())
    found = module.faults(alerts)
    assert found["four 30x losses at 100, 150, 200, 250"] == [100, 150, 200, 250]
    assert module.cost(alerts, repeats=1) > 0 and module.told_cost(5, steps=5) > 0
