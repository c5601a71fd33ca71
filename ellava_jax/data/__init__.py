"""Data: the synthetic toy VQA task, proxy text, multiple-choice jsonl records, the toy tokenizer.

Modules: scenes (images), facts (the invented fact base), questions (records and splits),
proxy (text stream and proxy data), records (the jsonl format), tokenizer (tokenizer, prompt).
"""

from ellava_jax.data.records import Record, RecordError, load_records, write_records

__all__ = ["Record", "RecordError", "load_records", "write_records"]
