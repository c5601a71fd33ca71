"""Whole runs: what the commands call, and the one place that uses both the library and the
bridges in `convert/` (model resolution, the search and demo pipelines, default data sources).
"""
