"""Pruning: calibration Hessians, block-wise OBS (SparseGPT), baselines, masks, level database."""
