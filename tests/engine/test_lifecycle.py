"""Hooks leave no trace, steps cost nothing when not recorded, no host syncs in hooks, records survive crashes."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradscope
from gradscope.errors import GradscopeError, OutputError
from tests import nets

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def hook_counts(model):
    return {(name, d): len(getattr(m, d, {})) for name, m in model.named_modules() for d in HOOK_DICTS}


def train_step(model, scope=None, x=None):
    x = torch.randn(4, 3, 8, 8) if x is None else x
    model(x).sum().backward()
    if scope is not None:
        scope.step()


def test_detach_removes_exactly_its_hooks_and_keeps_the_users():
    model = nets.TinyResNet()
    user_calls = []
    model.layer1[0].register_forward_hook(lambda m, i, o: user_calls.append(1))
    model.layer1[0].register_forward_pre_hook(lambda m, i: None)
    before = hook_counts(model)
    scope = gradscope.attach(model, blocks=lambda n, m: True)
    assert hook_counts(model) != before
    train_step(model, scope)
    scope.detach()
    assert hook_counts(model) == before
    train_step(model)
    assert len(user_calls) == 2
    scope.detach()  # idempotent


def test_exception_inside_with_removes_hooks_and_keeps_records(tmp_path):
    model = nets.TinyResNet()
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with gradscope.attach(model, out=tmp_path / "run") as scope:
            for i in range(3):
                train_step(model, scope)
            raise RuntimeError("boom")
    assert hook_counts(model) == before
    frame = gradscope.load(tmp_path / "run")
    assert sorted(frame.step.unique()) == [0, 1, 2]
    assert frame.equals(scope.frame())


def test_nested_attaches_remove_only_their_own():
    model = nets.TinyResNet()
    outer = gradscope.attach(model)
    with_outer = hook_counts(model)
    with gradscope.attach(model, blocks=nn.BatchNorm2d) as inner:
        train_step(model, inner)
    assert hook_counts(model) == with_outer
    train_step(model, outer)
    assert len(outer.frame()) > 0
    outer.detach()


class SyncCounter(TorchFunctionMode):
    """Counts tensor calls that would make a GPU wait for the host (reading values back)."""

    SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
               "any", "all", "equal", "allclose"}

    def __init__(self):
        super().__init__()
        self.calls = []
        self.devices = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        if name in self.SYNCING or (name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values()))):
            self.calls.append(name)
            self.devices.update(a.device.type for a in args if isinstance(a, torch.Tensor))
        return func(*args, **kwargs)


def test_hooks_never_read_values_back_and_flush_transfers_once(monkeypatch):
    """The path a GPU takes (forced here on CPU tensors): nothing read back in forward or backward, one transfer at
    scope.step()."""
    import gradscope.engine.metrics as metrics

    monkeypatch.setattr(metrics, "CHECK_ON_CPU", False)
    model = nets.TinyResNet()
    x = torch.randn(4, 3, 8, 8)
    scope = gradscope.attach(model, blocks=lambda n, m: n != "")
    with SyncCounter() as during_step:
        model(x).sum().backward()
    assert during_step.calls == []
    with SyncCounter() as at_flush:
        scope.step()
    assert at_flush.calls == ["tolist"]
    scope.detach()


def test_cpu_hooks_read_back_only_cpu_values():
    """On the CPU the hooks read two sums back to check them (free there: no device to wait for); never a GPU value."""
    model = nets.TinyResNet()
    scope = gradscope.attach(model, blocks=lambda n, m: n != "")
    with SyncCounter() as during_step:
        model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert set(during_step.calls) == {"item"} and during_step.devices == {"cpu"}
    scope.detach()


def test_unrecorded_steps_run_no_metric_computation(monkeypatch):
    import gradscope.engine.gradwatch as gradwatch
    import gradscope.engine.params as params
    import gradscope.engine.probes as probes

    calls = []
    for mod, name in ((probes, "activation_sums"), (gradwatch, "squared_norm"), (params, "group_norms")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    model = nets.TinyResNet()
    user_hook = model.layer1[0].register_forward_hook(lambda m, i, o: None)
    bare = hook_counts(model)
    with gradscope.attach(model, every=3) as scope:
        for step in range(6):
            before = len(calls)
            # an unrecorded step carries no gradscope hook at all: PyTorch's hook-free call path
            assert (hook_counts(model) != bare) == (step % 3 == 0), step
            train_step(model, scope)
            assert (len(calls) > before) == (step % 3 == 0), step
        assert sorted(scope.frame().step.unique()) == [0, 3]
    assert hook_counts(model) == bare
    user_hook.remove()


def test_gradscope_sees_the_module_output_before_other_hooks_at_every_recorded_step():
    """Hooks come and go with the schedule; prepending them keeps what they measure the same at every recorded step,
    whatever hooks the user registers before or after attach()."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].register_forward_hook(lambda m, i, o: o * 10)  # replaces the output, registered before attach
    scope = gradscope.attach(model, blocks=[model[0]], every=2, metrics=["act_rms"])
    model[0].register_forward_hook(lambda m, i, o: o * 100)  # and one registered after
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = nn.functional.linear(x, model[0].weight, model[0].bias).pow(2).mean().sqrt().item()
    for _ in range(5):
        model(x).sum().backward()
        scope.step()
    rms = scope.frame().value.tolist()
    assert rms == pytest.approx([expected] * 3, rel=1e-6)
    scope.detach()


def test_no_reference_to_activations_survives_the_step():
    model = nets.TinyResNet()
    refs = []
    model.layer2[1].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    with gradscope.attach(model, blocks=lambda n, m: n != "") as scope:
        train_step(model, scope)
        gc.collect()
        assert refs and refs[0]() is None
        # forward-only passes that are never followed by backward or step() keep nothing alive either
        with torch.no_grad():
            model(torch.randn(4, 3, 8, 8))
        gc.collect()
        assert refs[1]() is None


def test_nonfinite_pinpoints_first_block_in_each_direction():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="forward pass: block '1' at step 0"):
        with gradscope.attach(model) as scope:
            model(torch.randn(2, 4)).sum().backward()
            scope.step()
    first = scope.first_nonfinite()
    assert first["forward"] == (0, "1")
    # d loss / d output of blocks 3, 2, 1 only involves the finite weights of blocks 3 and 2; the gradient turns NaN
    # inside block 1 (its NaN weight), at block 1's input, which is block 0's output: block 1 is where it arose
    assert first["backward"] == (0, "1")
    frame = scope.frame()
    bad_grads = frame[(frame.metric == "grad_norm") & ~frame.value.map(math.isfinite)].block.tolist()
    assert bad_grads == ["0"]
    bad = frame[(frame.metric == "act_nonfinite") & (frame.value > 0)].block.tolist()
    assert bad == ["1", "2", "3"]


class _NaNGrad(torch.autograd.Function):
    """Identity forward; backward returns NaN: a NaN that arises in the backward pass of a known block."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class _Block(nn.Module):
    def __init__(self, poison: bool = False):
        super().__init__()
        self.lin, self.poison = nn.Linear(4, 4), poison

    def forward(self, x):
        y = self.lin(x)
        return _NaNGrad.apply(y) if self.poison else y


@pytest.mark.parametrize("poisoned", [1, 2, 4])
def test_backward_nonfinite_names_the_block_where_the_nan_arose(poisoned):
    """Independent reference: which block's backward produced the NaN is known by construction."""
    model = nn.Sequential(*[_Block(poison=(i == poisoned)) for i in range(6)])
    with gradscope.attach(model, on_nonfinite="ignore") as scope:
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
        scope.step()
    assert scope.first_nonfinite() == {"backward": (0, str(poisoned))}


def test_raise_policy_keeps_records():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    scope = gradscope.attach(model, on_nonfinite="raise")
    model(torch.tensor([[float("inf"), 1.0]])).sum().backward()
    with pytest.raises(gradscope.NonFiniteError, match="block '0'"):
        scope.step()
    assert scope.frame().step.unique().tolist() == [0]
    scope.detach()


@pytest.mark.parametrize("every", [0, -2, 1.5, "3"])
def test_bad_every(every):
    with pytest.raises(GradscopeError, match=f"every={every!r}"):
        gradscope.attach(nets.mlp(), every=every)


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write records to out="):
        gradscope.attach(nets.mlp(), out=blocker / "sub")


def test_unknown_metric():
    with pytest.raises(GradscopeError, match="unknown metric"):
        gradscope.attach(nets.mlp(), metrics=["act_variance"])


def test_streaming_parts_and_load_round_trip(tmp_path):
    model = nets.conv_bn_net()
    with gradscope.attach(model, out=tmp_path, flush_every=2, every=2) as scope:
        for _ in range(9):
            train_step(model, scope)
        # parts are written while training runs, before detach
        assert len(list(tmp_path.glob("part-*.parquet"))) == 2
    loaded = gradscope.load(tmp_path)
    assert loaded.equals(scope.frame())
    assert sorted(loaded.step.unique()) == [0, 2, 4, 6, 8]
    with pytest.raises(GradscopeError, match="no gradscope records"):
        gradscope.load(tmp_path / "missing")


def test_update_ratio_matches_the_optimizer_step():
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    with gradscope.attach(model, optimizer=opt) as scope:
        nn.functional.cross_entropy(model(x), y).backward()
        scope.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        frame = scope.frame()
    got = frame[(frame.metric == "update_ratio") & (frame.block == "2")].value.item()
    delta = torch.cat([(0.1 * grads[f"2.{k}"]).flatten() for k in ("weight", "bias")]).norm()
    base = torch.cat([before[f"2.{k}"].flatten() for k in ("weight", "bias")]).norm()
    assert got == pytest.approx((delta / base).item(), rel=1e-5)


def test_metrics_subset_records_only_what_was_asked():
    model = nets.mlp()
    with gradscope.attach(model, metrics=["act_var", "grad_norm"]) as scope:
        train = model(torch.randn(4, 12)).sum()
        train.backward()
        scope.step()
        assert set(scope.frame().metric) == {"act_var", "grad_norm"}


def test_an_uncaught_exception_still_leaves_rows_on_disk(tmp_path):
    """A training script that dies with a traceback (no with-block, no detach) keeps every recorded step."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(
        "import torch, gradscope\n"
        "from torch import nn\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        f"scope = gradscope.attach(model, out={str(tmp_path / 'run')!r}, flush_every=100)\n"
        "for step in range(3):\n"
        "    model(torch.randn(2, 4)).sum().backward()\n"
        "    scope.step()\n"
        "raise RuntimeError('the training loop crashed')\n")
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "the training loop crashed" in proc.stderr
    assert sorted(gradscope.load(tmp_path / "run").step.unique()) == [0, 1, 2]


def test_attaching_and_recording_never_import_dynamo():
    """attach() and recorded steps leave torch._dynamo unimported (1.5 s of start-up; a program that never steps a
    torch optimizer, e.g. a CI guard measuring at initialisation, need not pay it): the hooks' skip strategy comes
    from Dynamo's C extension."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch, gradscope\n"
            "from gradscope.models import build\n"
            "model = build('resnet20')\n"
            "with gradscope.attach(model, every=2) as scope:\n"
            "    for _ in range(3):\n"
            "        model(torch.randn(2, 3, 8, 8)).sum().backward(); scope.step(); model.zero_grad()\n"
            "    assert len(scope.frame()), 'nothing recorded'\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n")
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "no dynamo"


def test_recorded_steps_register_the_same_hook_functions():
    """The module hooks are made once and re-registered at each recorded step (no new closures per step), and a
    module replaced after attach gets hooks of its own."""
    model = nets.mlp()
    scope = gradscope.attach(model, every=2)
    try:
        first = [h for m in model.modules() for h in m._forward_hooks.values()]
        for _ in range(2):  # step 0 recorded, step 1 not (hooks off), step 2 recorded again
            model(torch.randn(4, 12)).sum().backward()
            scope.step()
        again = [h for m in model.modules() for h in m._forward_hooks.values()]
        assert first and [id(h) for h in again] == [id(h) for h in first]
    finally:
        scope.detach()


def test_attach_that_fails_leaves_no_hook():
    model = nets.TinyResNet()
    before = hook_counts(model)
    with pytest.raises(GradscopeError, match="optimizer=object"):
        gradscope.attach(model, optimizer=object())
    assert hook_counts(model) == before


def test_after_a_nonfinite_error_the_next_step_is_clean():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    scope = gradscope.attach(model, on_nonfinite="raise")
    model(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    with pytest.raises(gradscope.NonFiniteError):
        scope.step()
    model.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    scope.step()
    frame = scope.frame()
    assert sorted(frame.step.unique()) == [0, 1] and (frame.call == 0).all()
    scope.detach()


def test_out_folder_of_another_run_is_refused(tmp_path):
    model = nets.mlp()
    with gradscope.attach(model, out=tmp_path) as scope:
        model(torch.randn(2, 12)).sum().backward()
        scope.step()
    with pytest.raises(OutputError, match="already holds the records of another run"):
        gradscope.attach(model, out=tmp_path)


def test_update_ratio_lands_on_its_own_step_whatever_the_loop_order():
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.attach(model, every=2, optimizer=opt) as scope:
        for _ in range(4):  # optimizer.step() before scope.step()
            model(torch.randn(4, 12)).sum().backward()
            opt.step()
            opt.zero_grad()
            scope.step()
        for _ in range(4):  # and after it
            model(torch.randn(4, 12)).sum().backward()
            scope.step()
            opt.step()
            opt.zero_grad()
        frame = scope.frame()
    updates = frame[(frame.metric == "update_ratio") & (frame.block == "0")]
    assert updates.step.tolist() == [0, 2, 4, 6]


def test_an_update_in_an_unrecorded_step_is_not_credited_to_the_recorded_one_before():
    """Gradient accumulation: the optimizer steps only in odd (unrecorded) steps; no recorded step saw an update."""
    torch.manual_seed(0)
    model = nets.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.attach(model, every=2, optimizer=opt, metrics=["update_ratio", "act_mean"]) as scope:
        for step in range(4):
            model(torch.randn(4, 12)).sum().backward()
            if step % 2:
                opt.step()
                opt.zero_grad()
            scope.step()
        frame = scope.frame()
    assert "update_ratio" not in set(frame.metric)
    assert sorted(frame.step.unique()) == [0, 2]


def test_float64_moments_keep_their_range_on_the_centred_path():
    from gradscope.engine.metrics import activation_stats

    torch.manual_seed(0)
    for scale in (1e-25, 1e25):
        x = torch.randn(1000, dtype=torch.float64) * scale
        for on_host in (True, False):
            mean, var, rms = activation_stats(x, zeros=False, nonfinite=False, max_abs=False, check_on_host=on_host)
            assert var == pytest.approx(x.var(unbiased=False).item(), rel=1e-9)
            assert rms == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-9)


def test_backward_after_detach_records_nothing():
    model = nets.mlp()
    scope = gradscope.attach(model)
    out = model(torch.randn(2, 12)).sum()
    scope.detach()
    rows = len(scope.frame())
    out.backward()
    assert len(scope.frame()) == rows


def test_recorded_data_is_a_few_numbers_per_block_and_metric():
    """Memory grows by O(blocks x metrics) plain numbers per recorded step: no tensor outlives scope.step()."""
    from gradscope import schema as S

    model = nets.TinyResNet()
    with gradscope.attach(model) as scope:
        sizes = []
        for _ in range(3):
            train_step(model, scope)
            assert scope._rec.buffer == []
            sizes.append(len(scope._rec.rows))
        per_step = sizes[0]
        assert sizes == [per_step, 2 * per_step, 3 * per_step]
        assert 0 < per_step <= len(scope.sites) * len(S.DEFAULT_METRICS)
        assert all(type(v) is float for v in scope._rec.rows.value)


def test_forwards_inside_torch_func_transforms_are_left_alone():
    """Per-sample gradients with vmap(grad(...)) on an attached model work, record nothing, and leave the next
    plain step's records intact."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(5, 4)
    with gradscope.attach(model, blocks=nn.Linear) as scope:
        per_sample = vmap(grad(lambda p, x: functional_call(model, p, (x[None],)).sum()), in_dims=(None, 0))(params, xs)
        assert per_sample["0.weight"].shape == (5, 4, 4)
        assert scope.frame().empty
        model(xs).sum().backward()
        scope.step()
        frame = scope.frame()
    assert set(frame.call) == {0} and set(frame.block) == {"0", "2"}
    assert "grad_norm" in set(frame.metric)


def _registration_hooks() -> int:
    from torch.nn.modules import module as torch_module

    return len(torch_module._global_parameter_registration_hooks) + \
        len(torch_module._global_module_registration_hooks)


def test_the_registration_count_is_given_back_by_detach_collection_and_a_failed_attach(tmp_path, monkeypatch):
    """While a scope is attached, torch's global registration hooks count parameters registered inside blocks
    (engine/params.py). Every way a scope ends gives its share back: detach (twice is once), a scope collected
    without detach, and an attach whose provenance.json cannot be written (its hooks used to stay on the model)."""
    from gradscope.engine import provenance

    before = _registration_hooks()
    first, second = gradscope.attach(nets.mlp()), gradscope.attach(nets.mlp())
    assert _registration_hooks() == before + 2  # one hook of each kind for the process, however many scopes
    first.detach()
    first.detach()
    assert _registration_hooks() == before + 2
    del second
    gc.collect()
    assert _registration_hooks() == before

    def refuse(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provenance.Provenance, "start", refuse)
    model = nets.mlp()
    clean = hook_counts(model)
    with pytest.raises(OSError):
        gradscope.attach(model, out=tmp_path / "run")
    assert _registration_hooks() == before and hook_counts(model) == clean
