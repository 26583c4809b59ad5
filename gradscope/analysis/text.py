"""Numbers and verdicts as text, written in one place: every renderer (terminal, Markdown, HTML, claims) uses these.

Pure functions, no pandas needed by callers; NaN, None, ``pd.NA`` and infinities are all handled here.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from gradscope import words as W

#: What a missing number prints as.
MISSING = "—"


def is_missing(x: Any) -> bool:
    """True for None, NaN and pandas' NA (anything that is not a number to print)."""
    if x is None:
        return True
    try:
        return bool(x != x)  # NaN and pd.NA (NA != NA is NA, whose bool raises: handled below)
    except TypeError:
        return True


def num(x: Any, fmt: str = ".3g", missing: str = MISSING) -> str:
    """``format(x, fmt)`` for a number; ``missing`` for None/NaN/NA; ``inf``/``-inf`` spelled out."""
    if is_missing(x):
        return missing
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def factor(f: Any) -> str:
    """A per-block factor: two decimals near 1 (``1.12``), else three significant digits; ``—`` if missing."""
    if is_missing(f):
        return MISSING
    f = float(f)
    if math.isinf(f):
        return "inf"
    return f"{f:.2f}" if 0.1 <= f < 10 else f"{f:.3g}"


def times(f: Any) -> str:
    """``x1.12`` (a factor with its multiplication sign), ``—`` if missing."""
    return MISSING if is_missing(f) else f"x{factor(f)}"


def pm(mean: Any, sd: Any, n: int, fmt: str = ".3g", sign: bool = False) -> str:
    """``+1.23 ± 0.05 (n=2)``; the spread is left out for a single value."""
    m = num(mean, ("+" if sign else "") + fmt)
    if n < 2 or is_missing(sd):
        return f"{m} (n={n})"
    return f"{m} ± {num(sd, fmt)} (n={n})"


def rate_text(f: Any, r2: Any, low: Any = None, high: Any = None) -> str:
    """``"x1.12 per block (R² 0.97)"``, with the fit's 95% interval when given (``"x1.12 per block (R² 0.97), 95%
    x1.10 to x1.14"``), or a note when no rate could be fitted."""
    if is_missing(f):
        return "no per-block rate (fewer than two blocks with a positive value)"
    r2s = "" if is_missing(r2) else f" (R² {float(r2):.2f})"
    ci = "" if is_missing(low) or is_missing(high) else f", 95% x{factor(low)} to x{factor(high)}"
    return f"x{factor(f)} per block{r2s}{ci}"


def sentence(r: Mapping[str, Any]) -> str:
    """The verdict of one verdict row in plain language, with its measured per-block rate and its phase.

    e.g. ``"resnet56-bn (init): backward gradients explode toward the input: x1.12 per block (R² 0.97),
    340x over 27 blocks (fitted)"``.
    """
    signal = r.get("signal")
    what = "forward activation variance" if signal == W.FORWARD else "backward gradients"
    where = "toward the output" if signal == W.FORWARD else "toward the input"
    step, phase = r.get("step"), r.get("phase")
    at = "" if is_missing(step) else f" at step {int(step)}"
    label = f" ({phase}{at})" if isinstance(phase, str) and phase else at
    head = f"{r.get('run', 'run')}{label}: {what}"
    verdict, n = r.get("verdict"), 0 if is_missing(r.get("n_blocks")) else int(r.get("n_blocks"))
    if verdict == W.DIVERGED:
        return f"{head} diverged: non-finite values (NaN/Inf) first at {r.get('nonfinite_block')}."
    if verdict == W.UNKNOWN:
        why = r.get("reason")
        if isinstance(why, str) and why and not is_missing(r.get("factor")):
            return f"{head} cannot be judged: {why}; fitted {rate_text(r.get('factor'), None)}."
        return f"{head} cannot be judged: {n} block(s) with a value, a rate needs two or more."
    if verdict == W.VANISHING and r.get("max_value") == 0:
        return f"{head} is zero at every one of {n} blocks (vanished)."
    plural = signal != W.FORWARD
    verb = {W.VANISHING: "vanish" if plural else "vanishes", W.EXPLODING: "explode" if plural else "explodes",
            W.HEALTHY: "stay healthy" if plural else "stays healthy"}.get(verdict, str(verdict))
    rate = rate_text(r.get('factor'), r.get('r2'), r.get('factor_low'), r.get('factor_high'))
    why = r.get("reason")
    if verdict in (W.VANISHING, W.EXPLODING) and isinstance(why, str) and why:  # decided by the measured ends
        text = f"{head} {verb}: {why}"
    elif r.get("min_value") == 0:  # the zero is the finding; the fit only covers the blocks with a positive value
        text = (f"{head} {verb}: zero at {r.get('min_block')}; the fit over the positive ones of its {n} blocks: "
                f"{rate}")
    else:
        text = f"{head} {verb}{' ' + where if verdict != W.HEALTHY else ''}: {rate}"
        text += f", {num(r.get('end_to_end'))}x over {n} blocks (from the fit)"
    pred = r.get("predicted_factor")
    if not is_missing(pred):
        text += f"; theory: {agreement_word(r.get('agreement'))}, predicted x{factor(pred)} per block against " \
                f"a measured x{factor(r.get('measured_factor'))}"
    return text + "."


def agreement_word(word: Any) -> str:
    """The agreement column as a phrase: agrees / DISAGREES / inconclusive."""
    return {W.AGREES: "agrees", W.DISAGREES: "DISAGREES", W.INCONCLUSIVE: "inconclusive"}.get(str(word), "—")
