"""Prompt-set readers: Pick-a-Pic parquet, PartiPrompts TSV, HPDv2 JSON, plain text; malformed files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastinpo.data.prompts import PromptItem, read_prompts


def test_text(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\na red cat\n\n  an astronaut  \n   # indented comment\nthe end\n")
    assert read_prompts(f) == [PromptItem("a red cat"), PromptItem("an astronaut"), PromptItem("the end")]


def test_pickapic_dedup_keeps_order(tmp_path):
    rows = {"caption": ["b", "a", "b", "c", None, "a", "  "], "jpg_0": [b"x"] * 7}
    pq.write_table(pa.table(rows), tmp_path / "test-00000.parquet")
    assert [p.prompt for p in read_prompts(tmp_path / "test-00000.parquet")] == ["b", "a", "c"]
    pq.write_table(pa.table({"caption": ["d", "a"]}), tmp_path / "test-00001.parquet")
    assert [p.prompt for p in read_prompts(tmp_path)] == ["b", "a", "c", "d"]  # a folder: files sorted by name


def test_parti(tmp_path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na cat\tAnimals\tBasic\tx\n")
    assert read_prompts(f) == [PromptItem("bond", "Abstract"), PromptItem("a cat", "Animals")]


def test_hpdv2_file_and_folder(tmp_path):
    (tmp_path / "photo.json").write_text(json.dumps(["a photo", "b photo"]))
    (tmp_path / "anime.json").write_text(json.dumps(["an anime"]))
    assert read_prompts(tmp_path / "photo.json") == [PromptItem("a photo", "photo"), PromptItem("b photo", "photo")]
    assert [(p.prompt, p.category) for p in read_prompts(tmp_path)] == [
        ("an anime", "anime"), ("a photo", "photo"), ("b photo", "photo")]


@pytest.mark.parametrize("name,content,fmt,match", [
    ("p.tsv", "Text\tCategory\nx\ty\n", "auto", r"p\.tsv: missing column\(s\) \['Prompt'\]"),
    ("p.tsv", "Prompt\tCategory\n", "auto", "no prompt rows"),
    ("p.tsv", "Prompt\tCategory\n\tAnimals\n", "auto", "line 2 has an empty Prompt"),
    ("p.json", '{"prompts": ["a"]}', "auto", r"p\.json: expected a JSON list of prompt strings.*got dict"),
    ("p.json", '["a", 3]', "auto", "non-string items"),
    ("p.json", '["a",', "auto", r"p\.json: is not valid JSON"),
    ("p.txt", "# only comments\n\n", "auto", r"p\.txt: holds no prompt"),
    ("p.parquet", "not parquet", "auto", r"p\.parquet: is not a readable parquet file"),
    ("p.txt", "x", "yaml", "prompt format must be one of"),
])
def test_malformed_files_are_clear(tmp_path, name, content, fmt, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_prompts(f, fmt)


def test_parquet_without_caption_and_missing_file(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no 'caption' column.*\['text'\]"):
        read_prompts(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(tmp_path / "binary.txt")


def test_parti_keeps_quote_marks(tmp_path):
    # The real PartiPrompts.tsv has prompts that start with a quote mark; a TSV has no quoting to strip.
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text('Prompt\tCategory\n"G I G G L E" painted in thick colorful lettering\tWorld Knowledge\n'
                 'a sign that says "hi"\tText\n')
    assert [p.prompt for p in read_prompts(f)] == ['"G I G G L E" painted in thick colorful lettering',
                                                   'a sign that says "hi"']


@pytest.mark.parametrize("name,content", [
    ("p.txt", "a red cat\nb\n"),
    ("PartiPrompts.tsv", "Prompt\tCategory\na red cat\tAnimals\nb\tAnimals\n"),
    ("photo.json", '["a red cat", "b"]'),
])
def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes("\ufeff".encode() + content.encode())
    assert [p.prompt for p in read_prompts(f)] == ["a red cat", "b"]


@pytest.mark.parametrize("name,content", [
    ("p.tsv", b"Prompt\tCategory\ncaf\xe9\tFood\n"),
    ("p.json", b'["caf\xe9"]'),
    ("p.txt", b"caf\xe9\n"),
])
def test_non_utf8_bytes_name_the_file(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"prompt file .*{name}: is not UTF-8 text"):
        read_prompts(f)


def test_repeated_prompts_are_dropped_with_a_warning(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\na dog\na cat\na cat\n")
    with pytest.warns(UserWarning, match=r"p\.txt: 2 repeated prompt\(s\) dropped.*'a cat'"):
        items = read_prompts(f)
    assert [p.prompt for p in items] == ["a cat", "a dog"]
