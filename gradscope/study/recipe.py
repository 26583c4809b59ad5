"""He et al. 2016's CIFAR-10 recipe (Deep Residual Learning, §4.2) as one object, and its data pipeline.

Each line of the paper's §4.2, and where it lives here:

- "We use a weight decay of 0.0001 and momentum of 0.9, and adopt the weight initialization in [13] and BN [16]
  but with no dropout. These models are trained with a mini-batch size of 128": :class:`Recipe` fields; the nets
  are :mod:`gradscope.models.cifar` (He init, BN, option-A identity shortcuts: "we use identity shortcuts in all
  cases (i.e., option A)").
- "We start with a learning rate of 0.1, divide it by 10 at 32k and 48k iterations, and terminate training at 64k
  iterations, which is determined on a 45k/5k train/val split": :meth:`Recipe.lr_at` and
  :func:`split_indices`.
- "4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the padded image or its
  horizontal flip": :func:`augment`. "The network inputs are 32x32 images, with the per-pixel mean subtracted":
  :func:`pixel_mean` and :func:`normalise` (padding adds zeros after the subtraction, i.e. the mean pixel).
- "For testing, we only evaluate the single view of the original 32x32 image": the test set is normalised and
  never augmented.
- For the 110-layer net "0.1 is slightly too large to start converging. So we use 0.01 to warm up the training
  until the training error is below 80% (about 400 iterations), and then go back to 0.1": :class:`WarmUp`.

Known deviations, said where a reader looks (docs/recipe.md): the paper's mini-batch of 128 was split over two
GPUs, so its BatchNorm saw 64 images per GPU, while one device here normalises over all 128; the paper does not
say how the 5k validation images were chosen (here: a seeded permutation, the same for every run).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from gradscope.errors import GradscopeError

#: CIFAR-10's training and test set sizes, which the paper's recipe and Table 6 assume.
PAPER_TRAIN_IMAGES, PAPER_TEST_IMAGES = 50_000, 10_000


@dataclass(frozen=True)
class Recipe:
    """A training recipe: optimiser, schedule, augmentation, split and what is measured how often."""

    name: str = "he2016"
    iterations: int = 64_000
    milestones: Tuple[int, ...] = (32_000, 48_000)
    lr: float = 0.1
    lr_decay: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: nets at least this deep start at ``warmup_lr`` until the training error falls below ``warmup_error``.
    warmup_depth: int = 110
    warmup_lr: float = 0.01
    warmup_error: float = 0.80
    #: iterations whose mean mini-batch training error decides the end of the warm-up.
    warmup_window: int = 50
    pad: int = 4
    flip: bool = True
    #: training images kept for training out of the 50k; the rest is the validation split.
    train_images: int = 45_000
    #: iterations between evaluations of the validation and test error (and at the last iteration).
    eval_every: int = 1_000
    #: gradscope records every ``record_every``-th iteration's signals.
    record_every: int = 100
    shortcut: str = "A"
    #: the nets of Fig. 6 and Table 6.
    models: Tuple[str, ...] = ("plain20", "plain32", "plain44", "plain56",
                               "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

    def __post_init__(self) -> None:
        for option in ("iterations", "batch_size", "eval_every", "record_every", "warmup_window"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GradscopeError(f"recipe {self.name!r}: {option}={value!r} must be an integer >= 1")
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise GradscopeError(f"recipe {self.name!r}: milestones={self.milestones!r} must rise and be >= 1")
        if not 0 < self.train_images:
            raise GradscopeError(f"recipe {self.name!r}: train_images={self.train_images!r} must be >= 1")

    def lr_at(self, iteration: int, warming_up: bool = False) -> float:
        """The learning rate of (0-based) ``iteration``: ``lr`` divided by 10 at each milestone passed.

        Iteration 31,999 still runs at 0.1 and iteration 32,000 at 0.01 (the paper's "at 32k iterations");
        ``warming_up`` gives ``warmup_lr`` whatever the iteration.
        """
        if warming_up:
            return self.warmup_lr
        passed = sum(iteration >= milestone for milestone in self.milestones)
        return self.lr * self.lr_decay ** passed

    def warms_up(self, depth: int) -> bool:
        """Whether a net of ``depth`` layers starts with the warm-up (the paper: the 110-layer net)."""
        return depth >= self.warmup_depth

    def shortened(self, iterations: int, name: Optional[str] = None) -> "Recipe":
        """The same recipe over ``iterations``: milestones, evaluation and recording intervals scaled alike."""
        if not isinstance(iterations, int) or iterations < 1:
            raise GradscopeError(f"iterations={iterations!r} must be an integer >= 1")
        scale = iterations / self.iterations
        scaled = tuple(max(1, round(m * scale)) for m in self.milestones)
        return replace(self, name=name or f"{self.name}-{iterations}", iterations=iterations, milestones=scaled,
                       eval_every=max(1, round(self.eval_every * scale)),
                       record_every=max(1, round(self.record_every * scale)))


#: The paper's recipe, and a variant one GPU finishes in minutes (milestones at the same fractions of the run). The
#: short variant evaluates every 250 iterations (16 times, about 1.4 times an epoch of the 45k images) rather than at
#: the scaled interval (62: 65 evaluations of 15,000 images, a third of its cost on a CPU, for curve points 0.18 of
#: an epoch apart). Its claims do not read the evaluations (study/error_claims.py decides on the training error of
#: the last 200 iterations and prints the last evaluation's test error beside it, an evaluation that stays after the
#: last iteration); the full recipe evaluates every 1,000 iterations (every 2.8 epochs).
HE2016 = Recipe()
HE2016_SHORT = replace(HE2016.shortened(4_000, name="he2016-short"), eval_every=250)
RECIPES: Dict[str, Recipe] = {r.name: r for r in (HE2016, HE2016_SHORT)}


def get(name: str) -> Recipe:
    """A named recipe; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise GradscopeError(f"recipe={name!r} is not known; use one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


class WarmUp:
    """The 110-layer warm-up: ``warmup_lr`` until the recent mean training error is below the threshold, once."""

    def __init__(self, recipe: Recipe, depth: int) -> None:
        self.active = recipe.warms_up(depth)
        self.threshold = recipe.warmup_error
        self.window = recipe.warmup_window
        self.errors: list = []
        self.ended_at: Optional[int] = None

    def update(self, iteration: int, batch_error: float) -> None:
        """Feed one iteration's mini-batch error; ends the warm-up when the window's mean falls below the bar."""
        if not self.active:
            return
        self.errors = (self.errors + [batch_error])[-self.window:]
        if len(self.errors) == self.window and sum(self.errors) / self.window < self.threshold:
            self.active = False
            self.ended_at = iteration


# --- data ------------------------------------------------------------------------------------------------------
def split_indices(count: int, train_images: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` indices of ``count`` images: a seeded permutation cut after ``train_images``."""
    if train_images > count:
        raise GradscopeError(f"train_images={train_images} but the training set holds only {count} images")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:train_images], order[train_images:]


def pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """The per-pixel mean ``(C, H, W)`` of uint8 images ``(N, C, H, W)``, in [0, 1] units (float64 sums)."""
    return (images.to(torch.float64).mean(dim=0) / 255).to(torch.float32)


def normalise(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] with the per-pixel ``mean`` subtracted."""
    return images.to(torch.float32) / 255 - mean


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crops of zero-padded images, each mirrored with probability 1/2, in one gather.

    For image ``b`` the offsets ``(dy[b], dx[b])`` are drawn uniformly from ``0 .. 2 pad`` (one
    ``torch.randint`` call of shape ``(2, B)``, rows first), then, when ``flip``, a mirror flag ``torch.rand(B)
    < 0.5``; the output is ``padded[b, :, dy:dy+H, dx:dx+W]``, reversed along the width where flagged. A crop of
    the mirrored padded image has the same distribution: this is the paper's "crop from the padded image or its
    horizontal flip".
    """
    n, c, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h)
    width = torch.arange(w)
    cols = offsets[1, :, None] + torch.where(mirror[:, None], (w - 1) - width, width)
    rows, cols = rows.to(images.device), cols.to(images.device)
    picked = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return picked.gather(3, cols[:, None, None, :].expand(n, c, h, w))


@dataclass
class RecipeData:
    """The recipe's three splits, normalised with the training split's per-pixel mean (float32, on the host)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor


def prepare(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
            recipe: Recipe, split_seed: int = 0) -> RecipeData:
    """Split the uint8 training images, take the per-pixel mean of the kept part, normalise all three splits."""
    if len(train_x) < PAPER_TRAIN_IMAGES or len(test_x) < PAPER_TEST_IMAGES:
        warnings.warn(f"gradscope: the data holds {len(train_x):,} training and {len(test_x):,} test images; "
                      f"He et al.'s recipe uses CIFAR-10's {PAPER_TRAIN_IMAGES:,} ({recipe.train_images:,} to train, "
                      f"the rest to validate) and {PAPER_TEST_IMAGES:,}: errors and claims from this folder do not "
                      f"compare with the paper's Table 6", RuntimeWarning, stacklevel=2)
    kept, held = split_indices(len(train_x), min(recipe.train_images, len(train_x)), split_seed)
    mean = pixel_mean(train_x[kept])
    return RecipeData(normalise(train_x[kept], mean), train_y[kept], normalise(train_x[held], mean), train_y[held],
                      normalise(test_x, mean), test_y, mean)


def batches(data: RecipeData, recipe: Recipe, seed: int):
    """Endless augmented mini-batches ``(x, y)``: a fresh seeded shuffle each epoch, the last partial batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    count = len(data.train_x)
    size = min(recipe.batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - size + 1, size):
            index = order[start:start + size]
            yield augment(data.train_x[index], recipe.pad, recipe.flip, generator), data.train_y[index]


def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
               batch_size: int = 1000, channels_last: bool = False) -> float:
    """Top-1 error (fraction) of ``model`` in eval mode on ``(x, y)``: a single view, no augmentation.

    ``x`` and ``y`` may live on the host: each batch of ``batch_size`` goes to ``device`` (channels-last when the
    training run is), the wrong answers are counted there and read back once.
    """
    if len(x) == 0:
        return math.nan
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                inputs = x[start:start + batch_size].to(device)
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                labels = y[start:start + batch_size].to(device)
                wrong += (model(inputs).argmax(1) != labels).sum()
    finally:
        model.train(was_training)
    return int(wrong) / len(x)  # one read-back per evaluation
