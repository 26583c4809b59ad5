"""WHERE to hook: turn a block selector into an ordered list of sites.

A *site* is a module whose output (and input) gradscope measures. :func:`find_blocks` resolves the selector that
``attach(model, blocks=...)`` takes:

``"auto"`` (the default) picks what a practitioner calls the blocks, from the module tree alone; its rules and their
order are in :mod:`gradscope.engine.autoblocks` (declared blocks; repeated units, with stages giving way to their
blocks, a mixture of experts kept whole, sub-units and auxiliary heads left out, and the units beside the blocks;
else the smallest modules owning parameters). ``find_blocks(model, explain=True)`` says which rule chose each block.

Other selectors: a module class or tuple of classes (``nn.BatchNorm2d``), a string matched against qualified
module names both as a glob (``layer1.*``) and as a full regular expression (``layer\\d+\\.\\d+``), a compiled
``re.Pattern``, a module instance, a list of names and/or modules, or a predicate ``(name, module) -> bool``.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

from gradscope.engine.autoblocks import RULES, auto_blocks
from gradscope.errors import GradscopeError, SelectorError

Predicate = Callable[[str, nn.Module], bool]
BlockSelector = Union[str, "re.Pattern[str]", type, Tuple[type, ...], nn.Module, Sequence[Union[str, nn.Module]], Predicate]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Site:
    """One hooked module: its qualified name in ``model.named_modules()``, the module, and its class name.

    ``rule`` and ``reason`` say why it was picked: a rule of :data:`gradscope.engine.autoblocks.RULES` under
    ``"auto"``, ``"selector"`` for an explicit selector.
    """

    name: str
    module: nn.Module
    kind: str
    rule: str = "selector"
    reason: str = ""


class BlockChoice(list):
    """The list of :class:`Site` that ``find_blocks(model, explain=True)`` returns; printed, a table of each block's
    name, class, rule and reason, then what each rule means."""

    def __str__(self) -> str:
        rows = [("block", "class", "rule", "why")] + [(s.name, s.kind, s.rule, s.reason) for s in self]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        used = [r for r in RULES if any(s.rule == r for s in self)]
        lines += [""] + [f"{r}: {RULES[r]}" for r in used]
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return str(self)


def find_blocks(model: nn.Module, blocks: BlockSelector = "auto", explain: bool = False) -> List[Site]:
    """Return the sites that ``attach(model, blocks=blocks)`` would hook, in ``named_modules()`` order.

    The frame's ``depth`` column is assigned later, in forward execution order; this order is the static one.
    ``explain=True`` returns a :class:`BlockChoice`, the same sites that print as a table saying which rule of
    ``"auto"`` chose each one and why (``print(gradscope.find_blocks(model, explain=True))``).
    Raises :class:`~gradscope.errors.SelectorError` when the selector is malformed or matches nothing.
    """
    model = unwrap_model(model)
    named = list(model.named_modules())
    why = {}
    if isinstance(blocks, str) and blocks == "auto":
        chosen = auto_blocks(named)
        picked = [(p.name, p.module) for p in chosen]
        why = {id(p.module): (p.rule, p.reason) for p in chosen}
        how = "'auto' (declared blocks, repeated units, then modules owning parameters)"
    else:
        matcher, how = _matcher(blocks, named)
        picked = [(n, m) for n, m in named if matcher(n, m)]
    if not picked and isinstance(blocks, str) and blocks != "auto" and _regex_error(blocks):
        raise SelectorError(
            f"block selector {blocks!r} is not a valid regular expression ({_regex_error(blocks)}) and matched no "
            f"module name as a glob either; some module names are: {_sample_names(named)}")
    if not picked:
        raise SelectorError(
            f"block selector {how} matched no module of {type(model).__name__}; "
            f"some module names are: {_sample_names(named)}. Pass a class, a glob/regex on these names, "
            f"a list of names, or a predicate (name, module) -> bool."
        )
    sites = [Site(n, m, kind_of(m), *why.get(id(m), ("selector", f"matched {how}"))) for n, m in _dedupe(picked)]
    return BlockChoice(sites) if explain else sites


def idle_message(sites: List[Site], idle: List[int], step: int, model: nn.Module, ranks: bool = False) -> str:
    """The one-time warning for picked blocks that did not run in recorded step ``step`` (indices ``idle``; ``ranks``:
    under a distributed combiner, where other ranks may have run them): names
    them and says why that happens, so that a block that gives no rows is never silent."""
    parents = {id(child): (name, module) for name, module in model.named_modules() for child in module.children()}
    parts = []
    for i in idle[:8]:
        site = sites[i]
        parent = parents.get(id(site.module))
        if parent is not None and any(True for _ in parent[1].parameters(recurse=False)):
            why = (f"its parent {parent[0] or 'the model'!r} ({type(parent[1]).__name__}) owns parameters and uses "
                   f"this module's weights itself without calling it (as nn.MultiheadAttention does with out_proj); "
                   f"pick {parent[0] or 'the model'!r} instead")
        else:
            why = ("the forward did not call it (a branch it skipped, a head used only in training or evaluation, "
                   "an expert that received no token)")
        parts.append(f"{site.name!r} ({site.kind}): {why}")
    more = f"; and {len(idle) - 8} more" if len(idle) > 8 else ""
    where = ("on this rank (under DDP a block that ran on another rank still gets its rows from there)" if ranks
             else "and have no rows there")
    return (f"gradscope: {len(idle)} picked block(s) did not run in recorded step {step} {where}: "
            + "; ".join(parts) + more)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def mixed_layers_message(sites: List[Site]) -> Optional[str]:
    """The warning for an ``"auto"`` choice that fell back on every module owning parameters and so picked both
    weight layers and the normalisation layers after them: each is a block, and the profile alternates between a
    layer's output and its normalised output (a zigzag no rate fits). None when that is not the case."""
    if not sites or any(s.rule != "own-parameters" for s in sites):
        return None
    norms = [s for s in sites if isinstance(s.module, _NORMS)]
    others = [s for s in sites if not isinstance(s.module, _NORMS)]
    if not norms or len(others) < 2:
        return None
    kinds = sorted({s.kind for s in norms})
    layer_kinds = sorted({s.kind for s in others})
    return (f"gradscope: blocks='auto' found no repeated units, so it picked every module that owns parameters: "
            f"{len(others)} layers ({', '.join(layer_kinds)}) and the {len(norms)} normalisation layers "
            f"({', '.join(kinds)}) among them, each a block of its own; the depth profile then alternates between a "
            f"layer's output and its normalised output, and the verdicts may read 'unknown'. Pick one point per "
            f"layer: blocks=nn.{kinds[0]} (after each normalisation) or blocks=nn.{layer_kinds[0]}.")


def kind_of(module: nn.Module) -> str:
    """The block's class name; for a module that FSDP2's ``fully_shard`` turned into its generated ``FSDP<Class>``
    (bases ``(FSDPModule, Class)``), the original ``Class``, so a sharded run's frame matches an unsharded one."""
    cls = type(module)
    if any(base.__name__ == "FSDPModule" for base in cls.__bases__):
        for base in cls.__bases__:
            if base.__name__ != "FSDPModule":
                return base.__name__
    return cls.__name__


def unwrap_model(model: Any) -> nn.Module:
    """Return the module whose submodules are hooked: unwraps DDP/FSDP-style ``.module`` wrappers.

    A ``torch.compile``-d module is not unwrapped here: :func:`gradscope.attach` decides what to do with it.
    """
    if not isinstance(model, nn.Module):
        raise GradscopeError(
            f"attach() needs a torch.nn.Module, got {type(model).__name__} ({_short_repr(model)}); "
            f"pass the model itself, e.g. gradscope.attach(model)."
        )
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in {"DistributedDataParallel", "DataParallel"}:
        return inner
    return model


def is_declared_block(module: nn.Module) -> bool:
    """True for modules that declare ``gradscope_block = True`` (gradscope's zoo, or a user's own classes)."""
    return bool(getattr(module, "gradscope_block", False))


# ---- explicit selectors ---------------------------------------------------------------------------------------

def _matcher(blocks: Any, named: List[Tuple[str, nn.Module]]) -> Tuple[Predicate, str]:
    if isinstance(blocks, type) and issubclass(blocks, nn.Module):
        return (lambda n, m: isinstance(m, blocks)), f"class {blocks.__name__}"
    if isinstance(blocks, tuple) and blocks and all(isinstance(b, type) and issubclass(b, nn.Module) for b in blocks):
        return (lambda n, m: isinstance(m, blocks)), f"classes {tuple(b.__name__ for b in blocks)}"
    if isinstance(blocks, str):
        return _pattern_matcher(blocks), f"pattern {blocks!r}"
    if isinstance(blocks, re.Pattern):
        return (lambda n, m: n != "" and blocks.fullmatch(n) is not None), f"regex {blocks.pattern!r}"
    if isinstance(blocks, nn.Module):
        return _list_matcher([blocks], named), f"module {type(blocks).__name__}"
    if isinstance(blocks, (list, tuple, set, frozenset)):
        return _list_matcher(list(blocks), named), f"list {_short_repr(list(blocks))}"
    if callable(blocks):
        return _predicate_matcher(blocks), f"predicate {getattr(blocks, '__name__', repr(blocks))}"
    raise SelectorError(
        f"unknown block selector {_short_repr(blocks)} ({type(blocks).__name__}); use 'auto', a module class, "
        f"a glob or regex string, a list of names or modules, or a predicate (name, module) -> bool."
    )


def _pattern_matcher(pattern: str) -> Predicate:
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None

    def match(name: str, module: nn.Module) -> bool:
        if not name:
            return False
        return fnmatch.fnmatchcase(name, pattern) or (regex is not None and regex.fullmatch(name) is not None)

    return match


def _regex_error(pattern: str) -> str:
    """Why ``pattern`` does not compile as a regular expression ('' when it does)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return ""


def _list_matcher(items: List[Any], named: List[Tuple[str, nn.Module]]) -> Predicate:
    names = {n for n, _ in named}
    aliases = {}  # a module registered under several names answers to each of them
    if named:
        for name, module in named[0][1].named_modules(remove_duplicate=False):
            aliases.setdefault(name, module)
    wanted_names, wanted_ids = set(), set()
    for item in items:
        if isinstance(item, str):
            if item not in aliases:
                close = difflib.get_close_matches(item, sorted(names), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise SelectorError(f"module {item!r} is not in the model{hint} (names come from model.named_modules())")
            if item in names:
                wanted_names.add(item)
            else:
                wanted_ids.add(id(aliases[item]))
        elif isinstance(item, nn.Module):
            if not any(m is item for _, m in named):
                raise SelectorError(f"module {type(item).__name__} passed in blocks= is not a submodule of the model")
            wanted_ids.add(id(item))
        else:
            raise SelectorError(f"blocks list holds {_short_repr(item)} ({type(item).__name__}); use names or modules")
    return lambda n, m: n in wanted_names or id(m) in wanted_ids


def _predicate_matcher(predicate: Callable[..., Any]) -> Predicate:
    def match(name: str, module: nn.Module) -> bool:
        try:
            return bool(predicate(name, module))
        except Exception as exc:  # a user's predicate: report which module broke it
            raise SelectorError(f"block predicate raised {type(exc).__name__}: {exc} on module {name!r}") from exc

    return match


def _dedupe(pairs: List[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """One site per module object, even when a module is registered under several names."""
    seen, kept = set(), []
    for name, module in pairs:
        if id(module) not in seen:
            seen.add(id(module))
            kept.append((name, module))
    return kept


def _sample_names(named: List[Tuple[str, nn.Module]], limit: int = 8) -> str:
    names = [n for n, _ in named if n]
    if not names:
        return "(the model has no submodules)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
