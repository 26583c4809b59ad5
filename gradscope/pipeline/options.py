"""The options of a profile, checked once: the keyword arguments of :func:`gradscope.profile` and the CLI's flags.

:class:`Options` holds every option with its default (the training defaults come from
:class:`gradscope.study.runs.Settings`, the study's from :mod:`gradscope.study.specs`); the CLI builds its parser
from these defaults and passes its flags here as keyword arguments. :meth:`Options.check` refuses bad values
with one message that names the value and the fix.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from gradscope.errors import GradscopeError
from gradscope.pipeline.policy import check_kinds
from gradscope.study.runs import DEFAULT_TRAIN_SIZE, Settings
from gradscope.study.specs import DEFAULT_MODELS, DEFAULT_SEEDS, DEFAULT_TRAIN, RunSpec, check_unique, grid, \
    user_specs

_D = Settings()
BN_CHOICES = {"on": (True,), "off": (False,), "both": (True, False)}
FORMATS = ("full", "records")


#: Options of the default study that a recipe study does not use (its recipe fixes them): left out of its record.
_DEFAULT_STUDY_ONLY = ("steps", "init_only", "batch_size", "lr", "every", "train", "train_size", "image_size")


@dataclass
class Options:
    """Every option of a profile (see ``docs/cli.md`` for each one)."""

    # models
    models: Optional[Sequence[str]] = None
    depths: Optional[Sequence[int]] = None
    bn: str = "both"
    shortcut: Optional[str] = None
    init: str = "kaiming"
    model: Optional[Union[str, Callable[[], Any]]] = None
    input_shape: Optional[Sequence[int]] = None
    blocks: Any = "auto"
    # training
    steps: int = _D.steps
    init_only: bool = False
    batch_size: int = _D.batch_size
    lr: float = _D.lr
    every: int = _D.every
    init_batches: int = _D.init_batches
    seeds: Sequence[int] = DEFAULT_SEEDS
    train: str = DEFAULT_TRAIN
    data: str = "synthetic"
    train_size: int = DEFAULT_TRAIN_SIZE
    image_size: int = _D.image_size
    workers: int = _D.workers
    device: str = "auto"
    # where the runs execute
    executor: str = "local"
    address: Optional[str] = None
    resume: bool = False
    # He et al.'s CIFAR-10 recipe (docs/recipe.md)
    recipe: Optional[str] = None
    iterations: Optional[int] = None
    amp: bool = False
    #: None: the study's default (the default study: channels-last for the built-in nets; a recipe: contiguous)
    channels_last: Optional[bool] = None
    # output
    out: Optional[Union[str, Path]] = None
    format: str = "full"
    fail_on: Sequence[str] = ()
    progress: Any = None
    title: Optional[str] = None

    @classmethod
    def of(cls, options: Dict[str, Any]) -> "Options":
        """Options from keyword arguments; an unknown name is refused with the close ones."""
        names = [f.name for f in fields(cls)]
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=2)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise GradscopeError(f"profile() takes no option {key!r}; {hint}options: {', '.join(names)}")
        return cls(**options).check()

    def check(self) -> "Options":
        """Refuse bad values (one message each); returns self."""
        for name, minimum in (("steps", 0), ("batch_size", 1), ("every", 1), ("init_batches", 1),
                              ("train_size", 1), ("image_size", 1), ("workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise GradscopeError(f"--{name.replace('_', '-')} {value!r} must be an integer >= {minimum}")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0 or not math.isfinite(self.lr):
            raise GradscopeError(f"--lr {self.lr} must be a positive number")
        _choice("bn", self.bn, tuple(BN_CHOICES))
        _choice("train", self.train, ("bn", "all"))
        _choice("format", self.format, FORMATS)
        self.fail_on = check_kinds(self.fail_on)
        self.seeds = [self.seeds] if isinstance(self.seeds, int) else list(self.seeds)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise GradscopeError(f"--seeds {self.seeds!r}: give one or more integer seeds")
        if self.input_shape and not self.model:
            raise GradscopeError(f"--input-shape {','.join(map(str, self.input_shape))} applies to --model only; "
                                 f"the built-in nets take 3,32,32")
        _choice("executor", self.executor, ("local", "ray"))
        if self.resume and self.out is None:
            raise GradscopeError("--resume needs --out: the folder of the study to resume")
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 1):
            raise GradscopeError(f"--iterations {self.iterations!r} must be an integer >= 1")
        if self.recipe is not None:
            from gradscope.study.recipe import get

            get(self.recipe)
            if self.model is not None:
                raise GradscopeError("--recipe trains the paper's CIFAR nets; it does not apply to --model")
            if self.data == "synthetic":
                raise GradscopeError("--recipe needs CIFAR-10: pass --data DIR, a local copy of the 'CIFAR-10 "
                                     "python version' (nothing is downloaded)")
        elif self.iterations is not None:
            raise GradscopeError("--iterations applies to --recipe; the default study counts --steps")
        elif self.amp:
            raise GradscopeError("--amp applies to --recipe (He et al.'s CIFAR-10 training); the default study "
                                 "trains in float32")
        if self.model is not None and (self.models or self.depths):
            raise GradscopeError("--model (your own model) and --models/--depths (built-in nets) exclude each "
                                 "other; pass one of them")
        return self

    @property
    def measured_steps(self) -> int:
        """Training steps per run: 0 in the initialisation-only mode."""
        return 0 if self.init_only else self.steps

    def settings(self, device: str) -> Settings:
        """The study's :class:`~gradscope.study.runs.Settings` on ``device``."""
        layout = {} if self.channels_last is None else {"channels_last": bool(self.channels_last)}
        return Settings(steps=self.measured_steps, batch_size=self.batch_size, lr=self.lr, every=self.every,
                        init_batches=self.init_batches, device=device, workers=self.workers,
                        image_size=self.image_size if self.data == "synthetic" else 32, **layout)

    def recipe_settings(self, device: str) -> Any:
        """The :class:`~gradscope.study.recipe_train.RecipeSettings` of a recipe study on ``device``."""
        from gradscope.study.recipe import get
        from gradscope.study.recipe_train import RecipeSettings

        recipe = get(self.recipe)
        if self.iterations is not None:
            recipe = recipe.shortened(self.iterations)
        return RecipeSettings(recipe=recipe, device=device, amp=self.amp, channels_last=bool(self.channels_last),
                              workers=self.workers, init_batches=self.init_batches)

    def specs(self) -> List[RunSpec]:
        """One spec per run: the user's model per seed, the recipe's nets per seed, or the built-in grid (models x
        depths x bn x seeds)."""
        blocks = selector(self.blocks)
        if self.recipe is not None:
            from dataclasses import replace

            from gradscope.study.recipe import get
            from gradscope.study.recipe_train import recipe_spec

            recipe = get(self.recipe)
            specs = [replace(recipe_spec(m, s, recipe), blocks=blocks)
                     for m in (self.models or recipe.models) for s in self.seeds]
            check_unique(specs)
            return specs
        if self.model is not None:
            specs = user_specs(self.model, self.seeds, tuple(self.input_shape) if self.input_shape else None,
                               blocks)
        else:
            train = "all" if self.bn == "off" else self.train  # without BN runs at all, "bn" would train nothing
            specs = grid(list(self.models or DEFAULT_MODELS), bn=BN_CHOICES[self.bn], seeds=self.seeds,
                         shortcut=self.shortcut, init=self.init, train=train, depths=self.depths, blocks=blocks)
        check_unique(specs)
        return specs

    def record(self) -> Dict[str, Any]:
        """The options as the provenance record keeps them."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}
        out["model"] = self.model if self.model is None or isinstance(self.model, str) else repr(self.model)
        if self.recipe is not None:  # the recipe's own numbers, not the default study's that it does not use
            from dataclasses import asdict

            for name in _DEFAULT_STUDY_ONLY:
                out.pop(name, None)
            out["recipe_used"] = asdict(self.recipe_settings("cpu").recipe)
        return out


def _choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise GradscopeError(f"--{name} {value!r}: choose from {', '.join(choices)}")


def selector(blocks: Any) -> Any:
    """'auto', a torch.nn class name (``BatchNorm2d``, ``nn.Conv2d``), or a glob/regex on module names."""
    if not isinstance(blocks, str):
        return blocks
    from torch import nn

    name = blocks[3:] if blocks.startswith("nn.") else blocks
    candidate = getattr(nn, name, None)
    if isinstance(candidate, type) and issubclass(candidate, nn.Module):
        return candidate
    return blocks
