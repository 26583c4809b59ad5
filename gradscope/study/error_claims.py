"""A recipe study's training claims, decided on the final *training error*, with the final *test error* beside them.

He et al.'s degradation claim is about training error: "the deeper 56-layer plain net has higher training error
throughout the training procedure" (§4.1, Fig. 6 left, dashed), and §4.2 compares test errors too (Table 6, Fig. 6
bold). A recipe study trains to the end of the paper's schedule and records both (:mod:`gradscope.study.recipe_train`),
so its degradation and residual claims are decided on the training error, by the same rule as the default study's
loss claims (:mod:`gradscope.study.training_claims`, quantity :data:`~gradscope.study.training_claims.TRAIN_ERROR`:
paired by seed, learning check against the chance error ``100·(1 - 1/classes)`` %, 95% interval of the
deep-minus-shallow gap against a :data:`~gradscope.study.training_claims.ERROR_MARGIN` of 1 percentage point).

What "final" means:

* **Final training error** of a run: the mean mini-batch error (augmented images, train mode; ``1 - accuracy`` of
  the per-iteration table) over the last :data:`FINAL_FRACTION` (5%) of the recipe's iterations, at least one:
  the last 3,200 of he2016's 64,000 iterations (about 9 epochs of the 45k images), the last 200 of he2016-short's
  4,000. Both windows lie wholly after the last learning-rate drop (48k, 3k), where Fig. 6's training curves are
  flat, so the mean describes the end of training rather than a point on a slope; and they hold 410k (25.6k)
  mini-batch images, so the binomial noise of the mean (about 0.05 (0.2) points at a 10% error) is far below
  the 1-point margin and the spread over seeds is what the interval measures. One curve point (the mean since the
  previous evaluation: 1,000 iterations, 250 for the short recipe) would tie the window to the evaluation
  interval; the last 5% is one rule for both recipes, and no closer to the paper either way.
* **Final test error** of a run: the test error of its last evaluation (after the last iteration for a run that
  finished), the number the paper's Table 6 reports and :func:`gradscope.analysis.curves.table6` tabulates. It is
  reported beside each claim (the deep-minus-shallow gap with its 95% interval, each net against Table 6) and does
  not decide the answer: the paper's claims are about training error, and a number beside the paper's is evidence,
  not an agreement verdict.

**The binomial floor.** Each final error is a count on a known number of examples: the window's iterations times
the mini-batch size the run recorded (``batch_images``), and the test set size (``test_images``). Its binomial
variance (:func:`gradscope.analysis.stats.binomial_variance`) floors the per-seed variance of every interval
(:mod:`gradscope.study.run_noise`), so a few seeds that agree exactly on a small evaluation set (identical quantised
errors, sd 0) give a wide interval and ``unclear`` instead of a zero-width one. Where a count is unknown (records
from before it was kept) the evidence says so, and identical values decide nothing.

A run whose loss went non-finite (diverged) has NaN for both and is named in the claims it touches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

from gradscope import schema as S
from gradscope.analysis import stats
from gradscope.analysis.curves import PAPER_RESNET110_MEAN_STD, PAPER_TEST_ERROR
from gradscope.analysis.results import Claim
from gradscope.study.run_noise import Noise, binomial_noise
from gradscope.study.training_claims import (TEST_ERROR, TRAIN_ERROR, degradation_claim, depth_gap, gap_numbers,
                                             residual_claim)

#: Share of a recipe's iterations, at its end, whose mean mini-batch error is a run's final training error.
FINAL_FRACTION = 0.05


def error_window(iterations: int) -> int:
    """Iterations whose mean training error is final: the last :data:`FINAL_FRACTION` of ``iterations``, at least
    one (3,200 of 64,000; 200 of 4,000)."""
    return max(1, math.ceil(FINAL_FRACTION * iterations))


@dataclass(frozen=True)
class FinalErrors:
    """Per run, in percent: the final training error (mean over the window) and the final test error, with each
    one's binomial noise (empty where the number of examples is unknown)."""

    train: Dict[str, float]
    test: Dict[str, float]
    window: int
    train_noise: Noise = field(default_factory=Noise)
    test_noise: Noise = field(default_factory=Noise)


def _diverged(rows: Any) -> bool:
    loss = rows["loss"].astype(float)
    return bool((~loss.apply(math.isfinite)).any())


def _count(config: Mapping[str, Any], key: str) -> Optional[int]:
    value = config.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def final_errors(losses: Any, runs: Sequence[str], window: int,
                 configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> FinalErrors:
    """The final training and test errors (%) of each run of a recipe study's per-iteration table (``accuracy``
    and ``test_error`` columns); NaN for a run that diverged, a test error NaN for a run never evaluated.

    ``configs`` (run -> config) give the examples behind each error, for its binomial noise: the training error
    counts ``batch_images`` per iteration of the window (its rows: a run stopped early has fewer), the test error
    ``test_images``; a run without them has unknown noise."""
    configs = configs or {}
    train: Dict[str, float] = {}
    test: Dict[str, float] = {}
    train_examples: Dict[str, int] = {}
    test_examples: Dict[str, int] = {}
    for run in runs:
        rows = losses[losses[S.RUN] == run].sort_values(S.STEP)
        if rows.empty:
            continue
        bad = _diverged(rows)
        tail = rows["accuracy"].tail(window)
        train[run] = math.nan if bad else float(100 * (1 - tail.mean()))
        evaluated = rows["test_error"].dropna()
        test[run] = math.nan if bad or evaluated.empty else float(100 * evaluated.iloc[-1])
        batch, images = _count(configs.get(run, {}), "batch_images"), _count(configs.get(run, {}), "test_images")
        if batch:
            train_examples[run] = batch * len(tail)
        if images:
            test_examples[run] = images
    return FinalErrors(train, test, window, binomial_noise(train, train_examples), binomial_noise(test, test_examples))


def recipe_errors(losses: Any, runs: Sequence[str], window: Any,
                  configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Any:
    """:func:`final_errors` when ``losses`` is a recipe study's table and ``window`` is set; None otherwise (the
    study's claims are then decided on the loss)."""
    columns = getattr(losses, "columns", ())
    if not window or "accuracy" not in columns or "test_error" not in columns:
        return None
    return final_errors(losses, runs, int(window), configs)


def _paper(model: str) -> str:
    if model == "resnet110":
        mean, sd = PAPER_RESNET110_MEAN_STD
        return f"Table 6: {PAPER_TEST_ERROR[model]:.2f}% best of 5 runs, {mean:.2f} ± {sd:.2f}% over the 5"
    if model in PAPER_TEST_ERROR:
        return f"Table 6: {PAPER_TEST_ERROR[model]:.2f}%"
    return "not in Table 6"


def _net_text(group: str, runs: List[str], test: Dict[str, float], configs: Dict[str, Dict[str, Any]]) -> str:
    """``resnet20-bn 8.90% ± 0.20 sd (n=3; Table 6: 8.75%)``: a configuration's final test error, mean and sd over
    its seeds."""
    mean, sd, _, n = stats.mean_sd_se([test[r] for r in runs])
    spread = f" ± {sd:.2f} sd" if n > 1 else ""
    model = str((configs.get(runs[0]) or {}).get("model") or "") if runs else ""
    value = "—" if n == 0 else f"{mean:.2f}%"
    return f"{group} {value}{spread} (n={n}; {_paper(model)})"


def test_error_text(configs: Dict[str, Dict[str, Any]], test: Dict[str, float], residual: bool,
                    noise: Optional[Noise] = None) -> str:
    """The final test error of one family's two depths, beside its claim: the gap paired by seed with its 95%
    interval (floored at the binomial ``noise`` of the test set), and each net against the paper's Table 6. Empty
    when the family has no two depths."""
    g = depth_gap(configs, test, residual=residual, quantity=TEST_ERROR, noise=noise)
    if g is None:
        return ""
    shallow, deep = min(g["runs"]), max(g["runs"])
    nets = "; ".join(_net_text(p.group, g["runs"][d], test, configs) for p, d in zip(g["progress"], (shallow, deep)))
    return f"beside it, not deciding it, the test error of the last evaluation: {gap_numbers(g)}; {nets}"


def error_claims(configs: Dict[str, Dict[str, Any]], errors: FinalErrors, caveat: str) -> List[Claim]:
    """The degradation and residual claims of a recipe study: decided on the final training error, with the final
    test error reported beside each."""
    out = []
    noise = errors.train_noise
    for claim, residual in ((degradation_claim(configs, errors.train, caveat, quantity=TRAIN_ERROR, noise=noise),
                             False),
                            (residual_claim(configs, errors.train, caveat, quantity=TRAIN_ERROR, noise=noise),
                             True)):
        beside = test_error_text(configs, errors.test, residual, errors.test_noise)
        out.append(replace(claim, evidence=f"{claim.evidence}; {beside}") if beside else claim)
    return out
