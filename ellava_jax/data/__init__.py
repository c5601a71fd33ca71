"""Data: the synthetic toy VQA task, proxy text, multiple-choice jsonl records."""
