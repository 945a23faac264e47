"""`fastinpo data inspect CONFIG|PATH`: counts, skips by reason, distinct captions/images, the projected cache size
(checked against a real build), and a contact sheet whose left image is the winner."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fastinpo.cli import main
from fastinpo.data.pickapic import write_pickapic_parquet
from tests.test_cache import pickapic_shaped_rows

R = 32


def _data(tmp_path):
    rows = pickapic_shaped_rows(3, 4)  # 18 pairs, 3 captions, 12 images; label_0 alternates 0 / 1
    rows[2]["label_0"], rows[2]["label_1"] = 0.5, 0.5  # a tie
    rows[5]["jpg_1"] = None  # a missing image
    write_pickapic_parquet(tmp_path / "d" / "p.parquet", rows)
    return tmp_path / "d"


def test_inspect_a_path_counts_and_draws_winner_left(tmp_path, capsys):
    data = _data(tmp_path)
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(data), "--set", f"data.resolution={R}", "--sheet", str(sheet), "--pairs",
                 "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["rows"] == 18 and r["usable_pairs"] == 16
    assert r["skipped"] == {"missing_image": 1, "tie": 1}
    assert r["distinct_captions"] == 3 and r["distinct_images"] == 12
    assert r["projected_cache"]["shapes"]["arch"].startswith("sdxl (assumed")
    img = np.asarray(Image.open(sheet).convert("RGB")).astype(float)
    assert img.shape[1] == 2 * 192 + 12 and img.shape[0] > 4 * 192
    # pair 0 is row 0 with label_0 = 0: image 1 wins and is drawn on the left; pickapic_shaped_rows's images
    # alternate warm (red-dominant, even index) / cool, and row 0 pairs image 0 (warm) with image 1 (cool)
    left, right = img[10:180, 10:180], img[10:180, 206:376]
    assert left[..., 2].mean() > left[..., 0].mean() and right[..., 0].mean() > right[..., 2].mean()


def test_inspect_a_config_projects_the_size_a_build_measures(tmp_path, tiny_pipelines, capsys):
    data = _data(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_pipelines['sdxl']}}}\n"
                   f"data: {{path: {data}, resolution: {R}, cache_dir: {tmp_path / 'cache'}}}\n")
    assert main(["data", "inspect", str(cfg), "--no-sheet"]) == 0
    out = capsys.readouterr().out
    assert "usable pairs: 16" in out and "1 missing_image, 1 tie" in out and "distinct images: 12" in out
    assert main(["data", "inspect", str(cfg), "--no-sheet", "--json"]) == 0
    projected = json.loads(capsys.readouterr().out)["projected_cache"]
    assert main(["cache", str(cfg)]) == 0
    capsys.readouterr()
    from fastinpo.data.cache import read_manifest

    m = read_manifest(tmp_path / "cache")
    assert (m["num_images"], m["num_captions"], m["num_pairs"]) == (12, 3, 16)
    # payload projection vs whole files: the difference is the safetensors headers (< 1 KiB a file)
    n_files = sum(len(v) for v in m["files"].values())
    assert 0 < m["bytes_total"] - projected["bytes_total"] < 1024 * n_files, (m["bytes"], projected["bytes"])
    assert abs(m["bytes"]["latents"] - projected["bytes"]["latents"]) < 1024 * len(m["files"]["latents"])
