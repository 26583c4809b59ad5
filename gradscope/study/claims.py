"""The paper's claims, answered from measurements with statistics: pure functions of verdicts and training losses.

He et al. (2016, §4.1) argue that the degradation of deep plain nets is not caused by vanishing signals, because
BatchNorm keeps (1) forward activations at non-zero variance and (2) backward gradients at healthy norms, while
(3) the deeper plain net still trains worse than the shallower one and (4) residual nets do not.

Every claim is decided the same way and says what it compared, at which steps, and how sure it is:

* **Seeds are pooled.** Runs that differ only by seed form one configuration; rates are geometric means over
  seeds with the sd of their logs; losses are compared *paired by seed* (same seed, same batches).
* **The noise rule** (:mod:`gradscope.analysis.stats`): a mean difference ``m`` over ``n`` seeds is outside the
  noise when the 95% interval ``m ± t(0.975, n-1)·SE`` excludes the boundary; otherwise the answer is
  ``unclear``. One seed gives no spread, so a training claim from one seed is ``unclear``.
* **Training answers** carry the same short-run caveat (``Settings.describe()``), and every run that diverged
  (NaN loss or non-finite values) is named in each claim it touches, never silently dropped.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gradscope import schema as S
from gradscope.analysis import stats
from gradscope.analysis.results import Claim
from gradscope.analysis.text import num, pm, times
from gradscope.analysis.trajectory import run_group

YES, NO, UNCLEAR = "yes", "no", "unclear"
#: Final losses within this many nats count as "the same" (the equivalence margin of the training claims).
LOSS_MARGIN = 0.1
#: The variance of relu(BN(z)) in train mode, whatever z: the forward claim holds by construction there.
BN_RELU_VAR = 0.341


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
    return f"{times(row['factor'])} per block{spread}, n={row['n']}, {row['verdict']}{div}"


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


def forward_claim(pooled: Any, configs: Dict[str, Dict[str, Any]], traj: Any = None) -> Claim:
    """BatchNorm keeps forward signals from vanishing: no BN configuration's pooled forward rate is vanishing."""
    statement = "BatchNorm keeps forward signals from vanishing"
    with_bn = _pooled_rows(pooled, "forward", True, configs)
    if not with_bn:
        return Claim("bn_forward", statement, UNCLEAR, "no run with BatchNorm was measured", "init")
    bad = [r["group"] for r in with_bn if r["verdict"] in ("vanishing", "diverged")]
    deepest = max(with_bn, key=lambda r: (r["n_blocks"], not r["residual"]))
    text = (f"at initialisation, with BN: {deepest['group']} {_rate(deepest)}"
            + "".join(f"; {r['group']} {_rate(r)}" for r in with_bn if r is not deepest and r["group"] in bad))
    text += (f" (in train mode relu(BN(z)) has variance {BN_RELU_VAR} for any z, so this holds by construction; "
             f"the contrast without BN is what the claim adds)")
    without = _pooled_rows(pooled, "forward", False, configs)
    if without:  # the plain net shows the point (a residual net keeps its variance through the skip path)
        contrast = max(without, key=lambda r: (not r["residual"], r["n_blocks"]))
        text += f"; without BN, {contrast['group']}: {_rate(contrast)}"
    trained = [r for row in with_bn for r in row["runs"]]
    tt = _trajectory_text(traj, trained, "forward")
    if tt:
        text += f"; over training (BN runs): {tt}"
    how = f"decided from the pooled per-block rate of {len(with_bn)} BN configuration(s) at initialisation"
    return Claim("bn_forward", statement, NO if bad else YES, text, "init", how=how)


def backward_claim(pooled: Any, configs: Dict[str, Dict[str, Any]], traj: Any = None) -> Claim:
    """BatchNorm keeps backward gradients from vanishing, at initialisation and over training (the paper's
    sentence is about training); says where they explode instead."""
    statement = "BatchNorm keeps backward gradients from vanishing"
    with_bn = _pooled_rows(pooled, "backward", True, configs)
    if not with_bn:
        return Claim("bn_backward", statement, UNCLEAR, "no run with BatchNorm was measured", "init+train")
    parts = [f"{r['group']} {_rate(r)}" for r in sorted(with_bn, key=lambda r: r["group"])]
    text = "at initialisation, with BN, toward the input: " + "; ".join(parts)
    exploding = [r["group"] for r in with_bn if r["verdict"] == "exploding"]
    if exploding:
        text += (f" — gradients grow rather than vanish (Yang et al. 2019: BN's gradient explosion), "
                 f"exploding in {', '.join(exploding)}")
    bad_init = [r["group"] for r in with_bn if r["verdict"] in ("vanishing", "diverged")]
    bad_train: List[str] = []
    if traj is not None and len(traj):
        for r in with_bn:
            t = traj[(traj["signal"] == "backward") & traj["run"].isin(r["runs"])]
            if len(t):
                frac = float(t["frac_vanishing"].mean() + t["frac_diverged"].mean())
                text += f"; {r['group']} over training: {_trajectory_text(traj, r['runs'], 'backward')}"
                if frac > 0.5:
                    bad_train.append(r["group"])
    without = _pooled_rows(pooled, "backward", False, configs)
    if without:
        contrast = max(without, key=lambda r: (not r["residual"], r["n_blocks"]))
        text += f"; without BN at initialisation, {contrast['group']}: {_rate(contrast)}"
    how = ("no: a BN configuration vanishes (or diverges) at initialisation or in more than half of its recorded "
           "training steps, pooled over seeds; raw gradient norms of BN nets also shrink as weights grow (scale "
           "invariance): update_ratio in the records is the scale-free view")
    return Claim("bn_backward", statement, NO if bad_init or bad_train else YES, text, "init+train", how=how)


# --- training claims -----------------------------------------------------------------------------------------

def _family_runs(configs: Dict[str, Dict[str, Any]], residual: bool, bn: bool,
                 losses: Dict[str, float]) -> Dict[int, Dict[int, str]]:
    """depth -> seed -> run, for trained runs of one family."""
    out: Dict[int, Dict[int, str]] = {}
    for run, c in configs.items():
        if run not in losses or "depth" not in c or bool(c.get("residual")) != residual or bool(c.get("bn")) != bn:
            continue
        out.setdefault(int(c["depth"]), {})[int(c.get("seed") or 0)] = run
    return out


def depth_gap(configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], residual: bool
              ) -> Optional[dict]:
    """Deep-minus-shallow final loss per seed for one family (BN preferred), with what was dropped and why."""
    for bn in (True, False):
        fam = _family_runs(configs, residual, bn, losses)
        if len(fam) < 2:
            continue
        shallow, deep = min(fam), max(fam)
        seeds = sorted(set(fam[shallow]) & set(fam[deep]))
        diverged = [fam[d][s] for d in (shallow, deep) for s in seeds if math.isnan(losses[fam[d][s]])]
        pairs = {s: losses[fam[deep][s]] - losses[fam[shallow][s]] for s in seeds
                 if not (math.isnan(losses[fam[deep][s]]) or math.isnan(losses[fam[shallow][s]]))}
        mean, sd, se, n = stats.mean_sd_se(list(pairs.values()))
        return {"bn": bn, "shallow": run_group(fam[shallow][seeds[0]]) if seeds else "",
                "deep": run_group(fam[deep][seeds[0]]) if seeds else "", "pairs": pairs, "mean": mean, "sd": sd,
                "se": se, "n": n, "band": stats.band(se, n), "diverged": diverged,
                "losses": {d: [losses[fam[d][s]] for s in seeds] for d in (shallow, deep)}}
    return None


def _gap_text(g: dict) -> str:
    shallow_l, deep_l = list(g["losses"].values())
    return (f"{g['deep']} - {g['shallow']} final loss {pm(g['mean'], g['sd'], g['n'], '.3f', sign=True)} nats "
            f"(per seed {', '.join(num(v, '+.2f') for v in g['pairs'].values())}; "
            f"95% interval ±{num(g['band'], '.2f')})"
            + (f"; diverged (NaN loss), left out: {', '.join(g['diverged'])}" if g["diverged"] else ""))


def degradation_claim(configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], caveat: str,
                      margin: float = LOSS_MARGIN) -> Claim:
    """Deeper plain nets train worse: ``yes`` when deep - shallow > 0 beyond the noise, ``no`` when the interval
    lies below ``margin``, ``unclear`` otherwise (or with fewer than two seeds)."""
    statement = "Deeper plain nets train worse (degradation)"
    g = depth_gap(configs, losses, residual=False)
    if g is None:
        return Claim("degradation", statement, UNCLEAR, "needs trained plain nets at two depths", "train",
                     caveat=caveat)
    lo, hi = g["mean"] - g["band"], g["mean"] + g["band"]
    answer = UNCLEAR if g["n"] < 2 else YES if lo > 0 else NO if hi < margin else UNCLEAR
    how = ("paired by seed; yes when the 95% interval of the gap lies above 0, no when it lies below "
           f"{margin} nats, else unclear (inside the noise)" + ("; one seed: no spread, so unclear" if g["n"] < 2
                                                                  else ""))
    return Claim("degradation", statement, answer, _gap_text(g) + f" ({'with' if g['bn'] else 'without'} BN)",
                 "train", how=how, caveat=caveat)


def residual_claim(configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], caveat: str) -> Claim:
    """Residual nets remove the degradation: the residual depth gap is smaller than the plain one beyond the noise
    and not itself above 0 beyond the noise (``yes``); ``no`` when the residual gap is above 0 beyond the noise."""
    statement = "Deeper residual nets do not train worse (shortcuts remove the degradation)"
    g = depth_gap(configs, losses, residual=True)
    if g is None:
        return Claim("residual", statement, UNCLEAR, "needs trained residual nets at two depths", "train",
                     caveat=caveat)
    text = _gap_text(g)
    p = depth_gap(configs, losses, residual=False)
    contrast = None
    if p is not None:
        common = sorted(set(p["pairs"]) & set(g["pairs"]))
        mean, sd, se, n = stats.mean_sd_se([p["pairs"][s] - g["pairs"][s] for s in common])
        contrast = (mean, stats.band(se, n), n)
        text += (f"; the plain gap exceeds it by {pm(mean, sd, n, '.3f', sign=True)} nats "
                 f"(95% interval ±{num(contrast[1], '.2f')})")
    res_worse = g["n"] >= 2 and g["mean"] - g["band"] > 0
    closes = contrast is not None and contrast[2] >= 2 and contrast[0] - contrast[1] > 0
    answer = NO if res_worse else YES if closes else UNCLEAR
    how = ("paired by seed; no when the residual gap's 95% interval lies above 0; yes when it does not and the "
           "plain gap exceeds it beyond the noise; else unclear")
    return Claim("residual", statement, answer, text, "train", how=how, caveat=caveat)


def all_claims(pooled: Any, configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], caveat: str,
               traj: Any = None) -> List[Claim]:
    """The paper's claims, in its order: BN forward, BN backward, degradation of plain nets, residual nets."""
    return [forward_claim(pooled, configs, traj), backward_claim(pooled, configs, traj),
            degradation_claim(configs, losses, caveat), residual_claim(configs, losses, caveat)]


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
