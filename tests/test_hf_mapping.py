"""HF <-> megatron mapping without megatron processes: index maths, config reading, errors, model_info."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from distill_plugins.errors import DistillError  # noqa: E402
from distill_plugins.models.hf_export import megatron_to_hf  # noqa: E402
from distill_plugins.models.hf_config import SUPPORTED_FAMILIES, HFArchitecture, read_hf_config  # noqa: E402
from distill_plugins.models.hf_import import HFCheckpoint, read_local  # noqa: E402
from distill_plugins.models.hf_mapping import hf_tensor_shapes, local_ranges, partition_dim, tensor_pieces  # noqa: E402
from distill_plugins.models.resolve import resolve_model_spec  # noqa: E402
from distill_plugins.models.model_info import count_parameters, describe_model, vocab_mismatch_error  # noqa: E402
from distill_plugins.recipe.schema import ModelSpec, ParallelSpec  # noqa: E402


def _save_llama(path, **overrides):
    cfg = dict(vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    _save_llama(path)
    return path


def _arch(family="llama", **kw):
    base = dict(family=family, num_layers=1, hidden_size=16, ffn_hidden_size=24, num_attention_heads=4,
                num_query_groups=2, vocab_size=10, max_position_embeddings=8, add_qkv_bias=family in ("qwen2", "gpt2"),
                prefix="transformer." if family == "gpt2" else "")
    base.update(kw)
    return HFArchitecture(**base)


# ---------------------------------------------------------------------------
# Index maths
# ---------------------------------------------------------------------------


def test_qkv_pieces_interleave_per_query_group():
    arch = _arch()  # 4 heads, 2 groups, head_dim 4
    d = 4
    q = torch.arange(16 * 16, dtype=torch.float32).view(16, 16)
    k = -torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
    v = 1000 + torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
    src = {"q": q, "k": k, "v": v}
    pieces = tensor_pieces("decoder.layers.0.self_attention.linear_qkv.weight", arch, 10)
    pieces = [p.__class__(p.length, p.hf_name.split(".")[-2][0], p.axis, p.offset, p.transpose) for p in pieces]
    full = read_local(pieces, [(0, 32)], 0, (16,), lambda p, a, b: src[p.hf_name][p.offset + a:p.offset + b])
    expected = torch.cat([q[0:8], k[0:4], v[0:4], q[8:16], k[4:8], v[4:8]])
    assert torch.equal(full, expected)
    # a TP rank's rows are a contiguous block of the interleaved layout
    rank1 = read_local(pieces, local_ranges(32, 1, 2), 0, (16,), lambda p, a, b: src[p.hf_name][p.offset + a:p.offset + b])
    assert torch.equal(rank1, expected[16:])
    assert d == arch.head_dim


def test_local_ranges_gated_takes_each_half():
    assert local_ranges(8, 0, 2) == [(0, 4)]
    assert local_ranges(8, 1, 2, gated=True) == [(2, 4), (6, 8)]


def test_partition_dims():
    assert partition_dim("decoder.layers.3.self_attention.linear_qkv.bias") == 0
    assert partition_dim("decoder.layers.3.mlp.linear_fc2.weight") == 1
    assert partition_dim("decoder.layers.3.mlp.linear_fc2.bias") is None
    assert partition_dim("output_layer.weight") == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_megatron_to_hf_round_trip(family):
    """HF tensors -> full megatron tensors (read_local) -> HF tensors is the identity."""
    arch = _arch(family, num_query_groups=4 if family == "gpt2" else 2, ffn_hidden_size=64 if family == "gpt2" else 24)
    shapes = hf_tensor_shapes(arch)
    hf = {n: torch.randn(s) for n, s in shapes.items()}
    names = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"]
    layer = ["input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
             "self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if family == "gpt2":
        names += ["embedding.position_embeddings.weight", "decoder.final_layernorm.bias"]
        layer += ["input_layernorm.bias", "pre_mlp_layernorm.bias", "self_attention.linear_qkv.bias",
                  "self_attention.linear_proj.bias", "mlp.linear_fc1.bias", "mlp.linear_fc2.bias"]
    elif family == "qwen2":
        layer += ["self_attention.linear_qkv.bias"]
    names += [f"decoder.layers.0.{n}" for n in layer]
    padded = 16
    full = {}
    for name in names:
        pieces = tensor_pieces(name, arch, padded)
        dim = partition_dim(name) or 0
        any_hf = next(p for p in pieces if p.hf_name)
        ref = hf[any_hf.hf_name]
        other = tuple(s for i, s in enumerate(ref.t().shape if any_hf.transpose else ref.shape) if i != dim)

        def read(p, a, b):
            t = hf[p.hf_name].narrow(p.axis, p.offset + a, b - a)
            return t.t() if p.transpose else t

        full[name] = read_local(pieces, [(0, sum(p.length for p in pieces))], dim, other, read)
    assert full["embedding.word_embeddings.weight"].shape[0] == padded
    assert torch.count_nonzero(full["embedding.word_embeddings.weight"][10:]) == 0
    back = megatron_to_hf(full, arch, complete=True)
    assert set(back) == set(hf)
    for n in hf:
        assert torch.equal(back[n], hf[n]), n


def test_megatron_to_hf_rejects_wrong_shape():
    arch = _arch()
    with pytest.raises(DistillError, match="linear_fc2.weight"):
        megatron_to_hf({"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(16, 20)}, arch)


# ---------------------------------------------------------------------------
# Config and errors
# ---------------------------------------------------------------------------


def test_read_config_and_spec(llama_dir):
    arch = read_hf_config(llama_dir)
    assert (arch.family, arch.num_query_groups, arch.ffn_hidden_size, arch.vocab_size) == ("llama", 2, 48, 90)
    spec = resolve_model_spec(ModelSpec(hf=llama_dir))
    assert spec.hf == llama_dir and spec.num_layers == 2 and spec.ffn_hidden_size == 48 and not spec.tie_embeddings
    assert spec.norm_epsilon == pytest.approx(1e-6)


def test_unsupported_architecture_named_with_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(DistillError) as err:
        read_hf_config(str(tmp_path))
    msg = str(err.value)
    assert "phi3" in msg and all(f in msg for f in SUPPORTED_FAMILIES)


def test_rope_scaling_rejected(tmp_path):
    _save_llama(str(tmp_path), rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                              "rope_theta": 10000.0})
    with pytest.raises(DistillError, match="llama3"):
        read_hf_config(str(tmp_path))


def test_missing_shard_file(tmp_path):
    _save_llama(str(tmp_path))
    shards = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(tmp_path / shards[1])
    with pytest.raises(DistillError, match=shards[1]):
        HFCheckpoint(str(tmp_path))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _save_llama(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ckpt = HFCheckpoint(str(tmp_path))
    with pytest.raises(DistillError) as err:
        ckpt.check_shapes(hf_tensor_shapes(read_hf_config(str(tmp_path))))
    msg = str(err.value)
    assert "mlp" in msg and "48" in msg and "40" in msg


def test_slices_are_read_not_whole_tensors(llama_dir):
    ckpt = HFCheckpoint(llama_dir)
    t = ckpt.read("model.layers.0.self_attn.o_proj.weight", axis=1, start=8, stop=16)
    assert t.shape == (32, 8)
    assert ckpt.bytes_read == 32 * 8 * 4


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(DistillError, match="safetensors"):
        HFCheckpoint(str(tmp_path))


# ---------------------------------------------------------------------------
# model_info
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_parameter_count_matches_transformers(tmp_path, family):
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=77, n_embd=16, n_layer=2, n_head=2,
                                                                     n_positions=20))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=77, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=77, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1))
    model.config.save_pretrained(str(tmp_path))  # config only: describe_model reads nothing else
    info = describe_model(ModelSpec(hf=str(tmp_path)), ParallelSpec(tensor=2), role="teacher")
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.family == family and info.padded_vocab_size == 256 and info.vocab_size == 77
    assert "padded 256" in info.summary()


def test_count_parameters_inline_spec():
    spec = ModelSpec(arch="llama", num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2)
    # embed 10*8 + qkv 8*24 + proj 8*8 + mlp 3*8*16 + 2 norms 16 + final norm 8 + output 10*8
    assert count_parameters(spec, 10) == 80 + 192 + 64 + 384 + 16 + 8 + 80


def test_vocab_mismatch_error():
    spec = ModelSpec()
    s = describe_model(spec, ParallelSpec(), role="student", vocab_size=100)
    t = describe_model(spec, ParallelSpec(), role="teacher", vocab_size=120)
    assert "vocab_size=100" in vocab_mismatch_error(s, t, "identity")
    assert vocab_mismatch_error(s, t, "some_cross_tokenizer_aligner") is None
    assert vocab_mismatch_error(s, s, "identity") is None
