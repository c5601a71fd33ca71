"""The synthetic toy world the shipped toy LLaVA was trained on: scenes, an invented fact base,
questions and splits, the proxy text stream, training, the toy's tokenizer, and `defaults`
(what the toy hands the library: its location, proxy data and test split).

The library's core never imports this package; the command layer (`ellava_jax/app/`) hands its
data in.
"""
