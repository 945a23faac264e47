"""A resume may change where and how long the ranks talk (``distributed.socket_ifname``, ``distributed.timeout_s``):
that is the fix for the cluster faults of docs/DISTRIBUTED.md (a wrong interface, a timeout too short for a slow
file system) and what a run moved to another cluster needs. Anything that changes the training is still refused."""

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
