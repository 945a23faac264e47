"""`torchrun --nproc_per_node 2 -m fastinpo.cli cache CONFIG` on the CPU (gloo): the shards split over the ranks,
the result byte-identical to a one-process build, and a launch SIGKILLed at two points (rank 0 in the plan pass,
rank 1 in the latents pass) resumes without recomputing a finished shard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastinpo.data.cache import read_manifest
from fastinpo.data.pickapic import write_pickapic_parquet
from tests.test_cache import pickapic_shaped_rows

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]

# Dies (SIGKILL, nothing cleaned up) right after rank KILL_RANK commits its KILL_AFTER-th file named KILL_PREFIX*.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import fastinpo.data.cache as cache

    real = cache._atomic_save_tensors
    seen = [0]

    def dying(path, tensors, metadata):
        real(path, tensors, metadata)
        if os.environ["RANK"] == os.environ["KILL_RANK"] and path.name.startswith(os.environ["KILL_PREFIX"]):
            seen[0] += 1
            if seen[0] == int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)

    cache._atomic_save_tensors = dying
    from fastinpo.cli import main
    sys.exit(main(["cache", *sys.argv[1:]]))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    # one thread everywhere: the one-process build runs with the same kernels' summation order as each rank
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "DS_ACCELERATOR": "cpu", **extra}


def _torchrun(args, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=600, cwd=ROOT)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}


def test_two_process_build_equals_one_process_and_resumes_after_sigkill(tiny_pipelines, tmp_path):
    write_pickapic_parquet(tmp_path / "d" / "p.parquet", pickapic_shaped_rows(3, 4))  # 18 pairs, 12 images
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_pipelines['sdxl']}}}\n"
                   f"data: {{path: {tmp_path / 'd'}, resolution: 32, cache_shard_size: 2, cache_batch_pairs: 1}}\n"
                   f"train: {{device: cpu}}\n")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "fastinpo.cli", "cache", str(cfg), "--set",
                           f"data.cache_dir={one}"], env=_env(), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = [str(killer), str(cfg), "--set", f"data.cache_dir={two}"]

    # launch 1: rank 0 dies after its first plan file
    proc = _torchrun(args, KILL_RANK="0", KILL_PREFIX="pairs-", KILL_AFTER="1")
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    assert not read_manifest(two)["complete"]
    after_1 = _mtimes(two)
    assert any(k.startswith("plan/") for k in after_1)
    # launch 2: rank 1 dies after its second latents file (9 plan files done, 2 of rank 1's latents)
    proc = _torchrun(args, KILL_RANK="1", KILL_PREFIX="latents-", KILL_AFTER="2")
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    after_2 = _mtimes(two)
    assert len([k for k in after_2 if k.startswith("plan/")]) == 9 and "latents-00003.safetensors" in after_2
    assert not (two / "pairs.safetensors").exists()
    # launch 3: plain torchrun -m fastinpo.cli cache finishes it
    proc = _torchrun(["-m", "fastinpo.cli", "cache", str(cfg), "--set", f"data.cache_dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "18 pairs cached (3 distinct captions, 12 distinct images" in proc.stdout
    final = _mtimes(two)
    for before in (after_1, after_2):  # nothing finished before a kill was written again
        assert {k: final[k] for k in before} == before
    assert not list(two.rglob(".*tmp*"))
    assert _files(two) == _files(one)  # byte for byte, the manifest included
    m = read_manifest(one)
    assert m["complete"] and (m["num_pairs"], m["num_images"], m["num_captions"]) == (18, 12, 3)
    assert len(m["files"]["latents"]) == 6 and len(m["files"]["plan"]) == 9

