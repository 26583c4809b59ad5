"""Sinks: every recorded row reaches each sink once, at scope.step() on the host, equal to the frame."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope.engine.params import passes_closure

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


class Collect:
    """A sink that keeps what it is given, and whether it was closed."""

    def __init__(self) -> None:
        self.calls: list[pd.DataFrame] = []
        self.closed = 0

    def __call__(self, rows: pd.DataFrame) -> None:
        self.calls.append(rows)

    def close(self) -> None:
        self.closed += 1


def _key(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["step", "block", "call", "metric"]).reset_index(drop=True)


def test_each_row_reaches_the_sink_once_at_step_and_equals_the_frame():
    model, sink = _net(), Collect()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.attach(model, every=2, optimizer=opt, sinks=[sink]) as scope:
        for i, (x, y) in enumerate(_batches(6)):
            nn.functional.cross_entropy(model(x), y).backward()
            before = len(sink.calls)  # after backward, before scope.step(): nothing was sent from a hook
            scope.step()
            assert len(sink.calls) == before + (1 if i % 2 == 0 else 0)
            opt.step()
            opt.zero_grad()
        assert sink.closed == 0
    assert sink.closed == 1
    sent = pd.concat(sink.calls, ignore_index=True)
    assert list(sent.columns) == list(scope.frame().columns)
    pd.testing.assert_frame_equal(_key(sent), _key(scope.frame()))
    assert set(sent.step) == {0, 2, 4}
    # the update of step 4 (optimizer.step() after scope.step()) arrives at detach
    assert set(sink.calls[-1].metric) == {"update_ratio"} and set(sink.calls[-1].step) == {4}


class Flaky(Collect):
    """A tracker whose server fails at some calls (ConnectionError), keeping what it was given otherwise."""

    def __init__(self, failing: set) -> None:
        super().__init__()
        self.failing, self.n = failing, 0

    def __call__(self, rows: pd.DataFrame) -> None:
        self.n += 1
        if self.n in self.failing:
            raise ConnectionError("tracker server: 503")
        super().__call__(rows)


def test_a_failing_sink_stops_neither_training_nor_the_other_sinks_and_says_what_it_lost():
    """The third call of one sink raises: scope.step() used to raise it into the training loop, and the second
    sink lost that step's rows. Now both go on, one warning names the sink, its lost step and the error, and a
    summary at detach() counts its further failures; the frame keeps every row."""
    model, flaky, keep = _net(), Flaky({3, 5}), Collect()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning) as caught:
        with gradscope.attach(model, optimizer=opt, sinks=[flaky, keep]) as scope:
            for x, y in _batches(5):
                nn.functional.cross_entropy(model(x), y).backward()
                scope.step()
                opt.step()
                opt.zero_grad()
    messages = [str(w.message) for w in caught if "sink" in str(w.message)]
    assert len(messages) == 2
    assert "sink Flaky raised ConnectionError: tracker server: 503" in messages[0]
    assert "of steps 1-2 are lost to it" in messages[0]  # step 1's late update_ratio and step 2's rows
    assert "raised at 2 of its calls" in messages[1]
    frame = scope.frame()
    pd.testing.assert_frame_equal(_key(pd.concat(keep.calls, ignore_index=True)), _key(frame))
    got = pd.concat(flaky.calls, ignore_index=True)
    # calls 3 (step 1's late update_ratio, step 2) and 5 (step 4) raised; 4 brought step 2's update_ratio, and the
    # call at detach step 4's
    assert set(got[got.step.isin([2, 4])].metric) == {"update_ratio"}
    arrived = lambda f: f[(f.step == 0) | ((f.step == 3) & (f.metric != "update_ratio"))]  # noqa: E731
    pd.testing.assert_frame_equal(_key(arrived(got)), _key(arrived(frame)))
    assert keep.closed == flaky.closed == 1


def test_log_to_adds_a_sink_from_the_next_step_and_a_plain_function_works():
    model, late, seen = _net(), Collect(), []
    with gradscope.attach(model, sinks=seen.append) as scope:
        for i, (x, y) in enumerate(_batches(3)):
            if i == 1:
                assert scope.log_to(late) is scope
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
    assert [sorted(set(c.step)) for c in seen] == [[0], [1], [2]]
    assert [sorted(set(c.step)) for c in late.calls] == [[1], [2]] and late.closed == 1


def test_a_sink_that_is_not_callable_is_refused_before_any_hook():
    model = _net()
    with pytest.raises(gradscope.GradscopeError, match="not callable"):
        gradscope.attach(model, sinks=["runs/tb"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_closure_step_labels_the_update_like_a_plain_loop():
    """optimizer.step(closure) (LBFGS, Lightning) runs forward, backward and scope.step() inside the step."""
    frames = []
    for closure in (False, True):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradscope.attach(model, optimizer=opt) as scope:
            for x, y in _batches(3):
                if closure:
                    def run(x=x, y=y):
                        opt.zero_grad()
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                        scope.step()
                        return loss
                    opt.step(run)
                else:
                    nn.functional.cross_entropy(model(x), y).backward()
                    scope.step()
                    opt.step()
                    opt.zero_grad()
        frames.append(_key(scope.frame()))
    pd.testing.assert_frame_equal(frames[0], frames[1])
    assert sorted(set(frames[1][frames[1].metric == "update_ratio"].step)) == [0, 1, 2]


def test_passes_closure_reads_the_hook_arguments():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    assert not passes_closure(opt, (opt,), {})
    assert passes_closure(opt, (opt, lambda: 0.0), {})
    assert passes_closure(opt, (opt,), {"closure": lambda: 0.0})
    assert not passes_closure(opt, (opt, None), {})


class ClosesBadly(Collect):
    def close(self) -> None:
        super().close()
        raise ConnectionError("503 at close")


def test_a_sink_whose_close_raises_neither_replaces_the_runs_error_nor_fails_a_healthy_run():
    bad, good = ClosesBadly(), Collect()
    model = _net()
    with pytest.raises(ValueError, match="the user's own"):  # before: the sink's ConnectionError came out
        with pytest.warns(RuntimeWarning, match="raised in close"):
            with gradscope.attach(model, sinks=[bad, good]) as scope:
                model(torch.randn(3, 6)).sum().backward()
                scope.step()
                raise ValueError("the user's own training error")
    assert bad.closed == good.closed == 1 and len(good.calls) == 1
    with pytest.warns(RuntimeWarning, match="raised in close"):  # a healthy run: a warning, not an error
        scope = gradscope.attach(model, sinks=[ClosesBadly()])
        model(torch.randn(3, 6)).sum().backward()
        scope.step()
        scope.detach()
