"""Claim lines are computed from the numbers: feed known verdicts and losses, and the answers flip with them."""
from __future__ import annotations

import pandas as pd

from gradscope.study.claims import backward_claim, degradation_claim, forward_claim, residual_claim


def verdict_frame(rows):
    cols = ["run", "signal", "verdict", "factor", "end_to_end", "min_value", "max_value", "n_blocks", "bn"]
    return pd.DataFrame(rows, columns=cols)


def row(run, signal, verdict, factor, bn, lo=0.5, hi=2.0, n=27):
    e2e = factor ** (n - 1)
    return [run, signal, verdict, factor, e2e, lo, hi, n, bn]


def test_forward_claim_yes_and_no():
    healthy = verdict_frame([row("plain56-bn", "forward", "healthy", 1.0, True, 0.33, 1.2),
                             row("plain56-nobn", "forward", "vanishing", 0.8, False)])
    claim = forward_claim(healthy)
    assert claim.answer == "yes"
    assert "[0.33, 1.2] over up to 27 blocks" in claim.evidence and "x0.8 per block" in claim.evidence
    vanished = verdict_frame([row("plain56-bn", "forward", "vanishing", 0.7, True, 1e-5, 1.0)])
    assert forward_claim(vanished).answer == "no"
    assert forward_claim(verdict_frame([row("x", "forward", "healthy", 1.0, False)])).answer == "unclear"


def test_backward_claim_reports_explosion_instead_of_vanishing():
    frame = verdict_frame([row("plain56-bn", "backward", "exploding", 1.43, True),
                           row("resnet56-bn", "backward", "healthy", 1.1, True)])
    frame["predicted_factor"] = [1.47, float("nan")]
    frame["agrees"] = [True, None]
    frame["reference"] = ["Yang et al. 2019 (A Mean Field Theory of Batch Normalization)", None]
    claim = backward_claim(frame)
    assert claim.answer == "yes"
    assert "explode in plain56-bn" in claim.evidence
    assert "x1.43 per block toward the input (exploding, theory x1.47 (Yang et al. 2019): agrees)" in claim.evidence
    frame.loc[0, "verdict"] = "vanishing"
    assert backward_claim(frame).answer == "no"


CONFIGS = {name: {"residual": name.startswith("resnet"), "bn": bn, "depth": int(name[-2:].lstrip("t"))}
           for name, bn in [("plain20", True), ("plain56", True), ("resnet20", True), ("resnet56", True)]}


def test_degradation_claim_flips_with_the_losses():
    worse = {"plain20": 1.2, "plain56": 1.6, "resnet20": 1.1, "resnet56": 0.9}
    claim = degradation_claim(worse, CONFIGS, steps=30)
    assert claim.answer == "yes"
    assert "plain56 loss 1.6 vs plain20 1.2" in claim.evidence
    better = dict(worse, plain56=1.0)
    assert degradation_claim(better, CONFIGS, steps=30).answer == "no"
    diverged = dict(worse, plain56=float("nan"))
    assert degradation_claim(diverged, CONFIGS, steps=30).answer == "unclear"
    assert "diverged (NaN)" in degradation_claim(diverged, CONFIGS, steps=30).evidence


def test_residual_claim_flips_with_the_losses():
    fixed = {"plain20": 1.2, "plain56": 1.6, "resnet20": 1.1, "resnet56": 0.9}
    claim = residual_claim(fixed, CONFIGS, steps=30)
    assert claim.answer == "yes" and "resnet56 loss 0.9 vs resnet20 1.1" in claim.evidence
    short = dict(fixed, resnet56=2.1)
    claim = residual_claim(short, CONFIGS, steps=30)
    assert claim.answer == "no" and "short run" in claim.evidence
