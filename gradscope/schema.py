"""The frame contract: column and metric names shared by every layer.

This module imports nothing heavy (no torch, no pandas) so that analysis, reports and the CLI can name columns
without pulling in the hook engine.

One row per (step, block, call, metric). ``depth`` is the 0-based order of a block's first call in the forward
pass; ``call`` is the 0-based index of the call within one step for modules that run several times per forward
(a shared layer, a reused ``ReLU``); it is 0 for the usual single call.
"""
from __future__ import annotations

#: The package version, in one place: ``pyproject.toml`` reads it, ``gradscope.__version__`` and
#: ``gradscope --version`` show it, provenance records carry it.
__version__ = "0.1.0"

# --- columns -------------------------------------------------------------------------------------------------
STEP = "step"
BLOCK = "block"
DEPTH = "depth"
KIND = "kind"
METRIC = "metric"
VALUE = "value"
CALL = "call"
#: Columns of every frame, in order. Frames that combine runs add :data:`RUN` and config columns after these.
COLUMNS = (STEP, BLOCK, DEPTH, KIND, METRIC, VALUE, CALL)
#: Name of the column that tells runs apart in combined frames (e.g. "resnet56-bn-s0").
RUN = "run"

# --- forward metrics (on the block output) -------------------------------------------------------------------
ACT_MEAN = "act_mean"
ACT_VAR = "act_var"
ACT_RMS = "act_rms"
ACT_ZERO_FRAC = "act_zero_frac"
ACT_NONFINITE = "act_nonfinite"
ACT_MAX_ABS = "act_max_abs"
#: Residual blocks only: variance of the residual branch F(x) and of the shortcut path.
BRANCH_VAR = "branch_var"
SHORTCUT_VAR = "shortcut_var"

# --- backward metrics -----------------------------------------------------------------------------------------
GRAD_NORM = "grad_norm"
GRAD_IN_NORM = "grad_in_norm"

# --- the batch (one row per recorded step, at the first block whose forward finished) ------------------------
#: Leading dimension of the block output of a recorded training forward: the batch size the hooks saw, so theory
#: that depends on it (BatchNorm's finite-batch rates, Yang et al. 2019) reads it from the frame. Under DDP/FSDP2 it
#: is the per-rank batch (what BN without SyncBatchNorm normalises over), not the global one the other rows describe.
BATCH_SIZE = "batch_size"
BATCH_METRICS = (BATCH_SIZE,)

# --- parameter metrics (parameters owned by the block) --------------------------------------------------------
PARAM_NORM = "param_norm"
PARAM_GRAD_NORM = "param_grad_norm"
UPDATE_RATIO = "update_ratio"
#: Adam-family optimizer state over the block's parameters (gradscope.engine.optstate): ||exp_avg|| and
#: ||sqrt(exp_avg_sq)||, read at ``scope.step()`` from ``optimizer.state``; need ``optimizer=``.
ADAM_M_NORM = "adam_m_norm"
ADAM_V_NORM = "adam_v_norm"

FORWARD_METRICS = (ACT_MEAN, ACT_VAR, ACT_RMS, ACT_ZERO_FRAC, ACT_NONFINITE, ACT_MAX_ABS)
BACKWARD_METRICS = (GRAD_NORM, GRAD_IN_NORM)
PARAM_METRICS = (PARAM_NORM, PARAM_GRAD_NORM, UPDATE_RATIO, ADAM_M_NORM, ADAM_V_NORM)
#: Metrics recorded only when ``attach(optimizer=...)`` is given (and, for the Adam states, the optimizer keeps them).
OPTIMIZER_METRICS = (UPDATE_RATIO, ADAM_M_NORM, ADAM_V_NORM)
RESIDUAL_METRICS = (BRANCH_VAR, SHORTCUT_VAR)
ALL_METRICS = FORWARD_METRICS + RESIDUAL_METRICS + BACKWARD_METRICS + PARAM_METRICS + BATCH_METRICS
#: Metrics that cost a full extra pass over activations and that no verdict or report needs, so they are recorded
#: only when asked for (``metrics=...`` naming them, or ``metrics="all"``): ``act_max_abs`` (hunting fp16
#: overflow) and the residual decomposition ``branch_var``/``shortcut_var`` (one more pass over every branch output).
OPT_IN_METRICS = (ACT_MAX_ABS, BRANCH_VAR, SHORTCUT_VAR)
#: What ``attach()`` records unless ``metrics=`` says otherwise: all the others. ``update_ratio`` and the Adam
#: states (:data:`OPTIMIZER_METRICS`) are among them but need ``optimizer=``.
DEFAULT_METRICS = tuple(m for m in ALL_METRICS if m not in OPT_IN_METRICS)

# --- run/config columns (frames that combine several runs: studies, the CLI) ----------------------------------
#: The configuration a run belongs to: the same for every seed of it (e.g. "resnet56-bn"); seeds pool by it.
CONFIG = "config"
MODEL = "model"
BN = "bn"
RESIDUAL = "residual"
SHORTCUT = "shortcut"
INIT = "init"
SEED = "seed"
#: Config columns a study adds after :data:`RUN`; each holds one value per run.
CONFIG_COLUMNS = (CONFIG, MODEL, BN, RESIDUAL, SHORTCUT, INIT, SEED)

# --- alerts (gradscope.engine.alerts; scope.alerts(), DIR/alerts.csv) -----------------------------------------
#: The training loss of a recorded step, as ``scope.step(loss=...)`` gives it: one value per step, not a frame row.
LOSS = "loss"
LOSS_SPIKE = "loss_spike"
GRAD_SPIKE = "grad_spike"
UPDATE_BAND = "update_band"
DIVERGENCE = "divergence"
#: Every alert kind (also names that ``gradscope profile --fail-on`` accepts).
ALERT_KINDS = (LOSS_SPIKE, GRAD_SPIKE, UPDATE_BAND, DIVERGENCE)
#: Columns of an alerts table: where (step, block), what (kind, metric), how much (value against threshold), and
#: the other blocks affected at that step (space-separated; empty for the loss).
#: ``origin``: for a divergence, the aten operator and module that made the first NaN/Inf (empty when not traced).
#: ``note``: the diagnosis in words where the numbers tell it (weight decay alone drives an update), else empty.
ALERT_COLUMNS = ("step", "kind", "block", "metric", "value", "threshold", "others", "origin", "note")
