"""benchmarks/vlt_ablation.py: the two recipes, the cache's recipe record, curves and per-kind scores."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import vlt_ablation  # noqa: E402
from vlt_ablation_report import curve_auc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHIPPED = BENCHMARKS / "results" / "vlt_ablation_runs.json"


def test_the_shipped_cache_reads_under_the_first_recipe_and_is_refused_by_the_paper_one(
    tmp_path: Path, capsys
) -> None:
    cache = tmp_path / "runs.json"
    shutil.copy(SHIPPED, cache)
    vlt_ablation.main(["--seeds", "0,1,2", "--cache", str(cache)])  # no training: every run is cached
    out = capsys.readouterr().out
    assert "| Conv | 65.01 ± 5.51 |" in out and "Nq = 32" in out
    with pytest.raises(SystemExit, match="another recipe"):
        vlt_ablation.main(["--paper", "--seeds", "0", "--cache", str(cache)])


def test_paper_recipe_settings_and_explicit_flags_win() -> None:
    args = vlt_ablation.parse_args(["--paper"])
    assert (args.lower_feat, args.loss_resolution, args.hard, args.queries) == (
        False,
        "output",
        True,
        "1,4,16",
    )
    assert args.eval_every > 0 and args.warmup > 0 and args.channels_last
    config = vlt_ablation.recipe(args, {}, 0, Path("x"))
    assert config["data"]["kwargs"]["hard"] and config["val_data"]["kwargs"]["hard"]
    assert not config["model_kwargs"]["concat_lower_feat"]
    assert config["model_kwargs"]["loss_resolution"] == "output"
    args = vlt_ablation.parse_args(["--paper", "--lower-feat", "--no-hard", "--warmup", "auto"])
    assert args.lower_feat and not args.hard and vlt_ablation.warmup_steps(args, 6000) == 200
    # The first recipe's data kwargs are exactly those of the runs in the shipped cache.
    first = vlt_ablation.recipe(vlt_ablation.parse_args([]), {}, 0, Path("x"))
    assert first["data"]["kwargs"] == {"num_scenes": 4000, "seed": 0, "size": 64}
    assert first["optim"]["warmup_steps"] == 200 and first["precision"] == "fp32"


def test_curve_auc_is_the_mean_over_steps() -> None:
    assert curve_auc([[250, 0.0, 0.0], [500, 0.5, 0.4], [1000, 0.5, 0.6]]) == pytest.approx(
        (250 * 0.25 + 500 * 0.5) / 750
    )
    assert curve_auc([[250, 0.3, 0.3], [500, 0.3, 0.3]], column=2) == pytest.approx(0.3)


def test_quick_paper_run_records_curve_kinds_and_recipe(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "runs.json"
    vlt_ablation.main(["--quick", "--paper", "--tables", "1", "--curriculum", "2", "--cache", str(cache)])
    data = json.loads(cache.read_text())
    assert data["recipe"]["hard"] is True and data["recipe"]["curriculum"] == 2
    run = data["runs"][vlt_ablation.key_of({})]["0"]
    # Evaluations every 2 steps: the curriculum's end (step 2) and the main phase's (step 4).
    assert [int(p[0]) for p in run["curve"]] == [2, 4]
    assert set(run["kinds"]) == {"position", "relation"}
    assert sum(k["count"] for k in run["kinds"].values()) > 0
    assert "AUC" in capsys.readouterr().out
