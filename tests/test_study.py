"""Tests for experiments/study.py: specs, resume, selection on validation, rendering; one smoke run.

Everything but the last test works on fake result JSONs (no training).
"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import study  # noqa: E402  (needs the checkout on sys.path)


def _spec(objective="semppl", seed=0, tag="", percent=1):
  return study.make_specs(study.PRESETS["small"], label_percents=(percent,),
                          objectives=(objective,), seeds=(seed,), tag=tag)[0]


def _evals(ft_val, ft_test, knn_test=0.7):
  """Fake evaluations: two fine-tune grid points, one linear, kNN."""
  return {
      "knn": {"protocol": "knn", "validation": {"knn_top1_k20": knn_test, "knn_top1_k200": 0.6},
              "test": {"knn_top1_k20": knn_test, "knn_top1_k200": 0.6}},
      "linear_h2": {"protocol": "linear", "validation": {"linear_top1": 0.5},
                    "test": {"linear_top1": 0.52}},
      "fine_tune_e0.005_h0.2": {"protocol": "fine_tune", "validation": {"fine_tune_top1": ft_val[0]},
                                "test": {"fine_tune_top1": ft_test[0]}},
      "fine_tune_e0.05_h2": {"protocol": "fine_tune", "validation": {"fine_tune_top1": ft_val[1]},
                             "test": {"fine_tune_top1": ft_test[1]}},
  }


def _fake_result(out, spec, ft_test=(0.70, 0.60), knn=0.7, pla=0.5):
  curves = [{"step": s, "pseudo_label_accuracy": pla * s / 100, "knn_top1_k20": knn * s / 100,
             "semantic_positive_purity": 0.6} for s in (50, 100)]
  pretrain = {"curves": curves, "final_validation": curves[-1], "pretrain_seconds": 1.0}
  result = study.summarise(spec, pretrain, _evals((0.8, 0.7), ft_test, knn))
  study.write_json_atomic(study.result_path(out, spec.run_id), result)
  return result


def test_specs_ids_order_and_json_round_trip():
  specs = study.make_specs(study.PRESETS["small"], label_percents=(1,),
                           objectives=study.OBJECTIVES, seeds=(0, 1), tag="k1",
                           overrides=(("semppl.knn_k", 1),))
  # Seed-major: a partial study already has every objective of seed 0.
  assert [s.run_id for s in specs[:3]] == ["p1_semppl_k1_s0", "p1_relic_k1_s0",
                                           "p1_supervised_k1_s0"]
  # The preset's own overrides come first, the variant's last (the last one wins).
  assert specs[0].overrides[-1] == ("semppl.knn_k", 1)
  assert ("queue.size", 640) in specs[0].overrides
  assert study.RunSpec.from_json(json.loads(json.dumps(specs[0].to_json()))) == specs[0]
  short = study.make_specs(study.PRESETS["full"], label_percents=(10,), objectives=("relic",),
                           seeds=(2,), steps=30)[0]
  assert (short.steps, short.warmup_steps, short.curve_every) == (30, 30, 30)
  assert study.parse_overrides(["semppl.knn_k=1", "semppl.mask_same_class_negatives=True",
                                "data.dataset=fashion_mnist"]) == (
      ("semppl.knn_k", 1), ("semppl.mask_same_class_negatives", True),
      ("data.dataset", "fashion_mnist"))
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    study.parse_overrides(["semppl.knn_k"])


def test_pretrain_config_applies_the_spec():
  spec = _spec(tag="mask")
  spec = study.RunSpec.from_json(dict(
      spec.to_json(), overrides=list(spec.overrides) + [["semppl.knn_k", 3]]))
  c = study.pretrain_config(spec)
  assert (c.data.eval_split, c.data.label_percent, c.objective, c.data.seed) == (
      "validation", 1, "semppl", 0)
  assert (c.data.labelled_batch_size, c.queue.size, c.semppl.knn_k) == (16, 640, 3)
  bad = study.RunSpec.from_json(dict(spec.to_json(), overrides=[["semppl.nope", 1]]))
  with pytest.raises(ValueError, match="no field 'semppl.nope'"):
    study.pretrain_config(bad)


@pytest.mark.parametrize("preset", sorted(study.PRESETS))
def test_every_preset_builds_configs_that_validate(preset):
  # A preset is only data: a wrong override or an invalid value would otherwise surface an hour
  # into a study, when its run starts.
  from semppl_jax.jaxline import experiment_config  # pylint: disable=g-import-not-at-top
  settings = study.PRESETS[preset]
  specs = study.make_specs(settings, label_percents=settings["label_percents"],
                           objectives=study.OBJECTIVES, seeds=(0,))
  for spec in specs:
    pretrain = study.pretrain_config(spec)
    experiment_config.validate_pretrain_config(pretrain, num_devices=1)
    assert (pretrain.objective, pretrain.data.label_percent) == (spec.objective,
                                                                 spec.label_percent)
    jobs = study.evaluation_jobs(spec)
    assert len(jobs) == 1 + len(spec.linear_head_lrs) + len(spec.finetune_grid)
    for _, protocol, steps, encoder_lr, head_lr in jobs:
      c = study.eval_config(spec, protocol, "validation", "/nonexistent", steps, encoder_lr,
                            head_lr)
      experiment_config.validate_eval_config(c, num_devices=1)


def test_atomic_write_and_resume(tmp_path):
  out = str(tmp_path)
  specs = [_spec("semppl"), _spec("relic"), _spec("supervised")]
  _fake_result(out, specs[0])
  # A torn write (what a crash mid-write would leave without os.replace) counts as unfinished.
  with open(study.result_path(out, specs[1].run_id), "w") as f:
    f.write('{"run_id": "p1_relic_s0", "reported": {')
  assert [s.run_id for s in study.pending(specs, out)] == ["p1_relic_s0", "p1_supervised_s0"]
  assert not [n for n in os.listdir(os.path.join(out, "results")) if ".tmp" in n]
  # A rerun with every run finished starts nothing and renders the tables.
  for s in specs[1:]:
    _fake_result(out, s)
  code = study.main(["--preset=small", f"--out={out}", "--seeds=0", "--label_percents=1"])
  assert code == 0
  with open(os.path.join(out, "tables.md")) as f:
    assert "p1_relic_s0" in f.read()


def test_selection_uses_validation_never_test():
  # Grid point 0 is best on validation (0.8) and worse on test (0.70 vs 0.75): it is reported.
  name, entry = study.choose(_evals((0.8, 0.7), (0.70, 0.75)), "fine_tune")
  assert name == "fine_tune_e0.005_h0.2" and entry["test"]["fine_tune_top1"] == 0.70
  result = study.summarise(_spec(), {"curves": [], "final_validation": {},
                                     "pretrain_seconds": 0.0},
                           _evals((0.8, 0.7), (0.70, 0.75)))
  assert result["reported"]["test"]["fine_tune"] == 0.70
  assert result["reported"]["validation"]["fine_tune"] == 0.8
  assert result["chosen"] == {"fine_tune": "fine_tune_e0.005_h0.2", "linear": "linear_h2"}


def test_mean_std_and_tables(tmp_path):
  mean, std = study.mean_std([1.0, 2.0, 3.0])
  assert mean == 2.0 and std == pytest.approx(1.0)  # Sample std (ddof = 1).
  assert study.mean_std([4.0]) == (4.0, 0.0)
  out = str(tmp_path)
  for seed, (ft, knn) in enumerate([(0.80, 0.70), (0.82, 0.72), (0.84, 0.74)]):
    _fake_result(out, _spec("semppl", seed), ft_test=(ft, 0.1), knn=knn)
    _fake_result(out, _spec("relic", seed), ft_test=(ft - 0.10, 0.1), knn=knn - 0.01)
  results = study.load_results(out)
  table = study.render_table(results, "test")
  assert "| 1 % | default | semppl | 0,1,2 | 200 | 82.00 ± 2.00 |" in table
  assert "| 1 % | default | relic | 0,1,2 | 200 | 72.00 ± 2.00 |" in table
  lines = study.target_check(results, "test").splitlines()
  assert any("relic on fine-tune (test) = +10.00 points (spread 2.00 + 2.00): holds" in line
             for line in lines)
  assert any("relic on kNN k=20 (test) = +1.00 points (spread 2.00 + 2.00): does not hold" in line
             for line in lines)
  text = study.render(out, docs_dir=os.path.join(out, "docs"))
  assert "Validation split" in text and "p1_semppl_s2" in text
  png = os.path.join(out, "plots", "curves_p1_default.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.exists(os.path.join(out, "docs", "curves_p1_default.png"))
  # A SemPPL variant adds its own figure and one comparing SemPPL's variants.
  _fake_result(out, _spec("semppl", 0, tag="mask"), knn=0.9)
  study.render(out)
  for name in ("curves_p1_mask.png", "curves_p1_semppl_variants.png"):
    assert os.path.exists(os.path.join(out, "plots", name))
  assert "| 1 % | mask | semppl | 0 |" in study.render_table(study.load_results(out))
  # Paired by seed against the default run: fine-tune 70 vs 80, kNN 90 vs 70 (test).
  variants = study.render_variants(study.load_results(out), "test")
  assert "| 1 % | mask | semppl | 0 | -10.00 ± 0.00 | +20.00 ± 0.00 | +0.00 ± 0.00 |" in variants


@pytest.mark.slow
def test_two_step_smoke_run(tmp_path):
  """The whole worker path once: 2 pre-training steps, kNN, linear and fine-tune on both splits
  (evaluations cut to 256 images), result JSON; a rerun of the worker reuses what is on disk."""
  spec = study.RunSpec.from_json(dict(
      _spec("semppl").to_json(), steps=2, warmup_steps=1, curve_every=1, save_every=1,
      finetune_steps=2, finetune_grid=[[0.005, 0.2]], linear_steps=2, linear_head_lrs=[2.0],
      max_eval_examples=256))
  out = str(tmp_path)
  result = study.run_worker(spec, out)
  assert [p["step"] for p in result["curves"]] == [1, 2]
  for split in ("validation", "test"):
    assert set(result["reported"][split]) >= {"fine_tune", "linear", "knn_k20", "knn_k200",
                                              "pseudo_label_accuracy"}
    for value in result["reported"][split].values():
      assert 0.0 <= value <= 1.0
  assert study.load_results(out)[0]["run_id"] == "p1_semppl_s0"
  again = study.run_worker(spec, out)  # Resumes at step 2, evaluations read back from disk.
  assert again["evaluations"] == result["evaluations"]
  assert again["curves"] == result["curves"]
