"""`fastinpo data inspect CONFIG|PATH`: what a pair source holds before anything is trained or cached.

Rows, usable pairs, rows skipped by reason, distinct captions and images (the cache stores each once), the
projected cache size, and a contact sheet PNG of a few pairs as training sees them (winner left, loser right,
caption under them): a picture is how a user checks that the labels point the right way.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

# What the cache stores per pair besides latents and text (caption index, two image indices, source row, row hash)
# and what its plan files hold per pair (dataset index, row, row hash, two image keys, caption key; + the caption).
PAIR_TABLE_BYTES = 8 + 16 + 8 + 32
PLAN_BYTES = 8 + 8 + 32 + 64 + 32
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# SDXL's shapes, used when no pipeline folder is given: 4 × R/8 × R/8 latents; 77 tokens × (768 + 1280) and a
# 1280 pooled embedding
SDXL = {"arch": "sdxl (assumed: no model.path)", "latent_channels": 4, "downsample": 8, "tokens": 77,
        "embed_dim": 2048, "pooled_dim": 1280}


def model_shapes(model_path: str | None) -> dict[str, Any]:
    """Latent and text-embedding shapes read from a diffusers folder's config files (no weights loaded)."""
    if not model_path:
        return dict(SDXL)
    folder = Path(model_path)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    te2_path = folder / "text_encoder_2" / "config.json"
    te2 = json.loads(te2_path.read_text()) if te2_path.is_file() else None
    tok_path = folder / "tokenizer" / "tokenizer_config.json"
    tokens = int(json.loads(tok_path.read_text()).get("model_max_length", 77)) if tok_path.is_file() else 77
    if tokens > 4096:  # "no limit" in tokenizer configs
        tokens = 77
    embed = int(te["hidden_size"]) + (int(te2["hidden_size"]) if te2 else 0)
    return {"arch": "sdxl" if te2 else "sd15", "latent_channels": int(vae.get("latent_channels", 4)),
            "downsample": 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1), "tokens": tokens,
            "embed_dim": embed, "pooled_dim": int(te2.get("projection_dim", te2["hidden_size"])) if te2 else 0}


def projected_cache_bytes(pairs: int, images: int, captions: int, caption_chars: int, resolution: int,
                          shapes: dict[str, Any], *, cache_dtype: str = "float32", embed_dtype: str = "float16",
                          store_std: bool = True) -> dict[str, Any]:
    """Bytes a cache of this data would take (payload; file headers add a few hundred bytes per shard)."""
    side = resolution // shapes["downsample"]
    per_image = shapes["latent_channels"] * side * side * _BYTES[cache_dtype] * (2 if store_std else 1)
    per_image += 1 + (24 if shapes["arch"].startswith("sdxl") else 0)  # ok flag, time_ids
    per_caption = (shapes["tokens"] * shapes["embed_dim"] + shapes["pooled_dim"]) * _BYTES[embed_dtype]
    parts = {"latents": images * per_image, "text": captions * per_caption, "pairs": pairs * PAIR_TABLE_BYTES,
             "plan": pairs * PLAN_BYTES + caption_chars, "empty_caption": per_caption}
    total = sum(parts.values())
    # what one copy per pair (cache format 1) would take, for comparison
    per_pair_copies = pairs * (2 * per_image + per_caption + PAIR_TABLE_BYTES)
    return {"bytes": parts, "bytes_total": total, "bytes_per_pair": round(total / pairs, 1) if pairs else None,
            "bytes_without_dedup": per_pair_copies, "shapes": shapes, "cache_dtype": cache_dtype,
            "embed_dtype": embed_dtype, "store_std": store_std}


def count_distinct(dataset, progress: bool = True) -> dict[str, Any]:
    """One pass over every usable pair's caption and image bytes: distinct captions and images (sha256 of the
    bytes, as the cache keys them), pairs whose images are missing."""
    caps: set[bytes] = set()
    imgs: set[bytes] = set()
    missing = 0
    chars = 0
    for i in tqdm(range(len(dataset)), disable=not progress, unit="pair", desc="fastinpo data inspect"):
        _, caption, win, lose, _ = dataset.read_pair_bytes(i)
        if win is None or lose is None:
            missing += 1
            continue
        key = hashlib.sha256(caption.encode()).digest()[:16]
        if key not in caps:
            caps.add(key)
            chars += len(json.dumps(caption))
        imgs.add(hashlib.sha256(win).digest()[:16])
        imgs.add(hashlib.sha256(lose).digest()[:16])
    return {"distinct_captions": len(caps), "distinct_images": len(imgs), "pairs_missing_an_image": missing,
            "caption_chars": chars}


def contact_sheet(dataset, path: str | Path, pairs: int = 8, cell: int = 192) -> Path:
    """A PNG of the first ``pairs`` usable pairs, one per row, as training sees them (after resize and crop):
    winner left, loser right, the caption under them."""
    font = ImageFont.load_default()
    rows = []
    for i in range(min(pairs, len(dataset))):
        rec = dataset.read_pair(i)
        if rec.pair is None:
            continue
        pix = ((rec.pair.pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        lines = textwrap.wrap(rec.pair.caption or "(empty caption)", width=max(20, (2 * cell) // 7))[:3]
        text_h = 14 * len(lines) + 22
        row = Image.new("RGB", (2 * cell + 12, cell + text_h), "white")
        for k in (0, 1):
            row.paste(Image.fromarray(np.ascontiguousarray(pix[k])).resize((cell, cell), Image.NEAREST),
                      (4 + k * (cell + 4), 4))
        draw = ImageDraw.Draw(row)
        draw.text((6, cell + 6), f"winner   |   loser      (row {rec.row})", fill=(0, 110, 0), font=font)
        for j, line in enumerate(lines):
            draw.text((6, cell + 20 + 14 * j), line, fill="black", font=font)
        rows.append(row)
    if not rows:
        raise ValueError("no pair could be decoded for the contact sheet")
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def inspect(dataset, *, model_path: str | None, cache_dtype: str, embed_dtype: str, store_std: bool,
            sheet: str | Path | None, sheet_pairs: int = 8, progress: bool = True) -> dict[str, Any]:
    """The report of ``fastinpo data inspect`` (a dict; see the module docstring)."""
    distinct = count_distinct(dataset, progress)
    pairs = len(dataset) - distinct["pairs_missing_an_image"]
    skipped = dict(dataset.skipped)
    if distinct["pairs_missing_an_image"]:
        skipped["missing_image"] = skipped.get("missing_image", 0) + distinct["pairs_missing_an_image"]
    report = {
        "path": str(dataset.path), "rows": dataset.num_source_rows, "usable_pairs": pairs,
        "skipped": dict(sorted(skipped.items())), "distinct_captions": distinct["distinct_captions"],
        "distinct_images": distinct["distinct_images"],
        "pairs_per_caption": round(pairs / max(distinct["distinct_captions"], 1), 2),
        "images_per_pair": round(distinct["distinct_images"] / max(pairs, 1), 3),
        "projected_cache": projected_cache_bytes(pairs, distinct["distinct_images"], distinct["distinct_captions"],
                                                 distinct["caption_chars"], dataset.resolution,
                                                 model_shapes(model_path), cache_dtype=cache_dtype,
                                                 embed_dtype=embed_dtype, store_std=store_std),
        "note": "undecodable images are found when they are decoded (by `fastinpo cache` or training), not here",
    }
    if sheet is not None:
        report["contact_sheet"] = str(contact_sheet(dataset, sheet, sheet_pairs))
    return report


def format_report(r: dict[str, Any]) -> str:
    pc = r["projected_cache"]

    def size(b: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if b < 1024 or unit == "TiB":
                return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
            b /= 1024
        return ""

    skipped = ", ".join(f"{v} {k}" for k, v in r["skipped"].items()) or "none"
    shapes = pc["shapes"]
    lines = [
        f"data: {r['path']}",
        f"rows: {r['rows']}   usable pairs: {r['usable_pairs']}   skipped: {skipped}",
        f"distinct captions: {r['distinct_captions']} ({r['pairs_per_caption']} pairs each)   distinct images: "
        f"{r['distinct_images']} ({r['images_per_pair']} per pair)",
        f"projected cache ({shapes['arch']}, latents {pc['cache_dtype']}{' mean+std' if pc['store_std'] else ' mean'}"
        f", text {pc['embed_dtype']}): {size(pc['bytes_total'])} = {size(pc['bytes_per_pair'] or 0)} per pair "
        f"(latents {size(pc['bytes']['latents'])}, text {size(pc['bytes']['text'])}, pair tables "
        f"{size(pc['bytes']['pairs'] + pc['bytes']['plan'])}); one copy per pair would take "
        f"{size(pc['bytes_without_dedup'])}",
    ]
    if "contact_sheet" in r:
        lines.append(f"contact sheet (winner left, loser right): {r['contact_sheet']}")
    lines.append(f"note: {r['note']}")
    return "\n".join(lines)


__all__ = ["inspect", "format_report", "contact_sheet", "projected_cache_bytes", "model_shapes", "count_distinct"]
