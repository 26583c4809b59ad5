"""The hook engine: torch only. Where to hook (sites), what to compute (metrics) and how each metric is laid out,
finished and combined across ranks (spec), the per-step hook state (state), the hooks (probes, and hookargs for the
tensors they pick; traced under torch.compile), when and where to keep it (recorder), parameter norms and the update
ratio (params), the GradScaler adapter (amp), the non-finite policy (nonfinite), alert rules (alerts) and a scope's
alerts (alertlog), ``attach()`` itself (attach) and the object it returns (scope: lifecycle and step closing), and
the distributed combine.

Nothing here imports pandas, matplotlib, seaborn, rich or any higher gradscope layer, so a user who only calls
``attach()`` in their own loop loads torch and nothing else.
"""
