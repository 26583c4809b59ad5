r"""The ``"auto"`` block rule: pick what a practitioner calls the blocks of a model, from its module tree alone.

Rules, in order (the first that finds anything decides; see ``docs/blocks.md``):

1. ``declared``: modules that set ``gradscope_block = True``.
2. Repeated units. *Candidates* are the children of ``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict`` containers
   that are neither containers nor leaves and whose class occurs at least twice among container children or that sit
   in a stage container (``repeated``), and composite children of one module whose class occurs at least twice among
   that module's children (``repeated``, e.g. GoogLeNet's ``inception3a..5b``, RegNet's ``s3.b1..b4``); a *layer
   group* (a composite holding a single weight layer, such as conv + norm + activation) is never a candidate that way.
   Then, per class:

   * a *stage* class wraps a run of repeated blocks (a container holding two or more candidates of one class, or a
     module whose parameterised children are all candidates of one class): it gives way to the blocks inside it;
   * a *mixture of experts* (``mixture``): a candidate holding two or more same-class experts and a router, a 2-D
     weight with one row or column per expert; it is the block, and its experts are not (ask for them with
     ``blocks=r".*\.experts\.\d+"`` or their class);
   * a class found inside a picked non-stage candidate is a sub-unit (GoogLeNet's ``BasicConv2d``): not a block;
   * an auxiliary head (a unit, rarer than the blocks, whose weight layer has the model's output width without
     holding the model's last weight layer: GoogLeNet's ``aux1``) is not a block.

   Every module of a remaining class is a block (``same-class``: RepVGG's stem is a ``RepVggBlock``, RegNet's
   ``s1.b1`` is alone in its stage), outermost first. Beside the blocks, at the module that holds them (through
   containers), a composite unit with parameterised children that is not a layer group is a block too (``beside``:
   a U-Net's ``inc``, LeViT's downsampling units); at the model's top level a layer group after the last block is an
   output stage (a U-Net's ``outc``).
3. ``own-parameters``: the smallest modules owning parameters; a module that owns parameters and whose children are
   all leaves is one unit (``nn.MultiheadAttention`` calls its ``out_proj`` weight itself, never the module).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: rule name -> what it means, in the order the rules apply
RULES: Dict[str, str] = {
    "declared": "declares gradscope_block = True",
    "repeated": "its class repeats among the children of one container or module",
    "same-class": "another module of a block class (a block alone in its stage, a stem block)",
    "mixture": "a mixture of experts: holds same-class experts and a router with one output per expert",
    "beside": "a unit beside the blocks, held by the same module (a U-Net's inc/outc, a downsampling unit)",
    "own-parameters": "the smallest modules owning parameters (no repeated units found)",
}


@dataclass(frozen=True)
class Pick:
    """One module chosen by the rule: its name, the module, the rule and a short reason."""

    name: str
    module: nn.Module
    rule: str
    reason: str


def auto_blocks(named: List[Tuple[str, nn.Module]]) -> List[Pick]:
    """The ``"auto"`` picks among ``named`` (``model.named_modules()``), in that order."""
    declared = outermost((n, m) for n, m in named if n and bool(getattr(m, "gradscope_block", False)))
    if declared:
        return [Pick(n, m, "declared", RULES["declared"]) for n, m in declared]
    tree = _Tree(named)
    candidates = _candidates(tree)
    if candidates:
        picks = _repeated_units(tree, candidates)
        if picks:
            return picks
    return _own_parameters(tree)


def outermost(pairs: Iterable[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """Drop every pair nested inside an earlier one (by qualified-name prefix)."""
    kept: List[Tuple[str, nn.Module]] = []
    for name, module in pairs:
        if any(name.startswith(k + ".") for k, _ in kept):
            continue
        kept.append((name, module))
    return kept


class _Tree:
    """Names, parents and a few structural facts of a model's modules, computed once."""

    def __init__(self, named: List[Tuple[str, nn.Module]]) -> None:
        self.named = named
        self.name_of = {id(m): n for n, m in named}
        self.parent: Dict[int, nn.Module] = {}
        for _, module in named:
            for child in module.children():
                self.parent.setdefault(id(child), module)
        self._weights: Dict[int, int] = {}

    def weight_layers(self, module: nn.Module) -> int:
        """Submodules of ``module`` that own a parameter of two or more dimensions (conv, linear, embedding); the
        module's own parameters (a class token, a position table) do not count."""
        key = id(module)
        if key not in self._weights:
            self._weights[key] = sum(1 for m in module.modules() if m is not module
                                     and any(p.dim() >= 2 for p in m.parameters(recurse=False)))
        return self._weights[key]

    def layer_group(self, module: nn.Module) -> bool:
        """A composite holding at most one weight layer: conv + norm + activation, a wrapped 1x1 conv."""
        return self.weight_layers(module) <= 1

    def level(self, module: nn.Module) -> Optional[nn.Module]:
        """The first ancestor of ``module`` that is not a container (the module that holds it)."""
        parent = self.parent.get(id(module))
        while parent is not None and isinstance(parent, CONTAINERS):
            parent = self.parent.get(id(parent))
        return parent


def _composite(module: nn.Module) -> bool:
    """Neither a container nor a leaf, and holding parameters."""
    return not isinstance(module, CONTAINERS) and any(True for _ in module.children()) and \
        any(True for _ in module.parameters())


def _candidates(tree: _Tree) -> Dict[int, Tuple[str, nn.Module, str]]:
    """id -> (name, module, reason) of every repeated-unit candidate, in ``named_modules()`` order."""
    named = tree.named
    held = [(name, module, child) for name, module in named if isinstance(module, CONTAINERS)
            for child in module.children()]
    counts: Dict[type, int] = {}
    for _, _, child in held:
        counts[type(child)] = counts.get(type(child), 0) + 1
    stages = {id(child) for _, module, child in held if isinstance(child, CONTAINERS)
              and sum(isinstance(c, CONTAINERS) for c in module.children()) >= 2}
    found: Dict[int, Tuple[str, nn.Module, str]] = {}
    for name, module, child in held:
        if isinstance(child, CONTAINERS) or not any(True for _ in child.children()):
            continue
        if id(module) in stages and counts[type(child)] < 2:
            found[id(child)] = (tree.name_of[id(child)], child, f"alone in stage {name!r}")
        elif counts[type(child)] >= 2:
            found[id(child)] = (tree.name_of[id(child)], child, f"{type(child).__name__} x{counts[type(child)]} in "
                                f"containers")
    for name, module in named:
        if isinstance(module, CONTAINERS):
            continue
        kids = [c for c in module.children() if _composite(c) and not tree.layer_group(c)]
        per_class: Dict[type, int] = {}
        for c in kids:
            per_class[type(c)] = per_class.get(type(c), 0) + 1
        for c in kids:
            if per_class[type(c)] >= 2 and id(c) not in found:
                found[id(c)] = (tree.name_of[id(c)], c, f"{type(c).__name__} x{per_class[type(c)]} under "
                                f"{name or 'the model'!r}")
    if any(not tree.layer_group(m) for _, m, _ in found.values()):
        # layers repeated in a stem (held, through containers, by no candidate) give way to the blocks
        found = {i: v for i, v in found.items() if not tree.layer_group(v[1]) or v[2].startswith("alone")
                 or id(tree.level(v[1])) in found}
    order = {id(m): i for i, (_, m) in enumerate(named)}
    return dict(sorted(found.items(), key=lambda item: order.get(item[0], len(order))))


def _holders(module: nn.Module) -> List[nn.Module]:
    """``module`` and the containers reachable from it through containers only."""
    out, todo = [module], [c for c in module.children() if isinstance(c, CONTAINERS)]
    while todo:
        c = todo.pop(0)
        out.append(c)
        todo.extend(g for g in c.children() if isinstance(g, CONTAINERS))
    return out


def _runs(module: nn.Module, ids: Set[int], tree: _Tree) -> List[Tuple[nn.Module, List[nn.Module]]]:
    """(holder, same-class candidates) for each holder of ``module`` with two or more candidates of one class.

    The module itself counts as a holder only when its parameterised children are all candidates of that class
    (RegNet's ``RegStage`` holding ``b1..b4``; not a decoder layer whose two attention modules share a class)."""
    runs = []
    for holder in _holders(module):
        kids = [c for c in holder.children() if id(c) in ids]
        for cls in {type(c) for c in kids}:
            same = [c for c in kids if type(c) is cls]
            if len(same) < 2:
                continue
            if holder is module and (len(same) < 3 or any(id(c) not in ids or type(c) is not cls
                                                          for c in module.children()
                                                          if any(True for _ in c.parameters()))):
                continue  # two same-class parts of one block (GhostNet's ghost1/ghost2) are no stage
            runs.append((holder, same))
    return runs


def _is_stage(module: nn.Module, ids: Set[int], tree: _Tree) -> bool:
    """A stage: a run of repeated blocks (layer groups only when the run holds every such layer of the module)."""
    for holder, same in _runs(module, ids, tree):
        if not tree.layer_group(same[0]):
            return True
        everywhere = [m for m in module.modules() if m is not module and type(m) is type(same[0]) and id(m) in ids]
        if len(everywhere) == len(same):
            return True
    return False


def _routes(module: nn.Module, ids: Set[int], tree: _Tree) -> bool:
    """A mixture of experts: a container of two or more same-class experts and, outside it, a router weight with one
    row or column per expert whose other side matches the experts' input width."""
    for holder in _holders(module)[1:]:
        kids = list(holder.children())
        if len(kids) < 2 or len({type(c) for c in kids}) != 1:
            continue
        weights = [p for p in kids[0].parameters() if p.dim() >= 2]
        if not weights:
            continue
        width = set(weights[0].shape[1:2]) | set(weights[0].shape[:1])
        inside = {id(p) for p in holder.parameters()}
        n = len(kids)
        for p in module.parameters():
            if id(p) in inside or p.dim() != 2:
                continue
            rows, cols = p.shape
            if (rows == n and cols in width) or (cols == n and rows in width):
                return True
    return False


def _repeated_units(tree: _Tree, candidates: Dict[int, Tuple[str, nn.Module, str]]) -> List[Pick]:
    ids = set(candidates)
    mixtures = {i for i, (_, m, _) in candidates.items() if _routes(m, ids, tree)}
    stage_classes = {type(m) for i, (_, m, _) in candidates.items() if i not in mixtures and _is_stage(m, ids, tree)}
    classes = {type(m) for _, m, _ in candidates.values()} - stage_classes
    inner: Set[type] = set()
    for i, (_, m, _) in candidates.items():
        if type(m) in classes:
            inner.update(type(d) for d in m.modules() if d is not m and id(d) in ids)
    classes -= inner - {type(candidates[i][1]) for i in mixtures}
    classes -= _auxiliary_heads(tree, classes)
    reason = {i: r for i, (_, _, r) in candidates.items()}
    chosen = outermost((n, m) for n, m in tree.named if n and type(m) in classes)
    picks = []
    for n, m in chosen:
        if id(m) in mixtures:
            picks.append(Pick(n, m, "mixture", RULES["mixture"]))
        elif id(m) in reason:
            picks.append(Pick(n, m, "repeated", reason[id(m)]))
        else:
            picks.append(Pick(n, m, "same-class", f"a {type(m).__name__}, like the repeated blocks"))
    return _with_beside(tree, picks, stage_classes)


def _auxiliary_heads(tree: _Tree, classes: Set[type]) -> Set[type]:
    """Classes of units that end in the model's output width without holding its output layer (auxiliary
    classifiers), among classes rarer than the most frequent block class."""
    weights = [m for _, m in tree.named if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    if not weights:
        return set()
    last = weights[-1]
    width = _out_width(last)
    count: Dict[type, int] = {}
    for _, m in tree.named:
        if type(m) in classes:
            count[type(m)] = count.get(type(m), 0) + 1
    most = max(count.values(), default=0)
    heads = set()
    for _, m in tree.named:
        cls = type(m)
        if cls in classes and count[cls] < most and _is_head(m, last, width):
            heads.add(cls)
    return heads


def _is_head(module: nn.Module, last: nn.Module, width: int) -> bool:
    """``module`` ends, like the model's output layer ``last`` (a linear classifier), in a linear layer of the
    output width, and does not hold ``last``."""
    inner = list(module.modules())
    if any(m is last for m in inner) or not _linear(last):
        return False
    own = [m for m in inner if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    return bool(own) and _linear(own[-1]) and _out_width(own[-1]) == width


def _linear(module: nn.Module) -> bool:
    """Owns a 2-D weight (a linear layer, not a convolution)."""
    return any(p.dim() == 2 for p in module.parameters(recurse=False))


def _out_width(module: nn.Module) -> int:
    return next(p.shape[0] for p in module.parameters(recurse=False) if p.dim() >= 2)


def _with_beside(tree: _Tree, picks: List[Pick], excluded: Set[type]) -> List[Pick]:
    """Add the composite units held beside the picked blocks (see the module doc), in model order."""
    picked = {id(p.module) for p in picks}
    levels: Dict[int, nn.Module] = {}
    for p in picks:
        level = tree.level(p.module)
        if level is not None:
            levels[id(level)] = level
    root = tree.named[0][1] if tree.named else None
    last_weights = [m for _, m in tree.named if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    last = last_weights[-1] if last_weights else None
    extra: Dict[int, Pick] = {}
    for level in levels.values():
        units = [c for c in _level_units(level) if id(c) not in picked]
        order = [id(c) for c in _level_units(level)]
        last_block = max((order.index(id(c)) for c in _level_units(level) if _holds_pick(c, picked)), default=-1)
        for unit in units:
            if not _composite(unit) or type(unit) in excluded or _holds_pick(unit, picked):
                continue
            if not any(any(True for _ in c.parameters()) for c in unit.children()):
                continue  # a norm layer with an activation child (BatchNormAct2d) is a layer
            if last is not None and _width_head(unit, last):
                continue
            if tree.layer_group(unit):
                if not (level is root and order.index(id(unit)) > last_block and last is not None
                        and any(m is last for m in unit.modules()) and not _linear(last)):
                    continue
                reason = "the output stage: the model's last (convolutional) layer, after the last block"
            else:
                reason = f"a {type(unit).__name__} beside the blocks held by {tree.name_of.get(id(level)) or 'the model'!r}"
            extra[id(unit)] = Pick(tree.name_of[id(unit)], unit, "beside", reason)
    if not extra:
        return picks
    order = {id(m): i for i, (_, m) in enumerate(tree.named)}
    return sorted(picks + list(extra.values()), key=lambda p: order[id(p.module)])


def _width_head(unit: nn.Module, last: nn.Module) -> bool:
    """Whether ``unit`` is an auxiliary classifier: it ends in the output width of ``last`` without holding it."""
    return _is_head(unit, last, _out_width(last))


def _level_units(level: nn.Module) -> List[nn.Module]:
    """The children of ``level``, containers looked through, in order."""
    out: List[nn.Module] = []
    for child in level.children():
        if isinstance(child, CONTAINERS):
            out.extend(_level_units(child))
        else:
            out.append(child)
    return out


def _holds_pick(module: nn.Module, picked: Set[int]) -> bool:
    return any(id(m) in picked for m in module.modules())


def _own_parameters(tree: _Tree) -> List[Pick]:
    """The smallest modules owning parameters; a module owning parameters whose children are all leaves is one unit
    (it may use their weights itself, as ``nn.MultiheadAttention`` does with ``out_proj``)."""
    units = []
    for name, module in tree.named:
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        children = list(module.children())
        if any(any(True for _ in c.children()) for c in children):
            continue  # owns parameters and holds composites: look inside
        units.append((name, module))
    return [Pick(n, m, "own-parameters", RULES["own-parameters"]) for n, m in outermost(units)]
