"""The one parser of Hugging Face ``config.json`` files: which models convert, and their shapes.

Design
------
:func:`parse_hf_config` turns a ``config.json`` dict into an :class:`HFArchitecture`
(the family and every shape and setting the conversion needs) or refuses it with a
:class:`~distill_plugins.errors.DistillError` that names the file, the key and the
value. It is the only place that reads these files: ``distill plan``
(:mod:`distill_plugins.plan`), ``distill check`` (recipe validation and
:mod:`distill_plugins.models.model_info`) and ``distill run`` (spec resolution in
:mod:`distill_plugins.models.resolve` and the weight import in
:mod:`distill_plugins.models.hf_import`) all call it, so they accept and refuse
exactly the same directories. The module imports neither torch nor megatron-core.

Accepted (``model_type`` -> family; ``architectures`` must name the causal-LM head
when given):

* ``llama`` (``LlamaForCausalLM``), ``mistral`` (``MistralForCausalLM``), ``qwen2``
  (``Qwen2ForCausalLM``): RMSNorm, SwiGLU (``hidden_act: silu``), RoPE; Qwen2 has
  q/k/v biases. Become ``arch: llama``.
* ``gpt2`` (``GPT2LMHeadModel``): LayerNorm, tanh-GeLU, learned positions, biases
  everywhere; embeddings tied unless ``tie_word_embeddings: false``. Becomes ``arch: gpt2``.

Refused, each with the key named:

* any other ``model_type``, or ``architectures`` without the causal-LM head;
* a missing or non-positive shape key (``hidden_size``, ``num_hidden_layers``, ...);
* Llama family: ``head_dim * num_attention_heads != hidden_size``; heads not divisible
  by ``num_key_value_heads``; ``hidden_act`` other than ``silu``; ``attention_bias`` or
  ``mlp_bias`` true (megatron would need biases on every linear layer; Qwen2's q/k/v
  biases are the family's own and supported); q/k normalisation; RoPE scaling other than
  ``rope_type: default`` (``linear``, ``dynamic``, ``yarn``, ``llama3``, ...: megatron's
  GPTModel would need scaling settings the model spec does not carry);
* GPT-2: an activation other than the tanh GeLU (``gelu_new``, ``gelu_pytorch_tanh``,
  ``gelu_fast``); ``scale_attn_by_inverse_layer_idx: true``; ``scale_attn_weights: false``.

Accepted with a note (:attr:`HFArchitecture.notes`, which the planner and ``distill
check`` print as warnings and the importer logs): a sliding window shorter than
``max_position_embeddings`` (megatron attends over the whole causal context, which
matches Hugging Face only for sequences up to the window).

The reverse direction, :meth:`HFArchitecture.from_model_spec` and
:meth:`HFArchitecture.hf_config`, writes a ``config.json`` this parser accepts (the
export uses it).

Usage::

    arch = read_hf_config("path/to/hf_dir")      # or parse_hf_config(json_dict, "where")
    spec = arch.to_model_spec(recipe.student)   # shape keys replaced, hf= set
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from distill_plugins.errors import DistillError
from distill_plugins.recipe.schema import ModelSpec
from distill_plugins.shapes import TransformerShape, shape_keys

__all__ = [
    "SUPPORTED_FAMILIES",
    "CAUSAL_LM_ARCHITECTURES",
    "HFArchitecture",
    "default_family",
    "parse_hf_config",
    "read_hf_config",
]

#: HF ``model_type`` -> family; the families the toolkit converts.
SUPPORTED_FAMILIES: dict[str, str] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}
#: HF ``architectures`` entry of each family's causal-LM head.
CAUSAL_LM_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
}
#: ``max_position_embeddings`` when config.json omits it (the transformers defaults).
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "gpt2": 1024}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True, kw_only=True)
class HFArchitecture(TransformerShape):
    """Shapes and settings of a supported HF causal LM, as the conversion needs them.

    The shape keys (``num_layers`` ... ``add_qkv_bias``, and :attr:`head_dim`) are
    those of :class:`~distill_plugins.shapes.TransformerShape`; ``vocab_size`` is
    the number of embedding rows in the checkpoint and ``tie_embeddings`` means
    ``lm_head`` shares the input embedding.

    Attributes:
        family: ``llama``, ``mistral``, ``qwen2`` or ``gpt2``.
        rotary_base: RoPE base (``rope_theta``); unused for gpt2.
        norm_epsilon: RMSNorm / LayerNorm epsilon.
        dtype: the checkpoint's ``torch_dtype``/``dtype`` string, if given.
        prefix: GPT-2 only: ``"transformer."`` or ``""`` (original OpenAI files).
        path: the directory read, if any.
        notes: settings accepted with a caveat (sliding window), one sentence each.
    """

    family: str
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    dtype: Optional[str] = None
    prefix: str = ""
    path: Optional[str] = None
    notes: tuple[str, ...] = ()

    @property
    def arch(self) -> str:
        """``ModelSpec.arch``: ``gpt2`` or ``llama`` (Llama, Mistral, Qwen2)."""
        return "gpt2" if self.family == "gpt2" else "llama"

    def spec_fields(self) -> dict[str, Any]:
        """The :class:`ModelSpec` shape keys this architecture sets."""
        return dict(
            arch=self.arch, num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings, rotary_base=float(self.rotary_base),
            norm_epsilon=self.norm_epsilon, tie_embeddings=self.tie_embeddings,
            add_qkv_bias=self.add_qkv_bias if self.family != "gpt2" else True,
        )

    def to_model_spec(self, base: Optional[ModelSpec] = None) -> ModelSpec:
        """``base`` (default ``ModelSpec()``) with every shape key replaced by this architecture's.

        ``hf`` is set to :attr:`path` when the architecture was read from a directory.
        """
        base = base if base is not None else ModelSpec()
        fields = self.spec_fields()
        if self.path is not None:
            fields.update(hf=self.path, megatron=None, checkpoint=None)
        return dataclasses.replace(base, **fields)

    @classmethod
    def from_model_spec(cls, spec: ModelSpec, *, vocab_size: Optional[int] = None,
                        family: Optional[str] = None) -> "HFArchitecture":
        """The HF architecture a megatron model of ``spec`` exports to.

        ``family`` defaults to :func:`default_family` of ``spec``.
        """
        vocab = vocab_size if vocab_size is not None else spec.vocab_size
        if vocab is None:
            raise DistillError("vocab_size is unknown: set it in the model spec or pass vocab_size=")
        if family is None:
            family = default_family(spec)
        if family not in SUPPORTED_FAMILIES:
            raise DistillError(f"unsupported family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if (family == "gpt2") != (spec.arch == "gpt2"):
            raise DistillError(f"family {family!r} does not fit arch {spec.arch!r}")
        if family in ("llama", "mistral") and spec.add_qkv_bias:
            raise DistillError(f"family {family!r} has no q/k/v biases but the spec sets add_qkv_bias; "
                               "export as family 'qwen2'")
        return cls(
            **shape_keys(spec, vocab), family=family, rotary_base=spec.rotary_base,
            norm_epsilon=spec.norm_epsilon, prefix="transformer." if family == "gpt2" else "",
        )

    def hf_config(self, dtype: Optional[str] = None) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` loads as this architecture (and :func:`parse_hf_config` accepts)."""
        dtype = dtype or self.dtype or "float32"
        if self.family == "gpt2":
            return {
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": self.vocab_size, "n_embd": self.hidden_size, "n_layer": self.num_layers,
                "n_head": self.num_attention_heads, "n_inner": self.ffn_hidden_size,
                "n_positions": self.max_position_embeddings, "layer_norm_epsilon": self.norm_epsilon,
                "activation_function": "gelu_new", "tie_word_embeddings": self.tie_embeddings,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "torch_dtype": dtype,
            }
        config = {
            "architectures": [CAUSAL_LM_ARCHITECTURES[self.family]], "model_type": self.family,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon, "hidden_act": "silu",
            "rope_theta": float(self.rotary_base),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rotary_base)},
            "tie_word_embeddings": self.tie_embeddings, "attention_dropout": 0.0, "torch_dtype": dtype,
        }
        if self.family == "llama":
            config.update(attention_bias=False, mlp_bias=False)
        if self.family == "mistral":
            config["sliding_window"] = None
        if self.family == "qwen2":
            config.update(use_sliding_window=False, sliding_window=None)
        return config


def default_family(spec: ModelSpec) -> str:
    """The HF family a spec without a recorded family exports to: gpt2, qwen2 (llama with q/k/v biases) or llama."""
    if spec.arch == "gpt2":
        return "gpt2"
    return "qwen2" if spec.add_qkv_bias else "llama"


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


class _Reader:
    """Typed access to one config dict; every error names the file and the key."""

    def __init__(self, config: dict, where: str):
        self.config, self.where = config, where

    def error(self, what: str) -> DistillError:
        return DistillError(f"{self.where}: {what}")

    def positive_int(self, key: str, default: Optional[int] = None) -> int:
        value = self.config.get(key)
        if value is None:
            if default is None:
                raise self.error(f"{key} is missing; a {self.config.get('model_type')} config.json needs it")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(f"{key}={value!r} is not a positive integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.config.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.error(f"{key}={value!r} is not a positive number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(f"{key}={value!r} is not true or false")
        return value


def _unsupported(reader: _Reader, what: str) -> DistillError:
    heads = ", ".join(f"{t} ({a})" for t, a in CAUSAL_LM_ARCHITECTURES.items())
    return reader.error(f"{what}. Supported model types: {heads}")


def parse_hf_config(config: Any, where: str = "config.json", *, path: Optional[str] = None) -> HFArchitecture:
    """Check a ``config.json`` dict against every rule of the conversion and return its architecture.

    Args:
        config: the parsed JSON.
        where: the file, for messages (``<dir>/config.json``).
        path: the model directory, recorded in :attr:`HFArchitecture.path`.

    Raises:
        DistillError: unsupported model type or setting (see the module docstring), a
            missing or ill-typed key; the message names ``where``, the key and the value.
    """
    if not isinstance(config, dict):
        raise DistillError(f"{where}: expected a JSON object, got {type(config).__name__}")
    reader = _Reader(config, where)
    model_type = config.get("model_type")
    family = SUPPORTED_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise _unsupported(reader, f"model_type {model_type!r} (architectures {config.get('architectures') or []}) "
                                   "is not supported")
    archs = config.get("architectures") or [CAUSAL_LM_ARCHITECTURES[family]]
    if CAUSAL_LM_ARCHITECTURES[family] not in archs:
        raise _unsupported(reader, f"architectures {archs} has no causal-LM head {CAUSAL_LM_ARCHITECTURES[family]!r}")
    dtype = config.get("torch_dtype") or config.get("dtype")
    if family == "gpt2":
        return _gpt2(reader, dtype, path)
    return _llama_family(reader, family, dtype, path)


def _rope_base(reader: _Reader) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x); default only."""
    config = reader.config
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise reader.error("rope_parameters / rope_scaling must be JSON objects")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise reader.error(f"RoPE scaling rope_type={rope_type!r} is not supported (only 'default'): megatron's "
                           "GPTModel would need scaling settings that the model spec does not carry")
    if "rope_theta" in params:
        return _Reader(params, f"{reader.where} rope_parameters").number("rope_theta", 10000.0)
    return reader.number("rope_theta", 10000.0)


def _llama_family(reader: _Reader, family: str, dtype: Optional[str], path: Optional[str]) -> HFArchitecture:
    config = reader.config
    hidden = reader.positive_int("hidden_size")
    heads = reader.positive_int("num_attention_heads")
    layers = reader.positive_int("num_hidden_layers")
    ffn = reader.positive_int("intermediate_size")
    vocab = reader.positive_int("vocab_size")
    groups = reader.positive_int("num_key_value_heads", heads)
    head_dim = reader.positive_int("head_dim", max(1, hidden // heads))
    if head_dim * heads != hidden:
        raise reader.error(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
                           "decoupled head sizes are not supported")
    if heads % groups:
        raise reader.error(f"num_attention_heads={heads} is not divisible by num_key_value_heads={groups}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise reader.error(f"hidden_act={act!r}; only 'silu' (SwiGLU) is supported for {family}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise reader.error(f"{key}=true is not supported (megatron would need biases on every linear layer)")
    if config.get("qk_norm") or config.get("use_qk_norm"):
        raise reader.error("q/k normalisation is not supported")
    max_positions = reader.positive_int("max_position_embeddings", _DEFAULT_MAX_POSITIONS[family])
    notes = []
    window = config.get("sliding_window")
    uses_window = window is not None and (family != "qwen2" or config.get("use_sliding_window"))
    if uses_window:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise reader.error(f"sliding_window={window!r} is not a positive integer or null")
        if window < max_positions:
            notes.append(f"{reader.where}: sliding_window={window} is not emulated; megatron attends over the full "
                         f"causal context, which matches Hugging Face only for sequences of at most {window} tokens")
    return HFArchitecture(
        family=family, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, vocab_size=vocab, max_position_embeddings=max_positions,
        rotary_base=_rope_base(reader), norm_epsilon=reader.number("rms_norm_eps", 1e-6),
        tie_embeddings=reader.flag("tie_word_embeddings", False), add_qkv_bias=family == "qwen2",
        dtype=dtype, path=path, notes=tuple(notes),
    )


def _gpt2(reader: _Reader, dtype: Optional[str], path: Optional[str]) -> HFArchitecture:
    config = reader.config
    act = config.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise reader.error(f"activation_function={act!r}; the gpt2 arch uses the tanh GeLU ({', '.join(_GELU_TANH)})")
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise reader.error("scale_attn_by_inverse_layer_idx=true is not supported (megatron scales every "
                           "layer's attention by 1/sqrt(head_dim) only)")
    if config.get("scale_attn_weights") is False:
        raise reader.error("scale_attn_weights=false is not supported (megatron always scales by 1/sqrt(head_dim))")
    hidden = reader.positive_int("n_embd")
    heads = reader.positive_int("n_head")
    if hidden % heads:
        raise reader.error(f"n_embd={hidden} is not divisible by n_head={heads}")
    return HFArchitecture(
        family="gpt2", num_layers=reader.positive_int("n_layer"), hidden_size=hidden,
        ffn_hidden_size=reader.positive_int("n_inner", 4 * hidden), num_attention_heads=heads,
        num_query_groups=heads, vocab_size=reader.positive_int("vocab_size"),
        max_position_embeddings=reader.positive_int("n_positions", _DEFAULT_MAX_POSITIONS["gpt2"]),
        norm_epsilon=reader.number("layer_norm_epsilon", 1e-5),
        tie_embeddings=reader.flag("tie_word_embeddings", True), add_qkv_bias=True,
        dtype=dtype, prefix="transformer.", path=path,
    )


def read_hf_config(path: str) -> HFArchitecture:
    """Read ``<path>/config.json`` (and nothing else) into an :class:`HFArchitecture`.

    Raises:
        DistillError: missing directory or config.json, invalid JSON, or anything
            :func:`parse_hf_config` refuses.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise DistillError(f"Hugging Face model directory {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise DistillError(f"{path!r} has no config.json; expected a Hugging Face model directory "
                           "(config.json + *.safetensors)")
    with open(cfg_path, encoding="utf-8") as fh:
        try:
            config = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DistillError(f"{cfg_path}: not valid JSON: {exc}") from exc
    return parse_hf_config(config, cfg_path, path=path)
