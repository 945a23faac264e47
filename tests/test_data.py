"""The Pick-a-Pic reader (SPEC §1): label semantics, bad rows, input formats, preprocessing."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import fastinpo.data.pickapic as data_mod
from fastinpo.data.batch import collate_raw
from fastinpo.data.pickapic import PickAPicDataset, encode_image, synthetic_rows, write_pickapic_parquet

R = 32


def red_wins(pixels: torch.Tensor) -> bool:
    """Synthetic image 0 is red-dominant, image 1 blue-dominant: tells which source image is the winner."""
    return bool(pixels[0, 0].mean() > pixels[0, 2].mean()) and bool(pixels[1, 0].mean() < pixels[1, 2].mean())


def labelled(rows, labels):
    for r, l0 in zip(rows, labels, strict=True):
        r["label_0"], r["label_1"] = l0, 1.0 - l0
    return rows


@pytest.fixture
def rows():
    return synthetic_rows(6, R, seed=3, tie_every=0)


def write(tmp_path, rows, name="data", **kw):
    write_pickapic_parquet(tmp_path / name / "part-0.parquet", rows, **kw)
    return tmp_path / name


# ----------------------------------------------------------------------------------------------- labels
def test_ties_dropped_by_default_and_counted(tmp_path, rows):
    ds = PickAPicDataset(write(tmp_path, labelled(rows, [1, 0, 0.5, 1, 0.5, 0])), R)
    assert len(ds) == 4
    assert ds.skipped == {"tie": 2}
    assert [ds[i].row for i in range(len(ds))] == [0, 1, 3, 5]


def test_keep_ties_keeps_image_0_as_winner(tmp_path, rows):
    ds = PickAPicDataset(write(tmp_path, labelled(rows, [0.5, 0, 0.5, 1, 0.5, 0])), R, keep_ties=True)
    assert len(ds) == 6 and ds.skipped == {}
    for i in (0, 2, 4):
        assert ds[i].row == i and red_wins(ds[i].pixels)


def test_label_0_zero_swaps_winner_and_loser(tmp_path, rows):
    labels = [1, 0, 0, 1, 0, 1]
    ds = PickAPicDataset(write(tmp_path, labelled(rows, labels)), R)
    for i, l0 in enumerate(labels):
        pair = ds[i]
        assert pair.row == i
        assert red_wins(pair.pixels) == (l0 == 1), f"row {i} label_0 {l0}"
        assert not red_wins(pair.pixels.flip(0)) or l0 == 0
    # exactly a swap: the same row with the opposite label gives the same two images in the other order
    flipped = PickAPicDataset(write(tmp_path, labelled([dict(r) for r in rows], [1 - x for x in labels]), "b"), R)
    for i in range(len(labels)):
        assert torch.equal(ds[i].pixels, flipped[i].pixels.flip(0))


# ----------------------------------------------------------------------------------------------- bad rows
def bad_rows(rows):
    """Rows 0..5 good (labels 1/0), then one of each kind of bad row."""
    good = labelled(rows, [1, 0, 1, 0, 1, 0])
    base = dict(good[0])
    bad = [
        {**base, "jpg_1": b"definitely not an image"},  # 6 undecodable
        {**base, "caption": ""},  # 7 empty caption
        {**base, "caption": "   "},  # 8 whitespace-only caption
        {**base, "caption": None},  # 9 null caption
        {**base, "label_0": 0.3, "label_1": 0.7},  # 10 bad label
        {**base, "label_0": None, "label_1": None},  # 11 missing label
        {**base, "label_0": float("nan"), "label_1": 1.0},  # 12 NaN label
        {**base, "label_0": 1.0, "label_1": 1.0},  # 13 labels contradict each other
        {**base, "jpg_0": None},  # 14 missing image
        {**base, "jpg_0": encode_image(Image.new("RGB", (40, 40)), "PNG")[:60]},  # 15 truncated PNG
    ]
    return good + bad


def test_bad_rows_skipped_and_counted_when_verified_at_index_time(tmp_path, rows):
    ds = PickAPicDataset(write(tmp_path, bad_rows(rows)), R, verify_images=True, keep_empty_captions=False)
    assert len(ds) == 6
    assert [ds.source_row(i) for i in range(6)] == list(range(6))
    assert ds.skipped == {"empty_caption": 3, "bad_label": 1, "missing_label": 2, "inconsistent_labels": 1,
                          "undecodable_image": 2, "missing_image": 1}


def test_undecodable_found_late_substitutes_next_row_and_counts_once(tmp_path, rows):
    good = labelled(rows, [1, 0, 1, 0, 1, 0])
    good[2]["jpg_1"] = b"\xff\xd8\xff garbage jpeg"
    ds = PickAPicDataset(write(tmp_path, good), R)  # verify_images=False: index built from labels/captions only
    assert len(ds) == 6 and ds.skipped == {}
    rec = ds.read_pair(2)
    assert rec.pair is None and rec.skip_reason == "undecodable_image" and rec.row == 2
    for _ in range(2):  # deterministic substitute, counted once however often it is hit
        pair = ds[2]
        assert pair.row == 3 and red_wins(pair.pixels) is False  # row 3's own label (0): never mislabeled
    assert ds.skipped == {"undecodable_image": 1}
    assert ds[-1].row == 5


def test_index_is_built_without_decoding_images(tmp_path, rows, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an image was decoded at construction")

    monkeypatch.setattr(data_mod, "_decode", boom)
    monkeypatch.setattr(data_mod, "_verify", boom)
    ds = PickAPicDataset(write(tmp_path, labelled(rows, [1, 0, 1, 0, 0.5, 1])), R)
    assert len(ds) == 5


def test_missing_column_is_an_error_listing_columns(tmp_path, rows):
    table = pa.table({"caption": [r["caption"] for r in rows], "jpg_0": [r["jpg_0"] for r in rows],
                      "jpg_1": [r["jpg_1"] for r in rows], "label_1": [1.0] * len(rows)})
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "x.parquet")
    with pytest.raises(ValueError, match=r"label_0.*found columns \['caption', 'jpg_0', 'jpg_1', 'label_1'\]"):
        PickAPicDataset(tmp_path / "d", R)


def test_no_usable_rows_is_an_error(tmp_path, rows):
    path = write(tmp_path, labelled(rows, [0.5] * 6))
    with pytest.raises(ValueError, match=r"no usable preference pairs.*'tie': 6.*keep_ties"):
        PickAPicDataset(path, R)


def test_unknown_input_layout_says_what_was_found(tmp_path, rows):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty directory"):
        PickAPicDataset(tmp_path / "empty", R)
    write_pickapic_parquet(tmp_path / "nested" / "data" / "train-0.parquet", rows)
    (tmp_path / "nested" / "README.md").write_text("hi")
    with pytest.raises(ValueError, match=r"found \['README.md', 'data'\].*data/train-0.parquet"):
        PickAPicDataset(tmp_path / "nested", R)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickAPicDataset(tmp_path / "nope", R)
    # a single parquet file is accepted too
    assert len(PickAPicDataset(tmp_path / "nested" / "data" / "train-0.parquet", R, keep_ties=True)) == 6


# ----------------------------------------------------------------------------------------------- formats
def test_several_files_and_row_groups_index_rows_globally(tmp_path):
    all_rows = labelled(synthetic_rows(7, R, seed=5, tie_every=0), [1, 0, 0.5, 1, 1, 0, 0])
    write_pickapic_parquet(tmp_path / "d" / "a.parquet", all_rows[:3], row_group_size=2)
    write_pickapic_parquet(tmp_path / "d" / "b.parquet", all_rows[3:], row_group_size=2)
    ds = PickAPicDataset(tmp_path / "d", R)
    single = PickAPicDataset(write(tmp_path, all_rows, "one"), R)
    assert len(ds) == len(single) == 6 and ds.skipped == {"tie": 1}
    for i in [5, 0, 3, 1, 4, 2]:  # out of order: row-group cache misses and hits
        a, b = ds[i], single[i]
        assert a.row == b.row and a.caption == b.caption and torch.equal(a.pixels, b.pixels)


def test_save_to_disk_folder_reads_like_parquet(tmp_path, rows):
    import datasets  # a core dependency: a missing install must fail, not skip
    rows = labelled(rows, [1, 0, 0.5, 1, 0, 1])
    parquet = PickAPicDataset(write(tmp_path, rows), R)
    cols = {k: [r[k] for r in rows] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "disk"))
    # image columns stored with the datasets Image feature ({bytes, path} structs) work too
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64"),
                                  "label_1": datasets.Value("float64")})
    img_cols = {**cols, "jpg_0": [{"bytes": b, "path": None} for b in cols["jpg_0"]],
                "jpg_1": [{"bytes": b, "path": None} for b in cols["jpg_1"]]}
    datasets.Dataset.from_dict(img_cols, features=features).save_to_disk(str(tmp_path / "disk_img"))
    for folder in ("disk", "disk_img"):
        ds = PickAPicDataset(tmp_path / folder, R)
        assert len(ds) == len(parquet) == 5 and ds.skipped == {"tie": 1}
        assert ds.index_digest == parquet.index_digest
        for i in range(len(ds)):
            assert ds[i].row == parquet[i].row and torch.equal(ds[i].pixels, parquet[i].pixels)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        PickAPicDataset(tmp_path / "dd", R)


# ----------------------------------------------------------------------------------------------- preprocessing
def test_pixels_shape_range_and_colour_conversion(tmp_path):
    white, black = Image.new("RGB", (50, 40), (255, 255, 255)), Image.new("L", (40, 50), 0)
    rgba = Image.new("RGBA", (33, 64), (255, 0, 0, 128))
    rows = [("white vs black", encode_image(white), encode_image(black), 1.0, 0.0),
            ("rgba vs jpeg", encode_image(rgba), encode_image(white, "JPEG"), 1.0, 0.0)]
    ds = PickAPicDataset(write(tmp_path, rows), R)
    p = ds[0].pixels
    assert p.shape == (2, 3, R, R) and p.dtype == torch.float32
    assert torch.all(p[0] == 1.0) and torch.all(p[1] == -1.0)
    q = ds[1].pixels
    assert torch.all(q[0, 0] == 1.0) and torch.all(q[0, 1:] == -1.0)  # RGBA -> RGB drops alpha
    for pair in (ds[i] for i in range(len(ds))):
        assert pair.pixels.min() >= -1 and pair.pixels.max() <= 1
    rnd = PickAPicDataset(write(tmp_path, synthetic_rows(2, R, 0, tie_every=0), "s"), R)[0].pixels
    assert rnd.std() > 0.1  # synthetic images are not constant


def test_time_ids_default_and_per_sample(tmp_path):
    img = Image.new("RGB", (60, 40), (10, 200, 30))  # w 60, h 40 -> resized to 48 x 32, centre crop left 8
    tall = Image.new("RGB", (40, 90), (10, 200, 30))  # -> 32 x 72, centre crop top round(20) = 20
    path = write(tmp_path, [("c", encode_image(img), encode_image(tall), 0.0, 1.0)])
    assert ds_tids(path) == [[R, R, 0, 0, R, R]] * 2
    assert ds_tids(path, per_sample_time_ids=True) == [[90, 40, 20, 0, R, R], [40, 60, 0, 8, R, R]]  # swapped


def ds_tids(path, **kw):
    return PickAPicDataset(path, R, **kw)[0].time_ids.tolist()


def test_random_crop_matches_time_ids_and_is_reproducible(tmp_path):
    rows = labelled(synthetic_rows(6, R, seed=7, tie_every=0), [1, 0, 1, 0, 1, 0])
    path = write(tmp_path, rows)
    kw = dict(center_crop=False, per_sample_time_ids=True, seed=11)
    a, b = PickAPicDataset(path, R, **kw), PickAPicDataset(path, R, **kw)
    lefts_tops = set()
    for i in range(len(a)):
        pa_, pb = a[i], b[i]
        assert torch.equal(pa_.pixels, pb.pixels) and torch.equal(pa_.time_ids, pb.time_ids)
        # the pixels are exactly the crop the time_ids describe (reference resize + crop with PIL)
        src = rows[pa_.row]
        images = [src["jpg_0"], src["jpg_1"]] if src["label_0"] == 1 else [src["jpg_1"], src["jpg_0"]]
        for k, raw in enumerate(images):
            oh, ow, top, left, _, _ = (int(v) for v in pa_.time_ids[k])
            img = Image.open(__import__("io").BytesIO(raw)).convert("RGB")
            assert img.size == (ow, oh)
            s = R / min(ow, oh)
            img = img.resize((max(R, round(ow * s)), max(R, round(oh * s))), Image.BILINEAR)
            ref = torch.from_numpy(np.array(img.crop((left, top, left + R, top + R)))).permute(2, 0, 1)
            assert torch.equal(pa_.pixels[k], ref.float() / 127.5 - 1.0)
            lefts_tops.add((top, left))
    assert len(lefts_tops) > 2  # the crops really vary
    other = PickAPicDataset(path, R, **{**kw, "seed": 12})
    assert any(not torch.equal(other[i].time_ids, a[i].time_ids) for i in range(len(a)))
    a.set_epoch(1)
    assert any(not torch.equal(a[i].time_ids, b[i].time_ids) for i in range(len(a)))
    a.set_epoch(0)
    assert all(torch.equal(a[i].pixels, b[i].pixels) for i in range(len(a)))


def test_flip_is_joint_and_reproducible(tmp_path):
    path = write(tmp_path, labelled(synthetic_rows(8, R, seed=2, tie_every=0), [1, 0] * 4))
    plain = PickAPicDataset(path, R, per_sample_time_ids=True)
    flip = PickAPicDataset(path, R, random_flip=True, per_sample_time_ids=True)
    again = PickAPicDataset(path, R, random_flip=True, per_sample_time_ids=True)
    flipped = 0
    for i in range(len(plain)):
        p, f = plain[i], flip[i]
        assert torch.equal(f.pixels, again[i].pixels)
        if torch.equal(f.pixels, p.pixels):
            continue
        # both images flipped together, and crop_left mirrored
        assert torch.equal(f.pixels, p.pixels.flip(-1))
        oh, ow = p.time_ids[:, 0], p.time_ids[:, 1]
        new_w = torch.round(ow * R / torch.minimum(oh, ow)).clamp(min=R)
        assert torch.equal(f.time_ids[:, 3], new_w - p.time_ids[:, 3] - R)
        flipped += 1
    assert 0 < flipped < len(plain)  # seeded draws: some pairs flipped, some not


def test_max_rows_caps_usable_rows(tmp_path, rows):
    path = write(tmp_path, labelled(rows, [1, 0.5, 0, 1, 0, 1]))
    ds = PickAPicDataset(path, R, max_rows=3)
    assert len(ds) == 3 and [ds.source_row(i) for i in range(3)] == [0, 2, 3]
    assert ds.skipped == {"tie": 1}
    assert ds.index_digest != PickAPicDataset(path, R).index_digest


def test_picklable_for_dataloader_workers_and_collates(tmp_path, rows):
    ds = PickAPicDataset(write(tmp_path, labelled(rows, [1, 0, 1, 0, 1, 0]), row_group_size=2), R)
    _ = ds[0]  # fills the row-group cache, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4].pixels, ds[4].pixels)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_raw)
    batch = next(iter(loader))
    assert batch.pixels.shape == (8, 3, R, R) and batch.time_ids.shape == (8, 6)
    assert batch.rows.tolist() == [0, 1, 2, 3]
    assert math.isclose(float(batch.pixels[0, 0].mean() - batch.pixels[0, 2].mean()),
                        float(ds[0].pixels[0, 0].mean() - ds[0].pixels[0, 2].mean()))
