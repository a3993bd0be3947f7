"""``distill plan``: parameter counts, hand-computed memory for two documented configurations,
refusal of layouts that do not divide, suggestions when over memory, config.json shapes.

The two configurations and their arithmetic are also written out in docs/planner.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill_plugins.cli import main
from distill_plugins.cli.main import build_parser
from distill_plugins.cli.plan import plan_recipe
from distill_plugins.errors import RecipeError
from distill_plugins.manager import NO_ENTRY_POINTS_ENV
from distill_plugins.plan import GIB, ModelShape, activation_bytes_per_layer, padded_vocab_size
from distill_plugins.shapes import count_parameters

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "recipes/cluster"
QWEN_CSD = CLUSTER / "qwen2.5-7b-to-qwen2.5-1.5b_csd_tp1pp1-2x8.yaml"
LLAMA_ADAKD = CLUSTER / "llama-3.1-8b-to-llama-3.2-1b_fkl-adakd_tp1pp1-2x8.yaml"
LLAMA_PRETRAIN = CLUSTER / "llama-3.1-8b-to-llama-3.2-1b_fkl-pretrain_tp1pp1-4x8.yaml"
#: the figures below are the materialised loss logits; the fused output layer's are in tests/test_fused_engine.py
MATERIALISED = "loss.fused_output_layer=false"


@pytest.fixture(autouse=True)
def no_entry_points(monkeypatch):
    monkeypatch.setenv(NO_ENTRY_POINTS_ENV, "1")


def _shape(**kw) -> ModelShape:
    base = dict(role="student", arch="llama", num_layers=1, hidden_size=64, ffn_hidden_size=256,
                num_attention_heads=4, num_query_groups=4, vocab_size=100, max_position_embeddings=128,
                tie_embeddings=False, add_qkv_bias=False)
    base.update(kw)
    return ModelShape(**base)


def test_padded_vocab():
    assert padded_vocab_size(151665, 128, 1) == 151680  # ceil(151665/128) = 1185
    assert padded_vocab_size(128256, 128, 2) == 128256  # 128256 = 501 * 256
    assert padded_vocab_size(50257, 128, 8) == 51200  # ceil(50257/1024) = 50


def test_parameter_counts_match_published_models():
    llama8b = _shape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                     num_query_groups=8, vocab_size=128256)
    assert count_parameters(llama8b, llama8b.arch) == 8_030_261_248  # Llama-3.1-8B
    qwen15b = _shape(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                     num_query_groups=2, vocab_size=151936, tie_embeddings=True, add_qkv_bias=True)
    assert count_parameters(qwen15b, qwen15b.arch) == 1_543_714_304  # Qwen2.5-1.5B ("1.54B")
    gpt2 = _shape(arch="gpt2", num_layers=12, hidden_size=768, ffn_hidden_size=3072, num_attention_heads=12,
                  num_query_groups=12, vocab_size=50257, max_position_embeddings=1024, tie_embeddings=True)
    assert count_parameters(gpt2, gpt2.arch) == 124_439_808  # GPT-2 small


def test_activation_formula():
    # Korthikanti et al.: s b h (34 + 5 a s / h) for TP=1; flash drops the 5 a s / h term
    assert activation_bytes_per_layer(seq=8, micro_batch=1, hidden=16, heads=2, tensor=1, sequence_parallel=False,
                                      flash_attention=False) == 8 * 16 * (34 + 5 * 2 * 8 / 16)
    assert activation_bytes_per_layer(seq=8, micro_batch=1, hidden=16, heads=2, tensor=2, sequence_parallel=False,
                                      flash_attention=True) == 8 * 16 * (10 + 24 / 2)
    assert activation_bytes_per_layer(seq=8, micro_batch=1, hidden=16, heads=2, tensor=2, sequence_parallel=True,
                                      flash_attention=True, element_bytes=4) == 8 * 16 * 34 / 2 * 2


def test_memory_qwen_csd_tp1_pp1_dp16():
    """Configuration A: the shipped Qwen2.5-7B -> 1.5B CSD recipe on 2 x 8 GPUs (docs/planner.md).

    Vp = ceil(151665/128)*128 = 151680; bf16; TP=1 PP=1 DP=16; distributed optimizer; s=2048, b=2.
    Student (h=1536, a=12, g=2, f=8960, 28 layers, tied, QKV bias):
      layer = 1536*2048 + 1536^2 + 3*1536*8960 + 2048 (bias) + 2*1536 (norms) = 46,797,824
      P_s = 28*46,797,824 + 151680*1536 + 1536 = 1,543,321,088
      weights 2 P_s = 3,086,642,176; grads 4 P_s = 6,173,284,352; Adam 12 P_s / 16 = 1,157,490,816
    Teacher (h=3584, a=28, g=4, f=18944, 28 layers, untied, QKV bias):
      layer = 3584*4608 + 3584^2 + 3*3584*18944 + 4608 + 2*3584 = 233,057,792
      P_t = 28*233,057,792 + 2*151680*3584 + 3584 = 7,612,864,000 -> 2 P_t = 15,225,728,000
    Activations: s b h (10 + 24) (flash, TP=1) = 2048*2*1536*34 = 213,909,504 per layer x 28 x 1 in flight
      = 5,989,466,112
    Logits: 4096 tokens x 4 B x (3 student-sized + 1 teacher-sized) x 151680 = 9,940,500,480
    Total 41,573,111,936 B = 38.72 GiB.
    """
    report = plan_recipe(QWEN_CSD, nodes=2, gpus_per_node=8, overrides=[MATERIALISED])
    mem = report.memory
    assert mem.stages == ("all layers",)
    expected = {
        "student weights": 3_086_642_176,
        "gradients": 6_173_284_352,
        "optimizer state": 1_157_490_816,
        "teacher weights": 15_225_728_000,
        "activations": 5_989_466_112,
        "loss logits": 9_940_500_480,
    }
    assert {line.name: line.bytes[0] for line in mem.lines} == expected
    assert mem.peak == 41_573_111_936
    assert round(mem.peak / GIB, 2) == 38.72
    assert report.ok and report.suggestion is None
    assert report.padded_vocab == {"student": 151680, "teacher": 151680}
    text = report.format()
    assert "model directory models/Qwen2.5-7B-Instruct not found; using the shape keys from the recipe" in text
    assert ("mkdir -p logs && sbatch --nodes=2 --gpus-per-node=8 launch/slurm/distill.sbatch "
            f"{QWEN_CSD}") in text


def test_ce_only_recipe_has_no_teacher_memory():
    """With loss.kd_weight 0 the engine builds no teacher: no teacher weights, only student-sized logits."""
    report = plan_recipe(QWEN_CSD, nodes=2, gpus_per_node=8, overrides=["loss.kd_weight=0", "loss.ce_weight=1", MATERIALISED])
    lines = {line.name: line.bytes[0] for line in report.memory.lines}
    assert "teacher weights" not in lines
    assert lines["loss logits"] == 4096 * 4 * 3 * 151680  # the student's logits and the loss workspace only
    assert lines["student weights"] == 3_086_642_176


def test_memory_llama_tp2_pp2_sequence_parallel():
    """Configuration B: the Llama-3.1-8B -> 3.2-1B AdaKD recipe at TP=2 PP=2 with sequence parallelism.

    2 x 8 GPUs -> DP=4; 128/(2*4) = 16 microbatches; Vp = ceil(128256/256)*256 = 128256; bf16; s=2048, b=2.
    Student per GPU (h=2048, a=32, g=8, f=8192, 16 layers -> 8 per stage, tied):
      layer = (2048*3072 + 2048^2 + 3*2048*8192)/2 + 2*2048 = 30,412,800; 8 layers = 243,302,400
      embedding/output shard = 128256*2048/2 = 131,334,144 (last stage keeps its own tied copy)
      first = 374,636,544; last = 374,636,544 + 2048 (final norm) = 374,638,592
    Teacher per GPU (h=4096, a=32, g=8, f=14336, 32 layers -> 16 per stage, untied):
      layer = (4096*6144 + 4096^2 + 3*4096*14336)/2 + 2*4096 = 109,060,096; 16 layers = 1,744,961,536
      first = + 128256*4096/2 = 2,007,629,824; last = first + 4096 = 2,007,633,920
    Adam with DP=4: 12 P / 4 = 3 P.
    Activations (SP): s b h 34 / t = 2048*2*2048*34/2 = 142,606,336 per layer x 8 layers
      x min(PP - stage, 16) = 2 (first) / 1 (last) microbatches.
    Logits (last stage): 4096 x 4 B x 4 x 128256/2 = 4,202,692,608.
    """
    report = plan_recipe(LLAMA_ADAKD, nodes=2, gpus_per_node=8,
                         overrides=["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true",
                                    MATERIALISED])
    mem = report.memory
    assert mem.stages == ("first stage", "last stage")
    expected = {
        "student weights": (749_273_088, 749_277_184),
        "gradients": (1_498_546_176, 1_498_554_368),
        "optimizer state": (1_123_909_632, 1_123_915_776),
        "teacher weights": (4_015_259_648, 4_015_267_840),
        "activations": (2_281_701_376, 1_140_850_688),
        "loss logits": (0, 4_202_692_608),
    }
    assert {line.name: line.bytes for line in mem.lines} == expected
    assert mem.totals == (9_668_689_920, 12_730_558_464)
    assert round(mem.peak / GIB, 2) == 11.86
    assert report.ok


def test_refuses_heads_not_divisible_by_tp_and_names_the_numbers(capsys):
    code = main(["plan", str(QWEN_CSD), "--nodes", "2", "--gpus-per-node", "8", "parallel.tensor=8"])
    out = capsys.readouterr().out
    assert code == 2
    assert "ERROR student.num_attention_heads=12 is not divisible by parallel.tensor=8" in out
    assert "ERROR teacher.num_attention_heads=28 is not divisible by parallel.tensor=8" in out
    assert "ERROR student.num_query_groups=2 is not divisible by parallel.tensor=8" in out
    assert "suggested layout: TP=1 PP=1 DP=16" in out


def test_refuses_layers_and_batch_that_do_not_divide():
    report = plan_recipe(QWEN_CSD, nodes=2, gpus_per_node=8,
                         overrides=["parallel.pipeline=8", "training.global_batch_size=102"])
    assert not report.ok
    assert "student.num_layers=28 is not divisible by parallel.pipeline=8" in report.errors
    assert ("training.global_batch_size=102 is not divisible by training.micro_batch_size=2 x data-parallel "
            "size 2 = 4") in report.errors


def test_suggests_a_layout_when_over_memory(capsys):
    code = main(["plan", str(LLAMA_PRETRAIN), "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gb", "40", MATERIALISED])
    out = capsys.readouterr().out
    assert code == 2
    assert "WARNING: peak 46.45 GiB exceeds the 40 GiB of one GPU" in out
    assert "suggested layout: TP=2 PP=1 DP=16" in out
    assert ("launch/slurm/distill.sbatch " + str(LLAMA_PRETRAIN) + f" {MATERIALISED} parallel.tensor=2 "
            "parallel.pipeline=1") in out
    report = plan_recipe(LLAMA_PRETRAIN, nodes=4, gpus_per_node=8, gpu_memory_gb=40, overrides=[MATERIALISED])
    layout, memory = report.suggestion
    assert memory.peak <= 40 * GIB and layout.tensor * layout.pipeline * layout.data == 32
    hopeless = plan_recipe(LLAMA_PRETRAIN, nodes=4, gpus_per_node=8, gpu_memory_gb=1)
    assert hopeless.suggestion is None and "no layout" in hopeless.format() and "both divides and fits" in hopeless.format()


def test_reads_config_json_when_the_model_directory_exists(tmp_path):
    model = tmp_path / "tiny-qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 4096,
        "tie_word_embeddings": True}))
    report = plan_recipe(QWEN_CSD, nodes=2, gpus_per_node=8, overrides=[f"student.hf={model}"])
    student = report.shapes[0]
    assert (student.num_layers, student.hidden_size, student.num_query_groups, student.vocab_size) == (4, 64, 2, 300)
    assert student.add_qkv_bias and student.tie_embeddings and student.source == f"{model}/config.json"
    assert not any("student" in w for w in report.warnings)


def test_bad_input_is_reported():
    with pytest.raises(RecipeError, match="parallel.tensor"):
        plan_recipe(QWEN_CSD, nodes=1, gpus_per_node=8, overrides=["parallel.tensor=two"])
    with pytest.raises(RecipeError, match="student.vocab_size is not set"):
        plan_recipe(QWEN_CSD, nodes=1, gpus_per_node=8, overrides=["student.vocab_size=null"])


def test_every_cluster_recipe_plans_and_fits_its_named_layout():
    recipes = sorted(CLUSTER.glob("*.yaml"))
    assert len(recipes) == 5
    for path in recipes:
        layout = path.stem.rsplit("_", 1)[1]  # e.g. tp1pp1-2x8, or t24tp8pp1-tp1pp1-4x8 (teacher on its own ranks)
        *_, parallel, shape = layout.split("-")
        nodes, gpus = map(int, shape.split("x"))
        tp, pp = map(int, parallel.removeprefix("tp").split("pp"))
        report = plan_recipe(path, nodes=nodes, gpus_per_node=gpus)
        assert (report.layout.tensor, report.layout.pipeline) == (tp, pp), path.name
        assert report.ok, report.format()
        header = path.read_text().split("\n\n")[0]
        assert f"sbatch --nodes={nodes} --gpus-per-node={gpus}" in header and str(path.relative_to(ROOT)) in header


def test_every_subcommand_takes_overrides_before_or_after_its_options():
    """``distill eval R --checkpoint P k=v`` and ``distill eval R k=v --checkpoint P`` parse the same."""
    parser = build_parser()
    for argv in (["eval", "r.yaml", "--checkpoint", "ck", "training.seed=3", "--no-generate"],
                 ["eval", "r.yaml", "training.seed=3", "--checkpoint", "ck", "--no-generate"]):
        args = parser.parse_args(argv)
        assert (args.recipe, args.checkpoint, args.overrides, args.no_generate) == ("r.yaml", "ck", ["training.seed=3"], True)
    args = parser.parse_args(["run", "r.yaml", "--cpu", "a=1", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.cpu
    assert parser.parse_args(["plugins", "list", "--json"]).json  # nested subcommands still parse
