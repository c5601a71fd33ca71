"""Questions of the toy task and its splits: multiple-choice records drawn from scenes and facts.

Categories (and what they need):
    colour, shape, count, spatial, presence   the image only
    knowledge                                  the image and a remembered fact (a kind's name or
                                               property, taught only through the text stream)
    context                                    the image and a text `context` (who owns what)
    recall                                     a remembered fact, no image (ScienceQA's NO column)

Each image question function returns (question, choices, answer, context, focus, refs) or None
when the scene cannot support it; focus is the grid cells whose objects the answer depends on,
when the question's own words pick them out (None when no object is named, as for an absent
kind, or when the object is found only through the context), kept on the record for training
only.

Each question offers every answer of its form, in a fixed order (2 for yes/no, 4 for shapes and
positions, 5 for colours, counts and fact values), and one correct index. Everything is
deterministic in (TASK_SEED, split, index). Scenes reach a split only through their content
bucket (`scenes.split_of`), so train, validation, test and proxy never share an image.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

from ellava_jax.data.records import Record, save_image, write_records
from ellava_jax.toy import facts, scenes
from ellava_jax.toy.scenes import COLOURS, POSITIONS, SHAPES, Obj, Scene

TASK_SEED = 5  # the toy task's version; a change makes a new task
SPLIT_CODES = {"train": 1, "validation": 2, "test": 3, "proxy": 4}
SPLIT_SIZES = {"validation": 500, "test": 1200}

CATEGORY_WEIGHTS: dict[str, float] = {
    "colour": 0.10,
    "shape": 0.10,
    "count": 0.10,
    "spatial": 0.12,
    "presence": 0.08,
    "knowledge": 0.25,
    "context": 0.10,
    "recall": 0.15,
}
SUBJECTS = {"knowledge": "knowledge", "recall": "knowledge", "context": "reading"}
NUMBERS = ("zero", "one", "two", "three", "four")
PEOPLE = ("Ann", "Bob", "Cara", "Dev", "Eli", "Fay")
KINDS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

RELATION_QUESTIONS = {
    "home": "Where does {r} live?",
    "food": "What does {r} eat?",
    "sound": "What sound does {r} make?",
    "group": "What kind of creature is {r}?",
}


def _choices(answer: str, space) -> tuple[list[str], int]:
    """All options of the question's answer space, in their fixed order, and the answer's index.

    Fixed option lists make each letter mean one answer per question form, as a classifier's
    label does: a model of the toy's size learns that in minutes, where finding the matching
    option among shuffled ones (an induction circuit) did not form in 1,000 steps.
    """
    space = list(space)
    return space, space.index(answer)


def _yes_no(truth: bool) -> tuple[list[str], int]:
    return _choices("yes" if truth else "no", ("yes", "no"))


def _refs(scene: Scene, o: Obj, avoid: str = "") -> list[str]:
    """Referring expressions that pick out o uniquely, not mentioning `avoid` (colour/shape)."""
    out = [f"the object in the {o.position}"]
    if avoid != "colour" and sum(x.colour == o.colour for x in scene.objects) == 1:
        out.append(f"the {o.colour} object")
    if avoid != "shape" and sum(x.shape == o.shape for x in scene.objects) == 1:
        out.append(f"the {o.shape}")
    if not avoid:
        out.append(f"the {o.kind}")
    return out


@cache
def answer_space() -> tuple[str, ...]:
    """Every answer any toy question can have (each option list's words, once): the classes of
    the answer readout that training may teach (`train.TrainConfig.readout_weight`)."""
    spaces = (COLOURS, SHAPES, POSITIONS, NUMBERS, ("yes", "no"))
    spaces += tuple(facts.RELATIONS.values())
    return tuple(dict.fromkeys(w for space in spaces for w in space))


def answer_class(rec: Record) -> int:
    """Index of rec's answer in `answer_space()`, -1 when it is not a toy answer."""
    space = answer_space()
    answer = rec.choices[rec.answer]
    return space.index(answer) if answer in space else -1


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


FOCUS_HEADS = 2  # decoder heads a record's focus teaches (`Record.focus`)
WHOLE_IMAGE = (0, 1, 2, 3)


def _focus(cells):
    """Per focus head, the cells it should read: every question reads one set of cells (an
    object's or the whole image), the same for both heads."""
    return (tuple(cells),) * FOCUS_HEADS


def _ref(phrase: str | None) -> tuple[str, ...] | None:
    """Per focus head, the words of the question that name what it reads ("top left", "red
    square"): a referring phrase less "the", "object" and "in"; None when nothing is named."""
    if not phrase:
        return None
    return (" ".join(w for w in phrase.split() if w not in ("the", "object", "in")),) * FOCUS_HEADS


def q_colour(rng, scene):
    o = _pick(rng, scene.objects)
    ref = _pick(rng, _refs(scene, o, "colour"))
    return (
        f"What colour is {ref}?",
        *_choices(o.colour, COLOURS),
        None,
        _focus((o.cell,)),
        _ref(ref),
    )


def q_shape(rng, scene):
    o = _pick(rng, scene.objects)
    ref = _pick(rng, _refs(scene, o, "shape"))
    return f"What shape is {ref}?", *_choices(o.shape, SHAPES), None, _focus((o.cell,)), _ref(ref)


def q_count(rng, scene):
    form = int(rng.integers(3))
    if form == 0:
        q, hits, ref = "How many objects are there?", scene.objects, None
    elif form == 1:
        ref = c = _pick(rng, list(COLOURS))
        q, hits = f"How many {c} objects are there?", [o for o in scene.objects if o.colour == c]
    else:
        ref = s = _pick(rng, SHAPES)
        q = f"How many objects are shaped like a {s}?"
        hits = [o for o in scene.objects if o.shape == s]
    # a count is read off the whole image: uniform attention averages its tokens, and the
    # share of them that are (say) red is the number of red objects over four
    return q, *_choices(NUMBERS[len(hits)], NUMBERS), None, _focus(WHOLE_IMAGE), _ref(ref)


def q_spatial(rng, scene):
    """Where one object is.

    Not asked, measured on full training runs: questions on a pair of objects. "Is A left of
    B?" (yes/no) stayed at chance (52%) even with spatial questions alone; "Where is A
    compared to B?" (left of, right of, above, below) reached 70% alone but stayed at chance
    in the full mixture (18%, not even the axis right), with the answer readout that took
    "Where is the X?" from 55% to 100%.
    """
    o = _pick(rng, scene.objects)
    q = f"Where is the {o.kind}?"
    return q, *_choices(o.position, POSITIONS), None, _focus((o.cell,)), _ref(o.kind)


def q_presence(rng, scene):
    if rng.integers(2) == 0:
        kind = _pick(rng, scene.objects).kind
    else:
        absent = [k for k in KINDS if k not in {o.kind for o in scene.objects}]
        kind = _pick(rng, absent)
    cells = tuple(o.cell for o in scene.objects if o.kind == kind)
    focus = _focus(cells) if cells else None
    q = f"Is there a {kind} in the picture?"
    return q, *_yes_no(bool(cells)), None, focus, _ref(kind)


def q_knowledge(rng, scene):
    """Image + remembered fact: a property of a seen object.

    Not asked: "Where is the object that lives in the marsh?" (from a fact to a kind to its
    place in the image): the toy answered it at 34% (chance 25%) after the full training run,
    and it shares its words and options with "Where is the <kind>?", which it held down.
    """
    kinds = facts.creature_of_kind()
    form = int(rng.integers(4))
    o = _pick(rng, scene.objects)
    # the kind itself is never named here: that would make it a text-only question
    ref = _pick(rng, _refs(scene, o, "kind"))
    rel = list(RELATION_QUESTIONS)[form]
    q = RELATION_QUESTIONS[rel].format(r=ref)
    value = kinds[o.kind].value(rel)
    return q, *_choices(value, facts.RELATIONS[rel]), None, _focus((o.cell,)), _ref(ref)


def q_context(rng, scene):
    """Image + text context: who owns which object (by position), then a question on it."""
    objs = list(scene.objects)
    people = [PEOPLE[i] for i in rng.choice(len(PEOPLE), size=len(objs), replace=False)]
    owned = list(zip(people, objs))
    order = rng.permutation(len(owned))
    context = " ".join(
        f"{owned[i][0]} owns the object in the {owned[i][1].position}." for i in order
    )
    p, o = owned[int(rng.integers(len(owned)))]
    # Not asked: "Where does the object Ann owns live?" (context, then image, then a fact):
    # 44% after the full training run.
    if rng.integers(2) == 0:
        q = f"What colour is the object {p} owns?"
        return q, *_choices(o.colour, COLOURS), context, None, _ref(p)
    q = f"What shape is the object {p} owns?"
    return q, *_choices(o.shape, SHAPES), context, None, _ref(p)


def q_recall(rng):
    """Text-only knowledge question (no image, no context)."""
    base = facts.fact_base()
    c = base[int(rng.integers(len(base)))]
    form = int(rng.integers(6 if c.kind is not None else 4))
    if form >= 4:  # what a named creature looks like (visible kinds only)
        colour, shape = c.kind.split()
        if form == 4:
            return f"What colour is the {c.name}?", *_choices(colour, COLOURS), _ref(c.name)
        return f"What shape is the {c.name}?", *_choices(shape, SHAPES), _ref(c.name)
    rel = list(RELATION_QUESTIONS)[form]
    q = RELATION_QUESTIONS[rel].format(r=f"the {c.name}")
    return q, *_choices(c.value(rel), facts.RELATIONS[rel]), _ref(c.name)


_IMAGE_QUESTIONS = {
    "colour": q_colour,
    "shape": q_shape,
    "count": q_count,
    "spatial": q_spatial,
    "presence": q_presence,
    "knowledge": q_knowledge,
    "context": q_context,
}


def make_record(rng: np.random.Generator, scene: Scene | None, category: str) -> Record | None:
    """One question of a category about a scene (None when the scene cannot support it)."""
    subject = SUBJECTS.get(category, "perception")
    if category == "recall":
        q, choices, answer, refs = q_recall(rng)
        return Record(q, choices, answer, category, subject=subject, refs=refs)
    out = _IMAGE_QUESTIONS[category](rng, scene)
    if out is None:
        return None
    q, choices, answer, context, focus, refs = out
    pixels = scenes.render(scene)
    return Record(
        q,
        choices,
        answer,
        category,
        context=context,
        subject=subject,
        pixels=pixels,
        focus=focus,
        refs=refs,
    )


def image_weights() -> dict[str, float]:
    """CATEGORY_WEIGHTS of the categories that ask about an image (all but recall)."""
    return {c: w for c, w in CATEGORY_WEIGHTS.items() if c != "recall"}


def more_records(
    rng: np.random.Generator, scene: Scene, n: int, weights: dict[str, float] | None = None
) -> list[Record]:
    """Up to n further image questions about one scene, categories drawn as weights
    (`image_weights()` by default)."""
    cats, p = _mixture(image_weights() if weights is None else weights)
    out = []
    for _ in range(n):
        rec = make_record(rng, scene, cats[int(rng.choice(len(cats), p=p))])
        if rec is not None:
            out.append(rec)
    return out


def _mixture(weights: dict[str, float]) -> tuple[list[str], np.ndarray]:
    """Categories and their normalised probabilities."""
    cats = list(weights)
    p = np.asarray([weights[c] for c in cats], np.float64)
    return cats, p / p.sum()


def iter_records(
    split: str,
    seed: int | None = None,
    weights: dict[str, float] | None = None,
    min_objects: int = 1,
) -> Iterator[tuple[Record, Scene | None]]:
    """Endless deterministic stream of (record with pixels, its scene) of one split.

    Args:
        split: train, validation, test or proxy (scenes come only from that split's buckets).
        seed: extra seed (e.g. a training epoch); None is the split's canonical stream.
        weights: category mixture; CATEGORY_WEIGHTS by default.
        min_objects: fewest objects a scene holds (training curricula; splits use 1).
    """
    cats, p = _mixture(CATEGORY_WEIGHTS if weights is None else weights)
    extra = [] if seed is None else [seed]
    scene_stream = scenes.iter_split_scenes(
        split, [TASK_SEED, SPLIT_CODES[split], *extra], min_objects
    )
    rng = np.random.default_rng([TASK_SEED, SPLIT_CODES[split], 1000, *extra])
    scene = next(scene_stream)
    while True:
        cat = cats[int(rng.choice(len(cats), p=p))]
        rec = make_record(rng, scene, cat)
        if rec is None:  # scene cannot support this category: draw another category
            continue
        yield rec, (scene if rec.has_image else None)
        if rec.has_image:
            scene = next(scene_stream)


def generate_split(split: str, n: int | None = None) -> list[tuple[Record, Scene | None]]:
    """The first n records of a split's canonical stream (n: SPLIT_SIZES by default)."""
    n = SPLIT_SIZES[split] if n is None else n
    out = []
    for rec, scene in iter_records(split):
        out.append((rec, scene))
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


def write_split(out_dir: str | Path, split: str, n: int | None = None) -> Path:
    """Writes a split as `<out_dir>/<split>.jsonl` plus PNG images under `<out_dir>/images/`.

    Returns:
        The jsonl path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (rec, _) in enumerate(generate_split(split, n)):
        if rec.pixels is not None:
            rel = f"images/{split}_{i:05d}.png"
            save_image(out_dir / rel, rec.pixels)
            rec.image = rel
        records.append(rec)
    path = out_dir / f"{split}.jsonl"
    write_records(path, records)
    return path
