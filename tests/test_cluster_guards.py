"""Cluster mistakes caught before any weight loads (docs/DISTRIBUTED.md, "What each failure looks like").

- A resume may change where and how long the ranks talk (``distributed.socket_ifname``, ``distributed.timeout_s``):
  that is the fix for a wrong interface or a timeout too short for a slow file system, and what a run moved to
  another cluster needs. Anything that changes the training is still refused.
- A launcher that starts several processes with ``distributed.backend = "none"`` is refused: each process would
  train alone, all into the same output folder.
"""

from __future__ import annotations

import json

import pytest

from fastinpo.config import load_config
from fastinpo.train.run_folder import check_resume_config


def _checkpoint(tmp_path, config):
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "config": config.to_dict()}))
    return ckpt


BASE = ["model.path=m", "data.path=d", "distributed.backend=deepspeed"]


def test_resume_may_change_the_interface_and_the_timeout(tmp_path):
    ckpt = _checkpoint(tmp_path, load_config(None, BASE))
    check_resume_config(load_config(None, [*BASE, "distributed.socket_ifname=ib0", "distributed.timeout_s=900"]),
                        ckpt, tmp_path)


def test_resume_still_refuses_a_change_of_the_distributed_training(tmp_path):
    ckpt = _checkpoint(tmp_path, load_config(None, BASE))
    with pytest.raises(ValueError, match=r"distributed.deepspeed_config: saved 'zero3', now 'zero2'"):
        check_resume_config(load_config(None, [*BASE, "distributed.deepspeed_config=zero2"]), ckpt, tmp_path)


def test_a_launch_of_several_processes_without_the_deepspeed_backend_is_refused(monkeypatch):
    from fastinpo.train.loop import make_engine

    config = load_config(None, ["model.path=m", "data.path=d", "train.device=cpu"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"started 2 processes \(WORLD_SIZE=2\) but distributed.backend = 'none'.*"
                                         r"--set distributed.backend=deepspeed"):
        make_engine(config)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: one process, as without a launcher
    assert make_engine(config).backend == "none"
