"""Training of the toy LLaVA on the synthetic task, with the project's Flax model and optax.

Three stages, deterministic in the seed: (1) `pretrain_vision`: the vision tower and projector
alone learn to name, on every visual token, what its grid cell holds (an auxiliary linear head,
dropped afterwards); (2) a text-only phase (facts and text questions, short rows); (3) the mixed
phase: image questions (optionally several turns a row), image captions, text-only questions
and the text stream that states the fact base (see `batches.TrainStream`), every parameter
trained with AdamW and a warmup-cosine schedule, the auxiliary vision loss kept on, a focus
loss that teaches two decoder heads where each image question's answer is (`_focus_loss`),
a reference loss that teaches two heads of the layer below to read the words that say
what to look for (`_ref_loss`), and an answer readout loss that asks the decoder's lower
layers to have fetched the answer itself (`_readout_loss`).
`scripts/train_toy.py` is the launcher; `score` and `magnitude_prune` are the quick checks it
reports (the harness of record is `ellava eval`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ellava_jax.config import LlavaConfig, TextConfig, VisionConfig
from ellava_jax.data import prompt as T
from ellava_jax.data.images import pixel_values
from ellava_jax.data.records import Record
from ellava_jax.model import forward, init_params
from ellava_jax.model.llama import LlamaModel, attention_mask_4d, positions_from_mask
from ellava_jax.model.llava import embed_image, embed_text, lm_head, merge_image_features
from ellava_jax.prune import baselines
from ellava_jax.toy import batches, questions, scenes


@dataclass(frozen=True)
class TrainConfig:
    # Defaults: the best measured full run (docs/architecture.md, "Training the toy").
    steps: int = 2000  # mixed-phase steps (every text_every-th a text batch)
    n_image_rows: int = 16
    n_text_rows: int = 0
    length: int = 224  # tokens per row: 4 turns about one image fit
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    p_caption: float = 0.0
    p_stream: float = 0.5
    log_every: int = 50
    # a first, text-only phase (short rows, no vision, cheap): facts and text questions
    text_steps: int = 0
    text_length: int = 72
    text_rows: int = 32
    text_p_stream: float = 0.3
    # Kernels of the vision tower and the decoder start at std 0.02 * init_scale. At HF's 0.02
    # the toy's attention stays near uniform for ~700 steps before it learns to route a question
    # to the image region it names; at 4x that happens in about half the steps.
    init_scale: float = 4.0
    # The CLIP position embeddings start at this std (HF: 0.02). Questions name places ("the
    # object in the top left") and vary in length, so the decoder cannot find a place by its
    # rotary distance; it needs the place in the visual tokens' content, and at 0.02 that
    # signal is drowned by the patch content (2-object probe: 71% -> 87% at 800 steps).
    pos_init_std: float = 1.0
    # Weight of the auxiliary vision loss: a linear head on the projected visual tokens names
    # the colour, shape and size of the object in each token's grid cell. It gives the tower a
    # dense signal from the first step (the answer letter is one token a row); the head is
    # dropped after training and is not part of the shipped model.
    aux_weight: float = 1.0
    # stage 1 (`pretrain_vision`): the tower and projector alone on the aux loss
    vision_steps: int = 800
    vision_batch: int = 64
    vision_lr: float = 3e-3
    turns: int = 4  # question turns per image-question row (batches.TrainStream)
    # Curriculum: the mixed phase's first curriculum_steps draw image questions only of the
    # curriculum_categories (comma-separated; "" = all) on scenes with at least
    # curriculum_min_objects objects. All seven image categories from the start keep the answer
    # at each question form's prior for hundreds of steps (5 categories, 600 steps: 31%);
    # colour and shape alone first escape it within 150 steps and the rest then learn
    # (150 colour + shape steps, then the 5: 58% at step 600). Crowded scenes (4 objects) take
    # away the read-any-object shortcut (colour-only, no focus loss: 58% -> 72%).
    curriculum_steps: int = 0
    curriculum_categories: str = "colour,shape"
    curriculum_min_objects: int = 1
    # Weight of the focus loss: at the position that predicts an image question's answer,
    # head f < questions.FOCUS_HEADS of decoder layer focus_layer is taught to spread its
    # attention evenly over the visual tokens of the cells `Record.focus[f]` names: one
    # object's, or the whole image for a count (the share of red tokens is the number of red
    # objects over four). KL from that uniform target. Without it the decoder reads any object
    # rather than the one a question names. (Heads are separate so that a question on a pair
    # could give each its own object; the task has none, measured: `questions.q_spatial`.)
    focus_weight: float = 1.0
    focus_layer: int = 1
    # Weight of the reference loss: at the same positions, head f of decoder layer ref_layer
    # is taught to read the question's words that name what focus head f looks for
    # (`Record.refs`: "red square", "top left"). The prompt puts the options and the
    # instruction (~20-40 tokens) between those words and the answer; without this, layer 0
    # reads the instruction and the focus heads' queries do not know what to look for
    # (5 image categories, 400 steps: 42% without, 84% with).
    ref_weight: float = 1.0
    ref_layer: int = 0
    # The tower and projector learn at tower_lr_scale x lr after stage 1 (0: frozen; the
    # decoder's losses pulled the aux loss from 0.02 to 0.1-0.2 even at 0.1).
    tower_lr_scale: float = 0.0
    # Every text_every-th step of the mixed phase is a text-phase batch (short rows, cheap):
    # facts are learned alongside the image questions rather than before them. A text phase
    # first taught "What colour is the <name>?" as recall, and the image questions that share
    # the template then read the word, not the image (colour 7% after 250 mixed steps where
    # image questions alone reach 70%).
    text_every: int = 2
    # Training-mixture factors on CATEGORY_WEIGHTS ("spatial=2,context=2"); the splits keep
    # CATEGORY_WEIGHTS. More practice where the toy is weakest.
    category_boost: str = ""
    # Weight of the answer readout loss: a linear head (dropped after training, as the vision
    # aux head is) reads the answer itself (`questions.answer_space`: a colour, a place, a
    # number, a fact's value) off the normed input of decoder layer readout_layer at every
    # answer position. It asks the layers below to have fetched the answer by then, so that
    # the layers above only turn it into the option letter. 0: off.
    readout_weight: float = 1.0
    readout_layer: int = 2


def toy_config(
    vocab_size: int,
    hidden: int = 128,
    layers: int = 4,
    mlp: int = 344,
    heads: int = 4,
    kv_heads: int = 2,
) -> LlavaConfig:
    """The toy LLaVA: 32x32 images, patch 4 (64 visual tokens), a small CLIP and LLaMA."""
    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=scenes.IMAGE_SIZE,
            patch_size=scenes.PATCH_SIZE,
            projection_dim=64,
        ),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden // heads,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_index=4,
        image_seq_length=scenes.num_visual_tokens(),
    )


def init_toy_params(config: LlavaConfig, tc: TrainConfig) -> dict:
    """The seeded starting point: HF's init, kernels and CLIP positions rescaled (TrainConfig)."""
    params = _scale_kernels(init_params(config, jax.random.key(tc.seed)), tc.init_scale)
    emb = params["vision_tower"]["vision_model"]["embeddings"]["position_embedding"]
    emb["embedding"] = emb["embedding"] * (tc.pos_init_std / 0.02)
    return params


def _scale_kernels(params: dict, factor: float) -> dict:
    """Multiplies the linear kernels of the vision tower and the decoder by factor."""

    def scale(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        inside = names[0] == "vision_tower" or names[0] == "language_model"
        return x * factor if inside and names[-1] == "kernel" else x

    return jax.tree_util.tree_map_with_path(scale, params)


# per visual token: the colour, shape and size of the object in its grid cell (0 = none),
# the cell itself, and the object's kind (colour x shape, 0 = none). The kind as a feature of
# its own gives the decoder one direction per kind to key remembered facts on ("what does the
# object in the top left eat"), as a token embedding keys a name's facts.
_N_KINDS = len(scenes.COLOURS) * len(scenes.SHAPES)
_AUX_CLASSES = (
    len(scenes.COLOURS) + 1,
    len(scenes.SHAPES) + 1,
    len(scenes.SIZES) + 1,
    4,
    _N_KINDS + 1,
)


def _linear_head(config: LlavaConfig, n_classes: int, key) -> dict:
    """A linear classifier on the decoder's width (the training-only heads: aux, readout)."""
    k = jax.random.normal(key, (config.text.hidden_size, n_classes), jnp.float32) * 0.02
    return {"kernel": k, "bias": jnp.zeros((n_classes,), jnp.float32)}


def _aux_init(config: LlavaConfig, key) -> dict:
    return _linear_head(config, sum(_AUX_CLASSES), key)


def _aux_loss(aux: dict, image_features, cell_targets) -> jax.Array:
    """Sum over the five attributes of the mean cross-entropy of reading them off each token.

    image_features [B_img, N, H] (projected); cell_targets [B_img, 4, 3] (`scenes.cell_targets`).
    """
    cells = jnp.asarray(scenes.patch_cells())  # [N]
    target = cell_targets[:, cells]  # [B_img, N, 3]
    where = jnp.broadcast_to(cells[None, :, None], target[..., :1].shape)
    colour, shape = target[..., :1], target[..., 1:2]
    kind = jnp.where(colour > 0, (colour - 1) * len(scenes.SHAPES) + shape, 0)
    target = jnp.concatenate([target, where, kind], axis=-1)  # [B_img, N, 5]
    logits = image_features @ aux["kernel"] + aux["bias"]  # [B_img, N, sum(_AUX_CLASSES)]
    total, start = 0.0, 0
    for j, n in enumerate(_AUX_CLASSES):
        logp = jax.nn.log_softmax(logits[..., start : start + n], axis=-1)
        total = total - jnp.mean(jnp.take_along_axis(logp, target[..., j, None], axis=-1))
        start += n
    return total


def _readout_init(config: LlavaConfig, key) -> dict:
    return _linear_head(config, len(questions.answer_space()), key)


def _readout_loss(head: dict, x, answer_class) -> jax.Array:
    """Mean cross-entropy of reading each answer position's answer class off x [B, T, H]
    (answer_class [B, T], -1: not an answer position)."""
    logp = jax.nn.log_softmax(x.astype(jnp.float32) @ head["kernel"] + head["bias"], axis=-1)
    where = answer_class >= 0
    nll = -jnp.take_along_axis(logp, jnp.maximum(answer_class, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * where) / jnp.maximum(1.0, jnp.sum(where))


def pretrain_vision(config: LlavaConfig, params: dict, aux: dict, tc: TrainConfig, log=print):
    """Stage 1: the vision tower and projector alone learn to read each cell (the aux loss).

    Cheap (no decoder in the loop): it hands the decoder clean visual tokens from its first step.
    Returns (params, aux) with the tower, projector and head updated.
    """
    stream = scenes.iter_split_scenes("train", [tc.seed, 23])
    names = ("vision_tower", "multi_modal_projector")
    state = {"tower": {k: params[k] for k in names}, "aux": aux}
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.vision_lr, tc.warmup, tc.vision_steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    opt_state = opt.init(state)

    @jax.jit
    def step(state, opt_state, px, cells):
        def loss(s):
            feats = embed_image(config, {**params, **s["tower"]}, px)
            return _aux_loss(s["aux"], feats, cells)

        value, grads = jax.value_and_grad(loss)(state)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value

    t0 = time.time()
    for i in range(tc.vision_steps):
        batch = [next(stream) for _ in range(tc.vision_batch)]
        px = pixel_values(np.stack([scenes.render(sc) for sc in batch]))
        cells = np.stack([scenes.cell_targets(sc) for sc in batch])
        state, opt_state, value = step(state, opt_state, px, cells)
        if i % tc.log_every == 0 or i == tc.vision_steps - 1:
            log(f"vision step {i:5d}  loss {float(value):.3f}  {time.time() - t0:6.0f}s")
    return {**params, **state["tower"]}, state["aux"]


def _kl_from_uniform(probs, mask) -> jax.Array:
    """Mean over supervised (position, head) pairs of KL(uniform on the keys mask marks || the
    head's attention).

    probs [B, n_kv, group, T, S] (one layer's `attn_probs`); mask [B, T, F, S]: 1 on the keys
    head f < F should spread its attention over at query t; a row of zeros is not supervised.
    """
    b, _, _, t, s = probs.shape
    f = mask.shape[2]
    probs = jnp.moveaxis(probs.reshape(b, -1, t, s)[:, :f], 1, 2).astype(jnp.float32)
    n = jnp.sum(mask, axis=-1)  # [B, T, F]
    target = mask / jnp.maximum(n, 1.0)[..., None]
    kl = jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-30)) - jnp.log(probs + 1e-6)), -1)
    where = n > 0
    return jnp.sum(kl * where) / jnp.maximum(1.0, jnp.sum(where))


def _focus_loss(config: LlavaConfig, probs, input_ids, focus) -> jax.Array:
    """KL from uniform on the focus cells' visual tokens (`_kl_from_uniform`).

    focus [B, T, F, 4] (`TrainStream`): head f < F of the layer is taught to spread its
    attention evenly over the visual tokens of the cells focus[b, t, f] marks.
    """
    b, t, f, _ = focus.shape
    s = input_ids.shape[1]
    img = input_ids == config.image_token_index  # [B, S]
    slot = jnp.clip(jnp.cumsum(img, axis=1) - 1, 0, config.num_image_tokens - 1)
    cell = jnp.asarray(scenes.patch_cells())[slot]  # [B, S]: the grid cell of each key
    mask = jnp.take_along_axis(focus, jnp.broadcast_to(cell[:, None, None, :], (b, t, f, s)), 3)
    return _kl_from_uniform(probs, mask * img[:, None, None, :])


def _ref_loss(probs, refs) -> jax.Array:
    """KL from uniform on the referring words' tokens (`_kl_from_uniform`).

    refs int32 [B, T, F, K] (`TrainStream`): head f < F is taught to read, at the position
    predicting an answer, the tokens refs[b, t, f] (-1: none) of the words that name what its
    focus head reads.
    """
    s = probs.shape[-1]
    mask = jnp.sum(jax.nn.one_hot(refs, s) * (refs >= 0)[..., None], axis=3)  # [B, T, F, S]
    return _kl_from_uniform(probs, mask)


def _loss(config: LlavaConfig, params, aux, batch, tc: TrainConfig, readout=None):
    ids, am = batch["input_ids"], batch["attention_mask"]
    embeds = embed_text(config, params, ids)
    aux_term = focus_term = jnp.float32(0.0)
    if batch["pixel_values"] is not None:
        feats = embed_image(config, params, batch["pixel_values"])
        embeds = merge_image_features(config, ids, embeds, feats)
        aux_term = _aux_loss(aux, feats, batch["cell_targets"])
    mask = attention_mask_4d(am, ids.shape[1])
    (hidden, _), state = LlamaModel(config.text).apply(
        {"params": params["language_model"]},
        embeds,
        positions_from_mask(am),
        mask,
        mutable=["intermediates"],
    )
    sown = state["intermediates"]["layers"]  # every leaf stacked over the layers: [L, ...]
    stacked_probs = sown["self_attn"]["attn_probs"][0]
    if batch["pixel_values"] is not None and tc.focus_weight:
        probs = stacked_probs[tc.focus_layer]
        focus_term = _focus_loss(config, probs, ids, batch["focus"])
    ref_term = jnp.float32(0.0)
    if tc.ref_weight:
        probs = stacked_probs[tc.ref_layer]
        ref_term = _ref_loss(probs, batch["refs"])
    readout_term = jnp.float32(0.0)
    if tc.readout_weight:
        x = sown["attn_in"][0][tc.readout_layer]
        readout_term = _readout_loss(readout, x, batch["answer_class"])
    logits = lm_head(config, params, hidden)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    per_row = jnp.sum(nll * batch["loss_weight"][:, :-1], axis=1)  # [B]
    kinds = jax.nn.one_hot(batch["row_kind"], 3)  # question, caption, stream
    terms = (aux_term, focus_term, ref_term, readout_term)
    parts = jnp.concatenate([per_row @ kinds, jnp.stack(terms)])
    total = jnp.sum(per_row) + tc.aux_weight * aux_term + tc.focus_weight * focus_term
    total = total + tc.ref_weight * ref_term + tc.readout_weight * readout_term
    return total, parts


_TOWER = ("vision_tower", "multi_modal_projector")


def parse_boost(text: str) -> dict[str, float]:
    """Parses "spatial=2,context=1.5" into {"spatial": 2.0, "context": 1.5}; a bad item is an
    error that names it."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"category_boost item {item!r} is not name=factor") from None
        if not sep:
            raise ValueError(f"category_boost item {item!r} is not name=factor")
    return out


def _model(state: dict) -> dict:
    """The LLaVA parameter tree of a training state (decoder part and tower part)."""
    return {**state["text"], **state["vision"]["tower"]}


def _update(opt, grads, opt_state, params):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train(config: LlavaConfig, tok, tc: TrainConfig, log=print, probe=None, probe_every=0) -> dict:
    """Trains from a seeded initialisation; returns the parameters (float32).

    probe(step, params), when given, runs every probe_every steps (e.g. a validation score).
    """
    # Over 80 lines on purpose: one training loop with its schedule, logging and checkpoints.

    def mixed_stream(seed: int, min_objects: int = 1, categories=None) -> batches.TrainStream:
        return batches.TrainStream(
            tok,
            config.num_image_tokens,
            tc.n_image_rows,
            tc.n_text_rows,
            tc.length,
            seed=seed,
            p_caption=tc.p_caption,
            p_stream=tc.p_stream,
            turns=tc.turns,
            min_objects=min_objects,
            categories=categories,
            boost=parse_boost(tc.category_boost),
        )

    stream = mixed_stream(tc.seed)
    first = [c for c in tc.curriculum_categories.split(",") if c] or None
    starter = mixed_stream(tc.seed + 2000, tc.curriculum_min_objects, first)
    text_stream = batches.TrainStream(
        tok,
        config.num_image_tokens,
        0,
        tc.text_rows,
        tc.text_length,
        seed=tc.seed + 1000,
        p_stream=tc.text_p_stream,
    )
    total = tc.text_steps + tc.steps
    params = init_toy_params(config, tc)
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, total, tc.lr * 0.05)
    # The tower, projector and aux head have their own optimizer, stepped only by batches
    # with images: AdamW on zero gradients keeps moving them along its stale momentum (and
    # decays them), which undid stage 1 when every other step was a text batch. At
    # tower_lr_scale 0 they are frozen and no gradient is taken for them.
    image_steps = tc.steps - (tc.steps // tc.text_every if tc.text_every else 0)
    vision_lr = tc.lr * tc.tower_lr_scale
    vision_sched = optax.warmup_cosine_decay_schedule(
        0.0, vision_lr, tc.warmup, max(image_steps, tc.warmup + 1), vision_lr * 0.05
    )

    def adamw(schedule):
        return optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=tc.weight_decay)
        )

    # the answer readout head learns with the decoder, in a part of its own (not shipped)
    opts = {"text": adamw(sched), "vision": adamw(vision_sched), "readout": adamw(sched)}
    aux = _aux_init(config, jax.random.key(tc.seed + 1))
    if tc.vision_steps:
        params, aux = pretrain_vision(config, params, aux, tc, log)
    state = {
        "text": {k: v for k, v in params.items() if k not in _TOWER},
        "vision": {"tower": {k: params[k] for k in _TOWER}, "aux": aux},
        "readout": _readout_init(config, jax.random.key(tc.seed + 2)),
    }
    opt_state = {k: opts[k].init(state[k]) for k in opts}

    @jax.jit
    def step(state, opt_state, batch):
        # static: one compilation per batch kind
        with_vision = batch["pixel_values"] is not None and tc.tower_lr_scale > 0
        trained = ("text",) + (("readout",) if tc.readout_weight else ())
        trained += ("vision",) if with_vision else ()

        def loss(part):
            s = {**state, **part}
            return _loss(config, _model(s), s["vision"]["aux"], batch, tc, s["readout"])

        (_, parts), grads = jax.value_and_grad(loss, has_aux=True)({k: state[k] for k in trained})
        state, opt_state = dict(state), dict(opt_state)
        for k in trained:
            state[k], opt_state[k] = _update(opts[k], grads[k], opt_state[k], state[k])
        return state, opt_state, parts

    keys = ("input_ids", "attention_mask", "pixel_values", "loss_weight", "row_kind")
    keys += ("cell_targets", "focus", "refs", "answer_class")
    t0 = time.time()
    for i in range(total):
        j = i - tc.text_steps  # step of the mixed phase
        if j < 0 or (tc.text_every and j % tc.text_every == tc.text_every - 1):
            b = next(text_stream)
        else:
            b = next(starter if i < tc.text_steps + tc.curriculum_steps else stream)
        state, opt_state, loss = step(state, opt_state, {k: b[k] for k in keys})
        if i % tc.log_every == 0 or i == total - 1:
            q, c, s, a, f, r, o = (float(x) for x in loss)
            log(
                f"step {i:5d}  loss question {q:.3f} caption {c:.3f} text {s:.3f} "
                f"vision {a:.3f} focus {f:.3f} refs {r:.3f} readout {o:.3f}"
                f"  {time.time() - t0:6.0f}s"
            )
        if probe is not None and probe_every and i > 0 and i % probe_every == 0:
            probe(i, _model(state))
    return _model(state)


def _last_logits(config: LlavaConfig, params, input_ids, attention_mask, pixel_values):
    return forward(config, params, input_ids, pixel_values, attention_mask)[:, -1]


_last_logits_jit = jax.jit(_last_logits, static_argnums=0)


def score(
    config: LlavaConfig, params, tok, records: list[Record], batch_size: int = 50, length=160
) -> dict:
    """Accuracy of answer letters at the first generated position.

    Returns:
        {"accuracy": greedy (argmax over the vocabulary is the right letter),
         "accuracy_letters": argmax over the record's option letters only,
         "per_category": {category: greedy accuracy}, "n": number of records}
    """
    letters = np.asarray(T.letter_ids(tok))
    pad = T.token_id(tok, T.PAD)
    hits, hits_letters = defaultdict(list), []
    for with_image in (True, False):
        group = [r for r in records if r.has_image == with_image]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch_size - n)  # one shape, one compilation
            rows = batches.record_rows(tok, chunk, config.num_image_tokens, with_answer=False)
            b = batches.pad_left(rows, length, pad)
            px = pixel_values(np.stack([r.pixels for r in chunk])) if with_image else None
            lg = np.asarray(
                _last_logits_jit(config, params, b["input_ids"], b["attention_mask"], px)
            )
            for j, r in enumerate(chunk[:n]):
                hits[r.category].append(int(np.argmax(lg[j])) == letters[r.answer])
                k = len(r.choices)
                hits_letters.append(int(np.argmax(lg[j, letters[:k]])) == r.answer)
    every = [h for hs in hits.values() for h in hs]
    return {
        "accuracy": float(np.mean(every)),
        "accuracy_letters": float(np.mean(hits_letters)),
        "per_category": {c: round(float(np.mean(h)), 4) for c, h in sorted(hits.items())},
        "n": len(every),
    }


def is_decoder_linear(path: tuple[str, ...]) -> bool:
    """language_model/layers/{self_attn,mlp}/<proj>/kernel (stacked over the layers)."""
    return (
        len(path) >= 2
        and path[0] == "language_model"
        and path[1] == "layers"
        and path[-1] == "kernel"
    )


def magnitude_prune(params: dict, sparsity: float) -> dict:
    """Uniform magnitude pruning of every decoder linear (`prune.baselines.magnitude_prune`)."""

    def prune(path, x):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        if not is_decoder_linear(names):
            return x
        return jnp.stack([baselines.magnitude_prune(w, sparsity)[0] for w in x])  # per layer

    return jax.tree_util.tree_map_with_path(prune, params)
