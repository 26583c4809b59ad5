"""He et al. 2016's CIFAR-10 recipe: schedule, warm-up, split, per-pixel mean and augmentation against hand-computed
expectations, and a short run on a generated CIFAR-format folder."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from gradscope.data import read_cifar10_pixels
from gradscope.errors import GradscopeError
from gradscope.study import recipe as R
from gradscope.analysis.curves import CURVE_COLUMNS, table6
from gradscope.study.recipe_train import train_run
from tests.fixtures.cifar_folder import write_cifar


def test_the_paper_numbers():
    r = R.HE2016
    assert (r.iterations, r.milestones, r.lr, r.batch_size) == (64_000, (32_000, 48_000), 0.1, 128)
    assert (r.momentum, r.weight_decay, r.pad, r.flip, r.train_images, r.shortcut) == (0.9, 1e-4, 4, True, 45_000,
                                                                                         "A")
    assert (r.warmup_depth, r.warmup_lr, r.warmup_error) == (110, 0.01, 0.80)


@pytest.mark.parametrize("iteration, lr", [(0, 0.1), (31_999, 0.1), (32_000, 0.01), (47_999, 0.01),
                                           (48_000, 0.001), (63_999, 0.001)])
def test_learning_rate_steps_at_32k_and_48k(iteration, lr):
    assert R.HE2016.lr_at(iteration) == pytest.approx(lr, rel=1e-12)


def test_warm_up_only_for_the_110_layer_net_and_only_once():
    recipe = R.Recipe(warmup_window=50)
    assert recipe.lr_at(40_000, warming_up=True) == 0.01
    shallow, deep = R.WarmUp(recipe, 56), R.WarmUp(recipe, 110)
    assert not shallow.active and deep.active
    for i in range(50):  # iterations 0..49 at 90% error: the warm-up goes on
        deep.update(i, 0.9)
    assert deep.active
    # then 70%: the mean of the last 50 is (0.9 (50 - k) + 0.7 k) / 50 < 0.8 first at k = 26, iteration 75
    for i in range(50, 200):
        deep.update(i, 0.7)
    assert not deep.active and deep.ended_at == 75
    deep.update(200, 0.99)
    assert not deep.active and deep.ended_at == 75  # never warms up again


def test_shortened_recipe_keeps_the_milestones_at_the_same_fractions():
    short = R.HE2016.shortened(6_400)
    assert short.milestones == (3_200, 4_800) and short.lr == 0.1 and short.iterations == 6_400
    assert R.get("he2016-short").iterations == 4_000
    with pytest.raises(GradscopeError, match="he2016"):
        R.get("he2017")


def test_bad_recipes_are_refused():
    with pytest.raises(GradscopeError, match="milestones"):
        R.Recipe(milestones=(48_000, 32_000))
    with pytest.raises(GradscopeError, match="batch_size"):
        R.Recipe(batch_size=0)


def test_split_is_disjoint_complete_and_seeded():
    train, val = R.split_indices(50_000, 45_000, seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert len(set(train.tolist()) | set(val.tolist())) == 50_000
    again, _ = R.split_indices(50_000, 45_000, seed=0)
    other, _ = R.split_indices(50_000, 45_000, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(GradscopeError, match="train_images"):
        R.split_indices(100, 200)


def test_per_pixel_mean_against_numpy():
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    expected = images.numpy().astype(np.float64).mean(axis=0) / 255
    mean = R.pixel_mean(images)
    assert mean.shape == (3, 32, 32)
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-6)
    normalised = R.normalise(images, mean)
    np.testing.assert_allclose(normalised.numpy().mean(axis=0), 0, atol=1e-6)  # per pixel, not per channel
    assert not np.allclose(expected[0], expected[0].mean())  # the fixture's pixels really differ in mean


def test_augmentation_equals_a_loop_over_the_same_draws():
    images = torch.randn(9, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = R.augment(images, pad=4, flip=True, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 9, (2, 9), generator=g)
    mirror = torch.rand(9, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for b in range(9):
        dy, dx = int(offsets[0, b]), int(offsets[1, b])
        crop = padded[b, :, dy:dy + 8, dx:dx + 8]
        expected = crop.flip(-1) if mirror[b] else crop
        assert torch.equal(out[b], expected), b
    assert 0 < int(mirror.sum()) < 9  # the seed gives both cases
    assert (offsets.min(), offsets.max()) == (0, 8)  # offsets reach both edges of the padded image


def test_augmentation_without_padding_or_flip_is_the_identity():
    images = torch.randn(4, 3, 6, 6)
    assert torch.equal(R.augment(images, pad=0, flip=False, generator=torch.Generator()), images)


def test_a_short_run_on_a_cifar_folder(tmp_path, one_thread):
    train_x, train_y, test_x, test_y = read_cifar10_pixels(write_cifar(tmp_path))
    assert train_x.dtype == torch.uint8 and train_x.shape == (160, 3, 32, 32) and test_x.shape == (60, 3, 32, 32)
    recipe = R.Recipe(name="tiny", iterations=12, milestones=(6, 9), batch_size=16, train_images=128,
                      eval_every=4, record_every=3)
    with pytest.warns(RuntimeWarning, match="160 training and 60 test images.*do not compare with the paper"):
        data = R.prepare(train_x, train_y, test_x, test_y, recipe)  # a folder smaller than CIFAR-10 says so
    assert len(data.train_x) == 128 and len(data.val_x) == 32 and len(data.test_x) == 60
    run = train_run("resnet20", recipe, data, seed=0, out=tmp_path / "records")
    curves = run.curves
    assert list(curves.columns) == list(CURVE_COLUMNS)
    assert curves["iteration"].tolist() == [4, 8, 12]
    assert curves["lr"].tolist() == pytest.approx([0.1, 0.01, 0.001])  # iterations 3, 7, 11
    for column in ("train_error", "val_error", "test_error"):
        assert curves[column].between(0, 1).all()
    assert len(run.losses) == 12
    errors = 1 - run.losses["accuracy"].to_numpy()
    assert curves["train_error"].tolist() == pytest.approx([errors[0:4].mean(), errors[4:8].mean(),
                                                            errors[8:12].mean()])
    assert run.losses["test_error"].notna().tolist() == [i in (3, 7, 11) for i in range(12)]
    # a recorded step every 3rd iteration (0, 3, 6, 9), each holding the training forward only (call 0):
    # the evaluation forwards under no_grad are not training forwards
    train = run.frame[run.frame["phase"] == "train"]
    assert sorted(train["step"].unique()) == [0, 3, 6, 9]
    assert set(run.frame["call"]) == {0}
    # before training, two recorded passes at initialisation (no update), labelled as the study labels runs
    init = run.frame[run.frame["phase"] == "init"]
    assert sorted(init["step"].unique()) == [0, 1]
    assert set(run.frame["run"]) == {"resnet20-bn-s0"} and set(run.frame["config"]) == {"resnet20-bn"}
    assert run.config["num_classes"] == 10 and run.config["recipe"] == "tiny" and run.config["finished"] is True
    table = table6(curves)
    assert table.loc[0, "model"] == "resnet20" and table.loc[0, "paper"] == 8.75
    assert table.loc[0, "test_error"] == pytest.approx(100 * curves["test_error"].iloc[-1])
