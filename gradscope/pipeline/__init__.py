"""The claim check as a library: :func:`profile` runs it, :func:`fail_on` and :func:`outcome` judge its results.

The top layer of the package: it composes the study (measuring), the analysis (verdicts, claims) and the report
writer; ``gradscope.cli`` parses flags into :func:`profile`'s keyword arguments and prints what it returns.
"""
from __future__ import annotations

from gradscope.pipeline.core import profile, rank, with_run_facts
from gradscope.pipeline.options import Options
from gradscope.pipeline.policy import (EXIT_FAIL_ON, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED,
                                       EXIT_USAGE, FAIL_ON, Outcome, fail_on, outcome)

__all__ = ["EXIT_FAIL_ON", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE",
           "FAIL_ON", "Options", "Outcome", "fail_on", "outcome", "profile", "rank", "with_run_facts"]
