"""docs/DISTRIBUTED.md stays true to the code: every ``section.key`` it names is a config key, every flag it
passes to ``fastinpo train`` is an option of that command, and every message it quotes from fastinpo is one the
package can print (the part before the first value)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fastinpo.cli import build_parser
from fastinpo.config import Config

REPO = Path(__file__).parents[1]
DOC = (REPO / "docs" / "DISTRIBUTED.md").read_text()
KEY = re.compile(r"(?<![\w.])(model|data|method|lora|optim|train|distributed)\.([a-z_][a-z0-9_]*)\b(?!\()")


def test_every_config_key_named_exists():
    config = Config()
    known = {f"{section.name}.{f.name}" for section in dataclasses.fields(config)
             for f in dataclasses.fields(getattr(config, section.name))}
    named = {f"{m.group(1)}.{m.group(2)}" for m in KEY.finditer(DOC)}
    assert named, "the doc names no config key: the pattern is broken"
    assert named <= known, sorted(named - known)


def test_every_fastinpo_train_flag_exists():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    options = {o for a in sub.choices["train"]._actions for o in a.option_strings}
    used = set()
    for line in DOC.splitlines():
        m = re.search(r"fastinpo(?:\.cli)? train\b(.*)", line)
        if m:
            used |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", m.group(1)))
    assert {"--resume", "--set"} <= used
    assert used <= options, sorted(used - options)


def test_quoted_messages_are_in_the_package():
    source = "".join(p.read_text() for p in (REPO / "fastinpo").rglob("*.py"))
    for fragment in ("could not join the process group within ", "Likely causes: a peer rank never started or ",
                     "gave up: another rank died, hangs, or the network link between the nodes is down",
                     "is not the same folder on every rank: ", "the ranks did not find the same complete checkpoint",
                     "the gradient reduction of a backward pass", "the optimizer step (gradient norm and parameter",
                     "the all-reduce of the logged metrics", "a barrier (the other ranks' checkpoint, export",
                     "the shared-output-folder check at start-up", "the resume-point check (every rank's checkpoint)",
                     "trains in one process: set distributed.backend = 'deepspeed' (e.g. --set "):
        assert fragment in DOC.replace("\n", " "), fragment
        assert fragment in source, fragment
