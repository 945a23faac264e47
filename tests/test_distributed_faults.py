"""Cluster faults under ``distributed.backend = "deepspeed"`` (issue 16 items 5, 6): a peer that never arrives and
a peer that stops answering must fail within ``distributed.timeout_s`` with a message that names the rank, what it
waited on and the likely cause — not hang for DeepSpeed's default 10 minutes (or, at start-up, forever).

Plain subprocesses with RANK / WORLD_SIZE set by hand (what torchrun would set), gloo on the CPU, no model: each
test costs the imports and the bound. Run with ``pytest -m distributed tests/test_distributed_faults.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).parents[1]
TIMEOUT_S = 5
# start-up of a worker: Python, torch and deepspeed imports on a loaded 2-core CI machine
IMPORT_SLACK_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return env


def _worker(role: str) -> None:
    """``join``: join the group and report; ``reduce``: join, then all-reduce metrics; ``hang``: join, then stop
    answering (a lost link) for longer than the timeout."""
    import torch

    from fastinpo.config import load_config
    from fastinpo.train.engine_deepspeed import DeepSpeedEngine

    config = load_config(None, ["model.path=unused", "data.path=unused", "distributed.backend=deepspeed",
                                f"distributed.timeout_s={TIMEOUT_S}", "distributed.socket_ifname=lo",
                                "train.device=cpu"])
    engine = DeepSpeedEngine(config)
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    print(f"joined rank {engine.rank}", flush=True)
    if role == "reduce":
        engine.reduce_metrics(torch.ones(3))
    elif role in ("outdir", "resume"):
        # each rank's own folder: what a node sees when train.output_dir is on its local disk
        out = Path(os.environ["FASTINPO_TEST_OUT"]) / f"rank{engine.rank}"
        out.mkdir(parents=True, exist_ok=True)
        if role == "outdir":
            engine.check_output_dir(out)
        else:
            from fastinpo.train.checkpoint import resolve_resume

            if engine.rank == 0:  # only node 0's disk holds the checkpoint (with only its shards)
                ds = out / "checkpoints" / "step-00000002" / "ds"
                ds.mkdir(parents=True, exist_ok=True)
                (ds.parent / "state.json").write_text('{"step": 2}')
                (ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
            engine.check_resume_point(resolve_resume(out, "latest"))
    elif role == "hang":
        time.sleep(TIMEOUT_S * 6)


def _start(role: str, rank: int, world: int, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.test_distributed_faults", "--worker", role],
                            env=_env(rank, world, port), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_peer_that_never_arrives_fails_within_the_timeout():
    """Rank 0 of 2 alone: the process-group start-up gives up after distributed.timeout_s, naming the likely
    causes (a dead peer, loopback interface, unreachable MASTER_ADDR) and the key to set."""
    started = time.monotonic()
    proc = _start("join", 0, 2, _free_port())
    out, err = proc.communicate(timeout=TIMEOUT_S + IMPORT_SLACK_S + 60)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, out
    assert "rank 0 of 2 could not join the process group within distributed.timeout_s = 5 s" in err, err[-3000:]
    assert "distributed.socket_ifname" in err and "127.0.0.1" in err
    assert elapsed < TIMEOUT_S + IMPORT_SLACK_S, elapsed
    print(f"start-up failure reported after {elapsed:.1f} s (timeout {TIMEOUT_S} s)")


def test_a_peer_that_stops_answering_fails_within_the_timeout():
    """Both ranks join; rank 1 then stops answering. Rank 0's metrics all-reduce fails after distributed.timeout_s
    with the rank and the collective it waited on (not DeepSpeed's default 10 silent minutes)."""
    port = _free_port()
    started = time.monotonic()
    waiting, hanging = _start("reduce", 0, 2, port), _start("hang", 1, 2, port)
    try:
        out, err = waiting.communicate(timeout=TIMEOUT_S * 3 + IMPORT_SLACK_S + 60)
        elapsed = time.monotonic() - started
    finally:
        hanging.kill()
        hanging.communicate()
    # the hanging rank sleeps 6 x the timeout: rank 0 must give up well before that
    assert elapsed < TIMEOUT_S + IMPORT_SLACK_S, elapsed
    print(f"collective timeout reported after {elapsed:.1f} s (timeout {TIMEOUT_S} s)")
    assert "joined rank 0" in out, err[-3000:]
    assert waiting.returncode != 0
    assert "rank 0 of 2 waited distributed.timeout_s = 5 s on the all-reduce of the logged metrics" in err, (
        err[-3000:])


@pytest.mark.parametrize("role", ["outdir", "resume"])
def test_an_output_folder_not_shared_by_the_ranks_is_refused(role, tmp_path):
    """Each rank writing to its own disk: refused at start-up (rank 0's token file is invisible to rank 1), and
    a resume where the ranks found different checkpoints is refused before loading, on every rank."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**_env(rank, 2, port), "FASTINPO_TEST_OUT": str(tmp_path)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_distributed_faults", "--worker", role],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=TIMEOUT_S * 3 + IMPORT_SLACK_S + 60) for p in procs]
    want = ("is not the same folder on every rank: rank 1 on" if role == "outdir" else
            "the ranks did not find the same complete checkpoint to resume from (rank 0: step-00000002; "
            "rank 1: no checkpoint)")
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode != 0
        assert want in err, err[-3000:]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: python -m tests.test_distributed_faults --worker join|reduce|hang")
