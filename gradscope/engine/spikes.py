"""The spike test of one series (the loss, or one block's log gradient norm): a robust z-score against a window of
recent values, and the guards that keep ordinary training from firing (see :mod:`gradscope.engine.alerts`).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Deque, Optional, Sequence, Tuple

from gradscope.engine.alertkinds import AlertRules

_MAD_TO_SD = 1.4826


def robust_z(history: Sequence[float], x: float, rel_floor: float,
             relative: bool = True) -> Tuple[float, float, float]:
    """``(z, median, scale)``: the robust z-score of ``x`` against ``history``, and what it was computed from.

    ``scale = 1.4826 * MAD(history)``, at least ``rel_floor * |median|`` (``relative``) or ``rel_floor`` (a log-space
    series, whose differences are already relative). ``median + z_max * scale`` is the bound ``x`` is tested against.
    """
    med = _median(sorted(history))
    mad = _median(sorted(abs(h - med) for h in history))
    floor = rel_floor * abs(med) if relative else rel_floor
    scale = max(_MAD_TO_SD * mad, floor, 1e-12)
    return (x - med) / scale, med, scale


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


#: one-step jumps a series keeps to learn its own noise (read once it holds ``warmup`` of them)
TAIL_MEMORY = 200
#: a spike starts with a jump over the largest of this many previous values (see :meth:`Series.test`)
JUMP_SPAN = 3
#: "elevated": this many times the window's median (a climb's values; an episode goes on while its values are)
ELEVATED = 1.5
#: a gradient's climb: this many elevated values in a row, the last the largest of them, this many times the median
#: and this many times the first of them (see :meth:`Series.test`)
CLIMB_STEPS, CLIMB_FACTOR, CLIMB_GROWTH = 4, 3.0, 1.5
#: a spike must jump this many times the ``TAIL_RANK``-th largest of the series' own earlier jumps
TAIL_MARGIN, TAIL_RANK = 2.0, 5


class Series:
    """One watched series (the loss, or one block's log gradient norm): its window, the jumps seen so far, and
    whether it is in a spike."""

    __slots__ = ("window", "jumps", "high", "climb", "pending")

    def __init__(self, window: int) -> None:
        self.window: Deque[float] = deque(maxlen=window)
        #: earlier one-step jumps of calm steps and lone excursions: relative to the window's median (the loss), in
        #: log units (gradients)
        self.jumps: Deque[float] = deque(maxlen=TAIL_MEMORY)
        self.high = False  # the latest value was a spike (started or continued one)
        self.climb = 0  # elevated values in a row (ELEVATED times the window's median)
        self.pending: Optional[float] = None  # the jump of a one-step excursion, kept once the next step is calm

    def calm(self, jump: float) -> None:
        """A value at or below the level: the excursion before it (if one) was a lone one, part of the noise."""
        if self.pending is not None:
            self.jumps.append(self.pending)
        self.jumps.append(jump)
        self.pending, self.high = None, False

    def bar(self, least_jump: float, least_count: int) -> float:
        """The jump a spike must start with: ``least_jump``, or more where the series' own jumps are larger (read
        once it holds ``least_count`` of them)."""
        if len(self.jumps) < least_count:
            return least_jump
        return max(least_jump, TAIL_MARGIN * heapq.nlargest(TAIL_RANK, self.jumps)[-1])

    def test(self, x: float, rules: AlertRules, relative: bool) -> Optional[float]:
        """The bound ``x`` crossed when it starts or continues a spike (in ``x``'s units: the loss, or the log of a
        gradient norm when not ``relative``), else None; ``x`` joins the window either way.

        The level first: ``x`` more than ``z`` robust standard deviations above the window's median (and, for a
        gradient, ``min_factor`` times it). Above it, an episode starts with either

        * a jump: ``x`` above the largest of the last :data:`JUMP_SPAN` values by ``z / 2`` scales, and by
          :data:`TAIL_MARGIN` times the :data:`TAIL_RANK`-th largest of the series' own earlier jumps (its noise: the
          jumps of calm steps, and of excursions above the level that lasted one step, alerts among them; a jump
          that recurs that often is the series' own), or
        * for a gradient, a climb, whatever the level: :data:`CLIMB_STEPS` values in a row at least
          :data:`ELEVATED` times their window's median, the last the largest of them, :data:`CLIMB_FACTOR` times
          its median and :data:`CLIMB_GROWTH` times the first (an explosion that grows by a factor each step never
          jumps, and widens the window's spread, so its level runs away from it).

        A smooth rise of a few percent a step stays below both; the batches of a heavy-tailed loss jump often but
        alone, which raises the bar. While the value stays above the level, or :data:`ELEVATED` times the median, the
        episode goes on."""
        history, series = self.window, self
        if len(history) < rules.warmup:
            history.append(x)
            return None
        recent = max(history[-1], history[-2], history[-3])  # the last JUMP_SPAN values
        if not relative and x <= min(history) + math.log(min(rules.min_factor, ELEVATED)):
            # below every bound (the median is at least the window's least value): the common case, no median
            series.calm(x - recent)
            series.climb = 0
            history.append(x)
            return None
        _, med, scale = robust_z(history, x, rules.rel_floor, relative)
        earlier = list(history)
        history.append(x)
        level = max(med + rules.z * scale, med if relative else med + math.log(rules.min_factor))
        raised = med + math.log(ELEVATED) if not relative else (med * ELEVATED if med > 0 else math.inf)
        series.climb = series.climb + 1 if x >= raised else 0
        climb_bound = med + math.log(CLIMB_FACTOR)
        run = earlier[len(earlier) - series.climb + 1:]  # the values before x in its run of elevated values
        climbing = not relative and series.climb >= CLIMB_STEPS and x >= climb_bound and \
            all(x >= h for h in run) and x - run[0] >= math.log(CLIMB_GROWTH)
        unit = max(abs(med), scale) if relative else 1.0  # jumps are kept relative to the loss, in log units else
        jump = (x - recent) / unit
        if series.high and (x > level or x >= raised):  # the episode goes on
            series.pending = None
            return level
        if x <= level and not climbing:
            series.calm(jump)
            return None
        needed = series.bar(0.5 * rules.z * scale / unit, rules.warmup)
        if x > level and jump > needed:
            bound = max(level, recent + needed * unit)
        elif climbing:
            bound = climb_bound
        else:
            bound = None
        # a lone excursion above the level (the step after it calm), alert or not, joins the noise memory: one that
        # recurs (TAIL_RANK times in TAIL_MEMORY steps) is the series' own, not a fault
        series.pending = jump if series.climb <= 1 else None
        if bound is None:
            return None
        series.high = True
        return bound
