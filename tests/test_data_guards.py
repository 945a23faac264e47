"""Data rules a user can see and rely on: empty captions are kept (the option to drop them is explicit), a caption
column that is not text is one clear error before anything is written, and `fastinpo cache` reports what it
cached after decoding, not what it planned to."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastinpo.cli import main
from fastinpo.data.pickapic import PickAPicDataset, synthetic_rows, write_pickapic_parquet

R = 32


def _rows_with_captions(captions):
    rows = synthetic_rows(len(captions), R, seed=5, tie_every=0)
    return [{**r, "caption": c} for r, c in zip(rows, captions, strict=True)]


def _write_int_captions(folder):
    rows = synthetic_rows(3, R, seed=5, tie_every=0)
    cols = {k: [r[k] for r in rows] for k in ("jpg_0", "jpg_1", "label_0", "label_1")}
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"caption": [1, 2, 3], **cols}), folder / "part-0.parquet")  # an int64 column
    return folder


def test_empty_captions_are_kept_by_default_and_dropped_only_on_request(tmp_path):
    write_pickapic_parquet(tmp_path / "d" / "part-0.parquet", _rows_with_captions(["a cat", "", None, "  ", "a dog"]))
    ds = PickAPicDataset(tmp_path / "d", R)
    assert len(ds) == 5 and "empty_caption" not in ds.skipped
    assert [ds[i].caption for i in range(5)] == ["a cat", "", "", "  ", "a dog"]  # null -> "", never "None"
    dropped = PickAPicDataset(tmp_path / "d", R, keep_empty_captions=False)
    assert len(dropped) == 2 and dropped.skipped == {"empty_caption": 3}
    assert ds.preprocessing_options()["keep_empty_captions"] is True  # a cache made one way is stale the other


def test_a_caption_column_that_is_not_text_is_one_clear_error(tmp_path):
    _write_int_captions(tmp_path / "d")
    with pytest.raises(ValueError, match=r"'caption' column must hold text.*row 0 holds int 1"):
        PickAPicDataset(tmp_path / "d", R)


def test_cache_command_refuses_non_text_captions_without_writing(tiny_pipelines, tmp_path, capsys):
    _write_int_captions(tmp_path / "d")
    code = main(["cache", "--set", f"model.path={tiny_pipelines['sd15']}", "--set", f"data.path={tmp_path / 'd'}",
                 "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", f"data.resolution={R}"])
    assert code == 2 and "'caption' column must hold text" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cache_command_reports_the_pairs_it_cached(tiny_pipelines, tmp_path, capsys):
    rows = synthetic_rows(6, R, seed=1, tie_every=0, undecodable_row=2)
    write_pickapic_parquet(tmp_path / "d" / "part-0.parquet", rows)
    code = main(["cache", "--set", f"model.path={tiny_pipelines['sd15']}", "--set", f"data.path={tmp_path / 'd'}",
                 "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", f"data.resolution={R}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "5 pairs cached" in out and "1 undecodable_image" in out, out


def test_cache_overwrite_is_a_real_flag_that_rebuilds_a_stale_cache(tiny_pipelines, tmp_path, capsys):
    write_pickapic_parquet(tmp_path / "d" / "part-0.parquet", synthetic_rows(3, R, seed=1, tie_every=0))
    base = ["cache", "--set", f"model.path={tiny_pipelines['sd15']}", "--set", f"data.path={tmp_path / 'd'}",
            "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", f"data.resolution={R}"]
    assert main(base) == 0
    other = [*base, "--set", "data.cache_embed_dtype=float32"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "already holds a cache built with other settings" in err and "`fastinpo cache CONFIG --overwrite`" in err
    assert main([*other, "--overwrite"]) == 0
    assert "3 pairs cached" in capsys.readouterr().out
