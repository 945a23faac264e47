"""Evaluation: win rates and bootstrap on tables with known answers, folder checks, the report, and the end to
end `sample` + `eval` comparison of two tiny pipelines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastinpo.eval import evaluate as ev
from fastinpo.eval.scorers import CallableScorer
from tests.tolerances import assert_close_fp32


def toy_reward(images, prompts):
    """The toy reward of these tests: mean red channel in [0, 1] (importable for `eval --reward`)."""
    return torch.tensor([np.asarray(im.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255.0 for im in images])


# ----------------------------------------------------------------------------------------------- statistics
def test_win_rate_known_answers():
    assert ev.win_rate([3, 2, 1], [1, 2, 3]) == 0.5  # win, tie, loss
    assert ev.win_rate([1, 1], [1, 1]) == 0.5  # all ties
    assert ev.win_rate([2.0], [1.0]) == 1.0 and ev.win_rate([0.0], [1.0]) == 0.0  # a single pair
    assert ev.win_outcomes([5, 1, 2], [4, 1, 3]).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="paired"):
        ev.win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="no pairs"):
        ev.win_rate([], [])


def test_bootstrap_known_answers():
    assert ev.bootstrap_ci([0.75]) == (0.75, 0.75)  # a single prompt: no spread
    assert ev.bootstrap_ci([0.5] * 7, n=200) == (0.5, 0.5)
    # two values 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> 95% CI [0, 1]
    assert ev.bootstrap_ci([0.0, 1.0], n=4000, seed=1) == (0.0, 1.0)
    v = np.random.default_rng(0).random(50)
    lo, hi = ev.bootstrap_ci(v, n=2000, seed=3)
    assert ev.bootstrap_ci(v, n=2000, seed=3) == (lo, hi), "seeded: reproducible"
    assert lo < v.mean() < hi
    se = v.std(ddof=1) / np.sqrt(v.size)  # the percentile CI is close to mean +- 1.96 standard errors here
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.25 * (2 * 1.96 * se)


def test_per_prompt_outcomes_and_stats():
    a = {("p1", 0): 1.0, ("p1", 1): 2.0, ("p2", 0): 5.0, ("p2", 1): 0.0}
    b = {("p1", 0): 0.0, ("p1", 1): 2.0, ("p2", 0): 1.0, ("p2", 1): 9.0}
    assert ev.per_prompt_outcomes(a, b) == {"p1": 0.75, "p2": 0.5}
    s = ev.mean_stats([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4
    assert_close_fp32(torch.tensor(s["std"]), torch.tensor(np.std([1, 2, 3, 4], ddof=1)))
    assert_close_fp32(torch.tensor(s["sem"]), torch.tensor(np.std([1, 2, 3, 4], ddof=1) / 2))
    assert ev.mean_stats([3.0])["std"] == 0.0


# ----------------------------------------------------------------------------------------------- constructed folders
def _write_folder(path: Path, rows: list[tuple[str, int, int]]):
    """A `sample`-style folder whose images are flat colours with the given red value."""
    path.mkdir(parents=True)
    with (path / "metadata.jsonl").open("w") as f:
        for i, (prompt, seed, red) in enumerate(rows):
            Image.new("RGB", (8, 8), (red, 0, 0)).save(path / f"{i:05d}.png")
            f.write(json.dumps({"index": i, "file": f"{i:05d}.png", "prompt": prompt, "seed": seed}) + "\n")
    return path


def test_run_eval_known_table(tmp_path):
    a = _write_folder(tmp_path / "aligned", [("p1", 0, 100), ("p1", 1, 50), ("p2", 0, 200), ("p2", 1, 200)])
    # B lists the same pairs in another order: pairing is by (prompt, seed), not by position
    b = _write_folder(tmp_path / "base", [("p2", 1, 250), ("p1", 0, 50), ("p1", 1, 50), ("p2", 0, 100)])
    summary = ev.run_eval([a, b], {"red": CallableScorer(toy_reward, name="red")}, tmp_path / "report",
                          not_run={"hpsv2": "no weights given"}, n_bootstrap=500, progress=False)
    (w,) = summary["win_rates"]
    # p1: win (100 > 50), tie (50 = 50) -> 0.75; p2: win (200 > 100), loss (200 < 250) -> 0.5; mean 0.625
    assert (w["a"], w["b"], w["win_rate"]) == ("aligned", "base", 0.625)
    assert (w["a_wins"], w["ties"], w["b_wins"], w["n_prompts"], w["n_pairs"]) == (2, 1, 1, 2, 4)
    assert (w["ci_low"], w["ci_high"]) == ev.bootstrap_ci([0.75, 0.5], n=500, seed=0)
    assert_close_fp32(torch.tensor(summary["means"]["aligned"]["red"]["mean"]),
                      torch.tensor(np.mean([100, 50, 200, 200]) / 255.0), what="mean")
    out = tmp_path / "report"
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {x["model"] for x in lines} == {"aligned", "base"}
    assert json.loads((out / "summary.json").read_text()) == summary
    report = (out / "report.md").read_text()
    assert "| aligned vs base | 62.5% [" in report and "- hpsv2: no weights given" in report
    assert Image.open(out / "scores.png").size[0] > 100


def test_single_prompt_and_single_folder(tmp_path):
    a = _write_folder(tmp_path / "a", [("only", 0, 10)])
    b = _write_folder(tmp_path / "b", [("only", 0, 10)])
    summary = ev.run_eval([a, b], {"red": CallableScorer(toy_reward)}, tmp_path / "r", progress=False)
    w = summary["win_rates"][0]
    assert (w["win_rate"], w["ci_low"], w["ci_high"], w["ties"]) == (0.5, 0.5, 0.5, 1)
    solo = ev.run_eval([a], {"red": CallableScorer(toy_reward)}, tmp_path / "solo", progress=False)
    assert solo["win_rates"] == [] and "Win rates" not in (tmp_path / "solo" / "report.md").read_text()


def test_folder_errors_are_clear(tmp_path):
    a = _write_folder(tmp_path / "a", [("p1", 0, 1), ("p2", 0, 1)])
    b = _write_folder(tmp_path / "b", [("p1", 0, 1), ("p3", 0, 1)])
    scorers = {"red": CallableScorer(toy_reward)}
    with pytest.raises(ValueError, match=r"same \(prompt, seed\) set.*only in a \[\('p2', 0\)\].*only in b "
                                         r"\[\('p3', 0\)\]"):
        ev.run_eval([a, b], scorers, tmp_path / "r", progress=False)
    (a / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in metadata.jsonl are missing: \['00001.png'\]"):
        ev.run_eval([a], scorers, tmp_path / "r", progress=False)
    with pytest.raises(FileNotFoundError, match="not a `fastinpo sample` folder"):
        ev.run_eval([tmp_path], scorers, tmp_path / "r", progress=False)
    (b / "metadata.jsonl").write_text('{"file": "00000.png", "prompt": "p1"}\n')
    with pytest.raises(ValueError, match=r"line 1: missing \['seed'\]"):
        ev.read_folder(b)
    with pytest.raises(ValueError, match="no scorer to run"):
        ev.run_eval([b], {}, tmp_path / "r")
    nan = CallableScorer(lambda images, prompts: [float("nan")] * len(images), name="nan")
    c = _write_folder(tmp_path / "c", [("p1", 0, 1)])
    with pytest.raises(ValueError, match="non-finite"):
        ev.run_eval([c], {"nan": nan}, tmp_path / "r", progress=False)


# ----------------------------------------------------------------------------------------------- end to end
def _cli(module, argv):
    p = argparse.ArgumentParser()
    module.add_cli(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    return args.func(args)


def test_sample_then_eval_two_tiny_pipelines(tiny_pipelines, tmp_path, capsys):
    from fastinpo.eval import sampling
    from fastinpo.models.sd import make_tiny_pipeline
    from tests.test_scorers import make_tiny_clip_folder

    model_b = make_tiny_pipeline(tmp_path / "sd15_seed1", "sd15", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a table\na lighthouse at night\n")
    for name, model in (("sd15_seed0", tiny_pipelines["sd15"]), ("sd15_seed1", model_b)):
        assert _cli(sampling, ["sample", str(model), "--prompts", str(prompts), "--out", str(tmp_path / name),
                               "--seeds", "0", "1", "--steps", "2", "--batch-size", "4", "--no-progress"]) == 0
    clip_dir, _ = make_tiny_clip_folder(tmp_path / "tiny_clip")
    out = tmp_path / "eval"
    assert _cli(ev, ["eval", str(tmp_path / "sd15_seed0"), str(tmp_path / "sd15_seed1"), "--out", str(out),
                     "--clip", str(clip_dir), "--reward", "red=tests.test_evaluate:toy_reward",
                     "--bootstrap", "200", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scorers_run"] == ["clip", "red"]
    assert set(summary["scorers_not_run"]) == {"pickscore", "hpsv2", "imagereward", "aesthetic"}
    # the expected numbers, recomputed from the images themselves
    scores = {}
    for folder in ("sd15_seed0", "sd15_seed1"):
        meta = [json.loads(x) for x in (tmp_path / folder / "metadata.jsonl").read_text().splitlines()]
        images = [Image.open(tmp_path / folder / m["file"]) for m in meta]
        scores[folder] = {(m["prompt"], m["seed"]): float(v) for m, v in zip(meta, toy_reward(images, None),
                                                                             strict=True)}
    assert_close_fp32(torch.tensor(summary["means"]["sd15_seed0"]["red"]["mean"]),
                      torch.tensor(np.mean(list(scores["sd15_seed0"].values()))), what="mean toy reward")
    keys = sorted(scores["sd15_seed0"])
    expected = ev.win_rate([scores["sd15_seed0"][k] for k in keys], [scores["sd15_seed1"][k] for k in keys])
    w = next(x for x in summary["win_rates"] if x["scorer"] == "red")
    assert w["win_rate"] == expected and w["n_pairs"] == 4 and w["n_prompts"] == 2
    assert all(np.isfinite(x["score"]) and x["score"] >= 0
               for x in map(json.loads, (out / "scores.jsonl").read_text().splitlines()))
    assert "sd15_seed0 vs sd15_seed1" in (out / "report.md").read_text() and "| sd15_seed0 vs" in printed
    assert (out / "scores.png").is_file()
