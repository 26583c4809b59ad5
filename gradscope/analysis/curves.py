"""Error curves of a recipe study (He et al. 2016, Fig. 6) and its comparison with the paper's Table 6, from the
per-iteration loss table the recipe runs write (pure pandas: the report and the study both read it).
"""
from __future__ import annotations

import math
from typing import Any, Dict

from gradscope import schema as S

#: Table 6 of the paper: CIFAR-10 test error (%) of the residual nets. For ResNet-110 the table gives the best of
#: five runs, 6.43, with "6.61±0.16" (mean ± std over the five) beside it.
PAPER_TEST_ERROR: Dict[str, float] = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                                      "resnet110": 6.43}
PAPER_RESNET110_MEAN_STD = (6.61, 0.16)
#: Columns of the error curves (one row per evaluation point of one run), derived by :func:`curves`.
CURVE_COLUMNS = (S.RUN, "model", "seed", "iteration", "lr", "train_loss", "train_error", "val_error", "test_error")


def has_curves(losses: Any) -> bool:
    """Whether a loss table holds evaluated errors (a recipe study's) to draw curves from."""
    return losses is not None and "test_error" in getattr(losses, "columns", ()) and losses["test_error"].notna().any()


def curves(losses: Any, configs: Dict[str, Dict[str, Any]]) -> Any:
    """Fig. 6's curves from per-iteration losses: one row per evaluation point of each run.

    ``train_error``/``train_loss`` are the means over the iterations since the previous point (1 - accuracy of
    each mini-batch); ``val_error``/``test_error`` are the evaluation after the point's iteration. ``configs``
    gives each run's model and seed.
    """
    import pandas as pd

    out = []
    for run, rows in losses.groupby(S.RUN, sort=False):
        rows = rows.sort_values(S.STEP)
        points = rows["test_error"].notna().to_numpy()
        interval = points[::-1].cumsum()[::-1]  # rows up to and including a point share its interval number
        for _, group in rows.groupby(-interval, sort=True):
            last = group.iloc[-1]
            if not math.isfinite(float(last["test_error"])):
                continue  # iterations after the last evaluation (a run stopped early)
            config = configs.get(run, {})
            out.append((run, config.get("model", config.get("name", run)), config.get("seed"), int(last[S.STEP]) + 1,
                        float(last["lr"]),
                        float(group["loss"].mean()), float(1 - group["accuracy"].mean()), float(last["val_error"]),
                        float(last["test_error"])))
    return pd.DataFrame(out, columns=list(CURVE_COLUMNS))


def table6(curves: Any) -> Any:
    """Final test error (%) per model, mean and std over seeds, beside the paper's Table 6 where it has one."""
    import pandas as pd

    last = curves.sort_values("iteration").groupby(S.RUN).tail(1)
    rows = []
    for model, group in last.groupby("model", sort=False):
        errors = 100 * group["test_error"].astype(float)
        paper = PAPER_TEST_ERROR.get(model, math.nan)
        rows.append((model, len(errors), float(errors.mean()), float(errors.std(ddof=1)) if len(errors) > 1
                     else math.nan, paper, float(errors.mean()) - paper))
    return pd.DataFrame(rows, columns=["model", "runs", "test_error", "test_error_sd", "paper", "difference"])
