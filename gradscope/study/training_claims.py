"""The paper's training claims (degradation, residual learning), decided only from nets that learned.

He et al. (2016, §4.1) report that the 56-layer plain net has a *higher training error* than the 20-layer one
(degradation) and that residual nets do not (§4.2). A short run can only say how the nets compare after the steps
it took; these rules make sure the words follow from what was measured:

* **One rule, one measured quantity** (:class:`Quantity`). The default study compares the final training *loss*
  (:data:`LOSS`, nats: its mini-batch error after 300 steps is too noisy to rank nets); a recipe study, which
  trains to the end of the paper's schedule, compares the final training *error* (:data:`TRAIN_ERROR`, percentage
  points), the quantity of the paper's Fig. 6 (:mod:`gradscope.study.error_claims`). Everything below is the same
  code for both; only the unit, the margin and chance change.
* **Learning check first.** A net *learned* when its final value is below chance (``ln(classes)`` nats, or
  ``100·(1 - 1/classes)`` % error) by more than the quantity's margin beyond the noise (the 95% interval over seeds
  of ``chance - value`` lies above the margin); it is *at chance* when that interval lies below the margin. Every
  comparison needs its shallow net to have learned; a "does not train worse" answer needs both nets to have
  learned (two nets at chance are equal trivially). Random labels, too few steps or a learning rate too small for
  the net therefore give ``unclear``, with the run that would decide it.
* **One equivalence standard** (:func:`gradscope.analysis.stats.versus_margin`): a depth gap (deep minus shallow
  final value, paired by seed) is "worse" when its 95% interval lies wholly above the margin, "not worse" when it
  lies wholly below, and undecided when it contains the margin. The degradation claim and the residual claim use
  the same rule on their own family's gap.
* **The measurement's own noise is a floor** (:mod:`gradscope.study.run_noise`). Every interval that decides
  (the learning check, the depth gap) uses ``max(sample variance over seeds, the runs' mean measurement
  variance)`` per seed: the binomial noise of the examples an error counts, the batch-to-batch noise of a loss
  averaged over the last steps; the evidence says when the floor widened an interval. Seeds whose values are
  identical (sd 0) with no floor to stand in decide nothing: repeated runs are no independent evidence.
* **How far training got** is said in words for every net compared: its final value against chance (and the batch
  accuracy where the value is a loss), and whether it learned, so "trains worse after 300 steps" is never mistaken
  for the paper's converged degradation when the deep net has barely left chance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from gradscope.analysis import stats
from gradscope.analysis.results import Claim
from gradscope.analysis.text import num
from gradscope.analysis.trajectory import config_of
from gradscope.study.run_noise import Noise

YES, NO, UNCLEAR = "yes", "no", "unclear"
#: Final losses within this many nats count as "the same": the one margin of every training comparison on the loss
#: (and of "learned": a net must be this far below chance, beyond the noise).
LOSS_MARGIN = 0.1
#: Final errors within this many percentage points count as "the same" (recipe studies). Five times the seed-to-seed
#: sd of a CIFAR ResNet's test error (~0.2 points), so three to five seeds can put an interval on one side of it;
#: below every depth step of the paper's Table 6 (ResNet-20 -> 32: 1.24 points) and a fraction of the plain nets'
#: degradation in its Fig. 6 (several points), so a gap the paper reports is never called "the same".
ERROR_MARGIN = 1.0
LEARNED, AT_CHANCE, UNSURE = "learned", "at chance", "unsure"
NATS, POINTS = "nats", "points"


@dataclass(frozen=True)
class Quantity:
    """What a training claim compares at the end of training: its name, unit, margin and chance level, and how
    its numbers and the advice of an undecided answer are written."""

    name: str  # "loss", "training error": the text says "final <name>"
    unit: str  # NATS or POINTS (percentage points; values are errors in %)
    margin: float
    longer: str  # how to train longer, as a command-line hint
    gap_format: str = "+.3f"
    seed_format: str = "+.2f"

    @property
    def singular(self) -> str:
        return self.unit[:-1]

    @property
    def margin_words(self) -> str:
        """``0.1-nat`` / ``1-point``: the margin as an adjective."""
        return f"{self.margin:g}-{self.singular}"

    @property
    def within(self) -> str:
        """``0.1 nats`` / ``1 point``: the margin as an amount."""
        return f"{self.margin:g} {self.singular if self.margin == 1 else self.unit}"

    def chance(self, classes: int) -> float:
        """The value of a net that guesses: ``ln(classes)`` nats, or the error ``100·(1 - 1/classes)`` %."""
        return math.log(classes) if self.unit == NATS else 100 * (1 - 1 / classes)

    def chance_text(self, chance: float) -> str:
        if self.unit == NATS:
            return f"chance ln {math.exp(chance):.0f} = {chance:.2f}"
        return f"chance {chance:.0f}%"

    def value(self, v: float) -> str:
        return num(v, ".2f") if self.unit == NATS else num(v, ".1f") + ("" if math.isnan(v) else "%")


#: The default study's quantity: the mean training loss of the last steps.
LOSS = Quantity("loss", NATS, LOSS_MARGIN, "more --steps")
#: A recipe study's quantity: the mean mini-batch training error (%) over the end of the schedule.
TRAIN_ERROR = Quantity("training error", POINTS, ERROR_MARGIN, "more --iterations, up to the full recipe",
                       gap_format="+.2f", seed_format="+.1f")
#: The test error (%) at the last evaluation: reported beside a recipe study's claims, never deciding them.
TEST_ERROR = Quantity("test error", POINTS, ERROR_MARGIN, "more --iterations, up to the full recipe",
                      gap_format="+.2f", seed_format="+.1f")


@dataclass(frozen=True)
class Progress:
    """How far one configuration got, over its seeds: final value against chance (and batch accuracy)."""

    group: str
    chance: float
    loss: float  # the final value of the quantity (a loss in nats, or an error in %)
    accuracy: float
    n: int
    lo: float  # 95% interval of (chance - value): how far below chance
    hi: float
    state: str  # LEARNED, AT_CHANCE or UNSURE
    quantity: Quantity = LOSS
    identical: bool = False  # its seeds gave the same value and no noise floor stood in: nothing decided
    widened: str = ""  # "the binomial noise of 80 examples per run" when that floor widened the interval

    def text(self) -> str:
        q = self.quantity
        acc = "" if math.isnan(self.accuracy) else f", batch accuracy {100 * self.accuracy:.0f}%"
        what = {LEARNED: "learned", AT_CHANCE: f"still within {q.within} of chance: it has barely started learning",
                UNSURE: "unclear whether it left chance"}
        head = f"{self.group} final {q.name} {q.value(self.loss)} ({q.chance_text(self.chance)}){acc}: "
        if math.isnan(self.chance):
            return head + "number of classes unknown"
        if self.identical:
            return head + what[UNSURE] + f" (its {self.n} seeds gave the same value: no independent evidence)"
        if self.n == 1:  # no spread, no test: the point estimate is shown, not judged
            return head + "one seed, so whether it left chance is not tested"
        return head + what[self.state] + (f" (interval widened to {self.widened})" if self.widened else "")


def progress(group: str, runs: List[str], finals: Dict[str, float], accuracy: Dict[str, float],
             chance: float, quantity: Quantity = LOSS, noise: Optional[Noise] = None) -> Progress:
    """The learning check of one configuration from its seeds' final values (NaN values left out), its interval
    floored at the runs' measurement ``noise`` where known."""
    kept = [r for r in runs if not math.isnan(finals[r])]
    below = [chance - finals[r] for r in kept]
    floor = noise.floor([[r] for r in kept]) if noise else math.nan
    mean, sd, _, n, lo, hi = stats.interval(below, floor)
    if n == 1:  # one seed: no spread, so nothing is decided (the state stays UNSURE and the text says why)
        lo = hi = mean
    same = stats.identical(sd, below)
    side = stats.versus_margin(lo, hi, quantity.margin) if not (math.isnan(chance) or same) else stats.STRADDLES
    state = {stats.ABOVE: LEARNED, stats.BELOW: AT_CHANCE}.get(side, UNSURE) if n >= 2 else UNSURE
    accs = [accuracy[r] for r in runs if r in accuracy and not math.isnan(accuracy[r])]
    widened = noise.words(kept) if noise and n >= 2 and stats.floored(stats.mean_sd_se(below)[1], floor) else ""
    return Progress(group, chance, chance - mean if n else math.nan, sum(accs) / len(accs) if accs else math.nan,
                    n, lo, hi, state, quantity, same, widened)


def _chance(configs: Dict[str, Dict[str, Any]], runs: List[str], quantity: Quantity) -> float:
    classes = {int(configs[r]["num_classes"]) for r in runs if configs[r].get("num_classes")}
    return quantity.chance(classes.pop()) if len(classes) == 1 else math.nan


def _family_runs(configs: Dict[str, Dict[str, Any]], residual: bool, bn: bool,
                 finals: Dict[str, float]) -> Dict[int, Dict[int, str]]:
    """depth -> seed -> run, for trained runs of one family."""
    out: Dict[int, Dict[int, str]] = {}
    for run, c in configs.items():
        if run not in finals or "depth" not in c or bool(c.get("residual")) != residual or bool(c.get("bn")) != bn:
            continue
        out.setdefault(int(c["depth"]), {})[int(c.get("seed") or 0)] = run
    return out


def depth_gap(configs: Dict[str, Dict[str, Any]], finals: Dict[str, float], residual: bool,
              accuracy: Optional[Dict[str, float]] = None, quantity: Quantity = LOSS,
              noise: Optional[Noise] = None) -> Optional[dict]:
    """Deep-minus-shallow final value per seed for one family (BN preferred), its 95% interval (floored at the
    two runs' summed measurement ``noise`` where known), what was dropped and why, and the learning check of both
    depths. ``finals``: run -> final value of ``quantity``."""
    accuracy = accuracy or {}
    for bn in (True, False):
        fam = _family_runs(configs, residual, bn, finals)
        if len(fam) < 2:
            continue
        shallow, deep = min(fam), max(fam)
        seeds = sorted(set(fam[shallow]) & set(fam[deep]))
        diverged = [fam[d][s] for d in (shallow, deep) for s in seeds if math.isnan(finals[fam[d][s]])]
        pairs = {s: finals[fam[deep][s]] - finals[fam[shallow][s]] for s in seeds
                 if not (math.isnan(finals[fam[deep][s]]) or math.isnan(finals[fam[shallow][s]]))}
        pair_runs = {s: (fam[deep][s], fam[shallow][s]) for s in pairs}
        interval = floored_interval(list(pairs.values()), list(pair_runs.values()), noise, quantity)
        runs = {d: [fam[d][s] for s in seeds] for d in (shallow, deep)}
        chance = _chance(configs, runs[shallow] + runs[deep], quantity)
        prog = {d: progress(config_of(configs, runs[d][0]) if seeds else "", runs[d], finals, accuracy, chance,
                            quantity, noise) for d in (shallow, deep)}
        return {"bn": bn, "shallow": prog[shallow].group, "deep": prog[deep].group, "pairs": pairs, **interval,
                "diverged": diverged, "losses": {d: [finals[r] for r in runs[d]] for d in (shallow, deep)},
                "runs": runs, "pair_runs": pair_runs, "progress": (prog[shallow], prog[deep]), "quantity": quantity}
    return None


def floored_interval(values: List[float], groups: List[Tuple[str, ...]], noise: Optional[Noise],
                     quantity: Quantity) -> dict:
    """The 95% interval of per-seed ``values``, each a signed sum of the runs in its group, with the per-seed
    variance floored at the groups' summed measurement ``noise`` (:func:`gradscope.analysis.stats.interval`):
    ``mean, sd`` (the spread used), ``spread`` (the sample sd), ``se, n, lo, hi, band``, ``identical`` (the seeds
    agree exactly and no floor stood in: nothing may be decided) and ``note`` (the floor in words, or why there is
    none for an error)."""
    floor = noise.floor(groups) if noise else math.nan
    spread = stats.mean_sd_se(values)[1]
    mean, sd, se, n, lo, hi = stats.interval(values, floor)
    same = stats.identical(sd, values)
    notes = []
    if noise and n >= 2 and stats.floored(spread, floor):
        notes.append(f"interval widened to {noise.words([r for g in groups for r in g])}")
    elif quantity.unit == POINTS and n >= 2 and not math.isfinite(floor):
        notes.append("the number of examples behind each error is unknown: no binomial noise floor")
    if same:
        notes.append("identical over seeds: a zero-width interval, not certainty")
    return {"mean": mean, "sd": sd, "spread": spread, "se": se, "n": n, "lo": lo, "hi": hi,
            "band": stats.band(se, n), "identical": same, "note": "; ".join(notes)}


def gap_numbers(g: dict) -> str:
    """``plain56-bn - plain20-bn final loss +1.240 nats, 95% interval [+1.152, +1.328] (n=3 seeds; per seed ...)``."""
    q = g["quantity"]
    return (f"{g['deep']} - {g['shallow']} final {q.name} {num(g['mean'], q.gap_format)} {q.unit}, 95% interval "
            f"[{num(g['lo'], q.gap_format)}, {num(g['hi'], q.gap_format)}] (n={g['n']} seeds; per seed "
            f"{', '.join(num(v, q.seed_format) for v in g['pairs'].values())}; {'with' if g['bn'] else 'without'} "
            f"BN{'; ' + g['note'] if g.get('note') else ''})")


def _gap_text(g: dict) -> str:
    shallow, deep = g["progress"]
    head = gap_numbers(g)
    if g["diverged"]:
        head += f"; diverged (NaN loss), left out: {', '.join(g['diverged'])}"
    return head + f"; {shallow.text()}; {deep.text()}"


def _decide(g: dict, worse_answer: str, fine_answer: str) -> Tuple[str, str]:
    """The shared rule: (answer, why) for one gap, with the learning check and what run would decide it."""
    shallow, deep = g["progress"]
    q = g["quantity"]
    margin = q.margin
    if g["n"] < 2 and g["diverged"]:  # the seeds were run; divergence left too few pairs
        return UNCLEAR, (f"{len(g['diverged'])} run(s) diverged (NaN loss: {', '.join(g['diverged'])}), leaving "
                         f"{g['n']} seed(s) with both depths finite, too few for a spread, so the gap cannot be "
                         f"measured; at a lower learning rate (--lr) both depths may finish and be compared")
    if g["n"] < 2:
        return UNCLEAR, "one seed gives no spread (run --seeds 0,1,2 or more)"
    if g["identical"]:
        return UNCLEAR, identical_why(q, f"the {g['n']} seeds gave the same gap")
    if shallow.identical:
        return UNCLEAR, identical_why(q, f"the {shallow.n} seeds of {shallow.group} gave the same value")
    if shallow.state != LEARNED:
        return UNCLEAR, (f"{shallow.group} did not learn beyond the noise, so no comparison is decided: train "
                         f"longer ({q.longer}) or check the labels and learning rate")
    side = stats.versus_margin(g["lo"], g["hi"], margin)
    if side == stats.ABOVE:
        return worse_answer, f"the gap's interval lies above the {q.margin_words} margin"
    if side == stats.BELOW:
        if deep.identical:
            return UNCLEAR, identical_why(q, f"the gap lies below the margin but the {deep.n} seeds of "
                                             f"{deep.group} gave the same value")
        if deep.state != LEARNED:
            return UNCLEAR, (f"the gap lies below the margin but {deep.group} did not learn beyond the noise: "
                             f"nets near chance are equal trivially; train longer ({q.longer})")
        return fine_answer, f"the gap's interval lies below the {q.margin_words} margin"
    need = stats.seeds_to_decide(g["mean"], g["sd"], margin)
    plan = (f"about {need} seeds (--seeds {','.join(str(k) for k in range(need))}) would decide it if the mean and "
            f"spread hold"
            if need and need > g["n"] else f"more seeds or more {'steps' if q.unit == NATS else 'iterations'} "
                                           f"would decide it")
    return UNCLEAR, f"the gap's interval contains the {q.margin_words} margin; {plan}"


def identical_why(quantity: Quantity, what: str) -> str:
    """Why seeds that agree exactly decide nothing, and what to check."""
    fix = (", and record how many examples each error counts, so that its binomial noise can stand in"
           if quantity.unit == POINTS else "")
    return (f"{what} (spread 0 over seeds): a zero-width interval is not certainty, and identical runs give no "
            f"independent evidence; check that the seeds vary the data order and the initialisation{fix}")


def rule(quantity: Quantity = LOSS) -> str:
    """The rule of both training claims, in words, for ``quantity``."""
    chance = "chance ln(classes)" if quantity.unit == NATS else "the chance error 100·(1 - 1/classes)%"
    floor = ("the batch-to-batch noise of the final steps' mean" if quantity.unit == NATS else
             "the binomial noise of the examples each error counts")
    return (f"paired by seed; the learning check first (the shallow net, and for a 'not worse' answer both nets, "
            f"must be below {chance} by more than {quantity.within} beyond the noise); then the 95% interval "
            f"of the deep-minus-shallow gap in final {quantity.name} against the {quantity.margin_words} margin: "
            f"wholly above = trains worse, wholly below = does not, containing it = unclear; each interval's "
            f"per-seed variance is at least the runs' own measurement noise where it is known ({floor}), and "
            f"seeds with identical values decide nothing")


RULE = rule(LOSS)


def degradation_claim(configs: Dict[str, Dict[str, Any]], finals: Dict[str, float], caveat: str,
                      accuracy: Optional[Dict[str, float]] = None, quantity: Quantity = LOSS,
                      noise: Optional[Noise] = None) -> Claim:
    """Deeper plain nets train worse (degradation), by the shared rule on the plain family's depth gap in
    ``quantity`` (``finals``: run -> its final value; ``noise``: each run's measurement noise, the floor)."""
    statement = "Deeper plain nets train worse (degradation)"
    g = depth_gap(configs, finals, residual=False, accuracy=accuracy, quantity=quantity, noise=noise)
    if g is None:
        return Claim("degradation", statement, UNCLEAR, f"needs trained plain nets at two depths (decided on the "
                     f"final {quantity.name})", "train", caveat=caveat)
    answer, why = _decide(g, YES, NO)
    text = _gap_text(g) + (f"; undecided: {why}" if answer == UNCLEAR else "")
    if answer == YES and g["progress"][1].state != LEARNED:
        text += (f"; {g['deep']} trains worse because it has barely started learning in this run: slower training, "
                 f"not yet the converged degradation the paper reports")
    return Claim("degradation", statement, answer, text, "train", how=f"{rule(quantity)}; here: {why}",
                 caveat=caveat, **_key_number(g))


def residual_claim(configs: Dict[str, Dict[str, Any]], finals: Dict[str, float], caveat: str,
                   accuracy: Optional[Dict[str, float]] = None, quantity: Quantity = LOSS,
                   noise: Optional[Noise] = None) -> Claim:
    """Deeper residual nets do not train worse, by the shared rule on the residual family's depth gap; a ``yes``
    also needs the plain nets to degrade (otherwise there is nothing for shortcuts to remove)."""
    statement = "Deeper residual nets do not train worse (shortcuts remove the degradation)"
    g = depth_gap(configs, finals, residual=True, accuracy=accuracy, quantity=quantity, noise=noise)
    if g is None:
        return Claim("residual", statement, UNCLEAR, f"needs trained residual nets at two depths (decided on the "
                     f"final {quantity.name})", "train", caveat=caveat)
    answer, why = _decide(g, NO, YES)
    text = _gap_text(g)
    p = depth_gap(configs, finals, residual=False, accuracy=accuracy, quantity=quantity, noise=noise)
    if p is not None:
        common = sorted(set(p["pairs"]) & set(g["pairs"]))
        e = floored_interval([p["pairs"][s] - g["pairs"][s] for s in common],
                             [p["pair_runs"][s] + g["pair_runs"][s] for s in common], noise, quantity)
        f = quantity.gap_format
        text += (f"; the plain gap exceeds it by {num(e['mean'], f)} {quantity.unit}, 95% interval "
                 f"[{num(e['lo'], f)}, {num(e['hi'], f)}] (n={e['n']}{_widened(e)})")
        plain_answer, _ = _decide(p, YES, NO)
    else:
        plain_answer = UNCLEAR
    if answer == YES and plain_answer != YES:
        answer = UNCLEAR
        why += ("; but the plain nets are not shown to degrade here, so there is no degradation for shortcuts to "
                "remove (the degradation claim must be 'yes' first)")
    if answer == UNCLEAR:
        text += f"; undecided: {why}"
    return Claim("residual", statement, answer, text, "train", how=f"{rule(quantity)}; here: {why}", caveat=caveat,
                 **_key_number(g))


def _widened(e: dict) -> str:
    """``; interval widened to ...`` for a secondary interval: only when the floor was used (the main gap already
    says when the noise is unknown)."""
    return f"; {e['note']}" if e["note"].startswith("interval widened") else ""


def _key_number(g: dict) -> Dict[str, Any]:
    """The claim's key number for tables: the depth gap in its unit with its 95% interval (None where undefined)."""
    fin = [v if math.isfinite(v) else None for v in (g["mean"], g["lo"], g["hi"])]
    return {"estimate": fin[0], "low": fin[1], "high": fin[2], "unit": g["quantity"].unit}


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
