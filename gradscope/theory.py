"""Signal-propagation theory beside measurement (placeholder until issue 9 lands)."""
from __future__ import annotations

from typing import Any, Mapping, Optional


def annotate(verdicts: Any, frame: Any, *, configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
             agree_tol: Optional[float] = None) -> Any:
    """Fill the theory columns of a verdicts frame (no predictions yet)."""
    return verdicts


def predicted_profiles(frame: Any, metric: str, *, configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Any:
    """Predicted relative profiles per run (none yet)."""
    return None
