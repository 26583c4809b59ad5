"""A recipe study through ``gradscope.profile``: its training claims are decided on the final training error (in
percentage points, never nats) with the test error and the paper's Table 6 beside them, in the results, claims.md,
summary.json and the terminal (issue 25)."""
from __future__ import annotations

import io
import json

from rich.console import Console

import gradscope
from gradscope.render.page import report_html
from gradscope.render.terminal import print_results
from tests.fixtures.cifar_folder import write_cifar


def test_recipe_claims_are_decided_on_the_training_error(tmp_path, one_thread):
    # 40 training images: batches of 40 (the recipe's 128 capped at the split), so four short runs stay cheap
    data = write_cifar(tmp_path / "cifar", n_train=40, n_test=20)
    out = tmp_path / "out"
    results = gradscope.profile(recipe="he2016", iterations=2, models=["resnet20", "resnet32"], seeds=[0, 1],
                                data=str(data), workers=1, init_batches=1, out=str(out), format="records")
    claims = {c.key: c for c in results.claims}
    deg, res = claims["degradation"], claims["residual"]
    assert "final training error" in deg.evidence  # no plain nets: says what it would be decided on
    assert res.unit == "points" and res.estimate is not None
    assert "resnet32-bn - resnet20-bn final training error" in res.evidence and "points" in res.evidence
    assert "(chance 90%)" in res.evidence and "1-point margin" in res.how
    # each run records the examples behind its errors (batches capped at the 40-image split; 20 test images), so
    # the binomial noise floors the intervals: two seeds of 40 examples each decide nothing here
    assert {(c["batch_images"], c["test_images"]) for c in results.configs.values()} == {(40, 20)}
    assert res.answer == "unclear" and "the binomial noise of the examples each error counts" in res.how
    assert "test error of the last evaluation" in res.evidence and "Table 6: 8.75%" in res.evidence
    assert "Table 6: 7.51%" in res.evidence
    for claim in (deg, res):
        assert "nat" not in claim.evidence + claim.how
        assert "training error of the last 1 iterations" in claim.caveat  # 5% of 2 iterations, at least one
    text = (out / "claims.md").read_text()
    assert "final training error" in text and "Table 6: 7.51%" in text and " nats" not in text
    summary = {c["key"]: c for c in json.loads((out / "summary.json").read_text())["claims"]}
    assert summary["residual"]["unit"] == "points"
    console = Console(file=io.StringIO(), width=200)
    print_results(results, console)
    shown = console.file.getvalue()
    assert "final training error" in shown and "Table 6: 8.75%" in shown
    page = report_html(results, [], [], out, {}, "")  # the report.html of format="full", without its figures
    assert "final training error" in page and "Table 6: 7.51%" in page and "1-point margin" in page


def test_a_recipe_records_the_recipe_it_ran_not_the_default_studys_numbers():
    """provenance keeps what the recipe used (batch 128, lr 0.1, its iterations), not the default study's steps 300,
    batch 32 and lr 0.01, which a recipe never reads."""
    from gradscope.pipeline.options import Options

    record = Options(recipe="he2016-short", data="/nonexistent", iterations=7).record()
    assert "steps" not in record and "batch_size" not in record and "lr" not in record
    assert record["recipe_used"]["batch_size"] == 128 and record["recipe_used"]["lr"] == 0.1
    assert record["recipe_used"]["iterations"] == 7
