"""Evaluation: multiple-choice accuracy, perplexity, FLOPs."""
