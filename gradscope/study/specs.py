"""What a study measures: one :class:`RunSpec` per run, its facts as fields.

A run's seed, family, depth, BatchNorm and residual flags are fields of its spec and travel into the frame as
columns (``config``, ``seed``, ``bn``, ``residual``, ...); nothing reads them back out of a run's name. Names follow
one scheme: the configuration (``plain56-bn``, ``resnet20-bn-B-xavier``, ``mymodel``) then the seed, for every
seed alike (``plain56-bn-s0``, ``plain56-bn-s1``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from gradscope.errors import GradscopeError

#: The default study: the paper's shallow and deep plain/residual pairs, with and without BN, Kaiming init.
DEFAULT_MODELS = ("plain20", "resnet20", "plain56", "resnet56")
#: Seeds of the default study: three, so every claim has a spread (see the docs for the measured design).
DEFAULT_SEEDS = (0, 1, 2)
#: Which runs train by default: "bn" (BN nets train; nets without BN are measured at initialisation only, where
#: their contrast lives) or "all".
DEFAULT_TRAIN = "bn"
#: The family of a run whose model comes from the user's own factory.
USER = "user"
#: Families built in (gradscope.models); the CIFAR families take any depth 6n+2.
CIFAR_FAMILIES = ("plain", "resnet")


@dataclass(frozen=True)
class RunSpec:
    """One network to measure and the facts about it.

    ``model``: what the net is called (a zoo name such as ``plain56``, or the user's factory name); ``family``:
    ``plain``, ``resnet``, ``mlp`` or :data:`USER`; ``depth``, ``residual``, ``bn``: None where unknown (a user's
    model); ``task``: how to feed and train a user's model (:class:`gradscope.study.task.Task`); ``train``: False
    for a run measured at initialisation only.
    """

    model: str
    family: str
    seed: int = 0
    depth: Optional[int] = None
    residual: Optional[bool] = None
    bn: Optional[bool] = True
    shortcut: Optional[str] = None
    init: Optional[str] = "kaiming"
    factory: Optional[Callable[[], nn.Module]] = field(default=None, compare=False)
    task: Any = field(default=None, compare=False)
    input_shape: Optional[Tuple[int, ...]] = None
    blocks: Any = "auto"
    train: bool = True

    @property
    def builtin(self) -> bool:
        """True for a net of gradscope's zoo (the paper's claims are about these)."""
        return self.family != USER

    @property
    def config(self) -> str:
        """The configuration's name, the same for every seed: ``resnet56-bn``, ``plain20-nobn-xavier``."""
        parts = [self.model]
        if self.builtin:
            parts.append("bn" if self.bn else "nobn")
            if self.shortcut and self.residual:
                parts.append(self.shortcut)
            if self.init and self.init != "kaiming":
                parts.append(self.init)
        return "-".join(parts)

    @property
    def name(self) -> str:
        """The run's name: its configuration and seed, ``resnet56-bn-s0`` (every seed has its suffix)."""
        return f"{self.config}-s{self.seed}"

    def facts(self) -> Dict[str, Any]:
        """The run's facts as the frame's config columns and the report's configs carry them."""
        facts = {"config": self.config, "seed": self.seed, "model": self.model, "bn": self.bn,
                 "residual": self.residual, "shortcut": self.shortcut if self.residual else None,
                 "init": self.init, "depth": self.depth}
        if not self.builtin:  # a user's model named "mlp..." or "resnet20" must not get a built-in net's theory
            facts["family"] = USER
        return facts

    def build(self) -> nn.Module:
        """The initialised network (weights drawn from ``seed``)."""
        if self.factory is not None:
            import torch

            torch.manual_seed(self.seed)
            return self.factory()
        from gradscope.models import build

        options: Dict[str, Any] = {"bn": self.bn, "init": self.init}
        if self.family in CIFAR_FAMILIES:
            options["depth"] = self.depth
        if self.shortcut and self.residual:
            options["shortcut"] = self.shortcut
        return build(self.family, seed=self.seed, **options)


def zoo_spec(name: str, *, depth: Optional[int] = None, **options: Any) -> RunSpec:
    """The spec of a built-in net: a zoo name (``plain56``, ``mlp``) or a family with ``depth`` (``plain``, 26).

    The family, depth and residual flag come from the model registry (:func:`gradscope.models.facts`), which
    also refuses unknown names with close matches. ``options``: the other :class:`RunSpec` fields.
    """
    from gradscope.models import facts

    known = facts(name)
    family = known["family"]
    if depth is not None and family not in CIFAR_FAMILIES:
        raise GradscopeError(f"model {name!r} takes no depth; depths apply to the families "
                             f"{', '.join(CIFAR_FAMILIES)}")
    if depth is not None and known["depth"] != depth and name.lower() != family:
        raise GradscopeError(f"model {name!r} has depth {known['depth']}, not {depth}; pass the family "
                             f"({family}) with the depths instead")
    depth = depth if depth is not None else known["depth"]
    model = f"{family}{depth}" if family in CIFAR_FAMILIES else family
    return RunSpec(model=model, family=family, depth=depth, residual=known["residual"], **options)


def grid(models: Sequence[str] = DEFAULT_MODELS, bn: Sequence[bool] = (True, False),
         seeds: Sequence[int] = DEFAULT_SEEDS, shortcut: Optional[str] = None, init: str = "kaiming",
         train: str = "all", depths: Optional[Sequence[int]] = None, blocks: Any = "auto") -> List[RunSpec]:
    """Every combination of ``models`` (x ``depths``) x ``bn`` x ``seeds`` as run specs (models vary slowest).

    ``train``: "all" trains every run; "bn" trains the BN runs and measures the others at initialisation only.
    ``depths``: with families (``plain``, ``resnet``), one model per depth.
    """
    if train not in ("all", "bn"):
        raise GradscopeError(f"train={train!r}: use 'all' or 'bn'")
    nets = [(m, d) for m in models for d in (depths or (None,))]
    return [zoo_spec(m, depth=d, bn=b, shortcut=shortcut, init=init, seed=s, blocks=blocks,
                     train=train == "all" or bool(b))
            for (m, d), b, s in itertools.product(nets, bn, seeds)]


def user_specs(model: Any, seeds: Sequence[int], input_shape: Optional[Tuple[int, ...]] = None,
               blocks: Any = "auto") -> List[RunSpec]:
    """Specs for the user's ``path/to/file.py:factory`` (or ``package.module:factory``, or the factory itself),
    one per seed."""
    from gradscope.study.task import load_task

    factory, task = load_task(model)
    label = model.rsplit(":", 1)[-1] if isinstance(model, str) else getattr(model, "__name__", "model")
    return [RunSpec(model=label, family=USER, seed=s, bn=None, init=None, factory=factory, task=task,
                    input_shape=tuple(input_shape) if input_shape else None, blocks=blocks) for s in seeds]


def check_unique(specs: Sequence[RunSpec]) -> None:
    """Two runs with one name would write into one folder: refuse before the first starts."""
    seen, repeated = set(), []
    for spec in specs:
        if spec.name in seen and spec.name not in repeated:
            repeated.append(spec.name)
        seen.add(spec.name)
    if repeated:
        raise GradscopeError(f"run name(s) {', '.join(repeated)} would repeat: each run needs a distinct "
                             f"model/bn/seed combination (drop the repeated value)")


def planned_passes(spec: RunSpec, settings: Any) -> int:
    """Forward/backward passes one run will make: its batches at initialisation (``settings.init_batches``), then
    its training steps (``settings.steps``, when the spec trains)."""
    return settings.init_batches + (settings.steps if spec.train else 0)


def pass_cost(spec: RunSpec) -> float:
    """Relative cost of one of ``spec``'s passes, to order runs (longest first) and to estimate the time left.

    Its depth: the built-in nets keep the arithmetic per layer about equal (a CIFAR stage halves the resolution and
    doubles the channels; the MLP's layers share one width), so a 56-layer pass costs about 56/20 = 2.8 times a
    20-layer one (measured: about 3 times on the default study). 20 where the depth is unknown (a user's model),
    which makes every such run cost the same.
    """
    return float(spec.depth or 20)
