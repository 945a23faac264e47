"""The command line: ``fastinpo env`` and ``fastinpo quickstart``."""

from __future__ import annotations

import json
import subprocess
import sys

from fastinpo.cli import main


def test_env_reports_backends(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {b["name"]: b for b in info["backends"]}
    assert names["reference"]["available"] is True
    assert set(names) == {"reference", "triton", "triton-interpreter", "ext-cpu", "ext-cuda"}
    assert "diffusion_dpo_loss" in info["ops"] and "reference" in info["ops"]["diffusion_dpo_loss"]
    assert info["packages"]["torch"].startswith("2.")
    assert main(["env"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_quickstart_runs(capsys):
    assert main(["quickstart", "--pairs", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "DDIM-InPO" in out and "Inversion-DPO" in out


def test_bad_arguments_give_a_clear_error(capsys):
    assert main(["quickstart", "--pairs", "0"]) == 2
    assert "pairs must be >= 1" in capsys.readouterr().err
    assert main(["quickstart", "--backend", "cuda"]) == 2
    assert "unknown backend 'cuda'" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastinpo", "env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "reference" in out.stdout


def test_shipped_configs_load():
    """Every config in configs/ is valid (types, known keys, cross-field rules)."""
    from pathlib import Path

    from fastinpo.config import load_config

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert len(configs) >= 5
    for path in configs:
        config = load_config(path)
        assert config.method.beta > 0, path


def test_tiny_example_from_the_readme_runs(tmp_path, monkeypatch):
    """The README's tiny example: make-tiny-pipeline, make-tiny-data, train configs/tiny-cpu.toml (shortened)."""
    from pathlib import Path

    config = Path(__file__).parents[1] / "configs" / "tiny-cpu.toml"
    monkeypatch.chdir(tmp_path)
    assert main(["make-tiny-pipeline", "runs/tiny-sdxl", "--arch", "sdxl"]) == 0
    assert main(["make-tiny-data", "runs/tiny-data", "--rows", "12"]) == 0
    assert main(["train", str(config), "--set", "train.max_steps=2", "--set", "train.progress=false"]) == 0
    assert (tmp_path / "runs/tiny-inpo/export/unet/config.json").is_file()
    assert (tmp_path / "runs/tiny-inpo/config.yaml").is_file()
