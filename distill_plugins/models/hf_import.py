"""Import a local Hugging Face checkpoint into a megatron-core GPTModel, reading only this rank's slices.

Design
------
Three layers, each usable on its own:

1. **Config** (:func:`read_hf_config`): ``config.json`` -> :class:`HFArchitecture`,
   the family (``llama``, ``mistral``, ``qwen2``, ``gpt2``) and every shape the
   conversion needs; :meth:`HFArchitecture.to_model_spec` turns it into a
   :class:`~distill_plugins.recipe.schema.ModelSpec` (Qwen2 and Mistral are
   ``arch: llama``; Qwen2 adds ``add_qkv_bias``). Reads no weights.
2. **Mapping** (:func:`tensor_pieces`): pure index arithmetic. Every parameter
   of the *full* megatron model (names of :mod:`distill_plugins.models.build`'
   full-weight convention: local spec, global layer numbers, padded vocabulary)
   is described along its tensor-parallel partition dimension as a list of
   :class:`Piece` s, each a contiguous range of one HF tensor (or zero padding).
   For example with ``ng`` query groups of ``np/ng`` heads of size ``d``::

       linear_qkv.weight = for g in groups: [q_proj rows of g's heads; k_proj rows of g; v_proj rows of g]
       linear_fc1.weight = [gate_proj; up_proj]                 (SwiGLU; each half TP-sharded)
       word_embeddings   = [embed_tokens (V rows); zeros (V_padded - V rows)]
       GPT-2 c_attn      = Conv1D [h, 3h]: q/k/v are column ranges, transposed

   The same pieces drive export (:mod:`distill_plugins.models.hf_export`), so
   import and export cannot disagree.
3. **Reading** (:class:`HFCheckpoint`, :func:`load_hf_weights`): a TP rank owns
   one contiguous range of the full partition dimension (two for the gated
   ``fc1``: its share of gate and of up). Only the pieces intersecting that
   range are read, with ``safetensors``' ``get_slice``, so a rank never holds a
   whole tensor it only owns part of, and a pipeline stage reads only its own
   layers. Files are opened per tensor and closed straight after, so the pages
   a read maps are released before the next one. :attr:`HFCheckpoint.bytes_read`
   counts the bytes of every slice read (the memory test checks it).

Assumptions: ``head_dim == hidden_size / num_attention_heads``; no attention
output or MLP biases on Llama-family models; RoPE without scaling
(``rope_type: default``); sliding-window attention is not emulated (a warning
says logits match for sequences up to the window). Each is checked and gives a
:class:`~distill_plugins.errors.DistillError` naming the key.

Usage::

    arch = read_hf_config("path/to/hf_dir")
    spec = arch.to_model_spec()                        # or resolve_model_spec(ModelSpec(hf=...))
    model = models.build_gpt_model(spec, parallel, cpu=True)
    report = load_hf_weights(model, "path/to/hf_dir")  # this rank's slices only
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from distill_plugins.errors import DistillError
from distill_plugins.logging import get_logger
from distill_plugins.recipe.schema import ModelSpec
from distill_plugins.shapes import TransformerShape, shape_keys

__all__ = [
    "SUPPORTED_FAMILIES",
    "HFArchitecture",
    "Piece",
    "HFCheckpoint",
    "ImportReport",
    "read_hf_config",
    "resolve_model_spec",
    "hf_tensor_shapes",
    "tensor_pieces",
    "partition_dim",
    "ensure_tp_attributes",
    "local_ranges",
    "read_local",
    "load_hf_weights",
    "import_hf_model",
    "checkpoint_size",
]

log = get_logger(__name__)

#: HF ``model_type`` -> family; the families this module converts.
SUPPORTED_FAMILIES: dict[str, str] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}
#: HF ``architectures`` entries accepted for each family (causal-LM heads only).
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SHARD_INDEX = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SINGLE_FILE = "model.safetensors"


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


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
    """

    family: str
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    dtype: Optional[str] = None
    prefix: str = ""
    path: Optional[str] = None

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

        ``family`` defaults to ``gpt2`` for ``arch: gpt2``, ``qwen2`` for
        ``arch: llama`` with ``add_qkv_bias``, else ``llama``.
        """
        vocab = vocab_size if vocab_size is not None else spec.vocab_size
        if vocab is None:
            raise DistillError("vocab_size is unknown: set it in the model spec or pass vocab_size=")
        if family is None:
            family = "gpt2" if spec.arch == "gpt2" else ("qwen2" if spec.add_qkv_bias else "llama")
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
        """A ``config.json`` dict that ``transformers`` loads as this architecture."""
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
            "architectures": [_ARCHITECTURES[self.family]], "model_type": self.family,
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


def _unsupported(what: str, path: str) -> DistillError:
    return DistillError(f"{path}: {what}. Supported model types: {', '.join(SUPPORTED_FAMILIES)} "
                        f"({', '.join(_ARCHITECTURES.values())})")


def _rope(config: dict, path: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise DistillError(f"{path}/config.json: RoPE scaling {rope_type!r} is not supported by the import "
                           "(only rope_type 'default'); megatron's GPTModel needs rope_scaling settings "
                           "that the model spec does not carry yet")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def read_hf_config(path: str) -> HFArchitecture:
    """Read ``<path>/config.json`` (and nothing else) into an :class:`HFArchitecture`.

    Raises:
        DistillError: missing directory or config, unsupported model type (named,
            with the supported list), or a setting the conversion cannot honour.
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
        except json.JSONDecodeError as exc:
            raise DistillError(f"{cfg_path}: not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    family = SUPPORTED_FAMILIES.get(model_type)
    if family is None:
        archs = config.get("architectures") or []
        raise _unsupported(f"model_type {model_type!r} (architectures {archs}) is not supported", path)
    archs = config.get("architectures") or [_ARCHITECTURES[family]]
    if _ARCHITECTURES[family] not in archs:
        raise _unsupported(f"architectures {archs} has no causal-LM head {_ARCHITECTURES[family]!r}", path)
    dtype = config.get("torch_dtype") or config.get("dtype")
    if family == "gpt2":
        return _gpt2_config(config, path, dtype)
    return _llama_config(config, family, path, dtype)


def _llama_config(config: dict, family: str, path: str, dtype: Optional[str]) -> HFArchitecture:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise DistillError(f"{path}/config.json: head_dim={head_dim} x num_attention_heads={heads} != "
                           f"hidden_size={hidden}; decoupled head sizes are not supported")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise DistillError(f"{path}/config.json: hidden_act={act!r}; only 'silu' (SwiGLU) is supported for {family}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise DistillError(f"{path}/config.json: {key}=true is not supported (megatron would need biases on "
                               "every linear layer)")
    if config.get("qk_norm") or config.get("use_qk_norm"):
        raise DistillError(f"{path}/config.json: q/k normalisation is not supported")
    window = config.get("sliding_window")
    uses_window = window is not None and (family != "qwen2" or config.get("use_sliding_window"))
    if uses_window and window < config.get("max_position_embeddings", 0):
        log.warning("%s: sliding_window=%s is not emulated; megatron attends over the full causal context, "
                    "which matches Hugging Face only for sequences of at most %s tokens", path, window, window)
    return HFArchitecture(
        family=family, num_layers=config["num_hidden_layers"], hidden_size=hidden,
        ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        rotary_base=_rope(config, path), norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        add_qkv_bias=family == "qwen2", dtype=dtype, path=path,
    )


def _gpt2_config(config: dict, path: str, dtype: Optional[str]) -> HFArchitecture:
    act = config.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise DistillError(f"{path}/config.json: activation_function={act!r}; the gpt2 arch uses the tanh "
                           f"GeLU ({', '.join(_GELU_TANH)})")
    if config.get("scale_attn_by_inverse_layer_idx"):
        raise DistillError(f"{path}/config.json: scale_attn_by_inverse_layer_idx=true is not supported")
    if config.get("scale_attn_weights") is False:
        raise DistillError(f"{path}/config.json: scale_attn_weights=false is not supported")
    hidden = config["n_embd"]
    prefix = "transformer."
    return HFArchitecture(
        family="gpt2", num_layers=config["n_layer"], hidden_size=hidden,
        ffn_hidden_size=config.get("n_inner") or 4 * hidden, num_attention_heads=config["n_head"],
        num_query_groups=config["n_head"], vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("n_positions", 1024),
        norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)), add_qkv_bias=True,
        dtype=dtype, prefix=prefix, path=path,
    )


def resolve_model_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its shape keys filled from its checkpoint's config files.

    ``hf:`` reads ``config.json``; ``megatron:`` reads the ``distill_model.json``
    written by :func:`distill_plugins.models.megatron_ckpt.save_megatron_checkpoint`.
    Other specs are returned unchanged. Reads no weights.
    """
    if spec.hf:
        return read_hf_config(spec.hf).to_model_spec(spec)
    if spec.megatron:
        from distill_plugins.models.megatron_ckpt import read_checkpoint_spec

        saved = read_checkpoint_spec(spec.megatron)
        return dataclasses.replace(saved, hf=None, checkpoint=None, megatron=spec.megatron)
    return spec


# ---------------------------------------------------------------------------
# Mapping (pure index arithmetic)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A contiguous run of ``length`` entries along a megatron tensor's partition dimension.

    Attributes:
        length: entries along the megatron partition dimension.
        hf_name: HF tensor it comes from; ``None`` for zero padding.
        axis: axis of the HF tensor that runs along the megatron partition dimension.
        offset: start of the run on that axis.
        transpose: the HF tensor is stored transposed (GPT-2 ``Conv1D``: ``[in, out]``).
    """

    length: int
    hf_name: Optional[str] = None
    axis: int = 0
    offset: int = 0
    transpose: bool = False


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_tensor_shapes(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a checkpoint of ``arch`` must hold (``lm_head`` only when untied)."""
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if arch.family == "gpt2":
        p = arch.prefix
        shapes.update({f"{p}wte.weight": (v, h), f"{p}wpe.weight": (arch.max_position_embeddings, h),
                       f"{p}ln_f.weight": (h,), f"{p}ln_f.bias": (h,)})
        for i in range(arch.num_layers):
            b = f"{p}h.{i}."
            shapes.update({
                b + "ln_1.weight": (h,), b + "ln_1.bias": (h,), b + "ln_2.weight": (h,), b + "ln_2.bias": (h,),
                b + "attn.c_attn.weight": (h, 3 * h), b + "attn.c_attn.bias": (3 * h,),
                b + "attn.c_proj.weight": (h, h), b + "attn.c_proj.bias": (h,),
                b + "mlp.c_fc.weight": (h, f), b + "mlp.c_fc.bias": (f,),
                b + "mlp.c_proj.weight": (f, h), b + "mlp.c_proj.bias": (h,),
            })
    else:
        shapes.update({"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)})
        for i in range(arch.num_layers):
            b = f"model.layers.{i}."
            shapes.update({
                b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,),
                b + "self_attn.q_proj.weight": (q, h), b + "self_attn.k_proj.weight": (kv, h),
                b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.o_proj.weight": (h, q),
                b + "mlp.gate_proj.weight": (f, h), b + "mlp.up_proj.weight": (f, h),
                b + "mlp.down_proj.weight": (h, f),
            })
            if arch.add_qkv_bias:
                shapes.update({b + "self_attn.q_proj.bias": (q,), b + "self_attn.k_proj.bias": (kv,),
                               b + "self_attn.v_proj.bias": (kv,)})
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _qkv_pieces(arch: HFArchitecture, q: str, k: str, v: str, *, axis: int = 0, transpose: bool = False,
                k_offset: int = 0, v_offset: int = 0) -> list[Piece]:
    """Megatron's per-group interleaving ``[q heads of g; k of g; v of g]`` over HF q/k/v runs."""
    d = arch.head_dim
    per_group = arch.num_attention_heads // arch.num_query_groups
    out = []
    for g in range(arch.num_query_groups):
        out += [Piece(per_group * d, q, axis, g * per_group * d, transpose),
                Piece(d, k, axis, k_offset + g * d, transpose),
                Piece(d, v, axis, v_offset + g * d, transpose)]
    return out


def tensor_pieces(full_name: str, arch: HFArchitecture, padded_vocab_size: int) -> list[Piece]:
    """The :class:`Piece` s that make up full megatron tensor ``full_name`` along its partition dim.

    The partition dimension is megatron's: 0 for column-parallel weights and
    biases, embeddings and the output layer; 1 for row-parallel weights
    (``linear_proj``, ``linear_fc2``); 0 (the whole tensor) for replicated ones.

    Raises:
        DistillError: for a name the family does not have.
    """
    h, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    vocab = lambda name: [Piece(v, name)] + ([Piece(padded_vocab_size - v)] if padded_vocab_size > v else [])
    gpt2 = arch.family == "gpt2"
    p = arch.prefix
    if full_name == "embedding.word_embeddings.weight":
        return vocab(f"{p}wte.weight" if gpt2 else "model.embed_tokens.weight")
    if full_name == "output_layer.weight":
        return vocab("lm_head.weight")
    if full_name == "embedding.position_embeddings.weight" and gpt2:
        return [Piece(arch.max_position_embeddings, f"{p}wpe.weight")]
    if full_name.startswith("decoder.final_layernorm."):
        leaf = full_name.rsplit(".", 1)[1]
        return [Piece(h, f"{p}ln_f.{leaf}" if gpt2 else f"model.norm.{leaf}")]
    m = _LAYER.match(full_name)
    if m is not None:
        i, rest = int(m.group(1)), m.group(2)
        pieces = (_gpt2_layer if gpt2 else _llama_layer)(arch, i, rest)
        if pieces is not None:
            return pieces
    raise DistillError(f"{arch.family} has no counterpart for megatron parameter {full_name!r}")


def _llama_layer(arch: HFArchitecture, i: int, rest: str) -> Optional[list[Piece]]:
    h, f = arch.hidden_size, arch.ffn_hidden_size
    b = f"model.layers.{i}."
    a = b + "self_attn."
    if rest == "input_layernorm.weight":
        return [Piece(h, b + "input_layernorm.weight")]
    if rest == "pre_mlp_layernorm.weight":
        return [Piece(h, b + "post_attention_layernorm.weight")]
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        leaf = rest.rsplit(".", 1)[1]
        if leaf == "bias" and not arch.add_qkv_bias:
            return None
        return _qkv_pieces(arch, f"{a}q_proj.{leaf}", f"{a}k_proj.{leaf}", f"{a}v_proj.{leaf}")
    if rest == "self_attention.linear_proj.weight":
        return [Piece(arch.num_attention_heads * arch.head_dim, a + "o_proj.weight", axis=1)]
    if rest == "mlp.linear_fc1.weight":
        return [Piece(f, b + "mlp.gate_proj.weight"), Piece(f, b + "mlp.up_proj.weight")]
    if rest == "mlp.linear_fc2.weight":
        return [Piece(f, b + "mlp.down_proj.weight", axis=1)]
    return None


def _gpt2_layer(arch: HFArchitecture, i: int, rest: str) -> Optional[list[Piece]]:
    h, f = arch.hidden_size, arch.ffn_hidden_size
    b = f"{arch.prefix}h.{i}."
    simple = {
        "input_layernorm.weight": (h, "ln_1.weight"), "input_layernorm.bias": (h, "ln_1.bias"),
        "pre_mlp_layernorm.weight": (h, "ln_2.weight"), "pre_mlp_layernorm.bias": (h, "ln_2.bias"),
        "self_attention.linear_proj.bias": (h, "attn.c_proj.bias"),
        "mlp.linear_fc1.bias": (f, "mlp.c_fc.bias"), "mlp.linear_fc2.bias": (h, "mlp.c_proj.bias"),
    }
    if rest in simple:
        n, name = simple[rest]
        return [Piece(n, b + name)]
    qkv = b + "attn.c_attn."
    if rest == "self_attention.linear_qkv.weight":  # Conv1D [h, 3h]: q|k|v are column blocks
        return _qkv_pieces(arch, qkv + "weight", qkv + "weight", qkv + "weight", axis=1, transpose=True,
                           k_offset=h, v_offset=2 * h)
    if rest == "self_attention.linear_qkv.bias":
        return _qkv_pieces(arch, qkv + "bias", qkv + "bias", qkv + "bias", k_offset=h, v_offset=2 * h)
    # Conv1D weights are [in, out]; megatron's are [out, in].
    if rest == "self_attention.linear_proj.weight":  # row-parallel: partition dim 1 = HF axis 0
        return [Piece(h, b + "attn.c_proj.weight", axis=0, transpose=True)]
    if rest == "mlp.linear_fc1.weight":  # column-parallel: partition dim 0 = HF axis 1
        return [Piece(f, b + "mlp.c_fc.weight", axis=1, transpose=True)]
    if rest == "mlp.linear_fc2.weight":
        return [Piece(f, b + "mlp.c_proj.weight", axis=0, transpose=True)]
    return None


_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                    "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def partition_dim(name: str) -> Optional[int]:
    """Megatron's TP partition dimension of parameter ``name`` (local-spec name); ``None`` if replicated.

    Decided by name rather than by the ``partition_dim`` attribute, which megatron
    only sets when it initialises the weights.
    """
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def ensure_tp_attributes(model: torch.nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel``/``partition_dim``/``partition_stride`` where missing.

    megatron sets them in its weight initialiser, which ``perform_initialization=False``
    (used when weights are loaded anyway) skips; gradient clipping, the optimizer and
    :func:`distill_plugins.models.build.full_state_dict_shapes` read them.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from distill_plugins.models.build import canonical_name

    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    for name, param in model.named_parameters():
        dim = partition_dim(canonical_name(name))
        if dim is not None and not hasattr(param, "partition_dim"):
            set_tensor_model_parallel_attributes(param, True, dim, 2 if gated and "linear_fc1" in name else 1)


def local_ranges(full_len: int, tp_rank: int, tp_size: int, *, gated: bool = False) -> list[tuple[int, int]]:
    """Ranges of the full partition dimension this TP rank holds.

    One contiguous block ``[r*n, (r+1)*n)``; a gated ``fc1`` (``[gate; up]``)
    holds its block of each half, in that order, as megatron shards them.
    """
    if gated:
        half = full_len // 2
        n = half // tp_size
        return [(tp_rank * n, (tp_rank + 1) * n), (half + tp_rank * n, half + (tp_rank + 1) * n)]
    n = full_len // tp_size
    return [(tp_rank * n, (tp_rank + 1) * n)]


def read_local(pieces: list[Piece], ranges: Iterable[tuple[int, int]], dim: int, other_shape: tuple[int, ...],
               read: Callable[[Piece, int, int], torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Assemble the entries ``ranges`` of a full tensor along ``dim`` from ``pieces``.

    Args:
        pieces: the full tensor's pieces along ``dim`` (:func:`tensor_pieces`).
        ranges: ``[start, stop)`` ranges of the full dimension, concatenated in order.
        dim: the megatron partition dimension.
        other_shape: the tensor's shape with ``dim`` removed (for zero padding).
        read: ``read(piece, start, stop)`` returns entries ``[start, stop)`` of the
            piece, already in megatron orientation (``[n, ...]`` along ``dim``).
        dtype: dtype of zero padding.
    """
    out = []
    for a, b in ranges:
        pos = 0
        for piece in pieces:
            lo, hi = max(a, pos), min(b, pos + piece.length)
            if lo < hi:
                if piece.hf_name is None:
                    shape = list(other_shape)
                    shape.insert(dim, hi - lo)
                    out.append(torch.zeros(shape, dtype=dtype))
                else:
                    out.append(read(piece, lo - pos, hi - pos))
            pos += piece.length
    if len(out) == 1:
        return out[0]
    return torch.cat([t.to(dtype) for t in out], dim=dim)


# ---------------------------------------------------------------------------
# Reading safetensors slices
# ---------------------------------------------------------------------------


class HFCheckpoint:
    """The safetensors files of an HF directory, read slice by slice.

    Handles ``model.safetensors`` and sharded ``model.safetensors.index.json``
    layouts. Construction reads only the index and the file headers.

    Attributes:
        path: the directory.
        bytes_read: total bytes of all slices read so far.
        tensors_read: number of slice reads.
    """

    def __init__(self, path: str):
        self.path = path
        self.bytes_read = 0
        self.tensors_read = 0
        index = os.path.join(path, _SHARD_INDEX)
        single = os.path.join(path, _SINGLE_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise DistillError(f"{index} lists {len(missing)} shard file(s) that do not exist: "
                                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                                   "the download is incomplete — fetch the missing files")
        elif os.path.isfile(single):
            files, weight_map = [_SINGLE_FILE], None
        else:
            if any(n.endswith(".bin") for n in os.listdir(path)):
                raise DistillError(f"{path!r} holds PyTorch .bin weights only; convert them to safetensors "
                                   "(transformers: model.save_pretrained(dir, safe_serialization=True))")
            raise DistillError(f"{path!r} has neither {_SINGLE_FILE} nor {_SHARD_INDEX}")
        self._file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        from safetensors import safe_open

        for fname in files:
            with safe_open(os.path.join(path, fname), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    self._file_of[key] = fname
                    self._meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self._file_of:
                    raise DistillError(f"{index} maps {key!r} to {fname} but that file does not hold it")

    def names(self) -> list[str]:
        return sorted(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def read(self, name: str, axis: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Entries ``[start, stop)`` of ``name`` along ``axis`` (whole tensor when both are None)."""
        index = [slice(None)] * len(self.shape(name)) if name in self._meta else []
        if index and not (start is None and stop is None):
            index[axis] = slice(start, stop)
        return self.read_box(name, tuple(index))

    def read_box(self, name: str, index: tuple) -> torch.Tensor:
        """``name[index]`` for a tuple of slices, read with ``get_slice`` (only those bytes are copied)."""
        from safetensors import safe_open

        if name not in self._meta:
            raise DistillError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        # Opened per read and closed at once: the pages the read mapped are released before the next.
        with safe_open(os.path.join(self.path, self._file_of[name]), framework="pt") as fh:
            sl = fh.get_slice(name)
            t = sl[index] if index else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t

    def copy_into(self, target: torch.Tensor, piece: "Piece", start: int, stop: int,
                  max_chunk_bytes: int = 4 * 2**20) -> None:
        """Copy entries ``[start, stop)`` of ``piece`` into ``target`` (megatron orientation), in chunks.

        Reads HF rows in blocks of at most ``max_chunk_bytes``, so no more than one
        block is in flight, whatever the tensor's size.

        Raises:
            DistillError: the HF region and ``target`` differ in shape.
        """
        shape = self.shape(piece.hf_name)
        box = [(0, n) for n in shape]
        box[piece.axis] = (piece.offset + start, piece.offset + stop)
        view = target.t() if piece.transpose else target
        region = tuple(b - a for a, b in box)
        if tuple(view.shape) != region:
            raise DistillError(f"{self.path}: {piece.hf_name} slice has shape {region} but the megatron "
                               f"destination has shape {tuple(view.shape)}")
        if len(shape) == 1:
            view.copy_(self.read_box(piece.hf_name, (slice(*box[0]),)))
            return
        (r0, r1), (c0, c1) = box
        row_bytes = max(1, (c1 - c0) * _DTYPE_BYTES.get(self._meta[piece.hf_name][0], 4))
        step = max(1, max_chunk_bytes // row_bytes)
        for r in range(r0, r1, step):
            e = min(r + step, r1)
            view[r - r0:e - r0].copy_(self.read_box(piece.hf_name, (slice(r, e), slice(c0, c1))))

    def check_shapes(self, expected: dict[str, tuple[int, ...]], names: Optional[Iterable[str]] = None) -> None:
        """Raise if a needed tensor is absent or its shape differs from ``expected``.

        Raises:
            DistillError: naming the tensor and both shapes (or the missing tensor).
        """
        for name in (names if names is not None else expected):
            if name not in self._meta:
                raise DistillError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                                   "(config.json and the weights disagree)")
            got = self.shape(name)
            if tuple(got) != tuple(expected[name]):
                raise DistillError(f"{self.path}: tensor {name!r} has shape {tuple(got)} but config.json implies "
                                   f"{tuple(expected[name])}")


@dataclass
class ImportReport:
    """What :func:`load_hf_weights` did on this rank."""

    parameters: int = 0
    bytes_read: int = 0
    tensors_read: int = 0
    checkpoint_bytes: int = 0
    hf_tensors: list[str] = field(default_factory=list)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: str, *, arch: Optional[HFArchitecture] = None,
                    checkpoint: Optional[HFCheckpoint] = None) -> ImportReport:
    """Copy this rank's TP/PP slices of an HF checkpoint into ``model``.

    Args:
        model: a model from :func:`distill_plugins.models.build.build_gpt_model`
            whose spec matches the checkpoint (see :meth:`HFArchitecture.to_model_spec`).
        path: the HF directory.
        arch: its architecture (default: :func:`read_hf_config`).
        checkpoint: an open :class:`HFCheckpoint` (default: opened here).

    Returns:
        An :class:`ImportReport` (bytes and tensors read by this rank).

    Raises:
        DistillError: missing shard file or tensor, shape mismatch (both shapes
            named), or a model whose shape differs from the checkpoint's.
    """
    from distill_plugins.models.build import canonical_name, full_param_name, model_layout

    arch = arch or read_hf_config(path)
    ckpt = checkpoint or HFCheckpoint(path)
    if arch.family == "gpt2" and f"{arch.prefix}wte.weight" not in ckpt and "wte.weight" in ckpt:
        arch = dataclasses.replace(arch, prefix="")  # original OpenAI files: no "transformer." prefix
    inner = model
    while not hasattr(inner, "distill_layout") and hasattr(inner, "module"):
        inner = inner.module
    layout = model_layout(inner)
    spec = layout.spec
    for key, value in arch.spec_fields().items():
        if key in ("vocab_size",):
            continue
        mine = getattr(spec, key)
        if key == "ffn_hidden_size":
            from distill_plugins.models.build import ffn_hidden_size

            mine = ffn_hidden_size(spec)
        if key == "num_query_groups":
            mine = mine or spec.num_attention_heads
        if mine != value:
            raise DistillError(f"model spec {key}={mine!r} differs from {path}/config.json ({value!r}); "
                               "build the model from read_hf_config(path).to_model_spec()")
    if layout.vocab_size != arch.vocab_size:
        raise DistillError(f"model vocab_size={layout.vocab_size} differs from {path}/config.json "
                           f"vocab_size={arch.vocab_size}")
    expected = hf_tensor_shapes(arch)
    tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
    gated = bool(getattr(inner.config, "gated_linear_unit", False))
    tp_rank, tp_size = layout.tp_rank, layout.tp_size

    plans = []
    for name, param in inner.named_parameters():
        fname = full_param_name(name, layout, tied=tied)
        pieces = tensor_pieces(fname, arch, layout.padded_vocab_size)
        plans.append((name, param, fname, pieces))
    needed = sorted({p.hf_name for *_, pieces in plans for p in pieces if p.hf_name is not None})
    ckpt.check_shapes(expected, needed)

    report = ImportReport()
    before_bytes, before_n = ckpt.bytes_read, ckpt.tensors_read
    for name, param, fname, pieces in plans:
        dim = partition_dim(canonical_name(name))
        tp_param = dim is not None and tp_size > 1
        dim = dim or 0
        full_len = sum(p.length for p in pieces)
        if tp_param:
            is_fc1 = gated and canonical_name(name).endswith("mlp.linear_fc1.weight")
            ranges = local_ranges(full_len, tp_rank, tp_size, gated=is_fc1)
        else:
            ranges = [(0, full_len)]
        n_local = sum(b - a for a, b in ranges)
        if n_local != param.shape[dim]:
            raise DistillError(f"{fname}: the checkpoint gives TP rank {tp_rank} {n_local} entries along dim {dim} "
                               f"but megatron's parameter {name!r} has shape {tuple(param.shape)}")
        # Written straight into the parameter, piece by piece and in bounded chunks: no
        # intermediate copy of the local shard exists.
        dst = 0
        for a, b in ranges:
            pos = 0
            for piece in pieces:
                lo, hi = max(a, pos), min(b, pos + piece.length)
                if lo < hi:
                    target = param.narrow(dim, dst, hi - lo)
                    if piece.hf_name is None:
                        target.zero_()
                    else:
                        ckpt.copy_into(target, piece, lo - pos, hi - pos)
                    dst += hi - lo
                pos += piece.length
        report.parameters += param.numel()
    ensure_tp_attributes(inner)
    report.bytes_read = ckpt.bytes_read - before_bytes
    report.tensors_read = ckpt.tensors_read - before_n
    report.hf_tensors = needed
    report.checkpoint_bytes = checkpoint_size(path)
    log.info("imported %s: %d parameters on this rank, read %.1f MB of %.1f MB", path, report.parameters,
             report.bytes_read / 2**20, report.checkpoint_bytes / 2**20)
    return report


def checkpoint_size(path: str) -> int:
    """Bytes of all ``*.safetensors`` files in ``path``."""
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def import_hf_model(path: str, parallel, *, base: Optional[ModelSpec] = None, precision: str = "fp32",
                    cpu: bool = False, who: str = "teacher"):
    """Build this rank's stage of the model in ``path`` and load its slices.

    megatron's ``parallel_state`` must be initialised with ``parallel``'s sizes.

    Returns:
        ``(model, report)``: the GPTModel (``model.distill_layout`` set) and the
        :class:`ImportReport`.
    """
    from distill_plugins.models.build import build_gpt_model

    arch = read_hf_config(path)
    spec = arch.to_model_spec(base)
    model = build_gpt_model(spec, parallel, vocab_size=arch.vocab_size, precision=precision, cpu=cpu, who=who,
                            config_overrides={"perform_initialization": False})
    report = load_hf_weights(model, path, arch=arch)
    return model, report
