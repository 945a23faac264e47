"""Every message that tells the user what to do names a real flag or config key.

Walks every string literal of the package (messages, help texts, f-string parts): each ``--flag`` must be an
option of a ``fastinpo`` subcommand — of the one named when the text says ``fastinpo CMD ... --flag`` — and each
``section.key`` must be a key of the config schema. Flags of other programs that messages quote on purpose are
listed with the program they belong to.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

import fastinpo
from fastinpo.cli import build_parser
from fastinpo.config import Config

PACKAGE = Path(fastinpo.__file__).parent
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")
KEY = re.compile(r"(?<![\w.])(model|data|method|lora|optim|train|distributed)\.([a-z_][a-z0-9_]*)\b(?!\()")
COMMAND = re.compile(r"`fastinpo ([a-z][a-z-]*)([^`]*)`")
OTHER_PROGRAMS = {  # flag -> the program it belongs to
    "--no-deps": "pip", "--no-build-isolation": "pip", "--nproc_per_node": "torchrun",
    "--loss_type": "diffusers' train_diffusion_dpo.py (the drop-in loss docs quote it)",
}


def _subcommand_options() -> dict[str, set[str]]:
    def options(p) -> set[str]:
        """A parser's options and those of its own subcommands (`fastinpo data inspect --sheet` counts for
        `fastinpo data`)."""
        found = {o for a in p._actions for o in a.option_strings}
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                found |= set().union(*(options(c) for c in a.choices.values()))
        return found

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: options(p) for name, p in sub.choices.items()}


def _strings() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((str(path.relative_to(PACKAGE.parent)), node.lineno, node.value))
    return out


def _config_keys() -> set[str]:
    hints = typing.get_type_hints(Config)
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(hints[s.name])}


def test_every_suggested_flag_exists():
    options = _subcommand_options()
    every = set().union(*options.values())
    bad = []
    for where, line, text in _strings():
        for m in COMMAND.finditer(text):
            cmd, rest = m.group(1), m.group(2)
            if cmd in options:
                bad += [f"{where}:{line}: `fastinpo {cmd}` has no --{f}" for f in FLAG.findall(rest)
                        if f"--{f}" not in options[cmd]]
        for f in FLAG.findall(text):
            if f"--{f}" not in every and f"--{f}" not in OTHER_PROGRAMS:
                bad.append(f"{where}:{line}: no fastinpo command has --{f}")
    assert not bad, "\n".join(bad)


def test_every_suggested_config_key_exists():
    keys = _config_keys()
    bad = [f"{where}:{line}: {m.group(0)} is not a config key" for where, line, text in _strings()
           for m in KEY.finditer(text) if m.group(0) not in keys]
    assert not bad, "\n".join(bad)


def test_the_audit_catches_a_made_up_flag_and_key():
    assert FLAG.findall("pass --overwrite or `fastinpo cache --frobnicate`") == ["overwrite", "frobnicate"]
    assert "--frobnicate" not in _subcommand_options()["cache"]
    assert "data.keep_tiez" not in _config_keys() and "data.keep_ties" in _config_keys()
    assert [m.group(0) for m in KEY.finditer("fastinpo.train.loop; set data.keep_ties")] == \
        ["data.keep_ties"]
