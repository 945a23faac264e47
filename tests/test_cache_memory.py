"""`fastinpo cache` memory controls: VAE calls of at most ``data.cache_batch_pairs`` pairs, diffusers' VAE slicing
(and tiling) from the config, and no posterior std stored when the run never reads it — with a run that needs the
std refused on such a cache rather than silently training on the mean."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from fastinpo.cli import main
from fastinpo.config import load_config
from fastinpo.data.cache import StaleCacheError, read_manifest
from fastinpo.data.pickapic import synthetic_rows, write_pickapic_parquet

R = 32


def _cache(tiny_pipelines, tmp_path, *extra, cache="c"):
    args = ["cache", "--set", f"model.path={tiny_pipelines['sd15']}", "--set", f"data.path={tmp_path / 'd'}",
            "--set", f"data.cache_dir={tmp_path / cache}", "--set", f"data.resolution={R}"]
    for e in extra:
        args += ["--set", e]
    return main(args)


@pytest.fixture
def data(tmp_path):
    write_pickapic_parquet(tmp_path / "d" / "part-0.parquet", synthetic_rows(5, R, seed=2, tie_every=0))


def test_vae_calls_are_cache_batch_pairs_at_most_and_sliced(tiny_pipelines, tmp_path, data, monkeypatch):
    from diffusers import AutoencoderKL

    calls, slicing = [], []
    original = AutoencoderKL.encode

    def spy(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        slicing.append(self.use_slicing)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    assert _cache(tiny_pipelines, tmp_path, "data.cache_batch_pairs=2", "data.vae_slicing=true") == 0
    assert calls == [4, 4, 2] and all(slicing)  # 5 pairs: 2 + 2 + 1 pairs, 2 images each
    calls.clear()
    slicing.clear()
    assert _cache(tiny_pipelines, tmp_path, "data.cache_batch_pairs=1", cache="c2") == 0
    assert calls == [2] * 5 and not any(slicing)  # slicing is off by default


def test_no_std_stored_without_latent_sampling_and_a_sampling_run_refuses_it(tiny_pipelines, tmp_path, data):
    from fastinpo.train.data_source import PairStream

    assert _cache(tiny_pipelines, tmp_path, "data.latent_sample=false") == 0
    manifest = read_manifest(tmp_path / "c")
    assert manifest["build"]["store_std"] is False
    with safe_open(str(tmp_path / "c" / manifest["files"]["latents"][0]["file"]), framework="pt") as f:
        assert "latent_std" not in f.keys() and "latent_mean" in f.keys()
    over = [f"model.path={tiny_pipelines['sd15']}", f"data.path={tmp_path / 'd'}", f"data.cache_dir={tmp_path / 'c'}",
            f"data.resolution={R}"]
    with pytest.raises(StaleCacheError, match="holds no posterior std.*data.latent_sample = true"):
        PairStream(load_config(None, [*over, "data.latent_sample=true"]), model_folder=tiny_pipelines["sd15"],
                   device="cpu")
    PairStream(load_config(None, [*over, "data.latent_sample=false"]), model_folder=tiny_pipelines["sd15"],
               device="cpu")
