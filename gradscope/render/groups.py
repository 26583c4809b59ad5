"""Which configuration each run belongs to: the seeds of one configuration are drawn as one line with a band and
shown as one table row. Read from run facts (a ``config`` fact or column; else facts equal but for the seed), never
parsed from run names.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import pandas as pd

from gradscope import analysis as A
from gradscope import schema as S

__all__ = ["CONFIG_COLUMN", "by_configuration", "configurations_of", "results_configurations", "run_configurations"]

#: The frame column naming each run's configuration (the same for all its seeds), where a study adds it.
CONFIG_COLUMN = getattr(S, "CONFIG", "config")


def run_configurations(frame: pd.DataFrame, groups: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Run -> configuration, in run order: ``groups`` where given, else the frame's configuration column, else
    each run its own configuration. Names are never parsed: seeds of one configuration share the column's value."""
    runs = A.run_names(frame)
    if groups is None and CONFIG_COLUMN in frame.columns:
        f = A._with_run(frame)
        first = f.dropna(subset=[CONFIG_COLUMN]).groupby(S.RUN, sort=False)[CONFIG_COLUMN].first()
        groups = {str(r): str(c) for r, c in first.items()}
    groups = groups or {}
    return {r: str(groups.get(r, r)) for r in runs}


def configurations_of(configs: Optional[Mapping[str, Mapping[str, Any]]]) -> Optional[dict[str, str]]:
    """Run -> configuration from a study's run facts: a run's ``config`` where it has one; else runs whose facts
    differ only by ``seed`` form one configuration, named after its first run. None without facts."""
    if not configs:
        return None
    out: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for run, facts in configs.items():
        facts = dict(facts or {})
        if facts.get(CONFIG_COLUMN):
            out[str(run)] = str(facts[CONFIG_COLUMN])
            continue
        key = tuple(sorted((k, repr(v)) for k, v in facts.items() if k != S.SEED))
        out[str(run)] = first.setdefault(key, str(run)) if S.SEED in facts else str(run)
    return out


def by_configuration(config_of: Mapping[str, str]) -> dict[str, list[str]]:
    """Configuration -> its runs, both in first-seen order."""
    out: dict[str, list[str]] = {}
    for run, config in config_of.items():
        out.setdefault(config, []).append(run)
    return out


def results_configurations(results: Any) -> dict[str, str]:
    """Run -> configuration for every run of every phase of a Results (run facts from ``results.configs``)."""
    facts = configurations_of(results.configs)
    out: dict[str, str] = {}
    for phase in results.phases():
        out.update(run_configurations(results.frames[phase], facts))
    return out
