"""The words gradscope writes into frames, tables and reports, defined once.

Phases of a study, verdict classes of a signal, answers of a claim and of a theory comparison, the two signals.
Each is a plain string constant (frames, CSV files and JSON hold the string itself) with a tuple of all values,
so code compares against a name, never a literal typed again. Imports nothing, so every layer may use it.
"""
from __future__ import annotations

from typing import Dict, Tuple

# --- phases of a study (the ``phase`` column of a profile's frame, the sub-folders records/<run>/<phase>/) -------
#: Column of a combined frame that says which phase a row was measured in.
PHASE = "phase"
#: Measured at initialisation: forward/backward passes with no parameter update.
INIT = "init"
#: Measured over a short training run.
TRAIN = "train"
#: A claim decided from both phases.
INIT_AND_TRAIN = "init+train"
#: a run's config fact: every planned step ran (a run cut off by Ctrl-C or an error lacks it)
FINISHED = "finished"
PHASES: Tuple[str, ...] = (INIT, TRAIN)
#: How every renderer says a phase in a sentence.
PHASE_WORDS: Dict[str, str] = {INIT: "at initialisation", TRAIN: "over training",
                               INIT_AND_TRAIN: "at initialisation and over training"}

# --- signals ---------------------------------------------------------------------------------------------------
FORWARD = "forward"
BACKWARD = "backward"
SIGNALS: Tuple[str, ...] = (FORWARD, BACKWARD)

# --- verdict classes of a signal (the ``verdict`` column) ----------------------------------------------------
VANISHING = "vanishing"
HEALTHY = "healthy"
EXPLODING = "exploding"
UNKNOWN = "unknown"
DIVERGED = "diverged"
#: Every verdict class, in the order tables list them.
CLASSES: Tuple[str, ...] = (HEALTHY, VANISHING, EXPLODING, DIVERGED, UNKNOWN)

# --- answers of a claim ----------------------------------------------------------------------------------------
YES = "yes"
NO = "no"
UNCLEAR = "unclear"
ANSWERS: Tuple[str, ...] = (YES, NO, UNCLEAR)

# --- theory against measurement (the ``agreement`` column) ---------------------------------------------------
AGREES = "agrees"
DISAGREES = "disagrees"
INCONCLUSIVE = "inconclusive"
AGREEMENTS: Tuple[str, ...] = (AGREES, DISAGREES, INCONCLUSIVE)
