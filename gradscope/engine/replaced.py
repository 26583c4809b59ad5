"""A block replaced after ``attach()``: ``model[2] = nn.Linear(...)``, a classifier head swapped for fine-tuning.

gradscope hooks module *objects*; left alone, the old module's hooks and parameters would keep being measured (its
``param_norm`` forever the same) while the new one, the module that really runs, is never seen. A scope therefore
checks, once per recorded step (at the first training forward of the model, and when the step closes), that the
module at each block's qualified name is still the one it hooks: a walk down ``_modules`` from the model, a few
dictionary lookups per block, and nothing at all in unrecorded steps. A replaced block is *followed*: the new module
gets the hooks, its parameters the parameter statistics (the block keeps its name and depth; ``kind`` becomes the new
class), and a warning names it once. A block whose name no longer exists warns once and gets no more rows.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from gradscope.engine.sites import Site, kind_of


def module_at(root: nn.Module, keys: List[str]) -> Optional[nn.Module]:
    """The submodule of ``root`` at the qualified name split into ``keys`` (None if it is gone)."""
    module: Optional[nn.Module] = root
    for key in keys:
        module = module._modules.get(key) if module is not None else None
        if module is None:
            return None
    return module


class Replacements:
    """Finds the blocks of one scope whose module was replaced or removed since ``attach()``."""

    def __init__(self, root: nn.Module, sites: List[Site]) -> None:
        self.root = root
        self.keys = [site.name.split(".") if site.name else [] for site in sites]
        self.gone: set = set()  # sites whose name no longer exists in the model

    def changed(self, sites: List[Site]) -> List[Tuple[int, Optional[nn.Module]]]:
        """``(site, module now at its name or None)`` for every site whose module is not the hooked one."""
        out = []
        for s, (site, keys) in enumerate(zip(sites, self.keys)):
            if s in self.gone:
                continue
            now = module_at(self.root, keys)
            if now is not site.module:
                out.append((s, now))
        return out


def followed(site: Site, module: nn.Module) -> Site:
    """The site of the same name, now on ``module``."""
    return Site(name=site.name, module=module, kind=kind_of(module))


def message(site: Site, module: Optional[nn.Module], step: int) -> str:
    """The one warning about a replaced (or removed) block."""
    if module is None:
        return (f"gradscope: block {site.name!r} ({site.kind}) was removed from the model after attach(): it gets no "
                f"rows from step {step} on")
    return (f"gradscope: block {site.name!r} was replaced after attach() ({site.kind} -> {kind_of(module)}); from "
            f"step {step} gradscope measures the new module (hooks, parameters) under the same name. Its "
            f"update_ratio needs an optimizer that holds its parameters")
