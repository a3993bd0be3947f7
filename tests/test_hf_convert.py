"""HF <-> megatron conversion end to end: tiny random Llama, Qwen2, Mistral and GPT-2 models.

One 2-process gloo group runs every layout in turn (TP=1 with DP=2, TP=2, PP=2):
each family is imported from a locally saved ``transformers`` model and its
logits are compared with the HF logits; exports are reloaded with
``transformers``; a megatron dist checkpoint saved at TP=2 is loaded at PP=2 and
TP=1 with a different vocabulary padding. No download: models are built from
config classes with random weights.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from distill_plugins.testing.distributed import run_distributed  # noqa: E402

VOCAB = 250
SEQ = 12
FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
LAYOUTS = ((1, 1), (2, 1), (1, 2))
TOL = 1e-4


def _make_hf_model(family: str, path: str) -> None:
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
        extra = {"tie_word_embeddings": family == "qwen2", "rope_theta": 5000.0 if family == "mistral" else 10000.0}
        if family == "mistral":
            extra["sliding_window"] = None
        cfg = cls[0](hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, **extra, **common)
        model = cls[1](cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "weight" in name else 0.0))
    # Llama and GPT-2 sharded with an index file; Qwen2 and Mistral as one file.
    shard = "20KB" if family in ("llama", "gpt2") else "1GB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)


def _hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------
# Rank body (module level: spawned processes import it)
# ---------------------------------------------------------------------------


def _forward(model, ids):
    """Full-vocab logits [b, s, V_padded] on the last stage's ranks; None on other stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() > 1:
            group = ps.get_pipeline_model_parallel_group()
            stage = ps.get_pipeline_model_parallel_rank()
            if not ps.is_pipeline_first_stage():
                x = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
                dist.recv(x, src=dist.get_global_rank(group, stage - 1))
                model.set_input_tensor(x)
            out = model(ids, pos, None)
            if not ps.is_pipeline_last_stage():
                dist.send(out.contiguous(), dst=dist.get_global_rank(group, stage + 1))
                return None
        else:
            out = model(ids, pos, None)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def convert_body(rank, world_size, root, ids):
    import megatron.core.models.gpt  # noqa: F401  (import megatron before the CPU layer patches torch.cuda)

    from distill_plugins.engine import process_groups as dps
    from distill_plugins.engine.cpu import enable_cpu_mode
    from distill_plugins.models.hf_export import export_hf, export_megatron_checkpoint
    from distill_plugins.models.checkpoint_meta import read_checkpoint_spec
    from distill_plugins.models.hf_config import read_hf_config
    from distill_plugins.models.hf_import import import_hf_model
    from distill_plugins.models.megatron_ckpt import load_megatron_checkpoint, save_megatron_checkpoint
    from distill_plugins.models.build import build_gpt_model
    from distill_plugins.recipe.schema import ParallelSpec

    enable_cpu_mode()
    out = {"logits": {}, "bytes": {}, "ckpt_logits": {}}
    mckpt = os.path.join(root, "megatron_llama")
    for tp, pp in LAYOUTS:
        parallel = ParallelSpec(tensor=tp, pipeline=pp)
        dps.initialize(parallel, cpu=True, seed=7)
        for family in FAMILIES:
            if family == "mistral" and (tp, pp) != (2, 1):
                continue  # same code path as llama; one layout (GQA at TP=2, another RoPE base) suffices
            path = os.path.join(root, family)
            model, report = import_hf_model(path, parallel, cpu=True)
            model.eval()
            logits = _forward(model, ids)
            if logits is not None:
                out["logits"][(family, tp, pp)] = logits
            out["bytes"][(family, tp, pp, rank)] = (report.bytes_read, report.checkpoint_bytes)
            if (tp, pp) == (2, 1) or ((tp, pp) == (1, 2) and family != "mistral"):
                export_hf(model, os.path.join(root, f"export_{family}_tp{tp}_pp{pp}"), tokenizer_dir=None,
                          family=read_hf_config(path).family)
            del model
        # megatron checkpoint: saved at TP=2 with padding divisor 100 (400 rows), loaded at
        # PP=2 / TP=1 with 300 rows: the vocabulary tensors take the whole-tensor path.
        odd = ParallelSpec(tensor=tp, pipeline=pp, make_vocab_size_divisible_by=100)
        if (tp, pp) == (2, 1):
            model, _ = import_hf_model(os.path.join(root, "llama"), odd, cpu=True)
            save_megatron_checkpoint(model, mckpt, make_vocab_size_divisible_by=100, family="llama")
            del model
        dps.destroy()
    # Load the TP=2 checkpoint under PP=2 and under TP=1 (DP=2).
    for tp, pp in ((1, 2), (1, 1)):
        odd = ParallelSpec(tensor=tp, pipeline=pp, make_vocab_size_divisible_by=100)
        dps.initialize(odd, cpu=True, seed=7)
        spec = read_checkpoint_spec(mckpt)
        model = build_gpt_model(spec, odd, cpu=True)
        load_megatron_checkpoint(model, mckpt)
        model.eval()
        logits = _forward(model, ids)
        if logits is not None:
            out["ckpt_logits"][(tp, pp)] = logits
        if (tp, pp) == (1, 1):
            export_megatron_checkpoint(mckpt, os.path.join(root, "export_from_megatron"))
        dps.destroy()
    return out


# ---------------------------------------------------------------------------
# Fixture and tests
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_convert"))
    torch.manual_seed(0)
    for family in FAMILIES:
        _make_hf_model(family, os.path.join(root, family))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref = {family: _hf_logits(os.path.join(root, family), ids) for family in FAMILIES}
    results = run_distributed(convert_body, world_size=2, args=(root, ids))
    merged = {"logits": {}, "bytes": {}, "ckpt_logits": {}}
    for r in results:
        for key in merged:
            merged[key].update(r[key])
    return root, ids, ref, merged


CASES = [(f, layout) for f in FAMILIES for layout in LAYOUTS if f != "mistral" or layout == (2, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", CASES, ids=lambda v: v if isinstance(v, str) else f"tp{v[0]}pp{v[1]}")
def test_import_logits_match_hf(converted, family, layout):
    _, _, ref, merged = converted
    got = merged["logits"][(family, *layout)]
    want = ref[family]
    assert got.shape[:2] == want.shape[:2] and got.shape[-1] >= VOCAB
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=0, atol=TOL)
    assert torch.count_nonzero(got[..., VOCAB:]) == 0, "padded vocabulary columns must be zero"


EXPORTS = [(f, layout) for f in FAMILIES for layout in ((2, 1), (1, 2)) if f != "mistral" or layout == (2, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", EXPORTS, ids=lambda v: v if isinstance(v, str) else f"tp{v[0]}pp{v[1]}")
def test_export_reloads_in_transformers(converted, family, layout):
    root, ids, ref, _ = converted
    out = os.path.join(root, f"export_{family}_tp{layout[0]}_pp{layout[1]}")
    assert os.path.isfile(os.path.join(out, "config.json"))
    if layout[1] > 1:
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    original = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(root, family))
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back) is type(original)
    orig = original.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, orig[name]), name
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, ref[family])


@pytest.mark.slow
def test_tp2_import_reads_about_half(converted):
    """Each TP=2 rank reads < 0.6 x the checkpoint's tensor bytes (only its slices)."""
    _, _, _, merged = converted
    for family in FAMILIES:
        for rank in (0, 1):
            read, total = merged["bytes"][(family, 2, 1, rank)]
            assert read < 0.6 * total, (family, rank, read, total)
        if family == "mistral":
            continue
        # PP=2: each stage reads only its layers (plus embedding or output layer).
        for rank in (0, 1):
            read, total = merged["bytes"][(family, 1, 2, rank)]
            assert read < 0.75 * total, (family, rank, read, total)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 2), (1, 1)], ids=lambda t: f"tp{t[0]}pp{t[1]}")
def test_megatron_checkpoint_loads_with_other_layout(converted, layout):
    _, _, ref, merged = converted
    got = merged["ckpt_logits"][layout]
    assert got.shape[-1] == 300  # padded for divisor 100 at TP=1 (saved with 400 rows at TP=2)
    torch.testing.assert_close(got[..., :VOCAB], ref["llama"], rtol=0, atol=TOL)
    assert torch.count_nonzero(got[..., VOCAB:]) == 0


@pytest.mark.slow
def test_export_of_megatron_checkpoint(converted):
    root, ids, ref, _ = converted
    back = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(root, "export_from_megatron")).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref["llama"])
