"""Rendering: the only layer that imports matplotlib, seaborn, rich or writes HTML. Text formatting, plots, the
terminal tables and the report folder writer."""
