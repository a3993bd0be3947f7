"""Bad input files give clear errors naming the file and line, exit 2 (issue 17 item 11)."""

from __future__ import annotations

import pytest

from distill_plugins.cli import main
from distill_plugins.data.sources import iter_texts, jsonl_source
from distill_plugins.data.text_batches import text_documents
from distill_plugins.data.tokenizer import train_bpe_tokenizer
from distill_plugins.errors import InputError
from distill_plugins.recipe.schema import DataSpec, Recipe


@pytest.fixture
def latin1(tmp_path):
    """A JSONL file whose third line holds a Latin-1 byte (0xe9), and a plain text file with one."""
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9 au lait"}\n')
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"first line\nsecond \xff line\n")
    return jsonl, txt


def test_non_utf8_line_is_named_with_file_and_line(latin1, tmp_path):
    jsonl, txt = latin1
    with pytest.raises(InputError, match=rf"{jsonl}:3: not UTF-8 text \(byte 0xe9 at byte 14 of the line.*iconv"):
        list(iter_texts(str(jsonl)))
    with pytest.raises(InputError, match=rf"{txt}:2: not UTF-8 text \(byte 0xff at byte 8 of the line"):
        list(iter_texts(str(txt)))
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "café"}\n', encoding="utf-8")
    assert list(iter_texts(str(good))) == ["café"]


def test_non_utf8_in_run_data_paths_and_data_prepare_exit_2(latin1, tmp_path, capsys):
    jsonl, _ = latin1
    tok = train_bpe_tokenizer(["fine words here"] * 4, 260, min_frequency=1)
    recipe = Recipe(data=DataSpec(kind="jsonl", paths=[str(jsonl)], seq_length=4))
    # the two readers `distill run` uses: token ids, and raw text for cross-tokenizer aligners
    with pytest.raises(InputError, match=rf"{jsonl}:3: not UTF-8"):
        jsonl_source([str(jsonl)], tok, seq_length=4, seed=0, split="train", split_spec="100,0,0")
    with pytest.raises(InputError, match=rf"{jsonl}:3: not UTF-8"):
        text_documents(recipe, "train")
    tok.save(tmp_path / "tok.json")
    code = main(["data", "prepare", "--input", str(jsonl), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "tok.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{jsonl}:3: not UTF-8 text" in err and "Traceback" not in err
