"""Claims decided with statistics: frames and losses with known answers, and the wording flips with the numbers."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from gradscope.analysis.trajectory import pool_seeds, pooled_verdict
from gradscope.study.claims import (all_claims, backward_claim, backward_train_claim, degradation_claim, forward_claim,
                                    residual_claim)
from gradscope.study.run_noise import BATCHES, Noise, batch_noise

CAVEAT = "300 SGD steps: a short run"


def configs(seeds=(0, 1, 2)):
    out = {}
    for fam in ("plain", "resnet"):
        for depth in (20, 56):
            for bn in (True, False):
                for s in seeds:
                    run = f"{fam}{depth}-{'bn' if bn else 'nobn'}" + (f"-s{s}" if s else "")
                    out[run] = {"residual": fam == "resnet", "bn": bn, "depth": depth, "seed": s,
                                "num_classes": 10}
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
    assert c.answer == "yes" and "+1.240" in c.evidence and "(n=3 seeds" in c.evidence and c.caveat == CAVEAT
    assert "plain56-bn - plain20-bn" in c.evidence and c.phase == "train"
    assert "plain20-bn final loss 1.01 (chance ln 10 = 2.30)" in c.evidence and ": learned" in c.evidence


def test_degradation_unclear_inside_the_noise_and_no_when_the_interval_is_below_the_margin():
    noisy = degradation_claim(configs(), losses([0.3, -0.2, 0.1], [0, 0, 0]), CAVEAT)
    assert noisy.answer == "unclear"  # mean +0.07, t(2)·SE = 0.63: the interval contains the margin
    assert "seeds" in noisy.how  # says what run would decide it
    flat = degradation_claim(configs(), losses([0.01, -0.01, 0.0], [0, 0, 0]), CAVEAT)
    assert flat.answer == "no"  # the interval [-0.025, +0.025] lies below the 0.1-nat margin, both nets learned


def test_one_seed_is_always_unclear():
    one = configs(seeds=(0,))
    c = degradation_claim(one, losses([1.3], [0.0], seeds=(0,)), CAVEAT)
    assert c.answer == "unclear" and "one seed" in c.how


def test_residual_claim_flips_with_the_numbers():
    cfg = configs()
    fixed = residual_claim(cfg, losses([1.27, 1.20, 1.25], [-0.01, 0.01, 0.0]), CAVEAT)
    assert fixed.answer == "yes" and "the plain gap exceeds it by +1.240" in fixed.evidence
    worse = residual_claim(cfg, losses([1.27, 1.20, 1.25], [0.9, 1.0, 0.95]), CAVEAT)
    assert worse.answer == "no"
    same = residual_claim(cfg, losses([0.0, 0.01, -0.01], [0.0, 0.01, -0.01]), CAVEAT)
    assert same.answer == "unclear"  # shortcuts cannot be shown to remove a degradation that is not there
    assert "no degradation for shortcuts to remove" in same.how


def test_residual_yes_needs_the_same_margin_as_degradation_no():
    """Issue 21: +0.467 ± 0.451 and +0.065 ± 0.172 were "yes" (absence of evidence); the interval must lie below
    the 0.1-nat margin that the degradation "no" uses."""
    cfg = configs()
    wide = residual_claim(cfg, losses([1.27, 1.20, 1.25], [0.5, 0.0, 0.9]), CAVEAT)  # +0.467 ± 0.451
    assert wide.answer != "yes" and wide.answer == "unclear"
    small = residual_claim(cfg, losses([1.27, 1.20, 1.25], [0.065 - 0.172, 0.065, 0.065 + 0.172]), CAVEAT)
    assert small.answer == "unclear" and "contains the 0.1-nat margin" in small.how
    # the default study's own interval, +0.020 with its upper end at +0.104: above the margin, so not "yes"
    edge = residual_claim(cfg, losses([1.27, 1.20, 1.25], [0.02 - 0.034, 0.02, 0.02 + 0.034]), CAVEAT)
    assert edge.answer == "unclear" and "+0.104]" in edge.evidence
    assert "seeds (--seeds 0,1,2," in edge.how and "would decide it" in edge.evidence  # the deciding run, in words


def chance_losses(gap, base=2.30, seeds=(0, 1, 2)):
    """Every net near chance (ln 10 = 2.303): short runs, random labels, a learning rate too small."""
    out = {}
    for i, s in enumerate(seeds):
        suffix = f"-s{s}" if s else ""
        for fam in ("plain", "resnet"):
            out[f"{fam}20-bn{suffix}"] = base + 0.001 * i
            out[f"{fam}56-bn{suffix}"] = base + 0.001 * i + gap[i]
    return out


def test_nothing_is_decided_from_nets_that_did_not_learn():
    """Issue 21: "no" at -0.010 ± 0.027 with every net at chance; random labels; --steps 5 residual "no"."""
    cfg = configs()
    at_chance = degradation_claim(cfg, chance_losses([-0.04, 0.0, 0.01]), CAVEAT)
    assert at_chance.answer == "unclear" and "did not learn" in at_chance.how and "more --steps" in at_chance.how
    assert "barely started learning" in at_chance.evidence
    five_steps = residual_claim(cfg, chance_losses([2.0, 2.5, 3.1]), CAVEAT)  # deep nets blew up, shallow at chance
    assert five_steps.answer == "unclear" and "did not learn" in five_steps.how


def test_a_deep_net_at_chance_beside_a_shallow_one_that_learned_says_how_far_training_got():
    finals = losses([1.25, 1.30, 1.28], [0.0, 0.01, -0.01])  # plain56 at ~2.28: barely left chance
    acc = {r: (0.15 if r.startswith("plain56") else 0.7) for r in finals}
    c = degradation_claim(configs(), finals, CAVEAT, acc)
    assert c.answer == "yes" and "batch accuracy 15%" in c.evidence
    assert "slower training, not yet the converged degradation" in c.evidence
    both_learned = degradation_claim(configs(), losses([0.5, 0.45, 0.55], [0, 0, 0]), CAVEAT)
    assert both_learned.answer == "yes" and "slower training" not in both_learned.evidence


def test_not_worse_needs_both_nets_to_have_learned():
    finals = losses([0.0, 0.01, -0.01], [0, 0, 0], base=2.25)  # shallow 2.25-2.27: within 0.1 of chance
    c = degradation_claim(configs(), finals, CAVEAT)
    assert c.answer == "unclear"


def test_without_the_number_of_classes_nothing_is_decided():
    cfg = {r: {k: v for k, v in c.items() if k != "num_classes"} for r, c in configs().items()}
    c = degradation_claim(cfg, losses([1.27, 1.20, 1.25], [0, 0, 0]), CAVEAT)
    assert c.answer == "unclear" and "number of classes unknown" in c.evidence


def test_a_diverged_run_is_named_in_every_training_claim():
    cfg = configs()
    finals = losses([1.27, 1.20, 1.25], [0.0, 0.05, -0.04])
    finals["plain56-bn-s2"] = math.nan
    finals["resnet56-bn-s1"] = math.nan
    deg, res = degradation_claim(cfg, finals, CAVEAT), residual_claim(cfg, finals, CAVEAT)
    assert "plain56-bn-s2" in deg.evidence and "diverged" in deg.evidence and "(n=2 seeds" in deg.evidence
    assert "resnet56-bn-s1" in res.evidence


def test_a_deep_net_that_diverged_in_every_seed_gets_advice_about_divergence_not_seeds():
    """Three seeds run, the deep net NaN in all of them: the claim said "one seed gives no spread (run --seeds
    0,1,2 or more)", advice the user had already followed. It now says what diverged and what to change."""
    cfg = configs()
    finals = losses([1.27, 1.20, 1.25], [0.0, 0.05, -0.04])
    for s in ("", "-s1", "-s2"):
        finals[f"plain56-bn{s}"] = math.nan
    c = degradation_claim(cfg, finals, CAVEAT)
    assert c.answer == "unclear" and "--seeds" not in c.how
    assert "3 run(s) diverged (NaN loss: plain56-bn, plain56-bn-s1, plain56-bn-s2), leaving 0 seed(s)" in c.how
    assert "so the gap cannot be measured; at a lower learning rate (--lr)" in c.how
    one = degradation_claim(cfg, losses([1.27], [0.0], seeds=(0,)), CAVEAT)
    assert "one seed gives no spread (run --seeds 0,1,2 or more)" in one.how  # no divergence: the old advice


def verdict_rows(rows):
    cols = ["run", "signal", "verdict", "factor", "n_blocks", "max_value", "seed", "layers_per_block", "unit"]
    return pd.DataFrame([r + [2.0, "per layer"] for r in rows], columns=cols)


def init_verdicts(bn_fwd=(1.0, 1.0), nobn_plain=(0.80, 0.81), nobn_res=(1.02, 1.03), bn_bwd=(1.43, 1.44),
                  bn_bwd_class="exploding", nobn_bwd=(0.88, 0.87), nobn_bwd_class="vanishing",
                  nobn_fwd_class="vanishing"):
    rows, config = [], []
    for i, s in enumerate((0, 1)):
        sfx = f"-s{s}" if s else ""
        for cfg, signal, verdict, factor in (("plain56-bn", "forward", "healthy", bn_fwd[i]),
                                             ("plain56-bn", "backward", bn_bwd_class, bn_bwd[i]),
                                             ("plain56-nobn", "forward", nobn_fwd_class, nobn_plain[i]),
                                             ("plain56-nobn", "backward", nobn_bwd_class, nobn_bwd[i]),
                                             ("resnet56-nobn", "forward", "healthy", nobn_res[i]),
                                             ("resnet56-nobn", "backward", "healthy", 1.0)):
            rows.append([f"{cfg}{sfx}", signal, verdict, factor, 27, 1.0, s])
            config.append(cfg)  # the study's config fact: seeds pool by it, never by the name
    return verdict_rows(rows).assign(config=config)


CFG = {r: {"bn": "-bn" in r, "residual": r.startswith("resnet"), "depth": 56, "name": r.split("-")[0]}
       for r in ("plain56-bn", "plain56-bn-s1", "plain56-nobn", "plain56-nobn-s1", "resnet56-nobn",
                 "resnet56-nobn-s1")}


def test_forward_claim_is_decided_against_the_no_bn_twin():
    c = forward_claim(pool_seeds(init_verdicts()), CFG)
    assert c.answer == "yes" and "against its no-BN twin plain56-nobn x0.80 per block" in c.evidence
    assert "x0.95 amplitude per layer" in c.evidence  # 0.805 ** (1/4): a variance ratio over two layers
    assert "n=2" in c.evidence and "by construction" in c.evidence  # resnet56-nobn is not the twin
    # --shortcut B --init xavier in the issue: the twin keeps its variance too, so the contrast decides nothing
    both = forward_claim(pool_seeds(init_verdicts(nobn_plain=(1.0, 1.0), nobn_fwd_class="healthy")), CFG)
    assert both.answer == "unclear" and "cannot tell BN from no BN" in both.how
    vanished = init_verdicts(bn_fwd=(0.7, 0.7))  # e.g. no-BN nets mislabelled as BN
    vanished.loc[vanished.run.str.startswith("plain56-bn") & (vanished.signal == "forward"), "verdict"] = "vanishing"
    no = forward_claim(pool_seeds(vanished), CFG)
    assert no.answer == "no" and "by construction" not in no.evidence


def test_backward_claim_says_no_when_bn_explodes_and_tells_bn_from_no_bn():
    c = backward_claim(pool_seeds(init_verdicts()), CFG)  # x1.43 per block = x1.196 per layer: Yang et al. 2019
    assert c.answer == "no" and "Yang et al. 2019" in c.evidence and "x1.43 per block = x1.20 per layer" in c.evidence
    assert c.phase == "init" and "healthy norms" in c.statement
    healthy = backward_claim(pool_seeds(init_verdicts(bn_bwd=(1.02, 1.03), bn_bwd_class="healthy")), CFG)
    assert healthy.answer == "yes" and "x0.94 per layer" in healthy.evidence  # the twin vanishes
    same = backward_claim(pool_seeds(init_verdicts(bn_bwd=(1.02, 1.03), bn_bwd_class="healthy",
                                                   nobn_bwd=(1.0, 1.0), nobn_bwd_class="healthy")), CFG)
    assert same.answer == "unclear" and "cannot tell BN from no BN" in same.how


def traj_rows(runs, healthy, vanishing=0.0, exploding=None):
    exploding = 1.0 - healthy - vanishing if exploding is None else exploding
    return [{"run": r, "signal": "backward", "n_steps": 30, "frac_healthy": healthy, "frac_vanishing": vanishing,
             "frac_exploding": exploding, "frac_diverged": 0.0, "frac_unknown": 0.0, "first_step": 0,
             "first_verdict": "exploding", "first_factor": 1.4, "first_end_to_end": 1e4, "last_step": 290,
             "last_verdict": "healthy", "last_factor": 1.0, "last_end_to_end": 1.0, "near_change": 1.0,
             "far_change": 1e-3, "moved": "far end"} for r in runs]


def test_backward_claim_over_training_is_its_own_phase_with_its_contrast():
    pooled = pool_seeds(init_verdicts())
    bn, nobn = ("plain56-bn", "plain56-bn-s1"), ("plain56-nobn", "plain56-nobn-s1")
    vanish = backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.2, 0.8)))
    assert vanish.answer == "no" and "vanishing in 80% of recorded training steps" in vanish.evidence
    assert vanish.phase == "train"
    alone = backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.9)))
    assert alone.answer == "unclear" and "--train all" in alone.how
    contrast = backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.9) + traj_rows(nobn, 0.1, 0.9)))
    assert contrast.answer == "yes" and "no-BN twin plain56-nobn healthy in 10%" in contrast.evidence
    same = backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.9) + traj_rows(nobn, 0.9)))
    assert same.answer == "unclear"
    assert backward_train_claim(pooled, CFG, None).answer == "unclear"
    short = pd.DataFrame(traj_rows(bn, 0.0, 0.0, 1.0)).assign(n_steps=1)  # --steps 5 --every 10: step 0 only
    early = backward_train_claim(pooled, CFG, short)
    assert early.answer == "unclear" and "only 1 recorded training step" in early.how


def test_over_training_every_seed_must_agree():
    """Seeds healthy in 90% and 20% of their recorded steps average 55%, "most steps": the claim said yes against a
    twin healthy in 10%. A twin whose seeds were healthy in 60% and 10% averaged 35% and made a contrast too."""
    pooled = pool_seeds(init_verdicts())
    bn, nobn = ("plain56-bn", "plain56-bn-s1"), ("plain56-nobn", "plain56-nobn-s1")
    split_bn = traj_rows(bn[:1], 0.9) + traj_rows(bn[1:], 0.2, 0.8)
    c = backward_train_claim(pooled, CFG, pd.DataFrame(split_bn + traj_rows(nobn, 0.1, 0.9)))
    assert c.answer == "unclear" and "seeds of plain56-bn split" in c.how
    assert "(seeds split: 90%, 20% healthy)" in c.evidence
    split_twin = traj_rows(nobn[:1], 0.6, 0.4) + traj_rows(nobn[1:], 0.1, 0.9)
    t = backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.9) + split_twin))
    assert t.answer == "unclear" and "no-BN twins split" in t.how
    assert "healthy in 35% of recorded steps (seeds split: 60%, 10% healthy)" in t.evidence
    both_low = traj_rows(bn[:1], 0.4, 0.6) + traj_rows(bn[1:], 0.1, 0.9)  # every seed below half: a settled "no"
    assert backward_train_claim(pooled, CFG, pd.DataFrame(both_low + split_twin)).answer == "no"


def test_a_diverged_seed_turns_a_pooled_verdict_to_diverged_and_is_named():
    v = init_verdicts()
    v.loc[(v.run == "plain56-bn-s1") & (v.signal == "forward"), ["verdict", "factor"]] = ["diverged", float("nan")]
    c = forward_claim(pool_seeds(v), CFG)
    assert c.answer == "no" and "diverged: plain56-bn-s1" in c.evidence


def _seed_classes(v, run, signal, verdict, factor):
    """One seed's own class and factor (as its fit decided them) changed in a verdicts frame."""
    v.loc[(v.run == run) & (v.signal == signal), ["verdict", "factor"]] = [verdict, factor]
    return v


def test_seeds_that_disagree_pool_to_unknown_even_when_their_mean_sits_in_a_band():
    """x1.02 (healthy) and x1.10 (exploding, x1.049 per layer) per block: their geometric mean x1.06 (x1.029 per
    layer) is inside the healthy band, and the pooled class used to be "healthy" from it."""
    v = _seed_classes(init_verdicts(bn_bwd=(1.02, 1.02), bn_bwd_class="healthy"), "plain56-bn-s1", "backward",
                      "exploding", 1.10)
    row = pool_seeds(v).set_index(["group", "signal"]).loc[("plain56-bn", "backward")]
    assert row.verdict == "unknown" and row.counts == {"healthy": 1, "exploding": 1}
    assert abs(row.factor - (1.02 * 1.10) ** 0.5) < 1e-12  # the pooled factor itself is still the geometric mean
    agree = pool_seeds(init_verdicts()).set_index(["group", "signal"])
    assert agree.loc[("plain56-bn", "backward")].verdict == "exploding"  # both seeds exploding: settled
    assert agree.loc[("plain56-nobn", "forward")].verdict == "vanishing"
    unsure = _seed_classes(init_verdicts(), "plain56-bn", "forward", "unknown", 1.0)  # one fit straddled a threshold
    assert pool_seeds(unsure).set_index(["group", "signal"]).loc[("plain56-bn", "forward")].verdict == "unknown"
    assert pooled_verdict([float("nan"), float("nan")]) == "unknown"  # missing verdicts agree on no class
    assert pooled_verdict(["healthy", "diverged"]) == "diverged" and pooled_verdict([]) == "unknown"


def test_bn_claims_are_unclear_when_the_bn_seeds_disagree():
    backward = _seed_classes(init_verdicts(bn_bwd=(1.02, 1.02), bn_bwd_class="healthy"), "plain56-bn-s1",
                             "backward", "exploding", 1.10)
    c = backward_claim(pool_seeds(backward), CFG)  # was "yes": healthy from the mean, the twin vanishing
    assert c.answer == "unclear" and "do not settle one class" in c.how
    assert "the seeds disagree: exploding 1, healthy 1" in c.evidence
    forward = _seed_classes(init_verdicts(), "plain56-bn-s1", "forward", "vanishing", 0.80)
    f = forward_claim(pool_seeds(forward), CFG)  # x1.00 and x0.80: mean x0.894, x0.972 per layer, "healthy"
    assert f.answer == "unclear" and "plain56-bn" in f.how
    unsure = _seed_classes(init_verdicts(), "plain56-bn", "forward", "unknown", 1.0)
    u = forward_claim(pool_seeds(unsure), CFG)
    assert u.answer == "unclear" and "not every seed settled a class: healthy 1, unknown 1" in u.evidence  # was "no"
    assert "by construction" not in u.evidence  # said only of BN nets that surely kept their variance
    assert "more seeds cannot" in u.how  # every seed must agree: only tighter fits settle it
    none = _seed_classes(unsure, "plain56-bn-s1", "forward", "unknown", 1.0)
    assert "unknown (no seed settled a class" in forward_claim(pool_seeds(none), CFG).evidence
    both_bad = _seed_classes(init_verdicts(bn_fwd=(0.8, 0.8)), "plain56-bn", "forward", "vanishing", 0.8)
    both_bad = _seed_classes(both_bad, "plain56-bn-s1", "forward", "vanishing", 0.8)
    assert forward_claim(pool_seeds(both_bad), CFG).answer == "no"  # seeds that agree still decide "no"


def test_a_contrast_needs_twin_seeds_that_agree():
    """No-BN twin seeds x0.70 (vanishing) and x0.93 (healthy): their mean x0.81 per block is vanishing per layer,
    and the forward claim used to say "yes" from that contrast."""
    v = _seed_classes(init_verdicts(nobn_plain=(0.70, 0.70)), "plain56-nobn-s1", "forward", "healthy", 0.93)
    c = forward_claim(pool_seeds(v), CFG)
    assert c.answer == "unclear" and "the seeds of the no-BN twins do not settle one class" in c.how
    assert forward_claim(pool_seeds(init_verdicts(nobn_plain=(0.70, 0.70))), CFG).answer == "yes"


def test_all_claims_in_the_papers_order():
    claims = all_claims(pool_seeds(init_verdicts()), {**CFG, **configs()}, losses([1.2, 1.3, 1.25], [0, 0, 0]),
                        CAVEAT)
    assert [c.key for c in claims] == ["bn_forward", "bn_backward", "bn_backward_train", "degradation", "residual"]
    assert all(c.caveat == CAVEAT for c in claims if c.key in ("degradation", "residual"))


# --- identical runs: a zero spread over seeds is no evidence (issue: "a yes must follow from the evidence") ----------

def test_identical_loss_gaps_over_seeds_are_unclear_and_say_why():
    c = degradation_claim(configs(), losses([1.2, 1.2, 1.2], [0.0, 0.05, -0.04]), CAVEAT)
    assert c.answer == "unclear"  # before: "yes" from the zero-width interval [+1.200, +1.200]
    assert "[+1.200, +1.200]" in c.evidence
    assert "identical over seeds: a zero-width interval, not certainty" in c.evidence
    assert "the 3 seeds gave the same gap (spread 0 over seeds)" in c.how
    assert "identical runs give no independent evidence" in c.how and "vary the data order and the initialisation" \
        in c.how
    assert c.estimate == pytest.approx(1.2)  # the number is still reported


def test_seeds_that_repeat_each_other_decide_nothing_even_the_learning_check():
    copies = {r: (2.0 if "56" in r else 1.0) for r in configs()}  # every seed the same run
    deg, res = degradation_claim(configs(), copies, CAVEAT), residual_claim(configs(), copies, CAVEAT)
    assert deg.answer == res.answer == "unclear"
    assert "plain20-bn final loss 1.00 (chance ln 10 = 2.30): unclear whether it left chance (its 3 seeds gave the " \
           "same value: no independent evidence)" in deg.evidence
    shallow_only = {r: (1.0 if "20" in r else 2.0 + 0.1 * configs()[r]["seed"]) for r in configs()}
    c = degradation_claim(configs(), shallow_only, CAVEAT)
    assert c.answer == "unclear" and "the 3 seeds of plain20-bn gave the same value" in c.how


def test_a_known_loss_noise_floor_widens_identical_gaps_by_hand():
    """Each final loss averages 20 mini-batch losses with variance 0.0004 nats² (sd 0.02) for its mean: the paired
    gap's floor is 0.0008, sd 0.02828, se 0.01633 over 3 seeds, half-width 4.303 · 0.01633 = 0.0703."""
    finals = losses([1.2, 1.2, 1.2], [0.0, 0.05, -0.04])
    noise = Noise({r: 0.0004 for r in finals}, {r: 20 for r in finals}, BATCHES)
    c = degradation_claim(configs(), finals, CAVEAT, noise=noise)
    half = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)) * math.sqrt(2 * 0.0004) / math.sqrt(3)  # t(0.975, 2)
    assert c.answer == "yes" and (c.low, c.high) == (pytest.approx(1.2 - half), pytest.approx(1.2 + half))
    assert "95% interval [+1.130, +1.270]" in c.evidence
    assert "interval widened to the batch-to-batch noise of each run's last 20 steps" in c.evidence
    # a floor the seeds' spread exceeds changes nothing
    spread = losses([1.27, 1.20, 1.25], [0.0, 0.05, -0.04])
    assert degradation_claim(configs(), spread, CAVEAT, noise=noise).low == pytest.approx(
        degradation_claim(configs(), spread, CAVEAT).low)


def test_batch_noise_is_the_squared_standard_error_of_the_final_window():
    rows = [("a", s, v) for s, v in enumerate([9.0, 1.0, 2.0, 3.0, 4.0])] + [("b", 0, 1.0)] + \
           [("c", s, v) for s, v in enumerate([1.0, math.nan, 2.0])]
    table = pd.DataFrame(rows, columns=["run", "step", "loss"])
    n4 = batch_noise(table, ["a", "b", "c"], 4)
    assert n4.variance == {"a": pytest.approx((1.5 ** 2 + 0.5 ** 2) * 2 / 3 / 4)}  # var(1,2,3,4) = 1.667, / 4
    assert n4.counts == {"a": 4} and n4.kind == BATCHES  # b: one loss; c: a NaN in the window
    assert batch_noise(table, ["a"], 2).variance["a"] == pytest.approx(0.5 / 2)  # var(3, 4) = 0.5


def test_an_unsettled_rate_says_why_no_seed_has_one_when_no_fit_exists():
    """With one block selected no seed has a rate; the claim said each fit straddles a threshold, which only an
    existing fit can do."""
    from gradscope.study.claims import _rate

    base = {"ln_sd": math.nan, "diverged_runs": [], "verdict": "unknown", "factor": math.nan, "unit": "per block"}
    one_block = _rate({**base, "n": 0, "n_blocks": 1, "counts": {"unknown": 1}})
    assert "one block with a value, a rate needs two or more" in one_block and "straddles" not in one_block
    assert "no fit over its blocks" in _rate({**base, "n": 0, "n_blocks": 5, "counts": {"unknown": 2}})
    fitted = _rate({**base, "n": 2, "factor": 1.1, "ln_sd": 0.01, "n_blocks": 9, "counts": {"unknown": 2}})
    assert "each fit straddles a threshold" in fitted


def test_the_forward_claim_needs_a_twin_that_vanishes_not_one_that_explodes():
    """"BatchNorm keeps forward signals from vanishing" said yes against a no-BN twin that exploded (or diverged):
    that twin shows nothing about vanishing. The backward claim ("healthy norms") still takes any unhealthy twin."""
    for twin in ("exploding", "diverged"):
        c = forward_claim(pool_seeds(init_verdicts(nobn_plain=(1.3, 1.3), nobn_fwd_class=twin)), CFG)
        assert c.answer == "unclear", (twin, c.how)
        assert f"no no-BN twin is vanishing (plain56-nobn {twin})" in c.how
    exploding_twin = init_verdicts(bn_bwd=(1.02, 1.03), bn_bwd_class="healthy", nobn_bwd=(1.3, 1.3),
                                   nobn_bwd_class="exploding")
    assert backward_claim(pool_seeds(exploding_twin), CFG).answer == "yes"


def test_bn_claims_answered_from_residual_nets_say_so_and_drop_the_plain_net_note():
    """With no plain BN net measured, the BN claims fall back on the residual ones: the evidence says so, and the
    note that relu(BN(z)) keeps its variance by construction (true of a plain block's output, not of
    relu(BN(z)) + x) is left out."""
    rows = []
    for s in (0, 1):
        sfx = f"-s{s}" if s else ""
        for cfg, verdict, factor in (("resnet56-bn", "healthy", 1.0), ("resnet56-nobn", "vanishing", 0.8)):
            rows.append([f"{cfg}{sfx}", "forward", verdict, factor, 27, 1.0, s])
    frame = verdict_rows(rows).assign(config=[r[0].rsplit("-s", 1)[0] for r in rows])
    cfg = {r[0]: {"bn": "-bn" in r[0], "residual": True, "depth": 56, "name": "resnet56"} for r in rows}
    c = forward_claim(pool_seeds(frame), cfg)
    assert "no plain BN net was measured: answered from the residual nets" in c.evidence
    assert "by construction" not in c.evidence
    assert "answered from the residual" not in forward_claim(pool_seeds(init_verdicts()), CFG).evidence
    assert c.how.startswith("residual BN configurations at initialisation")
    traj = pd.DataFrame(traj_rows([r[0] for r in rows if "-bn" in r[0]], 0.9))
    over = backward_train_claim(pool_seeds(frame.assign(signal="backward")), cfg, traj)
    assert "answered from the residual nets" in over.evidence and "each residual BN configuration" in over.how


def test_over_training_unknown_steps_decide_nothing():
    """A step whose class is unknown is no evidence. Twins unknown in every step made a "yes" (their 0% healthy
    read as "not healthy"), and BN nets unknown in every step made a "no"; both are now unclear."""
    pooled = pool_seeds(init_verdicts())
    bn, nobn = ("plain56-bn", "plain56-bn-s1"), ("plain56-nobn", "plain56-nobn-s1")
    unknown = lambda runs: [dict(r, frac_exploding=0.0, frac_unknown=1.0) for r in traj_rows(runs, 0.0)]  # noqa: E731
    twins_unknown = backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.9) + unknown(nobn)))
    assert twins_unknown.answer == "unclear" and "did not settle" in twins_unknown.how
    assert "not settled: healthy / surely not healthy per seed 0% / 0%, 0% / 0%" in twins_unknown.evidence
    bn_unknown = backward_train_claim(pooled, CFG, pd.DataFrame(unknown(bn) + traj_rows(nobn, 0.1, 0.9)))
    assert bn_unknown.answer == "unclear" and "neither healthy nor surely not" in bn_unknown.how
    # the same twins with their steps settled as vanishing are a contrast, and settled BN nets a "no"
    assert backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.9) + traj_rows(nobn, 0.0, 1.0))
                                ).answer == "yes"
    assert backward_train_claim(pooled, CFG, pd.DataFrame(traj_rows(bn, 0.0, 1.0) + traj_rows(nobn, 0.0, 1.0))
                                ).answer == "no"


def test_the_short_run_caveat_names_the_window_the_losses_are_averaged_over():
    from gradscope.study.runs import Settings

    assert "mean loss of the last 8 steps" in Settings(steps=8).describe()  # before: "the last 20" (of 8 steps)
    assert "mean loss of the last 20 steps" in Settings(steps=300).describe()
