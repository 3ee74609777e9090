"""One experiment run alone on one tiny case (no bulk maps, no other experiment), from the run context
(msxai.experiments.state.RunContext) that plan_run builds: it writes only its own rows, and the same rows as within
a whole run (where it reuses the TP's bulk map instead of computing it)."""

import pytest
import torch

from test_experiments_helpers import tiny_model, write_cohort

from msxai.experiments.bulk import run_bulk
from msxai.experiments.cohort import cohort_cases
from msxai.experiments.conditions import run_exp1, run_exp4, run_randomization
from msxai.experiments.runner import segment_cases
from msxai.experiments.selection import plan_run
from msxai.experiments.state import ExperimentConfig, ModelResults

torch.set_num_threads(1)
CFG = ExperimentConfig(samples=2, max_lesions_per_class=1, n_tn=1, n_boot=50, randomization_lesions=1,
                       progress=False)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ds = write_cohort(tmp_path_factory.mktemp("alone") / "cohort", n=1)
    model = tiny_model()
    return model, segment_cases(model, cohort_cases(ds), CFG)


def context(case):
    model, states = case
    return plan_run(model, states, CFG, ModelResults(model.name, model.source, CFG.as_dict()))


def test_experiment_4_alone_equals_its_rows_in_a_run(case):
    alone = context(case)
    run_exp4(alone)
    res = alone.res
    assert res.lesions == [] and res.exp1 == [] and res.exp5 == [] and res.randomization == []
    assert not alone.keep_full and set(res.timings) == {"exp4_s"}
    cid, lid, voxels = alone.exp4_target
    rows = res.exp4
    assert [r["domain"] for r in rows] == [f"TP lesion {lid}", "single voxel at the TP's centre of mass",
                                          "healthy-WM ball (93 mm^3)"]
    assert rows[0]["voxels"] == voxels and rows[1]["voxels"] == 1
    assert rows[0]["flair_range_vs_tp"] == rows[0]["mprage_range_vs_tp"] == 1.0

    whole = context(case)
    run_bulk(whole)  # the TP's map comes from the bulk maps here
    assert f"{cid}|TP:{lid}" in whole.keep_full
    run_exp4(whole)
    for a, b in zip(rows, whole.res.exp4):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_experiment_1_and_randomisation_alone(case):
    alone = context(case)
    run_exp1(alone)
    run_randomization(alone)
    assert alone.res.lesions == [] and alone.res.exp4 == []
    assert {r["aggregation"] for r in alone.res.exp1} == {"max", "mean"}
    assert len(alone.res.randomization) == 1 and abs(alone.res.randomization[0]["flair_spearman"]) < 0.99
    whole = context(case)
    run_bulk(whole)
    run_exp1(whole)
    run_randomization(whole)
    for got, want in ((alone.res.exp1, whole.res.exp1), (alone.res.randomization, whole.res.randomization)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
