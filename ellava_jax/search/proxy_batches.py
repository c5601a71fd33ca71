"""The proxy samples as the fitness and the projector training read them: length groups,
embedded once, with the dense model's targets where the loss is KL."""

from __future__ import annotations

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
        for rows in length_buckets(np.asarray(proxy.text_mask).sum(1), max_buckets, min_rows):
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
            for rows in length_buckets(np.asarray(proxy.mm_mask).sum(1), max_buckets, min_rows):
                ids, mask = rows_of(proxy.mm_ids, proxy.mm_mask, rows)
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
                self.mm = [
                    m.replace(
                        dense_logp=host_log_probs(config, params, m.batch(config, dense), chunk)
                    )
                    for m in self.mm
                ]
        self.has_mm = bool(self.mm)

    def parts(self, projector) -> list[ProxyBatch]:
        """The fitness's proxy parts for a given projector: text groups, then multimodal ones."""
        mm = [m.batch(self.config, projector) for m in self.mm]
        if not self.fitness_kl:
            mm = [b.replace(dense_logp=None) for b in mm]
        return self.text + mm

    @property
    def training(self) -> list[MultimodalProxy]:
        """The multimodal groups the projector trains on (with the KL target when it uses KL)."""
        return self.mm if self.projector_kl else [m.replace(dense_logp=None) for m in self.mm]
