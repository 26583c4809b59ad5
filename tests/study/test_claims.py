"""Claims decided with statistics: frames and losses with known answers, and the wording flips with the numbers."""
from __future__ import annotations

import math

import pandas as pd

from gradscope.analysis.trajectory import pool_seeds
from gradscope.study.claims import all_claims, backward_claim, degradation_claim, forward_claim, residual_claim

CAVEAT = "300 SGD steps: a short run"


def configs(seeds=(0, 1, 2)):
    out = {}
    for fam in ("plain", "resnet"):
        for depth in (20, 56):
            for bn in (True, False):
                for s in seeds:
                    run = f"{fam}{depth}-{'bn' if bn else 'nobn'}" + (f"-s{s}" if s else "")
                    out[run] = {"residual": fam == "resnet", "bn": bn, "depth": depth, "seed": s}
    return out


def losses(gap_plain, gap_res, base=1.0, seeds=(0, 1, 2)):
    """Final losses with per-seed deep-minus-shallow gaps ``gap_*[seed]`` (BN nets)."""
    out = {}
    for i, s in enumerate(seeds):
        suffix = f"-s{s}" if s else ""
        out[f"plain20-bn{suffix}"] = base + 0.01 * i
        out[f"plain56-bn{suffix}"] = base + 0.01 * i + gap_plain[i]
        out[f"resnet20-bn{suffix}"] = base - 0.1 + 0.01 * i
        out[f"resnet56-bn{suffix}"] = base - 0.1 + 0.01 * i + gap_res[i]
    return out


def test_degradation_yes_when_the_gap_is_outside_the_noise():
    c = degradation_claim(configs(), losses([1.27, 1.20, 1.25], [0.0, 0.05, -0.04]), CAVEAT)
    assert c.answer == "yes" and "+1.240 ± 0.036 (n=3)" in c.evidence and c.caveat == CAVEAT
    assert "plain56-bn - plain20-bn" in c.evidence and c.phase == "train"


def test_degradation_unclear_inside_the_noise_and_no_when_the_interval_is_below_the_margin():
    noisy = degradation_claim(configs(), losses([0.3, -0.2, 0.1], [0, 0, 0]), CAVEAT)
    assert noisy.answer == "unclear"  # mean +0.07, t(2)·SE = 0.63: inside the noise
    flat = degradation_claim(configs(), losses([0.01, -0.01, 0.0], [0, 0, 0]), CAVEAT)
    assert flat.answer == "no"  # the interval [-0.025, +0.025] lies below the 0.1-nat margin


def test_one_seed_is_always_unclear():
    one = configs(seeds=(0,))
    c = degradation_claim(one, losses([1.3], [0.0], seeds=(0,)), CAVEAT)
    assert c.answer == "unclear" and "one seed" in c.how


def test_residual_claim_flips_with_the_numbers():
    cfg = configs()
    fixed = residual_claim(cfg, losses([1.27, 1.20, 1.25], [-0.06, 0.06, 0.0]), CAVEAT)
    assert fixed.answer == "yes" and "the plain gap exceeds it by +1.240" in fixed.evidence
    worse = residual_claim(cfg, losses([1.27, 1.20, 1.25], [0.9, 1.0, 0.95]), CAVEAT)
    assert worse.answer == "no"
    same = residual_claim(cfg, losses([0.0, 0.05, -0.05], [0.0, 0.05, -0.05]), CAVEAT)
    assert same.answer == "unclear"  # shortcuts cannot be shown to remove a degradation that is not there


def test_a_diverged_run_is_named_in_every_training_claim():
    cfg = configs()
    finals = losses([1.27, 1.20, 1.25], [0.0, 0.05, -0.04])
    finals["plain56-bn-s2"] = math.nan
    finals["resnet56-bn-s1"] = math.nan
    deg, res = degradation_claim(cfg, finals, CAVEAT), residual_claim(cfg, finals, CAVEAT)
    assert "plain56-bn-s2" in deg.evidence and "diverged" in deg.evidence and "(n=2)" in deg.evidence
    assert "resnet56-bn-s1" in res.evidence


def verdict_rows(rows):
    cols = ["run", "signal", "verdict", "factor", "n_blocks", "max_value", "seed"]
    return pd.DataFrame(rows, columns=cols)


def init_verdicts(bn_fwd=(1.0, 1.0), nobn_plain=(0.80, 0.81), nobn_res=(1.02, 1.03), bn_bwd=(1.43, 1.44),
                  bn_bwd_class="exploding"):
    rows = []
    for i, s in enumerate((0, 1)):
        sfx = f"-s{s}" if s else ""
        rows += [[f"plain56-bn{sfx}", "forward", "healthy", bn_fwd[i], 27, 1.0, s],
                 [f"plain56-bn{sfx}", "backward", bn_bwd_class, bn_bwd[i], 27, 1.0, s],
                 [f"plain56-nobn{sfx}", "forward", "vanishing", nobn_plain[i], 27, 1.0, s],
                 [f"plain56-nobn{sfx}", "backward", "healthy", 0.95, 27, 1.0, s],
                 [f"resnet56-nobn{sfx}", "forward", "healthy", nobn_res[i], 27, 1.0, s],
                 [f"resnet56-nobn{sfx}", "backward", "healthy", 1.0, 27, 1.0, s]]
    return verdict_rows(rows)


CFG = {r: {"bn": "-bn" in r, "residual": r.startswith("resnet"), "depth": 56}
       for r in ("plain56-bn", "plain56-bn-s1", "plain56-nobn", "plain56-nobn-s1", "resnet56-nobn",
                 "resnet56-nobn-s1")}


def test_forward_claim_contrasts_the_plain_net_without_bn():
    c = forward_claim(pool_seeds(init_verdicts()), CFG)
    assert c.answer == "yes" and "without BN, plain56-nobn: x0.80 per block" in c.evidence
    assert "n=2" in c.evidence and "by construction" in c.evidence  # resnet56-nobn is not the contrast
    vanished = init_verdicts(bn_fwd=(0.7, 0.7))
    vanished.loc[vanished.run.str.startswith("plain56-bn") & (vanished.signal == "forward"), "verdict"] = "vanishing"
    assert forward_claim(pool_seeds(vanished), CFG).answer == "no"


def test_backward_claim_reports_explosion_and_flips_on_training():
    c = backward_claim(pool_seeds(init_verdicts()), CFG)
    assert c.answer == "yes" and "exploding in plain56-bn" in c.evidence and "x1.43 per block" in c.evidence
    traj = pd.DataFrame([{"run": r, "signal": "backward", "n_steps": 30, "frac_healthy": 0.2, "frac_vanishing": 0.8,
                          "frac_exploding": 0.0, "frac_diverged": 0.0, "frac_unknown": 0.0, "first_step": 0,
                          "first_verdict": "exploding", "first_factor": 1.4, "first_end_to_end": 1e4,
                          "last_step": 290, "last_verdict": "vanishing", "last_factor": 0.7,
                          "last_end_to_end": 1e-4, "near_change": 1.0, "far_change": 1e-3, "moved": "far end"}
                         for r in ("plain56-bn", "plain56-bn-s1")])
    trained = backward_claim(pool_seeds(init_verdicts()), CFG, traj)
    assert trained.answer == "no" and "vanishing in 80% of recorded training steps" in trained.evidence


def test_a_diverged_seed_turns_a_pooled_verdict_to_diverged_and_is_named():
    v = init_verdicts()
    v.loc[(v.run == "plain56-bn-s1") & (v.signal == "forward"), ["verdict", "factor"]] = ["diverged", float("nan")]
    c = forward_claim(pool_seeds(v), CFG)
    assert c.answer == "no" and "diverged: plain56-bn-s1" in c.evidence


def test_all_claims_in_the_papers_order():
    claims = all_claims(pool_seeds(init_verdicts()), {**CFG, **configs()}, losses([1.2, 1.3, 1.25], [0, 0, 0]),
                        CAVEAT)
    assert [c.key for c in claims] == ["bn_forward", "bn_backward", "degradation", "residual"]
    assert all(c.caveat == CAVEAT for c in claims if c.phase == "train")
