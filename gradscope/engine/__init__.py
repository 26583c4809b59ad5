"""The hook engine: torch only. Where to hook (sites), what to compute (metrics), the hooks (probes), when and
where to keep it (recorder), the object ``attach()`` returns (scope), and the distributed combine.

Nothing here imports pandas, matplotlib, seaborn, rich or any higher gradscope layer, so a user who only calls
``attach()`` in their own loop loads torch and nothing else.
"""
