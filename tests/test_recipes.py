"""Recipes for a time budget (`fastchar train --recipe`), and a time budget that no default step
count cuts short and whose final evaluation fits inside it."""

from __future__ import annotations

import json
import shlex
import time

import pytest

from fastchar import recipes
from fastchar.cli import build_parser, main
from fastchar.config import NO_STEP_LIMIT, ModelConfig, TrainConfig
from tests.test_cli import assert_clean_error, run


def stored_configs(folder):
    meta = json.loads((folder / "latest" / "meta.json").read_text())
    return meta


def test_list_prints_every_recipe_as_flags_that_parse_back_to_it(capsys):
    code, out, err = run(capsys, "train", "--recipe", "list")
    assert code == 0, err
    parser = build_parser()
    for recipe in recipes.RECIPES.values():
        line = next(x for x in out.splitlines() if x.strip().startswith("fastchar train") and recipe.flags() in x)
        args = parser.parse_args(shlex.split(line.strip())[1:])
        for name, value in recipe.model.items():
            assert getattr(args, name) == value, name
        for name, value in recipe.train.items():
            assert getattr(args, name) == value, name
        assert args.precision == recipe.precision
        assert recipe.name in out and recipe.summary in out
        ModelConfig(vocab_size=65, **recipe.model)  # each recipe is a legal configuration
        TrainConfig(**recipe.train)


def test_recipes_set_a_budget_and_no_step_count():
    assert {"one-minute", "ten-minutes"} <= set(recipes.RECIPES)
    assert recipes.RECIPES["one-minute"].train["time_budget"] == 60
    assert recipes.RECIPES["ten-minutes"].train["time_budget"] == 600
    for recipe in recipes.RECIPES.values():
        assert "steps" not in recipe.train and "out" not in recipe.train


def test_unknown_recipe_is_a_clear_error(capsys):
    code, out, err = run(capsys, "train", "--recipe", "one-hour")
    assert_clean_error(code, err, "--recipe 'one-hour': no such recipe")
    assert "one-minute" in err and "--recipe list" in err


def test_recipe_cannot_be_mixed_with_resume(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--recipe", "one-minute", "--resume", str(tmp_path))
    assert_clean_error(code, err, "--recipe starts a new run")


def test_flags_beside_a_recipe_override_it(capsys, corpus, tmp_path):
    recipe = recipes.RECIPES["one-minute"]
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--recipe", "one-minute", "--data", str(corpus), "--out", str(out_dir),
                         "--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
                         "--time-budget", "1.5", "--eval-batches", "2", "--sample-chars", "0",
                         "--backend", "numpy")  # fmt: skip
    assert code == 0, err
    meta = stored_configs(out_dir)
    train, model = meta["train"], meta["model"]
    assert (model["d_model"], model["n_layer"], model["ctx"]) == (32, 1, 16)  # given
    assert model["position"] == recipe.model["position"] and model["dropout"] == recipe.model["dropout"]
    assert (train["batch"], train["time_budget"]) == (4, 1.5)  # given
    for name in ("lr", "min_lr", "warmup", "eval_every"):  # the recipe's
        assert train[name] == recipe.train[name], name
    assert train["steps"] == NO_STEP_LIMIT, "a time budget is not cut short by the default step count"


def test_time_budget_is_not_cut_short_by_the_default_steps(capsys, corpus, tmp_path):
    """The README's complaint: `--time-budget 600` stopped at the default 2,000 steps. With a tiny
    model, 2,000 steps take far less than the budget, so the run must go past them."""
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", str(corpus), "--out", str(out_dir), "--time-budget", "4",
                         "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--ctx", "8", "--batch", "2",
                         "--eval-every", "100000", "--eval-batches", "1", "--log-every", "100000",
                         "--sample-chars", "0", "--backend", "numpy")  # fmt: skip
    assert code == 0, err
    done = next(x for x in out.splitlines() if x.startswith("done: step"))
    steps = int(done.split()[2])
    assert steps > TrainConfig().steps, done
    assert "steps=no limit" in out


def test_explicit_steps_still_cap_a_budget(capsys, corpus, tmp_path):
    code, out, err = run(capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "r"),
                         "--time-budget", "60", "--steps", "7", "--d-model", "16", "--n-layer", "1", "--n-head", "2",
                         "--ctx", "8", "--batch", "2", "--eval-batches", "1", "--sample-chars", "0",
                         "--backend", "numpy")  # fmt: skip
    assert code == 0, err
    assert "done: step 7 " in out


def test_final_evaluation_fits_inside_the_budget(corpus, tmp_path):
    """Evaluation counts against the budget: the run stops early enough for its last evaluation
    and its checkpoints (here about a tenth of the budget, timed at the evaluations before) to end
    by the deadline."""
    from tests.test_train import make

    budget = 3.0
    probe = make(corpus, tmp_path, name="probe", steps=1, eval_batches=200)
    start = time.perf_counter()
    probe.evaluate()
    batches = max(20, int(200 * 0.4 / (time.perf_counter() - start)))  # an evaluation of about 0.4 s here
    trainer = make(corpus, tmp_path, steps=10**6, warmup=2, eval_every=40, eval_batches=batches, time_budget=budget)
    summary = trainer.train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    first_eval = evals[0]["elapsed"]  # the step-0 evaluation: how long one takes
    assert first_eval > 0.1 * budget, "the evaluation must be long enough to matter for this test"
    # without the reserve the last evaluation would end about one evaluation late; evaluation times
    # on a shared machine vary by a third or more, hence the slack
    assert evals[-1]["elapsed"] <= budget + 0.75 * first_eval, (evals[-1], first_eval)
    assert summary["elapsed"] <= budget + 0.75 * first_eval
    assert trainer.step > 2


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_train_help_names_each_recipe(capsys, name):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert name in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("switch", ["", "1"])
def test_a_bf16_recipe_trains_in_fp32_where_bf16_is_unavailable(capsys, corpus, tmp_path, monkeypatch, switch):
    from fastchar import _gemm

    monkeypatch.setenv("FASTCHAR_DISABLE_BF16", switch)
    recipe = recipes.RECIPES["ten-minutes"]
    assert recipe.precision == "bf16"
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--recipe", "ten-minutes", "--data", str(corpus), "--out", str(out_dir),
                         "--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--time-budget", "1",
                         "--eval-batches", "2", "--sample-chars", "0", "--backend", "cython")  # fmt: skip
    assert code == 0, err
    want = "bf16" if _gemm.has_avx512bf16() else "fp32"
    assert json.loads((out_dir / "latest" / "meta.json").read_text())["precision"] == want
    assert ("training in fp32" in err) == (want == "fp32")
    assert recipes.precision_here(recipe, "numpy") == ("bf16", None)  # the reference computes bf16 anywhere
    assert recipes.precision_here(recipe, "numba")[0] == "fp32"
