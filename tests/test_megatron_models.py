"""Model building helpers and the CPU layer (distill_plugins.models.build / .cpu)."""

from __future__ import annotations

import pytest
import torch

from distill_plugins.errors import RecipeError
from distill_plugins.models.build import padded_vocab_size, pipeline_layer_split
from distill_plugins.testing.distributed import run_distributed


def test_padded_vocab_size():
    assert padded_vocab_size(250, 16, 1) == 256
    assert padded_vocab_size(250, 128, 2) == 256
    assert padded_vocab_size(257, 128, 2) == 512
    assert padded_vocab_size(32000, 128, 8) == 32768


def test_pipeline_layer_split():
    assert pipeline_layer_split(4, 2) == [2, 2]
    assert pipeline_layer_split(5, 2) == [3, 2]
    assert pipeline_layer_split(7, 3) == [3, 2, 2]
    with pytest.raises(RecipeError, match="at least one layer"):
        pipeline_layer_split(1, 2, who="teacher")


def test_cpu_mode_patches_and_restores():
    from distill_plugins.engine.cpu import cpu_mode, is_cpu_mode

    original = torch.cuda.current_device
    with cpu_mode():
        assert is_cpu_mode()
        x = torch.empty(3, device="cuda")
        assert x.device.type == "cpu"
        assert x.cuda() is x
        assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        assert torch.cuda.current_device() == 0
        state = torch.cuda.get_rng_state()
        a = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(torch.rand(3), a)
    assert not is_cpu_mode()
    assert torch.cuda.current_device is original
    assert torch.ones(1).type() == "torch.FloatTensor"


def body(rank: int, world: int) -> dict:
    from distill_plugins.engine.cpu import enable_cpu_mode

    enable_cpu_mode()
    from distill_plugins.errors import RecipeError as RE
    from distill_plugins.models import build as models
    from distill_plugins.engine import process_groups as dps
    from distill_plugins.recipe.schema import ModelSpec, ParallelSpec

    par = ParallelSpec(tensor=2, make_vocab_size_divisible_by=8)
    dps.initialize(par, cpu=True)
    out = {}
    for arch, groups in (("llama", 2), ("gpt2", None)):
        spec = ModelSpec(arch=arch, num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
                         vocab_size=100, max_position_embeddings=16)
        m = models.build_gpt_model(spec, par, cpu=True)
        shapes = models.full_state_dict_shapes(m)
        g = torch.Generator().manual_seed(0)
        full = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
        models.load_full_state_dict(m, full)
        back = models.gather_full_tensors(m)
        out[arch] = {"roundtrip": all(torch.equal(full[k], back[k]) for k in full),
                     "padded": models.model_layout(m).padded_vocab_size,
                     "vocab_rows": shapes["embedding.word_embeddings.weight"][0]}
    try:
        models.build_gpt_model(ModelSpec(num_layers=2, hidden_size=36, num_attention_heads=6, num_query_groups=3,
                                         vocab_size=100), par, cpu=True, who="student")
        out["heads_error"] = None
    except RE as exc:
        out["heads_error"] = str(exc)
    # uneven pipeline split: 3 layers on PP=2 -> 2 + 1, global layer numbering
    dps.destroy()
    pp2 = ParallelSpec(pipeline=2, make_vocab_size_divisible_by=8)
    dps.initialize(pp2, cpu=True)
    m = models.build_gpt_model(ModelSpec(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=100),
                               pp2, cpu=True)
    out["uneven"] = (len(m.decoder.layers), sorted({k.split(".")[2] for k in models.full_state_dict_shapes(m)
                                                    if k.startswith("decoder.layers.")}))
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(body, 2)


def test_full_weights_roundtrip_under_tp2(tp2):
    for r in tp2:
        for arch in ("llama", "gpt2"):
            assert r[arch]["roundtrip"], arch
            assert r[arch]["padded"] == 112
            assert r[arch]["vocab_rows"] == 100


def test_heads_not_divisible_by_tp(tp2):
    assert "student.num_query_groups=3 is not divisible by parallel.tensor=2" in tp2[0]["heads_error"]


def test_uneven_pipeline_split(tp2):
    assert tp2[0]["uneven"] == (2, ["0", "1"])
    assert tp2[1]["uneven"] == (1, ["2"])
