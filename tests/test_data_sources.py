"""Every pair source kind behind the one dataset interface (docs/DATA.md): Pick-a-Pic parquet, ``save_to_disk``,
pair manifests (JSONL, CSV, parquet; ``image_0``/``image_1``/``label_0`` or ``chosen``/``rejected``) and ``w/``/``l/``
folders give the same pairs, the same skip accounting, and train to the same losses."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastinpo.data.pickapic import PickAPicDataset, synthetic_rows, write_pickapic_parquet

R = 32
LABELS = [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.0]  # row 3 a tie, rows 1, 4, 7 swapped
MISSING = 5  # row 5's image 1 is missing


def source_rows():
    rows = synthetic_rows(len(LABELS), 40, seed=7, tie_every=0)
    for r, l0 in zip(rows, LABELS, strict=True):
        r["label_0"], r["label_1"] = l0, 1.0 - l0
    rows[MISSING]["jpg_1"] = None
    return rows


def _write_images(folder, rows):
    """Image files img/ROW_k.png (the missing one not written); returns the relative paths."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(rows):
        pair = []
        for k in (0, 1):
            rel = f"img/{i:03d}_{k}.png"
            if r[f"jpg_{k}"] is not None:
                (folder / rel).write_bytes(r[f"jpg_{k}"])
            pair.append(rel)
        paths.append(pair)
    return paths


def _winner_first(rows):
    """(caption, winner bytes, loser bytes) of the rows that are not ties: what chosen/rejected and folders hold."""
    out = []
    for r in rows:
        if r["label_0"] == 0.5:
            continue
        w, l = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1.0 else (r["jpg_1"], r["jpg_0"])
        out.append((r["caption"], w, l))
    return out


def write_kind(kind: str, root, rows):
    """``rows`` written as a source of ``kind``; returns the data path."""
    if kind == "parquet":
        write_pickapic_parquet(root / "pq" / "part-0.parquet", rows)
        return root / "pq"
    if kind == "save_to_disk":
        import datasets

        cols = {k: [r[k] for r in rows] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
        datasets.Dataset.from_dict(cols).save_to_disk(str(root / "disk"))
        return root / "disk"
    if kind.startswith("manifest-"):
        fmt = kind.split("-")[1]
        folder = root / kind
        chosen = kind.endswith("-chosen")
        if chosen:
            winners = _winner_first(rows)
            (folder / "img").mkdir(parents=True)
            recs = []
            for i, (cap, w, l) in enumerate(winners):
                for name, data in ((f"img/{i}_w.png", w), (f"img/{i}_l.png", l)):
                    if data is not None:
                        (folder / name).write_bytes(data)
                recs.append({"caption": cap, "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png"})
        else:
            paths = _write_images(folder, rows)
            recs = [{"caption": r["caption"], "image_0": p[0], "image_1": p[1], "label_0": r["label_0"]}
                    for r, p in zip(rows, paths, strict=True)]
        path = folder / f"pairs.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        elif fmt == "csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(recs[0]))
                w.writeheader()
                w.writerows(recs)
        else:
            pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=3)
        return path
    if kind.startswith("folder-"):
        folder = root / kind
        (folder / "w").mkdir(parents=True)
        (folder / "l").mkdir()
        lines = []
        for i, (cap, w, l) in enumerate(_winner_first(rows)):
            name = f"pair{i:03d}"
            (folder / "w" / f"{name}.png").write_bytes(w)
            if l is not None:
                (folder / "l" / f"{name}.png").write_bytes(l)
            if kind == "folder-txt":
                (folder / f"{name}.txt").write_text(cap)
            else:
                lines.append(json.dumps({"name": name, "caption": cap}))
        if kind == "folder-jsonl":
            (folder / "captions.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # any line order
        return folder
    raise ValueError(kind)


LABELLED = ["parquet", "save_to_disk", "manifest-jsonl", "manifest-csv", "manifest-parquet"]
WINNER_FIRST = ["manifest-jsonl-chosen", "manifest-csv-chosen", "manifest-parquet-chosen", "folder-jsonl",
                "folder-txt"]


@pytest.mark.parametrize("kind", LABELLED + WINNER_FIRST)
def test_every_kind_gives_the_same_pairs_and_skips(tmp_path, kind):
    rows = source_rows()
    ref = PickAPicDataset(write_kind("parquet", tmp_path / "ref", rows), R, verify_images=True)
    assert ref.skipped == {"tie": 1, "missing_image": 1} and len(ref) == 6
    ds = PickAPicDataset(write_kind(kind, tmp_path, rows), R, verify_images=True)
    # a winner-first source has no ties to drop (the tie row was never written); the rest is counted alike
    assert ds.skipped == ({"tie": 1, "missing_image": 1} if kind in LABELLED else {"missing_image": 1})
    assert len(ds) == len(ref)
    for i in range(len(ref)):
        a, b = ref[i], ds[i]
        assert a.caption == b.caption
        assert torch.equal(a.pixels, b.pixels), f"pair {i}: winner/loser differ"
    # without verify_images the missing image is found when its pair is read, counted once, under the same reason
    lazy = PickAPicDataset(write_kind(kind, tmp_path / "lazy", rows), R)
    assert lazy.skipped == ({"tie": 1} if kind in LABELLED else {})
    for i in range(len(lazy)):
        lazy[i]
    assert lazy.skipped == ds.skipped


def test_manifest_and_folder_errors_are_clear(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"caption": "a", "image_0": "x.png"}\n')
    with pytest.raises(ValueError, match="needs the columns"):
        PickAPicDataset(tmp_path / "m.jsonl", R)
    (tmp_path / "bad.jsonl").write_text('{"caption": "a", "chosen": "x", "rejected": "y"}\nnot json\n')
    with pytest.raises(ValueError, match="record 1 is not valid JSON"):
        PickAPicDataset(tmp_path / "bad.jsonl", R)
    (tmp_path / "f" / "w").mkdir(parents=True)
    (tmp_path / "f" / "l").mkdir()
    (tmp_path / "f" / "w" / "a.png").write_bytes(b"x")
    (tmp_path / "f" / "w" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="two images named 'a'"):
        PickAPicDataset(tmp_path / "f", R)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="pair manifest"):
        PickAPicDataset(tmp_path / "x.txt", R)


def test_csv_quoted_caption_with_newline_and_label_text(tmp_path):
    rows = source_rows()[:3]
    folder = tmp_path / "c"
    paths = _write_images(folder, rows)
    with open(folder / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "image_0", "image_1", "label_0"])
        w.writerow(['a "quoted"\ncaption, with comma', *paths[0], "1"])
        w.writerow(["plain", *paths[1], "0.0"])
        w.writerow(["no label", *paths[2], ""])
    ds = PickAPicDataset(folder / "p.csv", R)
    assert len(ds) == 2 and ds.skipped == {"missing_label": 1}
    assert ds[0].caption == 'a "quoted"\ncaption, with comma' and ds[1].caption == "plain"


# ----------------------------------------------------------------------------------------------- end to end
def _train(pipeline, data, out):
    from fastinpo.config import load_config
    from fastinpo.train import train

    over = [f"model.path={pipeline}", f"data.path={data}", f"data.resolution={R}", "method.name=diffusion-dpo",
            "train.max_steps=2", "train.pairs_per_batch=2", f"train.output_dir={out}", "train.log_every=1",
            "train.progress=false", "optim.lr=1e-4", "optim.scale_lr=false", "data.caption_dropout=0.0"]
    summary = train(load_config(None, over))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, losses


def test_every_kind_trains_end_to_end_to_the_same_losses(tiny_pipelines, tmp_path):
    rows = source_rows()
    kinds = ["parquet", "save_to_disk", "manifest-jsonl", "manifest-csv-chosen", "manifest-parquet", "folder-jsonl",
             "folder-txt"]
    results = {}
    for kind in kinds:
        summary, losses = _train(tiny_pipelines["sd15"], write_kind(kind, tmp_path / "data", rows),
                                 tmp_path / "run" / kind)
        assert summary["step"] == 2
        results[kind] = (losses, summary["skipped_rows"])
    ref_losses, _ = results["parquet"]
    assert all(torch.isfinite(torch.tensor(ref_losses)))
    for kind, (losses, skipped) in results.items():
        assert losses == ref_losses, kind  # same pairs in the same order: the same numbers
        assert skipped.get("tie", 0) == (1 if kind in LABELLED else 0), (kind, skipped)
