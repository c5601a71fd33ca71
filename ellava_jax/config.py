"""Model configuration: frozen dataclasses for CLIP, LLaMA and LLaVA, HF config.json in and out.

Every attribute of an HF `config.json` is either understood (and round-trips through
`to_hf_config`), known to be irrelevant to the computation (metadata such as `architectures`),
or an error that names it. A value we cannot compute (an unknown `rope_parameters` type, a
projector activation we lack, ...) is an error too, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ellava_jax.errors import UserError
from ellava_jax.inputs import check_file

# Keys that describe the checkpoint or the HF runtime, never the computation.
_METADATA_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "architectures",
        "chunk_size_feed_forward",
        "dtype",
        "torch_dtype",
        "id2label",
        "label2id",
        "is_encoder_decoder",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "return_dict",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "initializer_factor",
        "attention_dropout",
        "dropout",
        "ignore_index",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "unk_token_id",
        "projection_dim",
        "vocab_size",  # of the vision tower / top level: unused by the computation
        "model_type",
        "tokenizer_class",
        "use_return_dict",
    }
)


class ConfigError(UserError):
    """An HF config attribute we do not support, or a malformed config."""


# Quantisation methods whose checkpoints are saved dequantised (transformers dequantises GGUF
# at load, so a model saved after that holds float weights): their quantization_config only
# records where the weights came from.
_DEQUANTISED_METHODS = frozenset({"gguf"})


def _check_keys(d: dict, handled: set[str], where: str) -> None:
    qc = d.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method not in _DEQUANTISED_METHODS:
            raise ConfigError(
                f"{where}.quantization_config (quant_method={method!r}): quantised weights are "
                "not supported; dequantise the checkpoint first"
            )
    handled = handled | {"quantization_config"}
    unknown = sorted(k for k in d if k not in handled and k not in _METADATA_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unsupported attribute(s) {unknown}; ellava-jax does not handle them"
        )


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (HF `CLIPVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # carried for round trips; the vision model has no projection

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    _ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")

    def __post_init__(self):
        if self.hidden_act not in self._ACTS:
            raise ConfigError(
                f"vision_config.hidden_act={self.hidden_act!r} is not supported ({self._ACTS})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_hf_config(cls, d: dict) -> VisionConfig:
        where = "vision_config"
        mt = d.get("model_type", "clip_vision_model")
        if mt not in ("clip_vision_model", "clip"):
            raise ConfigError(f"{where}.model_type={mt!r}: only CLIP vision towers are supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        _check_keys(d, fields, where)
        kw = {k: d[k] for k in fields if k in d}
        for k in ("image_size", "patch_size"):
            if isinstance(kw.get(k), list | tuple):
                a, b = kw[k]
                if a != b:
                    raise ConfigError(f"{where}.{k}={kw[k]}: only square sizes are supported")
                kw[k] = a
        return cls(**kw)

    def to_hf_config(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_type"] = "clip_vision_model"
        return d


@dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder (HF `LlamaConfig`)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ConfigError(
                f"text_config.hidden_act={self.hidden_act!r}: only 'silu' is supported"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf_config(cls, d: dict, where: str = "text_config") -> TextConfig:
        """From an HF `LlamaConfig` dict; `where` names it in errors (a LLaVA's `text_config`,
        or the `config.json` of a plain LLaMA causal LM)."""
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ConfigError(
                f"{where}.model_type={mt!r}: only LLaMA language models are supported"
            )
        # a LLaVA's "text_config.rope_parameters ...", a LLaMA's "config.json: rope_parameters ..."
        pre = f"{where}." if where == "text_config" else f"{where}: "
        handled = {f.name for f in dataclasses.fields(cls)} | {
            "rope_parameters",
            "rope_scaling",
            "attention_bias",
            "mlp_bias",
            "pretraining_tp",
        }
        _check_keys(d, handled, where)
        for k in ("attention_bias", "mlp_bias"):
            if d.get(k):
                raise ConfigError(f"{pre}{k}=True is not supported (LLaMA linears have no bias)")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(
                f"{pre}pretraining_tp={d['pretraining_tp']} is not supported (only 1)"
            )
        theta = d.get("rope_theta", 10000.0)
        for key in ("rope_parameters", "rope_scaling"):
            rp = d.get(key)
            if rp is None:
                continue
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype != "default":
                raise ConfigError(
                    f"{pre}{key} rope_type={rtype!r} is not supported (only 'default')"
                )
            extra = sorted(set(rp) - {"rope_type", "type", "rope_theta"})
            if extra:
                raise ConfigError(f"{pre}{key}: unsupported entries {extra}")
            theta = rp.get("rope_theta", theta)
        n_heads = d.get("num_attention_heads", cls.num_attention_heads)
        hidden = d.get("hidden_size", cls.hidden_size)
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            if len(eos) != 1:
                raise ConfigError(f"{pre}eos_token_id={eos}: only one eos token is supported")
            eos = eos[0]
        kw = {k: d[k] for k in {f.name for f in dataclasses.fields(cls)} if k in d}
        kw.update(
            rope_theta=float(theta),
            eos_token_id=eos,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or hidden // n_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
        )
        return cls(**kw)

    def to_hf_config(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("rope_theta")
        d.update(
            model_type="llama",
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_bias=False,
            mlp_bias=False,
        )
        return d


@dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-1.5: CLIP tower, Linear-GELU-Linear projector, LLaMA decoder (HF `LlavaConfig`).

    With `vision=None` it is the text-only form: a plain LLaMA causal LM (HF `LlamaForCausalLM`,
    `LlavaConfig.text_only(text)`), no vision tower, no projector, no image token
    (`image_token_index` None, `image_seq_length` and `num_image_tokens` 0); the vision fields
    keep their defaults and mean nothing.
    """

    vision: VisionConfig | None = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int | None = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | tuple[int, ...] = -2
    multimodal_projector_bias: bool = True

    _STRATEGIES = ("default", "full")
    _PROJ_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "relu", "silu")

    def __post_init__(self):
        if self.vision is None:
            # no image token exists: the image fields say so whatever the caller passed
            object.__setattr__(self, "image_token_index", None)
            object.__setattr__(self, "image_seq_length", 0)
            return
        if self.image_token_index is None:
            raise ConfigError("image_token_index=None: a LLaVA needs an image token")
        if self.vision_feature_select_strategy not in self._STRATEGIES:
            raise ConfigError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is not "
                f"supported ({self._STRATEGIES})"
            )
        if self.projector_hidden_act not in self._PROJ_ACTS:
            raise ConfigError(
                f"projector_hidden_act={self.projector_hidden_act!r} is not supported ({self._PROJ_ACTS})"
            )
        n = self.vision.num_hidden_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ConfigError(
                    f"vision_feature_layer={layer} is out of range for {n} vision layers "
                    f"(hidden states are indexed {-(n + 1)}..{n})"
                )

    @classmethod
    def text_only(cls, text: TextConfig) -> LlavaConfig:
        """The text-only form: a plain LLaMA causal LM (HF `LlamaForCausalLM`)."""
        return cls(vision=None, text=text)

    @property
    def is_text_only(self) -> bool:
        """A plain LLaMA causal LM: no vision tower, no projector, no image token."""
        return self.vision is None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Vision hidden states the projector reads (none for a text-only model)."""
        if self.vision is None:
            return ()
        v = self.vision_feature_layer
        return (v,) if isinstance(v, int) else tuple(v)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image that the projector hands to the decoder (0: text-only)."""
        if self.vision is None:
            return 0
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    def replace(self, **kw) -> LlavaConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_config(cls, d: dict | str | os.PathLike) -> LlavaConfig:
        """Builds a config from an HF `config.json` (a dict, a file, or its directory): a LLaVA
        (`model_type: llava`), or a plain LLaMA causal LM (`model_type: llama` with
        `architectures: ["LlamaForCausalLM"]`), which gives the text-only form."""
        src = "config.json"
        if not isinstance(d, dict):
            path = os.fspath(d)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            src = path
            check_file(path, "config.json", missing="no config.json")
            try:
                with open(path) as f:
                    d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt == "llama":
            return cls._from_hf_llama(d, src)
        if mt != "llava":
            raise ConfigError(f"{src}: model_type={mt!r}, expected 'llava' (not a LLaVA config)")
        for k in ("vision_config", "text_config"):
            if not isinstance(d.get(k), dict):
                raise ConfigError(f"{src}: missing {k}")
        handled = {
            "vision_config",
            "text_config",
            "image_token_index",
            "image_token_id",
            "image_seq_length",
            "projector_hidden_act",
            "vision_feature_select_strategy",
            "vision_feature_layer",
            "multimodal_projector_bias",
            "tie_word_embeddings",
        }
        try:
            _check_keys(d, handled, src)
            text_d = dict(d["text_config"])
            if d.get("tie_word_embeddings"):
                text_d["tie_word_embeddings"] = True
            vfl = d.get("vision_feature_layer", -2)
            return cls(
                vision=VisionConfig.from_hf_config(d["vision_config"]),
                text=TextConfig.from_hf_config(text_d),
                image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                image_seq_length=d.get("image_seq_length", 576),
                projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                vision_feature_layer=vfl if isinstance(vfl, int) else tuple(vfl),
                multimodal_projector_bias=d.get("multimodal_projector_bias", True),
            )
        except ConfigError as e:
            if src != "config.json" and not str(e).startswith(src):
                raise ConfigError(f"{src}: {e}") from e
            raise
        except (TypeError, ValueError, AttributeError) as e:
            # a value of the wrong type (a string where a size goes, ...)
            raise ConfigError(f"{src}: malformed config ({e})") from None

    @classmethod
    def _from_hf_llama(cls, d: dict, src: str) -> LlavaConfig:
        arch = d.get("architectures")
        if arch != [_LLAMA_ARCH]:
            raise ConfigError(
                f"{src}: model_type='llama' with architectures={arch!r}: a LLaMA checkpoint must "
                f"be a causal LM, architectures [{_LLAMA_ARCH!r}] (or give a LLaVA config.json)"
            )
        try:
            return cls.text_only(TextConfig.from_hf_config(d, where=src))
        except ConfigError as e:
            if not str(e).startswith(src):
                raise ConfigError(f"{src}: {e}") from e
            raise
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ConfigError(f"{src}: malformed config ({e})") from None

    def to_hf_config(self) -> dict:
        if self.vision is None:
            return {"architectures": [_LLAMA_ARCH], **self.text.to_hf_config()}
        vfl = self.vision_feature_layer
        return {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": self.vision.to_hf_config(),
            "text_config": self.text.to_hf_config(),
            "image_token_index": self.image_token_index,
            "image_seq_length": self.image_seq_length,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "vision_feature_layer": vfl if isinstance(vfl, int) else list(vfl),
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }


_LLAMA_ARCH = "LlamaForCausalLM"

# ---------------------------------------------------------------------------------------------
# Presets

_CLIP_L_336 = VisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)

PRESETS: dict[str, LlavaConfig] = {
    # Small enough for a unit test in milliseconds; GQA so both attention paths run.
    "tiny": LlavaConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=32,
        ),
        text=TextConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            pad_token_id=0,
        ),
        image_token_index=127,
        image_seq_length=16,
    ),
    # The text-only form at unit-test size: GQA 3:1, tied embeddings, head_dim != hidden / heads.
    "tiny-llama": LlavaConfig.text_only(
        TextConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=12,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    ),
    "llava-1.5-7b": LlavaConfig(
        vision=_CLIP_L_336,
        text=TextConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            head_dim=128,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            pad_token_id=0,
        ),
        image_token_index=32000,
    ),
    "llava-1.5-13b": LlavaConfig(
        vision=_CLIP_L_336,
        text=TextConfig(
            vocab_size=32064,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            head_dim=128,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            pad_token_id=0,
        ),
        image_token_index=32000,
    ),
}


def get_preset(name: str) -> LlavaConfig:
    """Returns a named preset (`tiny`, `tiny-llama` (text-only), `llava-1.5-7b`, `llava-1.5-13b`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
