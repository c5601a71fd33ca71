"""CLIP vision tower in Flax linen, computing what HF `CLIPVisionModel` computes.

Parameter names follow HF (`embeddings.patch_embedding`, `encoder.layers.<i>.self_attn.q_proj`,
`pre_layrnorm` with HF's spelling). The tower returns every hidden state so that LLaVA can pick
`vision_feature_layer`: index 0 is the encoder input (after `pre_layrnorm`), index i the output
of layer i.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ellava_jax.config import VisionConfig

_INIT = nn.initializers.normal(0.02)


def activation(name: str):
    """HF ACT2FN subset used by CLIP and the LLaVA projector."""
    return {
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }[name]


def _dense(features: int, name: str):
    return nn.Dense(features, kernel_init=_INIT, name=name)


def _layer_norm(eps: float, name: str):
    return nn.LayerNorm(epsilon=eps, name=name)


class CLIPEmbeddings(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, S, S] (NCHW, as HF) -> [B, 1 + N, D]."""
        c = self.cfg
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))  # NHWC for the Flax conv
        patches = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            kernel_init=_INIT,
            name="patch_embedding",
        )(x)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major over the patch grid
        cls = self.param("class_embedding", _INIT, (c.hidden_size,)).astype(patches.dtype)
        h = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), patches], axis=1)
        pos = nn.Embed(
            c.num_patches + 1, c.hidden_size, embedding_init=_INIT, name="position_embedding"
        )
        return h + pos(jnp.arange(c.num_patches + 1))[None]


class CLIPAttention(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        b, t, d = x.shape
        nh, hd = c.num_attention_heads, c.head_dim
        q = _dense(d, "q_proj")(x).reshape(b, t, nh, hd)
        k = _dense(d, "k_proj")(x).reshape(b, t, nh, hd)
        v = _dense(d, "v_proj")(x).reshape(b, t, nh, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd**-0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return _dense(d, "out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        h = h + CLIPAttention(c, name="self_attn")(_layer_norm(c.layer_norm_eps, "layer_norm1")(h))
        x = _layer_norm(c.layer_norm_eps, "layer_norm2")(h)
        mlp = _MLP(c, name="mlp")
        return h + mlp(x)


class _MLP(nn.Module):
    cfg: VisionConfig

    @nn.compact
    def __call__(self, x):
        x = activation(self.cfg.hidden_act)(_dense(self.cfg.intermediate_size, "fc1")(x))
        return _dense(self.cfg.hidden_size, "fc2")(x)


class _EncoderLayers(nn.Module):
    cfg: VisionConfig
    n_layers: int

    @nn.compact
    def __call__(self, h):
        hidden = [h]
        for i in range(self.n_layers):
            h = CLIPEncoderLayer(self.cfg, name=str(i))(h)
            hidden.append(h)
        return hidden


class CLIPVisionTransformer(nn.Module):
    """HF `CLIPVisionTransformer` (the `vision_model` of `CLIPVisionModel`).

    `n_layers` limits how many encoder layers run (LLaVA never needs those after its feature
    layer); the default runs all of them. Returns the list of hidden states.
    """

    cfg: VisionConfig
    n_layers: int | None = None

    @nn.compact
    def __call__(self, pixel_values, *, with_post_layernorm: bool = False):
        c = self.cfg
        h = CLIPEmbeddings(c, name="embeddings")(pixel_values)
        h = _layer_norm(c.layer_norm_eps, "pre_layrnorm")(h)
        n = c.num_hidden_layers if self.n_layers is None else self.n_layers
        hidden = _Encoder(c, n, name="encoder")(h)
        post = _layer_norm(c.layer_norm_eps, "post_layernorm")
        if with_post_layernorm or self.is_initializing():
            hidden = hidden + [post(hidden[-1][:, 0])]
        return hidden


class _Encoder(nn.Module):
    cfg: VisionConfig
    n_layers: int

    @nn.compact
    def __call__(self, h):
        return _EncoderLayers(self.cfg, self.n_layers, name="layers")(h)
