"""The paper's training claims (degradation, residual learning), decided only from nets that learned.

He et al. (2016, §4.1) report that the 56-layer plain net has a *higher training error* than the 20-layer one
(degradation) and that residual nets do not (§4.2). A short run can only say how the nets compare after the steps
it took; these rules make sure the words follow from what was measured:

* **Learning check first.** A net *learned* when its final training loss is below chance, ``ln(classes)``, by more
  than :data:`LOSS_MARGIN` beyond the noise (the 95% interval over seeds of ``chance - loss`` lies above the
  margin); it is *at chance* when that interval lies below the margin. Every comparison needs its shallow net to
  have learned; a "does not train worse" answer needs both nets to have learned (two nets at chance are equal
  trivially). Random labels, too few steps or a learning rate too small for the net therefore give ``unclear``,
  with the run that would decide it.
* **One equivalence standard** (:func:`gradscope.analysis.stats.versus_margin`): a depth gap (deep minus shallow
  final loss, paired by seed) is "worse" when its 95% interval lies wholly above :data:`LOSS_MARGIN`, "not worse"
  when it lies wholly below, and undecided when it contains the margin. The degradation claim and the residual
  claim use the same rule on their own family's gap.
* **How far training got** is said in words for every net compared: its final loss against chance and its batch
  accuracy, and whether it learned, so "trains worse after 300 steps" is never mistaken for the paper's converged
  degradation when the deep net has barely left chance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from gradscope.analysis import stats
from gradscope.analysis.results import Claim
from gradscope.analysis.text import num
from gradscope.analysis.trajectory import config_of

YES, NO, UNCLEAR = "yes", "no", "unclear"
#: Final losses within this many nats count as "the same": the one margin of every training comparison (and of
#: "learned": a net must be this far below chance, beyond the noise).
LOSS_MARGIN = 0.1
LEARNED, AT_CHANCE, UNSURE = "learned", "at chance", "unsure"


@dataclass(frozen=True)
class Progress:
    """How far one configuration got, over its seeds: final loss against chance and batch accuracy."""

    group: str
    chance: float
    loss: float
    accuracy: float
    n: int
    lo: float  # 95% interval of (chance - loss): how far below chance
    hi: float
    state: str  # LEARNED, AT_CHANCE or UNSURE

    def text(self) -> str:
        acc = "" if math.isnan(self.accuracy) else f", batch accuracy {100 * self.accuracy:.0f}%"
        what = {LEARNED: "learned", AT_CHANCE: f"still within {LOSS_MARGIN:g} nats of chance: it has barely "
                                               f"started learning", UNSURE: "unclear whether it left chance"}
        head = f"{self.group} final loss {num(self.loss, '.2f')} (chance ln {math.exp(self.chance):.0f} = " \
               f"{self.chance:.2f}){acc}: "
        return head + (what[self.state] if not math.isnan(self.chance) else "number of classes unknown")


def progress(group: str, runs: List[str], losses: Dict[str, float], accuracy: Dict[str, float],
             chance: float) -> Progress:
    """The learning check of one configuration from its seeds' final losses (NaN losses left out)."""
    below = [chance - losses[r] for r in runs if not math.isnan(losses[r])]
    mean, _, _, n, lo, hi = stats.interval(below)
    if n == 1:  # one seed: no spread; the point estimate decides only the wording, never an answer
        lo = hi = mean
    side = stats.versus_margin(lo, hi, LOSS_MARGIN) if not math.isnan(chance) else stats.STRADDLES
    state = {stats.ABOVE: LEARNED, stats.BELOW: AT_CHANCE}.get(side, UNSURE)
    accs = [accuracy[r] for r in runs if r in accuracy and not math.isnan(accuracy[r])]
    return Progress(group, chance, chance - mean if n else math.nan, sum(accs) / len(accs) if accs else math.nan,
                    n, lo, hi, state)


def _chance(configs: Dict[str, Dict[str, Any]], runs: List[str]) -> float:
    classes = {int(configs[r]["num_classes"]) for r in runs if configs[r].get("num_classes")}
    return math.log(classes.pop()) if len(classes) == 1 else math.nan


def _family_runs(configs: Dict[str, Dict[str, Any]], residual: bool, bn: bool,
                 losses: Dict[str, float]) -> Dict[int, Dict[int, str]]:
    """depth -> seed -> run, for trained runs of one family."""
    out: Dict[int, Dict[int, str]] = {}
    for run, c in configs.items():
        if run not in losses or "depth" not in c or bool(c.get("residual")) != residual or bool(c.get("bn")) != bn:
            continue
        out.setdefault(int(c["depth"]), {})[int(c.get("seed") or 0)] = run
    return out


def depth_gap(configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], residual: bool,
              accuracy: Optional[Dict[str, float]] = None) -> Optional[dict]:
    """Deep-minus-shallow final loss per seed for one family (BN preferred), its 95% interval, what was dropped
    and why, and the learning check of both depths."""
    accuracy = accuracy or {}
    for bn in (True, False):
        fam = _family_runs(configs, residual, bn, losses)
        if len(fam) < 2:
            continue
        shallow, deep = min(fam), max(fam)
        seeds = sorted(set(fam[shallow]) & set(fam[deep]))
        diverged = [fam[d][s] for d in (shallow, deep) for s in seeds if math.isnan(losses[fam[d][s]])]
        pairs = {s: losses[fam[deep][s]] - losses[fam[shallow][s]] for s in seeds
                 if not (math.isnan(losses[fam[deep][s]]) or math.isnan(losses[fam[shallow][s]]))}
        mean, sd, se, n, lo, hi = stats.interval(list(pairs.values()))
        runs = {d: [fam[d][s] for s in seeds] for d in (shallow, deep)}
        chance = _chance(configs, runs[shallow] + runs[deep])
        prog = {d: progress(config_of(configs, runs[d][0]) if seeds else "", runs[d], losses, accuracy, chance)
                for d in (shallow, deep)}
        return {"bn": bn, "shallow": prog[shallow].group, "deep": prog[deep].group, "pairs": pairs, "mean": mean,
                "sd": sd, "se": se, "n": n, "lo": lo, "hi": hi, "band": stats.band(se, n), "diverged": diverged,
                "losses": {d: [losses[r] for r in runs[d]] for d in (shallow, deep)},
                "progress": (prog[shallow], prog[deep])}
    return None


def _gap_text(g: dict) -> str:
    shallow, deep = g["progress"]
    head = (f"{g['deep']} - {g['shallow']} final loss {num(g['mean'], '+.3f')} nats, 95% interval "
            f"[{num(g['lo'], '+.3f')}, {num(g['hi'], '+.3f')}] (n={g['n']} seeds; per seed "
            f"{', '.join(num(v, '+.2f') for v in g['pairs'].values())}; {'with' if g['bn'] else 'without'} BN)")
    if g["diverged"]:
        head += f"; diverged (NaN loss), left out: {', '.join(g['diverged'])}"
    return head + f"; {shallow.text()}; {deep.text()}"


def _decide(g: dict, worse_answer: str, fine_answer: str) -> Tuple[str, str]:
    """The shared rule: (answer, why) for one gap, with the learning check and what run would decide it."""
    shallow, deep = g["progress"]
    margin = LOSS_MARGIN
    if g["n"] < 2:
        return UNCLEAR, "one seed gives no spread (run --seeds 0,1,2 or more)"
    if shallow.state != LEARNED:
        return UNCLEAR, (f"{shallow.group} did not learn beyond the noise, so no comparison is decided: train "
                         f"longer (more --steps) or check the labels and learning rate")
    side = stats.versus_margin(g["lo"], g["hi"], margin)
    if side == stats.ABOVE:
        return worse_answer, f"the gap's interval lies above the {margin:g}-nat margin"
    if side == stats.BELOW:
        if deep.state != LEARNED:
            return UNCLEAR, (f"the gap lies below the margin but {deep.group} did not learn beyond the noise: "
                             f"nets near chance are equal trivially; train longer (more --steps)")
        return fine_answer, f"the gap's interval lies below the {margin:g}-nat margin"
    need = stats.seeds_to_decide(g["mean"], g["sd"], margin)
    plan = (f"about {need} seeds (--seeds {','.join(str(k) for k in range(need))}) would decide it if the mean and "
            f"spread hold"
            if need and need > g["n"] else "more seeds or more steps would decide it")
    return UNCLEAR, f"the gap's interval contains the {margin:g}-nat margin; {plan}"


RULE = (f"paired by seed; the learning check first (the shallow net, and for a 'not worse' answer both nets, must "
        f"be below chance ln(classes) by more than {LOSS_MARGIN:g} nats beyond the noise); then the 95% interval of "
        f"the deep-minus-shallow gap against the {LOSS_MARGIN:g}-nat margin: wholly above = trains worse, wholly "
        f"below = does not, containing it = unclear")


def degradation_claim(configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], caveat: str,
                      accuracy: Optional[Dict[str, float]] = None) -> Claim:
    """Deeper plain nets train worse (degradation), by the shared rule on the plain family's depth gap."""
    statement = "Deeper plain nets train worse (degradation)"
    g = depth_gap(configs, losses, residual=False, accuracy=accuracy)
    if g is None:
        return Claim("degradation", statement, UNCLEAR, "needs trained plain nets at two depths", "train",
                     caveat=caveat)
    answer, why = _decide(g, YES, NO)
    text = _gap_text(g) + (f"; undecided: {why}" if answer == UNCLEAR else "")
    if answer == YES and g["progress"][1].state != LEARNED:
        text += (f"; {g['deep']} trains worse because it has barely started learning in this run: slower training, "
                 f"not yet the converged degradation the paper reports")
    return Claim("degradation", statement, answer, text, "train", how=f"{RULE}; here: {why}", caveat=caveat,
                 **_key_number(g))


def residual_claim(configs: Dict[str, Dict[str, Any]], losses: Dict[str, float], caveat: str,
                   accuracy: Optional[Dict[str, float]] = None) -> Claim:
    """Deeper residual nets do not train worse, by the shared rule on the residual family's depth gap; a ``yes``
    also needs the plain nets to degrade (otherwise there is nothing for shortcuts to remove)."""
    statement = "Deeper residual nets do not train worse (shortcuts remove the degradation)"
    g = depth_gap(configs, losses, residual=True, accuracy=accuracy)
    if g is None:
        return Claim("residual", statement, UNCLEAR, "needs trained residual nets at two depths", "train",
                     caveat=caveat)
    answer, why = _decide(g, NO, YES)
    text = _gap_text(g)
    p = depth_gap(configs, losses, residual=False, accuracy=accuracy)
    if p is not None:
        common = sorted(set(p["pairs"]) & set(g["pairs"]))
        mean, sd, _, n, lo, hi = stats.interval([p["pairs"][s] - g["pairs"][s] for s in common])
        text += (f"; the plain gap exceeds it by {num(mean, '+.3f')} nats, 95% interval [{num(lo, '+.3f')}, "
                 f"{num(hi, '+.3f')}] (n={n})")
        plain_answer, _ = _decide(p, YES, NO)
    else:
        plain_answer = UNCLEAR
    if answer == YES and plain_answer != YES:
        answer = UNCLEAR
        why += ("; but the plain nets are not shown to degrade here, so there is no degradation for shortcuts to "
                "remove (the degradation claim must be 'yes' first)")
    if answer == UNCLEAR:
        text += f"; undecided: {why}"
    return Claim("residual", statement, answer, text, "train", how=f"{RULE}; here: {why}", caveat=caveat,
                 **_key_number(g))


def _key_number(g: dict) -> Dict[str, Any]:
    """The claim's key number for tables: the depth gap in nats with its 95% interval (None where undefined)."""
    fin = [v if math.isfinite(v) else None for v in (g["mean"], g["lo"], g["hi"])]
    return {"estimate": fin[0], "low": fin[1], "high": fin[2], "unit": "nats"}


def final_accuracy(losses: Any, runs: List[str], window: int) -> Dict[str, float]:
    """Mean batch accuracy over the last ``window`` steps of each trained run (NaN when not recorded)."""
    out: Dict[str, float] = {}
    if losses is None or "accuracy" not in getattr(losses, "columns", ()):
        return out
    for run in runs:
        rows = losses[losses["run"] == run].sort_values("step")
        if len(rows):
            out[run] = float(rows["accuracy"].tail(window).mean())
    return out
