"""Optimizers as loops really hold them: two optimizers, wrapped ones (Lightning's LightningOptimizer), and a
``zero_grad()`` before ``scope.step()``."""
from __future__ import annotations

import copy
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from tests import nets

KEY = ["step", "block", "call", "metric"]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY).reset_index(drop=True)


def _batches(n=3):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _ratio_by_hand(model, step_fn):
    """||theta_after - theta_before|| / ||theta_before|| of every Linear across ``step_fn()``."""
    before = {n: torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    step_fn()
    after = {n: torch.cat([p.detach().reshape(-1) for p in m.parameters()])
             for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n: ((after[n] - before[n]).norm() / before[n].norm()).item() for n in before}


# ---- two optimizers -------------------------------------------------------------------------------------------------
def _two_optimizer_loop(model, give):
    body, head = model[:-1], model[-1]
    opt_body = torch.optim.SGD(body.parameters(), lr=0.1)
    opt_head = torch.optim.Adam(head.parameters(), lr=0.01)
    given = {"both": [opt_body, opt_head], "body": opt_body}[give]
    want = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=given, on_anomaly=None) as scope:
            for x, y in _batches():
                nn.functional.cross_entropy(model(x), y).backward()
                scope.step()
                want.append(_ratio_by_hand(model, lambda: (opt_body.step(), opt_head.step())))
                opt_body.zero_grad()
                opt_head.zero_grad()
    return scope, want, [str(w.message) for w in caught]


def test_two_optimizers_each_block_updated_by_its_own():
    torch.manual_seed(0)
    scope, want, messages = _two_optimizer_loop(nets.mlp(), "both")
    frame = scope.frame()
    got = frame[frame.metric == "update_ratio"].pivot(index="step", columns="block", values="value")
    assert sorted(got.columns) == ["0", "2", "4", "6", "8"]
    for step, ratios in enumerate(want):
        for block, value in ratios.items():
            assert got.loc[step, block] == pytest.approx(value, rel=1e-5)
    assert not any("no optimizer" in m for m in messages)


def test_a_block_no_given_optimizer_updates_gets_no_update_row_and_one_warning():
    torch.manual_seed(0)
    scope, want, messages = _two_optimizer_loop(nets.mlp(), "body")
    frame = scope.frame()
    ratios = frame[frame.metric == "update_ratio"]
    assert "8" not in set(ratios.block) and {"0", "2", "4", "6"} == set(ratios.block)  # head: no false 0.0
    for row in ratios.itertuples():
        assert row.value == pytest.approx(want[row.step][row.block], rel=1e-5)
    assert (frame[frame.metric == "param_grad_norm"].block == "8").sum() == 3  # its other metrics stay
    assert sum("'8'" in m and "no optimizer" in m for m in messages) == 1
    assert scope.alerts().empty or "8" not in set(scope.alerts().block)


def test_a_frozen_block_outside_the_optimizer_is_silent():
    torch.manual_seed(0)
    model = nets.mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt) as scope:
            x, y = _batches(1)[0]
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            opt.step()
    assert "0" not in set(scope.frame().query("metric == 'update_ratio'").block)


# ---- wrapped optimizers ---------------------------------------------------------------------------------------------
def test_a_lightning_optimizer_is_unwrapped():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    model = nets.mlp()
    frames = []
    for wrap in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with gradscope.attach(m, optimizer=LightningOptimizer(opt) if wrap else opt) as scope:
            for x, y in _batches():
                nn.functional.cross_entropy(m(x), y).backward()
                scope.step()
                opt.step()
                opt.zero_grad()
        frames.append(_sorted(scope.frame()))
    assert "update_ratio" in set(frames[1].metric)
    pd.testing.assert_frame_equal(frames[1], frames[0])


class Lookahead(torch.optim.Optimizer):
    """Zhang et al. 2019 as torch_optimizer writes it: the inner optimizer in ``.optimizer``; every ``k`` steps the
    wrapper pulls the weights toward its slow copy after the inner step returns (the inner step's hooks have run)."""

    def __init__(self, optimizer, k=2, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.count = optimizer, k, alpha, 0
        self.param_groups, self.defaults, self.state = optimizer.param_groups, optimizer.defaults, optimizer.state
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            with torch.no_grad():
                for p, slow in zip((p for g in self.param_groups for p in g["params"]), self.slow):
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss


@pytest.mark.parametrize("order", ["step-then-scope", "scope-then-step"])
def test_a_wrapper_that_moves_the_weights_after_the_inner_step_is_measured_whole(order):
    torch.manual_seed(0)
    model = nets.mlp()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.5))
    expected = {}
    with gradscope.attach(model, optimizer=opt) as scope:
        for step, (x, y) in enumerate(_batches(4)):
            nn.functional.cross_entropy(model(x), y).backward()
            if order == "scope-then-step":
                scope.step()
            expected[step] = _ratio_by_hand(model, opt.step)
            if order == "step-then-scope":
                scope.step()
            opt.zero_grad()
            with torch.no_grad():
                model(x)  # a validation forward between steps changes nothing
    frame = scope.frame().query("metric == 'update_ratio'")
    got = {(s, b): v for s, b, v in zip(frame.step, frame.block, frame.value)}
    for step, ratios in expected.items():  # steps 1 and 3 sync: before, their ratio was the inner SGD step's alone
        for block, ratio in ratios.items():
            assert got[(step, block)] == pytest.approx(ratio, rel=1e-4), (step, block)


def test_which_wrappers_are_measured_when_their_step_is_over():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from gradscope.engine.optimizers import acts_after_step

    opt = torch.optim.SGD(nets.mlp().parameters(), lr=0.1)
    assert not acts_after_step(opt) and not acts_after_step(LightningOptimizer(opt))  # these only pass step() on
    assert acts_after_step(Lookahead(opt)) and acts_after_step(LightningOptimizer(Lookahead(opt)))


def test_something_that_is_no_optimizer_is_refused_clearly():
    with pytest.raises(gradscope.GradscopeError, match="optimizer=str"):
        gradscope.attach(nets.mlp(), optimizer="sgd")


# ---- zero_grad() before scope.step() ---------------------------------------------------------------------------------
def _zero_grad_loop(set_to_none, give_optimizer, order):
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt if give_optimizer else None) as scope:
            for x, y in _batches():
                nn.functional.cross_entropy(model(x), y).backward()
                if order == "late":  # the loop that loses the gradients
                    opt.step()
                    opt.zero_grad(set_to_none=set_to_none)
                    scope.step()
                else:
                    scope.step()
                    opt.step()
                    opt.zero_grad(set_to_none=set_to_none)
    frame = scope.frame()
    return frame[frame.metric == "param_grad_norm"], [str(w.message) for w in caught]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_step_with_the_optimizer_given_still_reads_the_gradients(set_to_none):
    want, _ = _zero_grad_loop(set_to_none, True, "early")
    got, messages = _zero_grad_loop(set_to_none, True, "late")
    assert len(want) == 15 and (want.value > 0).all()
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want))
    assert not any("zero_grad" in m for m in messages)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_step_without_the_optimizer_warns_once_with_the_fix(set_to_none):
    got, messages = _zero_grad_loop(set_to_none, False, "late")
    warned = [m for m in messages if "zero_grad" in m]
    assert len(warned) == 1 and "optimizer=opt" in warned[0] and "before" in warned[0]
    if set_to_none:
        assert got.empty and "absent" in warned[0]
    else:  # zeros may also be true gradients (a loss flat in every parameter): the words say "if"
        assert (got.value == 0).all() and "0.0" in warned[0] and "If optimizer.zero_grad" in warned[0]
        assert "truly flat" in warned[0]


def test_a_loop_that_reads_gradients_in_time_gets_no_warning():
    _, messages = _zero_grad_loop(True, False, "early")
    assert not any("zero_grad" in m for m in messages)


# ---- a loop that never calls the attached model's own forward ----------------------------------------------------
def _child_by_child_loop(via_root, order, every):
    """The same training either through ``model(x)`` or through its children one by one (a GAN container, a
    LightningModule whose ``training_step`` calls ``self.net``): the root's forward pre-hook never runs then."""
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt, every=every) as scope:
            for x, y in _batches(4):
                out = model(x) if via_root else x
                if not via_root:
                    for child in model:
                        out = child(out)
                nn.functional.cross_entropy(out, y).backward()
                if order == "late":
                    opt.step()
                    opt.zero_grad()
                    scope.step()
                else:
                    scope.step()
                    opt.step()
                    opt.zero_grad()
    frame = scope.frame()
    return frame[frame.metric.isin(["param_grad_norm", "update_ratio"])], [str(w.message) for w in caught]


@pytest.mark.parametrize("order", ["late", "early"])
@pytest.mark.parametrize("every", [1, 2])
def test_a_loop_that_calls_the_models_children_records_what_the_root_forward_loop_records(order, every):
    """With optimizer.step() before scope.step() and the root forward never called, param_grad_norm was missing
    and each update_ratio was filed one step early (the optimizer's step was taken for the previous step's)."""
    want, _ = _child_by_child_loop(True, order, every)
    got, messages = _child_by_child_loop(False, order, every)
    assert set(want.metric) == {"param_grad_norm", "update_ratio"}
    assert len(want) == 2 * 5 * len(range(0, 4, every))  # five Linear blocks
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want))
    assert not any("zero_grad" in m for m in messages)


# ---- a parameter group added while the optimizer's closure runs the step ---------------------------------------
def _fine_tuning_loop(closure_order):
    """A frozen backbone joins the optimizer (add_param_group) before step 3, as Lightning's BackboneFinetuning
    does; either the plain order or Lightning's (forward, backward and scope.step() inside opt.step(closure))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    want = {}
    with gradscope.attach(model, blocks=["0", "1"], optimizer=opt) as scope:
        for i in range(5):
            if i == 3:
                model[0].requires_grad_(True)
                opt.add_param_group({"params": list(model[0].parameters())})
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)

            def closure():
                nn.functional.cross_entropy(model(x), y).backward()
                scope.step()

            if closure_order:
                want[i] = _ratio_by_hand(model, lambda: opt.step(closure))
            else:
                closure()
                want[i] = _ratio_by_hand(model, opt.step)
            opt.zero_grad()
    frame = scope.frame()
    return frame[frame.metric == "update_ratio"], want


@pytest.mark.parametrize("closure_order", [False, True])
def test_a_group_added_before_a_closure_step_is_measured_in_that_step(closure_order):
    """Under the closure order the change was noticed inside opt.step(): the optimizer hooks were registered anew,
    the running step's post-hook went with them, and step 3 had no update_ratio at all (two in the plain order)."""
    got, want = _fine_tuning_loop(closure_order)
    assert sorted(got.groupby("step").block.apply(sorted).items()) == \
        [(0, ["1"]), (1, ["1"]), (2, ["1"]), (3, ["0", "1"]), (4, ["0", "1"])]
    for step, block, value in zip(got.step, got.block, got.value):
        assert value == pytest.approx(want[step][f"{block}.0" if block == "0" else block], rel=1e-5)


def test_the_steps_an_optimizer_measured_stay_a_few_over_a_long_run():
    """The optimizer hooks remember which recorded steps they measured (so a step is measured once); over a long run
    that memory must stay flat, not grow by one entry per step."""
    import gradscope

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.attach(model, optimizer=opt) as scope:
        for _ in range(60):
            model(torch.randn(3, 4)).sum().backward()
            scope.step()
            opt.step()
            opt.zero_grad()
        kept = scope._watch._updated[0]
        assert len(kept) <= 8 and max(kept) == 59  # before: 60 entries, one per step
    frame = scope.frame()
    assert sorted(frame[frame.metric == "update_ratio"].step.unique()) == list(range(60))  # each step measured once


def test_a_step_the_grad_scaler_skips_with_zero_grad_first_is_warned_about_once():
    """A GradScaler skips ``optimizer.step()`` for an inf gradient: no step hook reads the gradients, and a
    ``zero_grad()`` before ``scope.step()`` clears them. That step has no param_grad_norm, and now says why."""
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt, scaler=scaler, on_nonfinite="ignore") as scope:
            for step, (x, y) in enumerate(_batches(5)):
                scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
                if step in (1, 3):  # an fp16-style overflow in one weight's gradient: the scaler skips the step
                    next(model.parameters()).grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                scope.step()
    grads = scope.frame().query("metric == 'param_grad_norm'")
    assert sorted(set(grads.step)) == [0, 2, 4]  # the skipped steps' gradients were gone when scope.step() came
    warned = [str(w.message) for w in caught if "no given optimizer stepped" in str(w.message)]
    assert len(warned) == 1 and "recorded step 1" in warned[0]  # before: no word at all
    assert not any("zero_grad() (the optimizer's or the model's) ran before" in str(w.message) for w in caught)


def test_a_closure_optimizer_that_stepped_gets_the_zero_grad_warning_not_the_skipped_step_one():
    """LBFGS steps with a closure (its hook reads no gradient), then zero_grad() before scope.step(): the optimizer
    did step, so the message is the zero_grad one (an earlier version said no optimizer stepped)."""
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt) as scope:
            for x, y in _batches(3):
                def closure():
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
                opt.zero_grad()
                scope.step()
    messages = [str(w.message) for w in caught if "gradscope" in str(w.message)]
    assert not any("no given optimizer stepped" in m for m in messages)
    assert any("zero_grad() (the optimizer's or the model's) ran before it" in m and "closure" in m for m in messages)
