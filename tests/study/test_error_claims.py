"""A recipe study's training claims decided on the final training error (issue 25), with the final test error beside
them: hand-built per-iteration tables whose honest answers are "yes", "no" and "unclear", checked against intervals
computed by hand (t(0.975, 2) = 4.302653 for three seeds); the default study still decided on the loss."""
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
    # a net 82 points below chance on one seed is shown, not called "learned" (a new user read it as a verdict)
    assert "learned" not in c.evidence and c.evidence.count("whether it left chance is not tested") == 2


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
    # gaps +1.00, +1.01, +1.02 (identical gaps, sd 0, would decide nothing: issue "a yes must follow")
    finals = {r: (2.0 + 0.02 * c["seed"] if r.startswith("plain56") else 1.0 + 0.01 * c["seed"])
              for r, c in configs().items()}
    deg = degradation_claim(configs(), finals, CAVEAT)
    assert deg.answer == "yes" and deg.unit == "nats" and "final loss +1.010 nats" in deg.evidence
    by_loss = all_claims(pd.DataFrame(columns=["signal", "runs"]), configs(), finals, CAVEAT)[3:]
    assert [c.unit for c in by_loss] == ["nats", "nats"] and by_loss[0].evidence == deg.evidence
    assert ERROR_MARGIN == 1.0


# --- the binomial floor: a zero spread over seeds is not certainty ---------------------------------------------------

def counted(cfg, batch_images, test_images):
    """Configs with the examples behind each error, as a recipe run records them."""
    return {r: {**c, "batch_images": batch_images, "test_images": test_images} for r, c in cfg.items()}


def two_identical_seeds(facts=True):
    """plain20 10% and plain56 30% training error on both seeds: a gap of +20 points twice, sd 0. Batches of 20
    over the 2-iteration window: 40 examples per run (errors are multiples of 2.5%)."""
    cfg = configs(seeds=(0, 1), models=("plain20", "plain56"))
    cfg = counted(cfg, 20, 40) if facts else cfg
    train = {r: (10.0 if r.startswith("plain20") else 30.0) for r in cfg}
    test = {r: (12.5 if r.startswith("plain20") else 25.0) for r in cfg}
    return cfg, final_errors(table(train, test), list(cfg), error_window(ITERATIONS), cfg)


def test_two_seeds_with_identical_errors_on_40_examples_are_unclear_with_the_hand_computed_floor():
    cfg, e = two_identical_seeds()
    assert e.train_noise.counts == {r: 40 for r in cfg} and e.test_noise.counts == {r: 40 for r in cfg}
    c = error_claims(cfg, e, CAVEAT)[0]
    assert c.answer == "unclear"  # before the floor: "yes" from [+20.00, +20.00]
    # by hand: Agresti-Coull variances (points²) of 4 and 12 wrong of 40, added for the paired gap, then
    # sd = sqrt(floor), se = sd / sqrt(2), half-width t(0.975, 1) · se = 12.706 · se
    v10 = 1e4 * (6 / 44) * (38 / 44) / 44  # 26.77
    v30 = 1e4 * (14 / 44) * (30 / 44) / 44  # 49.30
    half = math.tan(math.pi * 0.475) * math.sqrt(v10 + v30) / math.sqrt(2)  # 78.36; t(0.975, 1) = tan(0.475 pi)
    assert c.low == pytest.approx(20 - half, abs=1e-6) and c.high == pytest.approx(20 + half, abs=1e-6)
    assert "+20.00 points, 95% interval [-58.36, +98.36]" in c.evidence
    assert "interval widened to the binomial noise of 40 examples per run" in c.evidence
    assert "contains the 1-point margin" in c.how and "about 4 seeds (--seeds 0,1,2,3)" in c.how
    # the learning checks use the same floor: plain20 80 ± 12.706·sqrt(v10/2) = [33.5, 126.5] learned; plain56
    # 60 ± 12.706·sqrt(v30/2) = [-3.1, 123.1] contains the margin
    assert "plain20-bn final training error 10.0% (chance 90%): learned (interval widened to the binomial noise of " \
           "40 examples per run)" in c.evidence
    assert "plain56-bn final training error 30.0% (chance 90%): unclear whether it left chance" in c.evidence
    # the test error beside it (40 test images) is widened too
    v12, v25 = (1e4 * (7 / 44) * (37 / 44) / 44, 1e4 * (12 / 44) * (32 / 44) / 44)
    test_half = math.tan(math.pi * 0.475) * math.sqrt(v12 + v25) / math.sqrt(2)
    assert f"final test error +12.50 points, 95% interval [{12.5 - test_half:+.2f}, {12.5 + test_half:+.2f}]" \
           in c.evidence


def test_identical_errors_with_an_unknown_number_of_examples_decide_nothing_and_say_why():
    cfg, e = two_identical_seeds(facts=False)
    assert e.train_noise.counts == {}
    c = error_claims(cfg, e, CAVEAT)[0]
    assert c.answer == "unclear" and "[+20.00, +20.00]" in c.evidence
    assert "the number of examples behind each error is unknown" in c.evidence
    assert "identical over seeds: a zero-width interval, not certainty" in c.evidence
    assert "the 2 seeds gave the same gap (spread 0 over seeds)" in c.how
    assert "check that the seeds vary the data order and the initialisation" in c.how
    assert "record how many examples each error counts" in c.how


@pytest.mark.parametrize("plain, res, answers", [(DEGRADES, SHORTCUTS, ["yes", "yes"]),
                                                  (FLAT, SHORTCUTS, ["no", "unclear"]),
                                                  (SPREAD, DEGRADES, ["unclear", "no"])])
def test_many_examples_and_a_real_spread_decide_as_before(plain, res, answers):
    """200,000 examples per run: the binomial sd of a gap (~0.09 points) is below the seed spread, so the interval
    and the answer are those of the spread alone."""
    unfloored = error_claims(configs(), errors_of(plain, res), CAVEAT)
    cfg = counted(configs(), 100_000, 10_000)
    train = {r: v for r, v in errors_of(plain, res).train.items()}
    floored = error_claims(cfg, final_errors(table(train), list(cfg), error_window(ITERATIONS), cfg), CAVEAT)
    assert [c.answer for c in floored] == [c.answer for c in unfloored] == answers
    for a, b in zip(floored, unfloored):
        assert (a.estimate, a.low, a.high) == pytest.approx((b.estimate, b.low, b.high))
        gap = a.evidence.split("BN)")[0]  # the deciding gap's numbers (a secondary interval may be widened)
        assert "per seed" in gap and "widened" not in gap and "unknown" not in a.evidence


def test_the_docs_example_he2016_sized_windows_and_10000_test_images():
    """docs/verdicts.md's example: 409,600 training examples per run (he2016's 3,200 × 128; here 2 × 204,800) leave
    the training-error interval to the seeds; identical test-error gaps on 10,000 images are widened by hand to
    ±4.303·sqrt((v(9.x%) + v(12.x%))/3), about ±1.08 points."""
    test = {f"{m}-bn-s{s}": v + 0.1 * s for m, v in (("plain20", 9.0), ("plain56", 12.0), ("resnet20", 8.5),
                                                     ("resnet56", 7.0)) for s in SEEDS}
    cfg = counted(configs(), 204_800, 10_000)
    e = final_errors(table(errors_of(DEGRADES, SHORTCUTS).train, test), list(cfg), error_window(ITERATIONS), cfg)
    deg = error_claims(cfg, e, CAVEAT)[0]
    assert deg.answer == "yes" and "+3.10 points, 95% interval [+2.44, +3.76] (n=3 seeds; per seed +3.0, +3.4, " \
                                   "+2.9; with BN);" in deg.evidence

    def v(err):  # Agresti-Coull, points²
        p = (err / 100 * 10_000 + 2) / 10_004
        return 1e4 * p * (1 - p) / 10_004
    floor = sum(v(9.0 + 0.1 * s) + v(12.0 + 0.1 * s) for s in SEEDS) / 3
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) * math.sqrt(floor / 3)  # t(0.975, 2), closed form
    assert half == pytest.approx(1.08, abs=0.01)
    assert (f"final test error +3.00 points, 95% interval [{3 - half:+.2f}, {3 + half:+.2f}] (n=3 seeds; per seed "
            f"+3.0, +3.0, +3.0; with BN; interval widened to the binomial noise of 10,000 examples per run)"
            in deg.evidence)
    assert "[+1.92, +4.08]" in deg.evidence
