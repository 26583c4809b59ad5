"""The paper's claims, answered from measurements with statistics: pure functions of verdicts and training losses.

He et al. (2016, §4.1) argue that the degradation of deep plain nets is not caused by vanishing signals, because
BatchNorm keeps (1) forward activations at non-zero variance and (2) backward gradients at healthy norms, while
(3) the deeper plain net still trains worse than the shallower one and (4) residual nets do not.

Every claim is decided the same way and says what it compared, at which steps, and how sure it is:

* **Seeds are pooled.** Runs that differ only by seed form one configuration; rates are geometric means over
  seeds with the sd of their logs; losses are compared *paired by seed*: runs of one seed share their batch
  order (:func:`gradscope.study.runs.data_order_seed`), runs of different seeds do not, so the spread over seeds
  covers data order and initialisation together.
* **The noise rule** (:mod:`gradscope.analysis.stats`): a mean difference ``m`` over ``n`` seeds is outside the
  noise when the 95% interval ``m ± t(0.975, n-1)·SE`` excludes the boundary; otherwise the answer is
  ``unclear``. One seed gives no spread, so a training claim from one seed is ``unclear``.
* **BatchNorm claims are decided against their contrast**: each plain BN configuration beside its no-BN twin
  (same model, init, shortcut). "Yes" needs the BN nets healthy *and* a twin that is not, so the answer can tell
  BN from no BN; both healthy is "unclear" (the measurement does not show that BN is what does it). The paper's
  words are "healthy norms", so exploding gradients (Yang et al. 2019: BN plain nets at initialisation) are a "no"
  as much as vanishing ones. The backward claim is answered per phase: at initialisation and over training.
* **Classes are per layer** (:mod:`gradscope.analysis`): the same net gets the same class whatever is called a
  block, and forward variance and backward norm are judged in one amplitude unit.
* **Training claims** (:mod:`gradscope.study.training_claims`): a learning check first, then one equivalence
  margin for "worse" and "not worse", and words that say how far training got; on the final loss for the default
  study, on the final training error (test error beside it) for a recipe study
  (:mod:`gradscope.study.error_claims`). Every run that diverged (NaN loss or non-finite values) is named in each
  claim it touches, never silently dropped.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gradscope import schema as S
from gradscope.analysis.results import Claim
from gradscope.analysis.text import times
from gradscope.words import DIVERGED, EXPLODING, UNKNOWN, VANISHING
from gradscope.study.error_claims import FinalErrors, error_claims
from gradscope.study.run_noise import Noise
from gradscope.study.training_claims import NO, UNCLEAR, YES, degradation_claim, residual_claim

#: The variance of relu(BN(z)) in train mode, whatever z: the forward claim holds by construction there.
BN_RELU_VAR = 0.341
#: A configuration whose seeds disagree, or did not all settle a class, is ``unknown``
#: (:func:`gradscope.analysis.trajectory.pooled_verdict`): it decides a claim neither way.
UNSETTLED = UNKNOWN
#: Pooled classes that are surely not healthy: a BN net in one is a "no", a no-BN twin in one is a contrast.
NOT_HEALTHY = (VANISHING, EXPLODING, DIVERGED)
#: What to do about an unsettled class: every seed must agree, so more seeds cannot settle it; tighter fits can.
SETTLE_FIX = "a tighter fit per seed settles it (more blocks, more or larger batches); more seeds cannot"


def _pooled_rows(pooled: Any, signal: str, bn: Optional[bool], configs: Dict[str, Dict[str, Any]]) -> List[dict]:
    out = []
    for row in pooled.to_dict("records"):
        if row["signal"] != signal:
            continue
        cfg = configs.get(row["runs"][0], {}) if row["runs"] else {}
        if bn is not None and bool(cfg.get("bn")) != bn:
            continue
        out.append({**row, "residual": bool(cfg.get("residual")), "depth": int(cfg.get("depth") or 0)})
    return out


def _rate(row: dict) -> str:
    """``x1.43 ± 0.02 per block (n=2, exploding)`` from a pooled row; the ± is the sd of ln factor."""
    sd = row["ln_sd"]
    spread = "" if row["n"] < 2 or math.isnan(sd) else f" (sd of ln {sd:.3f})"
    div = f"; diverged: {', '.join(row['diverged_runs'])}" if row["diverged_runs"] else ""
    counts = row.get("counts") or {}
    if row["verdict"] == UNSETTLED and counts:
        if len(counts) == 1 and row["n"] == 0:  # no seed has a rate at all: nothing straddled anything
            div += (" (no seed has a rate: one block with a value, a rate needs two or more)"
                    if row.get("n_blocks", 0) < 2 else " (no seed has a rate: no fit over its blocks)")
        elif len(counts) == 1:
            div += " (no seed settled a class: each fit straddles a threshold)"
        else:
            why = "not every seed settled a class" if UNSETTLED in counts else "the seeds disagree"
            div += f" ({why}: " + ", ".join(f"{cls} {n}" for cls, n in sorted(counts.items())) + ")"
    per_layer = ""
    if str(row.get("unit", "")).startswith("per layer"):
        unit = "amplitude " if row["signal"] == "forward" else ""
        per_layer = f" = {times(row.get('layer_factor'))} {unit}per layer"
    return f"{times(row['factor'])} per block{per_layer}{spread}, n={row['n']}, {row['verdict']}{div}"


def _trajectory_text(traj: Any, runs: Sequence[str], signal: str) -> str:
    """``healthy in 93% of recorded steps (exploding 7%), step 0 -> 290: x1.43 -> x1.05`` pooled over runs."""
    if traj is None or len(traj) == 0:
        return ""
    t = traj[(traj["signal"] == signal) & traj["run"].isin(list(runs))]
    if t.empty:
        return ""
    fracs = {c: float(t[f"frac_{c}"].mean()) for c in ("healthy", "vanishing", "exploding", "diverged")}
    main = max(fracs, key=fracs.get)
    rest = ", ".join(f"{c} {100 * f:.0f}%" for c, f in fracs.items() if c != main and f > 0)
    return (f"{main} in {100 * fracs[main]:.0f}% of recorded training steps" + (f" ({rest})" if rest else "")
            + f", step {int(t['first_step'].min())} -> {int(t['last_step'].max())}: {times(t['first_factor'].mean())}"
              f" -> {times(t['last_factor'].mean())} per block ({_moved_most(t['moved'])})")


def _moved_most(moved: Any) -> str:
    """``far end moved most (2 of 2 runs)``: the commonest answer of the runs' "which end moved"."""
    counts = moved.value_counts()
    return f"{counts.index[0]} moved most in {int(counts.iloc[0])} of {len(moved)} runs"


def _twin_key(cfg: Dict[str, Any]) -> Tuple[Any, ...]:
    """What a BN configuration and its no-BN twin share: model, residual, shortcut, init."""
    return (cfg.get("name") or cfg.get("model"), cfg.get("depth"), bool(cfg.get("residual")),
            cfg.get("shortcut") if cfg.get("residual") else None, cfg.get("init") or "kaiming")


def _pairs(pooled: Any, signal: str, configs: Dict[str, Dict[str, Any]]) -> List[Tuple[dict, Optional[dict]]]:
    """(BN configuration, its no-BN twin or None) for the plain BN configurations (all BN ones if none is plain):
    the paper's BN claims are about its plain nets."""
    with_bn = _pooled_rows(pooled, signal, True, configs)
    plain = [r for r in with_bn if not r["residual"]]
    twins = {_twin_key(configs.get(r["runs"][0], {})): r for r in _pooled_rows(pooled, signal, False, configs)}
    return [(r, twins.get(_twin_key(configs.get(r["runs"][0], {})))) for r in (plain or with_bn)]


def _which(pairs: List[Tuple[dict, Optional[dict]]]) -> str:
    """"plain", or "residual" where no plain BN net was measured and the residual ones answer."""
    return "residual" if pairs and all(bn["residual"] for bn, _ in pairs) else "plain"


def _residual_note(pairs: List[Tuple[dict, Optional[dict]]]) -> str:
    """What the evidence must say when no plain BN net was measured and the residual ones answer instead."""
    if _which(pairs) == "residual":
        return (" (no plain BN net was measured: answered from the residual nets, whose shortcut carries the signal "
                "past BN; the paper's claim is about plain nets)")
    return ""


def _pair_text(pairs: List[Tuple[dict, Optional[dict]]]) -> str:
    out = []
    for bn, twin in sorted(pairs, key=lambda p: p[0]["group"]):
        t = f"{bn['group']} {_rate(bn)}"
        t += f" against its no-BN twin {twin['group']} {_rate(twin)}" if twin else " (no no-BN twin measured)"
        out.append(t)
    return "; ".join(out)


def _contrast_answer(pairs: List[Tuple[dict, Optional[dict]]], bad: List[str], what: str,
                     unclear_fix: str, contrast: Sequence[str] = NOT_HEALTHY) -> Tuple[str, str]:
    """The shared contrast rule: no if a BN configuration is bad; unclear if one has no settled class; yes if all
    are fine and some twin is surely in a ``contrast`` class (what the claim says BN prevents: the measurement
    tells BN from no BN); unclear when every twin is fine too, in another bad class (an exploding twin says nothing
    about vanishing), unsettled, or none was measured."""
    if bad:
        return NO, f"not {what} with BN in {', '.join(bad)}"
    unsettled = [bn["group"] for bn, _ in pairs if bn["verdict"] == UNSETTLED]
    if unsettled:
        return UNCLEAR, (f"the seeds of {', '.join(unsettled)} do not settle one class (they disagree, or a fit "
                         f"straddles a threshold): {SETTLE_FIX}")
    differ = [bn["group"] for bn, twin in pairs if twin is not None and twin["verdict"] in contrast]
    if differ:
        return YES, f"{what} with BN while the no-BN twin is not, for {', '.join(differ)}"
    other = [f"{twin['group']} {twin['verdict']}" for _, twin in pairs
             if twin is not None and twin["verdict"] in NOT_HEALTHY]
    if other:
        return UNCLEAR, (f"{what} with BN, but no no-BN twin is {' or '.join(contrast)} ({', '.join(other)}), so "
                         f"the measurement shows no contrast on this claim; {unclear_fix}")
    if any(twin is not None and twin["verdict"] == UNSETTLED for _, twin in pairs):
        return UNCLEAR, (f"{what} with BN, but the seeds of the no-BN twins do not settle one class, so they show "
                         f"no contrast: {SETTLE_FIX}")
    if all(twin is None for _, twin in pairs):
        return UNCLEAR, f"{what} with BN, but no no-BN twin was measured to contrast; {unclear_fix}"
    return UNCLEAR, (f"{what} with BN, but the no-BN twins are healthy too, so the measurement cannot tell BN from no "
                     f"BN; {unclear_fix}")


def forward_claim(pooled: Any, configs: Dict[str, Dict[str, Any]], traj: Any = None) -> Claim:
    """BatchNorm keeps forward signals at non-zero variance, decided against the no-BN twins at initialisation."""
    statement = "BatchNorm keeps forward signals from vanishing"
    pairs = _pairs(pooled, "forward", configs)
    if not pairs:
        return Claim("bn_forward", statement, UNCLEAR, "no run with BatchNorm was measured", "init")
    bad = [bn["group"] for bn, _ in pairs if bn["verdict"] in (VANISHING, DIVERGED)]
    answer, why = _contrast_answer(pairs, bad, "the forward variance is kept",
                                   "measure a net whose no-BN twin loses its variance (e.g. a deeper plain net, or "
                                   "--init xavier)", contrast=(VANISHING,))
    text = "at initialisation: " + _pair_text(pairs) + _residual_note(pairs)
    if not bad and all(bn["verdict"] != UNSETTLED and not bn["residual"] for bn, _ in pairs):
        text += (f" (in train mode relu(BN(z)) has variance {BN_RELU_VAR} for any z, so BN nets keep it by "
                 f"construction; the no-BN contrast is what makes the answer informative)")
    trained = [r for bn, _ in pairs for r in bn["runs"]]
    tt = _trajectory_text(traj, trained, "forward")
    if tt:
        text += f"; over training (BN runs): {tt}"
    how = (f"{_which(pairs)} BN configurations at initialisation, pooled over seeds, each beside its no-BN twin; "
           + why)
    return Claim("bn_forward", statement, answer, text, "init", how=how)


BACKWARD_STATEMENT = "With BatchNorm, backward gradients keep healthy norms (neither vanish nor explode)"


def backward_claim(pooled: Any, configs: Dict[str, Dict[str, Any]], traj: Any = None) -> Claim:
    """He et al. §4.1, "the backward propagated gradients exhibit healthy norms with BN", at initialisation:
    decided per layer against the no-BN twins; exploding counts against it as much as vanishing."""
    pairs = _pairs(pooled, "backward", configs)
    if not pairs:
        return Claim("bn_backward", BACKWARD_STATEMENT, UNCLEAR, "no run with BatchNorm was measured", "init")
    bad = [bn["group"] for bn, _ in pairs if bn["verdict"] in NOT_HEALTHY]
    answer, why = _contrast_answer(pairs, bad, "healthy",
                                   "measure a deeper plain net, where the no-BN twin's gradients vanish")
    text = "at initialisation, toward the input: " + _pair_text(pairs) + _residual_note(pairs)
    exploding = [bn["group"] for bn, _ in pairs if bn["verdict"] == "exploding"]
    if exploding:
        text += (f" — with BN the gradients grow toward the input rather than vanish, in {', '.join(exploding)} "
                 f"(Yang et al. 2019: BatchNorm's gradient explosion at initialisation)")
    how = (f"per-layer classes of the {_which(pairs)} BN configurations at initialisation, pooled over seeds, each "
           f"beside its no-BN twin; " + why)
    return Claim("bn_backward", BACKWARD_STATEMENT, answer, text, "init", how=how)


#: Recorded training steps a configuration needs before "over training" is answered (fewer is initialisation).
MIN_TRAIN_STEPS = 5


def _recorded_steps(traj: Any, runs: Sequence[str]) -> int:
    t = traj[(traj["signal"] == "backward") & traj["run"].isin(list(runs))]
    return int(t["n_steps"].min()) if len(t) else 0


#: the trajectory columns of the classes that are surely not healthy (unknown steps are neither)
_NOT_HEALTHY_SHARES = tuple(f"frac_{c}" for c in NOT_HEALTHY)


def _healthy_shares(traj: Any, runs: Sequence[str]) -> List[Tuple[float, float]]:
    """Each trained run's shares of recorded steps whose backward class is healthy, and surely not healthy
    (vanishing, exploding, diverged); the rest are ``unknown`` steps (runs not trained: absent)."""
    if traj is None or not len(traj):
        return []
    t = traj[(traj["signal"] == "backward") & traj["run"].isin(list(runs))]
    bad = t[[c for c in _NOT_HEALTHY_SHARES if c in t.columns]].sum(axis=1)
    return [(float(h), float(b)) for h, b in zip(t["frac_healthy"], bad)]


#: What a configuration's seeds say over training: healthy in most recorded steps in every seed, surely not healthy
#: in most steps in every seed, split between those, or not settled (a seed whose steps are mostly ``unknown``).
MOSTLY_HEALTHY, MOSTLY_NOT, SPLIT, NOT_SETTLED = "mostly healthy", "mostly not healthy", "split", "not settled"


def _seed_state(healthy: float, not_healthy: float) -> str:
    """One seed over training: healthy in at least half its recorded steps, surely not healthy in at least half,
    or neither (its ``unknown`` steps decide it, and an unknown step is no evidence either way)."""
    return MOSTLY_HEALTHY if healthy >= 0.5 else MOSTLY_NOT if not_healthy >= 0.5 else NOT_SETTLED


def _majority(shares: Sequence[Tuple[float, float]]) -> Optional[str]:
    """Whether every seed was healthy in at least half its recorded steps, every seed surely not, a seed was not
    settled (mostly ``unknown`` steps: it decides nothing), or the seeds split (None: not trained). Seeds are judged
    one by one, as at initialisation: a mean over a seed healthy in 90% and one in 20% of its steps would read
    "mostly healthy" while one seed says otherwise."""
    if not shares:
        return None
    states = {_seed_state(h, b) for h, b in shares}
    if NOT_SETTLED in states:
        return NOT_SETTLED
    return states.pop() if len(states) == 1 else SPLIT


def _split_text(shares: Sequence[Tuple[float, float]]) -> str:
    """`` (seeds split: 90%, 20% healthy)`` where the seeds split or did not settle, else nothing."""
    state = _majority(shares)
    if state == SPLIT:
        return " (seeds split: " + ", ".join(f"{100 * h:.0f}%" for h, _ in shares) + " healthy)"
    if state == NOT_SETTLED:
        return (" (not settled: healthy / surely not healthy per seed " +
                ", ".join(f"{100 * h:.0f}% / {100 * b:.0f}%" for h, b in shares) + "; the other steps unknown)")
    return ""


def backward_train_claim(pooled: Any, configs: Dict[str, Dict[str, Any]], traj: Any = None) -> Claim:
    """The same claim over training: healthy in most recorded steps of every seed of every plain BN configuration,
    against the trained no-BN twins; seeds that split decide nothing."""
    pairs = _pairs(pooled, "backward", configs) if pooled is not None else []
    shares = [(bn, twin, _healthy_shares(traj, bn["runs"]), _healthy_shares(traj, twin["runs"]) if twin else [])
              for bn, twin in pairs]
    shares = [s for s in shares if s[2]]
    if not shares:
        return Claim("bn_backward_train", BACKWARD_STATEMENT, UNCLEAR, "no BN net was trained", "train")
    recorded = min(_recorded_steps(traj, bn["runs"]) for bn, *_ in shares)
    state = {bn["group"]: _majority(h) for bn, _, h, _ in shares}
    twins = [_majority(th) for *_, th in shares]
    text = "over training, toward the input: " + "; ".join(
        f"{bn['group']} {_trajectory_text(traj, bn['runs'], 'backward')}{_split_text(h)}"
        + (f"; its no-BN twin {twin['group']} healthy in {100 * sum(x for x, _ in th) / len(th):.0f}% of "
           f"recorded steps{_split_text(th)}" if th else "; its no-BN twin was not trained")
        for bn, twin, h, th in shares) + _residual_note([(bn, twin) for bn, twin, *_ in shares])
    bad = [g for g, s in state.items() if s == MOSTLY_NOT]
    split = [g for g, s in state.items() if s == SPLIT]
    unsettled = [g for g, s in state.items() if s == NOT_SETTLED]
    if recorded < MIN_TRAIN_STEPS:
        answer, why = UNCLEAR, (f"only {recorded} recorded training step(s), fewer than {MIN_TRAIN_STEPS}: that is "
                                f"initialisation, not training; train longer or record more often (--steps, --every)")
    elif bad:
        answer, why = NO, (f"vanishing, exploding or diverged in at least half the recorded steps of every seed of "
                           f"{', '.join(bad)}")
    elif unsettled:
        answer, why = UNCLEAR, (f"a seed of {', '.join(unsettled)} is neither healthy nor surely not in half its "
                                f"recorded steps (the rest are unknown: a step's fit that does not determine the "
                                f"class); {SETTLE_FIX}")
    elif split:
        answer, why = UNCLEAR, (f"the seeds of {', '.join(split)} split: healthy in most recorded steps in some, "
                                f"not in others (every seed must agree, so more seeds cannot settle it; longer "
                                f"training may)")
    elif MOSTLY_NOT in twins:
        answer, why = YES, "healthy in most recorded steps with BN while a trained no-BN twin is not"
    elif all(t is None for t in twins):
        answer, why = UNCLEAR, ("healthy in most recorded steps with BN, but no no-BN twin was trained to contrast "
                                "(train them too: --train all)")
    elif SPLIT in twins or NOT_SETTLED in twins:
        answer, why = UNCLEAR, ("healthy in most recorded steps with BN, but the seeds of the trained no-BN twins "
                                "split or did not settle (mostly unknown steps), so they show no contrast")
    else:
        answer, why = UNCLEAR, ("healthy with BN, and the trained no-BN twins too: the measurement cannot tell them "
                                "apart")
    how = (f"share of recorded training steps whose per-layer class is healthy, per seed of each "
           f"{_which([(bn, twin) for bn, twin, *_ in shares])} BN configuration (every seed must agree), against the "
           f"trained no-BN twins; raw gradient norms of BN nets "
           "also shrink as their weights grow (scale invariance): update_ratio in the records is the scale-free "
           "view; " + why)
    return Claim("bn_backward_train", BACKWARD_STATEMENT, answer, text, "train", how=how)


def all_claims(pooled: Any, configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], caveat: str,
               traj: Any = None, accuracy: Optional[Dict[str, float]] = None,
               errors: Optional[FinalErrors] = None, noise: Optional[Noise] = None) -> List[Claim]:
    """The paper's claims, in its order: BN forward, BN backward (at initialisation, over training), degradation of
    plain nets, residual nets. The training claims are decided on the final ``losses`` (run -> nats; ``noise``:
    each final loss's batch-to-batch noise, :func:`gradscope.study.run_noise.batch_noise`, the floor of its
    intervals), or, for a recipe study that passes its final ``errors``, on the final training error with the test
    error beside it (:mod:`gradscope.study.error_claims`)."""
    training = error_claims(configs, errors, caveat) if errors is not None else \
        [degradation_claim(configs, losses, caveat, accuracy, noise=noise),
         residual_claim(configs, losses, caveat, accuracy, noise=noise)]
    return [forward_claim(pooled, configs, traj), backward_claim(pooled, configs, traj),
            backward_train_claim(pooled, configs, traj), *training]


def final_losses(losses: Any, runs: Sequence[str], window: int) -> Dict[str, float]:
    """Mean training loss over the last ``window`` steps of each trained run (NaN if any of them is NaN)."""
    out: Dict[str, float] = {}
    for run in runs:
        rows = losses[losses[S.RUN] == run].sort_values(S.STEP)
        if rows.empty:
            continue
        tail = rows["loss"].tail(window)
        out[run] = math.nan if tail.isna().any() or rows["loss"].isna().any() else float(tail.mean())
    return out


def pairs_text(claims: Sequence[Claim]) -> Tuple[str, ...]:
    """Each claim as one line (for terminals, notebooks)."""
    return tuple(c.line() for c in claims)
