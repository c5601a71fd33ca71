"""Plots and reports of runs (search, evaluation, CPU timing)."""
