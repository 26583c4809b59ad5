"""The paper's three claims, answered from measurements: pure functions of verdicts and training losses.

He et al. (2016, §4.1) argue that the degradation of deep plain nets is not caused by vanishing signals, because
BatchNorm keeps (1) forward activations at non-zero variance and (2) backward gradients at healthy norms, while
(3) the deeper plain net still trains worse than the shallower one and residual nets do not. Each claim here is
decided from numbers the study measured; nothing is canned: feed other numbers and the answers change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from gradscope import schema as S

YES, NO, UNCLEAR = "yes", "no", "unclear"

#: Final losses closer than this (absolute, nats) count as "the same".
LOSS_MARGIN = 0.02


@dataclass(frozen=True)
class Claim:
    """One claim: its statement, the answer (yes / no / unclear) and the numbers that decide it."""

    key: str
    statement: str
    answer: str
    evidence: str

    def line(self) -> str:
        return f"{self.statement}: {self.answer} — {self.evidence}"


def _rows(verdicts: Any, signal: str, bn: Optional[bool]) -> List[Dict[str, Any]]:
    out = []
    for row in verdicts.to_dict("records"):
        if row.get("signal") != signal:
            continue
        if bn is not None and S.BN in row and bool(row[S.BN]) != bn:
            continue
        out.append(row)
    return out


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3g}"


def _theory(row: Dict[str, Any]) -> str:
    """", theory x1.47 (Yang et al. 2019): agrees" when the verdict row carries a prediction, else ""."""
    predicted = row.get("predicted_factor")
    if predicted is None or (isinstance(predicted, float) and math.isnan(predicted)):
        return ""
    agrees = row.get("agrees")
    judged = "" if agrees is None or (isinstance(agrees, float) and math.isnan(agrees)) else \
        (": agrees" if bool(agrees) else ": does NOT agree")
    reference = str(row.get("reference") or "").split(" (")[0]
    return f", theory x{_fmt(float(predicted))}" + (f" ({reference})" if reference else "") + judged


def _deepest(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return max(rows, key=lambda r: (r.get("n_blocks") or 0, str(r.get(S.RUN)))) if rows else None


def forward_claim(verdicts: Any) -> Claim:
    """BatchNorm keeps forward signals from vanishing: every BN run's forward verdict is not 'vanishing'."""
    statement = "BatchNorm keeps forward signals from vanishing"
    with_bn, without = _rows(verdicts, "forward", True), _rows(verdicts, "forward", False)
    if not with_bn:
        return Claim("bn_forward", statement, UNCLEAR, "no run with BatchNorm was measured")
    lo = min(r["min_value"] for r in with_bn)
    hi = max(r["max_value"] for r in with_bn)
    deepest = _deepest(with_bn)
    vanished = [r[S.RUN] for r in with_bn if r["verdict"] == "vanishing"]
    answer = NO if vanished else YES
    text = (f"block-output variance stays within [{_fmt(lo)}, {_fmt(hi)}] over up to {deepest['n_blocks']} blocks "
            f"with BN")
    if vanished:
        text += f", but it vanishes in {', '.join(vanished)}"
    if without:
        worst = _deepest(without)
        text += (f"; without BN ({worst[S.RUN]}) it changes by x{_fmt(worst['factor'])} per block"
                 f"{_theory(worst)}, {_fmt(worst['end_to_end'])}x end to end ({worst['verdict']})")
    return Claim("bn_forward", statement, answer, text)


def backward_claim(verdicts: Any) -> Claim:
    """BatchNorm keeps backward gradients from vanishing (and says whether they explode instead, at what rate)."""
    statement = "BatchNorm keeps backward gradients from vanishing"
    with_bn, without = _rows(verdicts, "backward", True), _rows(verdicts, "backward", False)
    if not with_bn:
        return Claim("bn_backward", statement, UNCLEAR, "no run with BatchNorm was measured")
    vanished = [r[S.RUN] for r in with_bn if r["verdict"] == "vanishing"]
    answer = NO if vanished else YES
    parts = []
    for r in sorted(with_bn, key=lambda r: str(r[S.RUN])):
        parts.append(f"{r[S.RUN]} x{_fmt(r['factor'])} per block toward the input ({r['verdict']}{_theory(r)})")
    text = "with BN: " + "; ".join(parts)
    exploding = [r[S.RUN] for r in with_bn if r["verdict"] == "exploding"]
    if exploding:
        text += f" — gradients grow rather than vanish, and explode in {', '.join(exploding)}"
    if without:
        worst = _deepest(without)
        text += f"; without BN ({worst[S.RUN]}): x{_fmt(worst['factor'])} per block ({worst['verdict']}{_theory(worst)})"
    return Claim("bn_backward", statement, answer, text)


def _loss(x: float) -> str:
    return "diverged (NaN)" if math.isnan(x) else _fmt(x)


def _depth_pairs(configs: Dict[str, Dict[str, Any]]) -> Dict[Tuple[bool, bool], Tuple[str, str]]:
    """(residual, bn) -> (shallowest run, deepest run), for groups with two depths or more."""
    groups: Dict[Tuple[bool, bool], List[Tuple[int, str]]] = {}
    for run, config in configs.items():
        if "residual" not in config or "depth" not in config:
            continue
        groups.setdefault((bool(config["residual"]), bool(config.get("bn"))), []).append((int(config["depth"]), run))
    pairs = {}
    for key, items in groups.items():
        items.sort()
        if items[0][0] != items[-1][0]:
            pairs[key] = (items[0][1], items[-1][1])
    return pairs


def _pair_losses(final_losses: Dict[str, float], configs: Dict[str, Dict[str, Any]], residual: bool
                 ) -> Tuple[Optional[bool], List[str], Optional[Tuple[str, str, float, float]]]:
    """(BN setting used, evidence texts, (shallow, deep, loss_shallow, loss_deep)) for one family.

    The BN pair is preferred (the paper's nets have BN); without one, the pair without BN.
    """
    pairs = _depth_pairs(configs)
    texts = []
    for bn in (True, False):
        if (residual, bn) in pairs:
            shallow, deep = pairs[(residual, bn)]
            ls, ld = final_losses.get(shallow, math.nan), final_losses.get(deep, math.nan)
            texts.append(f"{deep} loss {_loss(ld)} vs {shallow} {_loss(ls)}")
    for bn in (True, False):
        if (residual, bn) in pairs:
            shallow, deep = pairs[(residual, bn)]
            ls, ld = final_losses.get(shallow, math.nan), final_losses.get(deep, math.nan)
            if not (math.isnan(ls) or math.isnan(ld)):
                return bn, texts, (shallow, deep, ls, ld)
    return None, texts, None


def degradation_claim(final_losses: Dict[str, float], configs: Dict[str, Dict[str, Any]], steps: int,
                      margin: float = LOSS_MARGIN) -> Claim:
    """Deeper plain nets train worse (degradation), from the final training losses of a shallow/deep plain pair.

    ``yes`` when the deeper plain net's loss is above the shallower one's by more than ``margin``, ``no`` when it is
    not, ``unclear`` without a pair of finite losses. The BN pair decides when there is one.
    """
    statement = "Deeper plain nets train worse (degradation)"
    bn, texts, pair = _pair_losses(final_losses, configs, residual=False)
    evidence = ("; ".join(texts) + f" after {steps} steps (mean of the last 5)") if texts else \
        "needs plain nets at two depths"
    if pair is None:
        return Claim("degradation", statement, UNCLEAR, evidence)
    _, _, ls, ld = pair
    return Claim("degradation", statement, YES if ld > ls + margin else NO,
                 evidence + ("" if len(texts) < 2 else f"; decided {'with' if bn else 'without'} BN"))


def residual_claim(final_losses: Dict[str, float], configs: Dict[str, Dict[str, Any]], steps: int,
                   margin: float = LOSS_MARGIN) -> Claim:
    """Deeper residual nets do not train worse (the paper's remedy), from a shallow/deep residual pair.

    Short runs often say ``no``: the paper's comparison is after full training, and 40 steps are far from it.
    """
    statement = "Deeper residual nets train at least as well (no degradation)"
    bn, texts, pair = _pair_losses(final_losses, configs, residual=True)
    evidence = ("; ".join(texts) + f" after {steps} steps") if texts else "needs residual nets at two depths"
    if pair is None:
        return Claim("residual", statement, UNCLEAR, evidence)
    _, _, ls, ld = pair
    answer = YES if ld <= ls + margin else NO
    if answer == NO:
        evidence += " (a short run: the paper compares fully trained nets)"
    return Claim("residual", statement, answer, evidence)


def all_claims(verdicts: Any, final_losses: Dict[str, float], configs: Dict[str, Dict[str, Any]],
               steps: int) -> List[Claim]:
    """The paper's claims, in its order: BN forward, BN backward, degradation of plain nets, residual nets."""
    return [forward_claim(verdicts), backward_claim(verdicts), degradation_claim(final_losses, configs, steps),
            residual_claim(final_losses, configs, steps)]
