"""A recipe study's training claims decided on the final training error (issue 25), with the final test error beside
them: hand-built per-iteration tables whose honest answers are "yes", "no" and "unclear", checked against intervals
computed by hand (t(0.975, 2) = 4.303 for three seeds); the default study still decided on the loss."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from gradscope.study.claims import all_claims
from gradscope.study.error_claims import error_claims, error_window, final_errors, recipe_errors
from gradscope.study.runs import Settings
from gradscope.study.training_claims import ERROR_MARGIN, degradation_claim

CAVEAT = "recipe tiny: a short run"
ITERATIONS = 40  # the window is the last 5%: iterations 38 and 39
EVAL = (19, 39)  # evaluations after iterations 19 and 39
SEEDS = (0, 1, 2)


def configs(seeds=SEEDS, models=("plain20", "plain56", "resnet20", "resnet56")):
    out = {}
    for model in models:
        for s in seeds:
            out[f"{model}-bn-s{s}"] = {"config": f"{model}-bn", "model": model, "bn": True, "seed": s,
                                       "residual": model.startswith("resnet"),
                                       "depth": int(model.lstrip("plainrest")), "num_classes": 10}
    return out


def table(train, test=None, diverged=()):
    """A recipe study's per-iteration table: run -> final training error (%) over the window; the iterations before
    it at chance (so a wrong window is seen), the test error (%) at the last evaluation (30% at the first)."""
    test = test or {}
    rows = []
    window = error_window(ITERATIONS)
    for run, err in train.items():
        for i in range(ITERATIONS):
            acc = 1 - err / 100 if i >= ITERATIONS - window else 0.1
            t = (test.get(run, 10.0) if i == EVAL[-1] else 30.0) / 100 if i in EVAL else math.nan
            loss = math.inf if run in diverged and i == ITERATIONS - 1 else 1.0
            rows.append((run, run.rsplit("-s", 1)[0], int(run.rsplit("-s", 1)[1]), i, loss, acc, 0.1, math.nan, t))
    return pd.DataFrame(rows, columns=["run", "config", "seed", "step", "loss", "accuracy", "lr", "val_error",
                                       "test_error"])


def errors_of(plain_gap, res_gap, shallow=(8.0, 8.4, 7.9), test=None, diverged=()):
    """Final errors with per-seed deep-minus-shallow training-error gaps (points), through the table."""
    train = {}
    for i, s in enumerate(SEEDS):
        train[f"plain20-bn-s{s}"] = shallow[i]
        train[f"plain56-bn-s{s}"] = shallow[i] + plain_gap[i]
        train[f"resnet20-bn-s{s}"] = shallow[i] - 1.0
        train[f"resnet56-bn-s{s}"] = shallow[i] - 1.0 + res_gap[i]
    return final_errors(table(train, test, diverged), list(train), error_window(ITERATIONS))


DEGRADES = (3.0, 3.4, 2.9)  # mean +3.10, sd 0.2646: 95% interval +3.10 ± 4.303·0.1528 = [+2.44, +3.76]
FLAT = (0.1, -0.2, 0.0)  # mean -0.033, sd 0.1528: [-0.413, +0.346], below the 1-point margin
SPREAD = (1.0, 2.0, 3.0)  # mean +2.00, sd 1.0: [-0.48, +4.48] contains the margin; 7 seeds would decide it
SHORTCUTS = (-1.5, -1.2, -1.8)  # mean -1.50, sd 0.3: [-2.25, -0.75], below the margin


def test_the_window_is_the_last_five_percent_of_the_iterations():
    assert error_window(64_000) == 3_200 and error_window(4_000) == 200 and error_window(4) == 1
    e = errors_of(DEGRADES, SHORTCUTS, test={"plain20-bn-s0": 9.5}, diverged=("plain56-bn-s2",))
    assert e.window == 2
    assert e.train["plain20-bn-s0"] == pytest.approx(8.0) and e.train["plain56-bn-s1"] == pytest.approx(11.8)
    assert e.test["plain20-bn-s0"] == pytest.approx(9.5)  # the last evaluation, not the first (30%)
    assert math.isnan(e.train["plain56-bn-s2"]) and math.isnan(e.test["plain56-bn-s2"])  # diverged: NaN loss


def test_degradation_yes_from_the_training_error_with_its_hand_computed_interval():
    c = error_claims(configs(), errors_of(DEGRADES, SHORTCUTS), CAVEAT)[0]
    assert c.key == "degradation" and c.answer == "yes" and c.unit == "points"
    assert "plain56-bn - plain20-bn final training error +3.10 points, 95% interval [+2.44, +3.76]" in c.evidence
    assert c.estimate == pytest.approx(3.1) and c.low == pytest.approx(3.1 - 4.303 * 0.2646 / math.sqrt(3), abs=1e-3)
    assert "plain20-bn final training error 8.1% (chance 90%): learned" in c.evidence
    assert "1-point margin" in c.how and "nat" not in c.evidence + c.how


def test_degradation_no_when_the_gap_lies_below_the_margin():
    c = error_claims(configs(), errors_of(FLAT, SHORTCUTS), CAVEAT)[0]
    assert c.answer == "no" and "-0.03 points, 95% interval [-0.41, +0.35]" in c.evidence


def test_degradation_unclear_when_the_interval_contains_the_margin_and_says_what_would_decide_it():
    c = error_claims(configs(), errors_of(SPREAD, SHORTCUTS), CAVEAT)[0]
    assert c.answer == "unclear" and "[-0.48, +4.48]" in c.evidence
    assert "contains the 1-point margin" in c.how and "about 7 seeds (--seeds 0,1,2,3,4,5,6)" in c.evidence


def test_one_seed_is_unclear():
    cfg = configs(seeds=(0,))
    e = final_errors(table({"plain20-bn-s0": 8.0, "plain56-bn-s0": 14.0}), ["plain20-bn-s0", "plain56-bn-s0"], 2)
    c = error_claims(cfg, e, CAVEAT)[0]
    assert c.answer == "unclear" and "one seed" in c.how


def test_a_shallow_net_at_the_chance_error_decides_nothing():
    c = error_claims(configs(), errors_of(FLAT, FLAT, shallow=(89.8, 90.1, 90.0)), CAVEAT)
    assert [x.answer for x in c] == ["unclear", "unclear"]
    assert "did not learn" in c[0].how and "more --iterations" in c[0].how
    assert "plain20-bn final training error 90.0% (chance 90%): still within 1 point of chance" in c[0].evidence


def test_residual_yes_needs_the_plain_nets_to_degrade():
    yes, no, flat = (error_claims(configs(), errors_of(plain, res), CAVEAT)[1]
                     for plain, res in ((DEGRADES, SHORTCUTS), (DEGRADES, DEGRADES), (FLAT, SHORTCUTS)))
    assert yes.answer == "yes" and "-1.50 points, 95% interval [-2.25, -0.75]" in yes.evidence
    assert "the plain gap exceeds it by +4.60 points" in yes.evidence
    assert no.answer == "no"
    assert flat.answer == "unclear" and "no degradation for shortcuts to remove" in flat.how


def test_the_test_error_is_reported_beside_the_claim_and_does_not_decide_it():
    test = {f"{m}-bn-s{s}": v + 0.1 * s for m, v in (("plain20", 9.0), ("plain56", 12.0), ("resnet20", 8.5),
                                                     ("resnet56", 7.0)) for s in SEEDS}
    deg, res = error_claims(configs(), errors_of(DEGRADES, SHORTCUTS, test=test), CAVEAT)
    # gaps +3.00 per seed: sd 0, so the interval is the point
    assert "not deciding it, the test error of the last evaluation: plain56-bn - plain20-bn final test error " \
           "+3.00 points, 95% interval [+3.00, +3.00]" in deg.evidence
    assert "plain20-bn 9.10% ± 0.10 sd (n=3; not in Table 6)" in deg.evidence
    assert "resnet20-bn 8.60% ± 0.10 sd (n=3; Table 6: 8.75%)" in res.evidence
    assert "resnet56-bn 7.10% ± 0.10 sd (n=3; Table 6: 6.97%)" in res.evidence
    # the answer follows the training error only: test errors that say the opposite change nothing
    flipped = {r: 20.0 - v for r, v in test.items()}
    again = error_claims(configs(), errors_of(DEGRADES, SHORTCUTS, test=flipped), CAVEAT)
    assert [c.answer for c in again] == [deg.answer, res.answer] == ["yes", "yes"]


def test_resnet110_is_compared_with_the_best_and_the_mean_of_the_five_runs():
    cfg = configs(models=("resnet20", "resnet110"))
    train = {r: 7.0 for r in cfg}
    e = final_errors(table(train, {r: 6.5 for r in cfg}), list(cfg), 2)
    res = error_claims(cfg, e, CAVEAT)[1]
    assert ("resnet110-bn 6.50% ± 0.00 sd (n=3; Table 6: 6.43% best of 5 runs, 6.61 ± 0.16% over the 5)"
            in res.evidence)


def test_a_default_study_is_still_decided_on_the_loss():
    assert not hasattr(Settings(), "error_window")  # so evaluate() passes no errors
    t = table({"plain20-bn-s0": 8.0})
    assert recipe_errors(t, ["plain20-bn-s0"], None) is None
    assert recipe_errors(t.drop(columns=["test_error"]), ["plain20-bn-s0"], 2) is None
    finals = {r: (2.0 if r.startswith("plain56") else 1.0) + 0.01 * c["seed"] for r, c in configs().items()}
    deg = degradation_claim(configs(), finals, CAVEAT)
    assert deg.answer == "yes" and deg.unit == "nats" and "final loss +1.000 nats" in deg.evidence
    by_loss = all_claims(pd.DataFrame(columns=["signal", "runs"]), configs(), finals, CAVEAT)[3:]
    assert [c.unit for c in by_loss] == ["nats", "nats"] and by_loss[0].evidence == deg.evidence
    assert ERROR_MARGIN == 1.0
