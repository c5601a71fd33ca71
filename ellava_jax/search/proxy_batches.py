"""The proxy samples as the fitness and the projector training read them: length groups,
embedded once, with the dense model's targets where the loss is KL."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ellava_jax.model.llava import embed_text, vision_features
from ellava_jax.model.losses import next_token_targets
from ellava_jax.search.fitness import ProxyBatch, dense_log_probs, row_chunks, row_index
from ellava_jax.search.projector import MultimodalProxy
from ellava_jax.search.proxy_sources import ProxyData, length_buckets


def host_log_probs(config, params, batch: ProxyBatch, row_chunk: int | None) -> np.ndarray:
    """The dense model's log-probs on `batch` (the KL target), computed `row_chunk` rows at a
    time and kept in host memory (float32): each pass copies only its chunk's rows to the
    device, so a search never holds the whole target there."""
    n = batch.inputs_embeds.shape[0]
    out = np.zeros((n, batch.inputs_embeds.shape[1], config.text.vocab_size), np.float32)
    for _, own, part in row_chunks(batch, row_chunk):
        out[own] = np.asarray(dense_log_probs(config, params, part))[: len(own)]
    return out


def _vision_features(config, params, pixels: np.ndarray, chunk: int | None) -> jax.Array:
    """The frozen tower's features of every proxy image, `chunk` images per pass (the last
    pass padded by repeating its first image): the tower's activations exist for one chunk."""
    fn = jax.jit(vision_features, static_argnums=0)
    n = len(pixels)
    if chunk is None or chunk >= n:
        return fn(config, params, jnp.asarray(pixels))
    out = []
    for start in range(0, n, chunk):
        rows = row_index(n, start, chunk)
        out.append(fn(config, params, jnp.asarray(pixels[rows]))[: min(chunk, n - start)])
    return jnp.concatenate(out)


class FitnessBatches:
    """The proxy samples as the fitness and the projector training read them.

    Text segments and multimodal samples are grouped by length (`length_buckets`), each group
    padded only to its own longest row. The text groups are `fixed` parts: no image tokens, so
    their loss depends on the policy alone, and `cache` keeps it per policy for the whole search.
    KL targets live in host memory (`host_log_probs`).
    """

    def __init__(
        self, config, params, proxy: ProxyData, settings, max_buckets: int = 4, min_rows: int = 8
    ):
        self.config = config
        self.fitness_kl = settings.fitness_loss == "kl"
        self.projector_kl = settings.projector_loss == "kl"
        chunk = settings.row_chunk
        self.cache: dict = {}
        emb = jax.jit(embed_text, static_argnums=0)

        def rows_of(ids, mask, rows):
            """The rows, trimmed to their longest: the proxy is left-padded."""
            m = np.asarray(mask)[rows]
            lens, t = m.sum(1), m.shape[1]
            if ((m > 0) != (np.arange(t)[None] >= t - lens[:, None])).any():
                raise ValueError("proxy samples must be left-padded (real tokens last)")
            n = int(lens.max())
            return np.asarray(ids)[rows][:, -n:], m[:, -n:]

        self.text: list[ProxyBatch] = []
        self._text_rows: list[np.ndarray] = []  # each text group's proxy rows
        self._mm_rows: list[np.ndarray] = []  # each multimodal group's proxy samples
        self._mm_images: list[list[np.ndarray]] = []  # per group, each row's images in it
        self.n_text, self.n_mm = len(proxy.text_ids), len(proxy.mm_ids)
        minibatches = self.n_mm > 0 and settings.projector_samples is not None
        for rows in length_buckets(np.asarray(proxy.text_mask).sum(1), max_buckets, min_rows):
            self._text_rows.append(np.asarray(rows))
            ids, mask = rows_of(proxy.text_ids, proxy.text_mask, rows)
            labels, lmask = next_token_targets(config, ids, mask)
            part = ProxyBatch(
                emb(config, params, jnp.asarray(ids)), jnp.asarray(mask), labels, lmask, fixed=True
            )
            if self.fitness_kl:
                part = part.replace(dense_logp=host_log_probs(config, params, part, chunk))
            self.text.append(part)

        self.mm: list[MultimodalProxy] = []
        if len(proxy.mm_ids):
            vf = _vision_features(config, params, np.asarray(proxy.mm_pixels), chunk)
            per_row = (np.asarray(proxy.mm_ids) == config.image_token_index).sum(1)
            n_img, extra = np.divmod(per_row, config.num_image_tokens)  # images per sample
            if extra.any():
                raise ValueError(
                    f"multimodal proxy sample {int(np.argmax(extra > 0))} holds {per_row[extra > 0][0]}"
                    f" image tokens, not a multiple of {config.num_image_tokens} per image"
                )
            first = np.concatenate([[0], np.cumsum(n_img)[:-1]])
            groups = length_buckets(np.asarray(proxy.mm_mask).sum(1), max_buckets, min_rows)
            if minibatches:  # every sample in one group too, padded to the longest
                groups = [*groups, np.arange(self.n_mm)]
            for rows in groups:
                ids, mask = rows_of(proxy.mm_ids, proxy.mm_mask, rows)
                own = np.cumsum([0, *n_img[rows]])
                self._mm_rows.append(np.asarray(rows))
                self._mm_images.append([np.arange(a, b) for a, b in zip(own[:-1], own[1:])])
                images = np.concatenate([np.arange(first[r], first[r] + n_img[r]) for r in rows])
                labels, lmask = next_token_targets(config, ids, mask)
                self.mm.append(
                    MultimodalProxy(
                        jnp.asarray(ids),
                        jnp.asarray(mask),
                        emb(config, params, jnp.asarray(ids)),
                        vf[jnp.asarray(images, jnp.int32)],
                        labels,
                        lmask,
                        None,
                    )
                )
            if self.fitness_kl or self.projector_kl:  # both compare with the dense projector's
                dense = params["multi_modal_projector"]
                n = len(self.mm) - minibatches  # the all-samples group takes the groups' own
                self.mm[:n] = [
                    m.replace(
                        dense_logp=host_log_probs(config, params, m.batch(config, dense), chunk)
                    )
                    for m in self.mm[:n]
                ]
                if minibatches:
                    self.mm[-1] = self.mm[-1].replace(
                        dense_logp=_gathered(self.mm[:n], self._mm_rows[:n], self.mm[-1])
                    )
        if minibatches:  # every sample as one group: `training_samples`' minibatches
            self._mm_all = self.mm.pop()
            self._mm_all_rows, self._all_images = self._mm_rows.pop(), self._mm_images.pop()
        self.has_mm = bool(self.mm)
        self.stages: list[tuple[list[ProxyBatch], list[MultimodalProxy]]] = []
        self.stage_caches: list[dict] = []
        self.stage_samples: list[tuple[np.ndarray, np.ndarray]] = []

    def parts(self, projector, stage: int | None = None) -> list[ProxyBatch]:
        """The fitness's proxy parts for a given projector: text groups, then multimodal ones;
        with `stage`, that stage's slice of them (`set_stages`)."""
        text, mm = (self.text, self.mm) if stage is None else self.stages[stage]
        mm = [m.batch(self.config, projector) for m in mm]
        if not self.fitness_kl:
            mm = [b.replace(dense_logp=None) for b in mm]
        return text + mm

    def cache_of(self, stage: int | None = None) -> dict:
        """The text parts' scores per policy: the whole proxy's, or one stage slice's."""
        return self.cache if stage is None else self.stage_caches[stage]

    def set_stages(self, shares, seed: int) -> None:
        """Nested slices of the proxy for staged selection: stage s reads the first
        ceil(share_s x n) samples of a permutation drawn once from `seed` (text segments and
        multimodal samples each), so a stage's scores compare across rounds and every later
        stage reads what the earlier ones read and more. A share of 1 is the whole proxy (its
        parts and its cache are the full ones)."""
        rng = np.random.default_rng([seed, 0x57A6ED])
        perm_t, perm_m = rng.permutation(self.n_text), rng.permutation(self.n_mm)
        self.stages, self.stage_caches, self.stage_samples = [], [], []
        for share in shares:
            keep_t = np.sort(perm_t[: math.ceil(share * self.n_text)])
            keep_m = np.sort(perm_m[: math.ceil(share * self.n_mm)])
            self.stage_samples.append((keep_t, keep_m))  # what the stage reads
            if share >= 1.0:
                self.stages.append((self.text, self.mm))
                self.stage_caches.append(self.cache)
                continue
            text = [
                _take_rows(b, np.flatnonzero(np.isin(rows, keep_t)))
                for b, rows in zip(self.text, self._text_rows)
            ]
            mm = [
                _take_samples(m, np.flatnonzero(np.isin(rows, keep_m)), images)
                for m, rows, images in zip(self.mm, self._mm_rows, self._mm_images)
            ]
            self.stages.append(
                ([b for b in text if b is not None], [m for m in mm if m is not None])
            )
            self.stage_caches.append({})

    def stage_rows(self, stage: int) -> int:
        """Proxy samples (text and multimodal) a stage reads."""
        text, mm = self.stages[stage]
        return sum(b.labels.shape[0] for b in text) + sum(m.labels.shape[0] for m in mm)

    @property
    def training(self) -> list[MultimodalProxy]:
        """The multimodal groups the projector trains on (with the KL target when it uses KL)."""
        return self._for_training(self.mm)

    def _for_training(self, mm):
        return mm if self.projector_kl else [m.replace(dense_logp=None) for m in mm]

    def training_samples(self, samples: int, seed: int, round_index: int, steps: int) -> list:
        """Each projector step's minibatch of `samples` multimodal samples, for `steps` steps
        of round `round_index`: consecutive windows of a permutation drawn once from `seed`
        (wrapping around), so over the rounds every sample is used as often; each minibatch is
        one group padded to the longest sample (one compiled shape for every step)."""
        n = self.n_mm
        perm = np.random.default_rng([seed, 0x9A0C]).permutation(n)
        k = min(samples, n)
        out = []
        for t in range(steps):
            start = (round_index * steps + t) * k
            pick = np.sort(perm[(start + np.arange(k)) % n])
            sel = np.flatnonzero(np.isin(self._mm_all_rows, pick))
            out.append(self._for_training([_take_samples(self._mm_all, sel, self._all_images)]))
        return out


def _gathered(groups, rows, whole) -> np.ndarray:
    """The groups' host KL targets as one [n, T, V] array for `whole` (every sample, padded to
    the longest; the padding's positions are zero and unscored)."""
    n, t = whole.labels.shape
    v = groups[0].dense_logp.shape[-1]
    out = np.zeros((n, t, v), np.float32)
    for g, r in zip(groups, rows):
        out[r, t - g.dense_logp.shape[1] :] = g.dense_logp
    return out


def _trimmed(x, length: int):
    """[N, T, ...] -> its last `length` positions (the proxy is left-padded)."""
    return None if x is None else x[:, x.shape[1] - length :]


def _take(b, sel: np.ndarray, row_fields: tuple[str, ...], **other):
    """Rows `sel` of a part (`row_fields` [N, T, ...], and its host or device KL target),
    trimmed to their longest; `other` fields replaced as given. None when `sel` is empty."""
    if not len(sel):
        return None
    j = jnp.asarray(sel)
    mask = b.attention_mask[j]
    n = int(jnp.max(jnp.sum(mask, axis=1)))
    logp = None if b.dense_logp is None else b.dense_logp[sel]  # host targets stay on host
    rows = {f: _trimmed(getattr(b, f)[j], n) for f in row_fields}
    return b.replace(
        **rows, attention_mask=_trimmed(mask, n), dense_logp=_trimmed(logp, n), **other
    )


def _take_rows(b: ProxyBatch, sel: np.ndarray) -> ProxyBatch | None:
    """Rows `sel` of a text part, trimmed to their longest; None when `sel` is empty."""
    return _take(b, sel, ("inputs_embeds", "labels", "label_mask"))


def _take_samples(m: MultimodalProxy, sel: np.ndarray, images: list) -> MultimodalProxy | None:
    """Samples `sel` of a multimodal group (their images with them), trimmed to their longest;
    None when `sel` is empty."""
    if not len(sel):
        return None
    img = jnp.asarray(np.concatenate([images[i] for i in sel]), jnp.int32)
    fields = ("input_ids", "text_embeds", "labels", "label_mask")
    return _take(m, sel, fields, vision_feats=m.vision_feats[img])
