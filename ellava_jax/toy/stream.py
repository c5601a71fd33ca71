"""Text about scenes and the fact base: the training text stream and the proxy data.

Proxy data plays the role PTB plays in the paper: generic text the pruning search scores a
candidate on, plus image + description pairs for calibration and the projector evolution. It is
built from scene descriptions and stated facts, never from the question templates, and its
scenes come from the `proxy` content buckets, which no evaluation split draws from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ellava_jax.toy import facts, scenes
from ellava_jax.toy.questions import NUMBERS, PEOPLE, SPLIT_CODES, TASK_SEED
from ellava_jax.toy.scenes import Scene

PROXY_CODE = 7  # seed stream of proxy text, apart from every split's question stream


def describe(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Plain description of a scene: object count, then each object's cell, size and kind.

    The cell comes first ("In the top left is a large red square."), so that a caption teaches
    the decoder what questions ask of it: to find the object a place names and read it.
    """
    objs = list(scene.objects)
    if rng is not None:
        objs = [objs[i] for i in rng.permutation(len(objs))]
    n = len(objs)
    head = "There is one object." if n == 1 else f"There are {NUMBERS[n]} objects."
    parts = [head]
    for o in objs:
        parts.append(f"In the {o.position} is a {o.size} {o.kind}.")
    return " ".join(parts)


def describe_with_facts(scene: Scene, rng: np.random.Generator) -> str:
    """A description followed by one fact about each object's creature (image-grounded facts)."""
    text = describe(scene, rng)
    kinds = facts.creature_of_kind()
    extra = []
    for o in scene.objects:
        c = kinds[o.kind]
        rel = list(facts.RELATIONS)[int(rng.integers(len(facts.RELATIONS)))]
        extra.append(f"The {o.kind} is a {c.name}.")
        extra.append(facts.STATEMENTS[rel][0].format(n=c.name, v=c.value(rel)))
    return " ".join([text, *extra])


def text_stream(split: str, seed: int | None = None, p_fact: float = 0.8) -> Iterator[str]:
    """Endless stream of sentences: stated facts (p_fact) and descriptions of split scenes.

    Args:
        split: whose scenes are described (train for training, proxy for proxy data).
        seed: extra seed; None is the canonical stream.
        p_fact: share of fact statements; the rest are scene descriptions.
    """
    extra = [] if seed is None else [seed]
    rng = np.random.default_rng([TASK_SEED, PROXY_CODE, SPLIT_CODES[split], *extra])
    stream = scenes.iter_split_scenes(split, [TASK_SEED, PROXY_CODE, SPLIT_CODES[split], *extra])
    while True:
        if rng.random() < p_fact:
            yield facts.random_statement(rng)
        else:
            yield describe(next(stream), rng)


def proxy_text_segments(n: int, n_sentences: int = 8, seed: int | None = None) -> list[str]:
    """n proxy text segments, each n_sentences sentences joined by spaces (proxy scenes only)."""
    stream = text_stream("proxy", seed)
    return [" ".join(next(stream) for _ in range(n_sentences)) for _ in range(n)]


@dataclass
class ProxySample:
    """An image + description pair (the multimodal proxy / calibration sample)."""

    text: str
    pixels: np.ndarray = field(repr=False)  # uint8 [S, S, 3]
    scene: Scene = field(repr=False)


def caption_stream(
    split: str = "proxy", seed: int | None = None, with_facts: bool = True
) -> Iterator[ProxySample]:
    """Endless image + description pairs from a split's scenes (never an evaluation split)."""
    if split in ("test", "validation"):
        raise ValueError("proxy samples never come from an evaluation split")
    extra = [] if seed is None else [seed]
    rng = np.random.default_rng([TASK_SEED, PROXY_CODE, 99, SPLIT_CODES[split], *extra])
    stream = scenes.iter_split_scenes(
        split, [TASK_SEED, PROXY_CODE, 98, SPLIT_CODES[split], *extra]
    )
    for s in stream:
        text = describe_with_facts(s, rng) if with_facts else describe(s, rng)
        yield ProxySample(text, scenes.render(s), s)


def multimodal_samples(
    n: int, split: str = "proxy", seed: int | None = None, with_facts: bool = True
) -> list[ProxySample]:
    """The first n pairs of `caption_stream` ('proxy' scenes by default; never test)."""
    stream = caption_stream(split, seed, with_facts)
    return [next(stream) for _ in range(n)]


def corpus_for_vocabulary() -> list[str]:
    """Facts and descriptions covering every word they can produce (for the tokenizer)."""

    out = list(facts.all_statements())
    rng = np.random.default_rng(0)
    for s in _all_scene_shapes():
        out += [describe(s), describe_with_facts(s, rng)]
    return out + [" ".join(PEOPLE)]


def _all_scene_shapes() -> list[Scene]:
    """One scene per (kind, size, cell) and per object count: every description word."""
    out = []
    kinds = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]
    for i, (c, s) in enumerate(kinds):
        for size in scenes.SIZES:
            for cell in range(4):
                objs = [scenes.Obj(c, s, size, cell, 0, 0)]
                n_extra = i % 4
                for j in range(n_extra):
                    c2, s2 = kinds[(i + j + 1) % len(kinds)]
                    objs.append(scenes.Obj(c2, s2, "small", (cell + j + 1) % 4, 0, 0))
                out.append(Scene(tuple(sorted(objs, key=lambda o: o.cell)), 0))
    return out
