"""The report folder: records that load back equal, figures that exist and hold the data, honest notes."""
from __future__ import annotations

import base64
import math
import re
import struct
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from gradscope import agreement as G, analysis as A  # noqa: E402
from gradscope.render import report as R  # noqa: E402
from gradscope import schema as S  # noqa: E402
from gradscope import store  # noqa: E402
from gradscope.errors import DataError, OutputError  # noqa: E402


def frame(n_blocks=12, n_steps=5, runs=("only",), metrics=(S.ACT_VAR, S.GRAD_NORM, S.PARAM_GRAD_NORM), seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for i, run in enumerate(runs):
        k = np.tile(np.arange(n_blocks), n_steps)
        st = np.repeat(np.arange(n_steps), n_blocks)
        for m in metrics:
            parts.append(pd.DataFrame({
                S.STEP: st.astype("int64"), S.BLOCK: [f"layer{j // 9 + 1}.{j % 9}" for j in k],
                S.DEPTH: k.astype("int64"), S.KIND: "BasicBlock", S.METRIC: m,
                S.VALUE: (1.1 + i) ** k * np.exp(rng.normal(0, 0.1, k.size)), S.CALL: np.zeros(k.size, "int64"),
                S.RUN: run}))
    f = pd.concat(parts, ignore_index=True)
    return f if len(runs) > 1 else f.drop(columns=[S.RUN])


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# --- records round trip ---------------------------------------------------------------------------------------

def awkward_frame() -> pd.DataFrame:
    f = frame(n_blocks=4, n_steps=3, runs=("NA", "None"))
    f[S.VALUE] = f[S.VALUE].astype("float64")
    f.loc[0, S.VALUE] = np.nan
    f.loc[1, S.VALUE] = np.inf
    f.loc[2, S.VALUE] = 1e-310  # subnormal: must survive the text format exactly
    f.loc[3, S.VALUE] = 0.1 + 0.2
    f[S.MODEL] = "resnet20"
    f[S.BN] = f[S.RUN] == "NA"
    f[S.RESIDUAL] = True
    f[S.SHORTCUT] = pd.Series(np.where(f[S.RUN] == "NA", "A", None), dtype="str")  # missing for one run
    f[S.INIT] = "kaiming"
    f[S.SEED] = np.int64(7)
    return f


@pytest.mark.parametrize("name", [store.PARQUET, store.CSV])
def test_records_round_trip_exactly(tmp_path, name):
    f = awkward_frame()
    store.write_records(f, tmp_path)
    back = store.read_records(tmp_path / name)
    pd.testing.assert_frame_equal(back, f, check_exact=True)
    assert back[S.RUN].tolist()[:1] == ["NA"]  # not turned into a missing value


@pytest.mark.parametrize("name", [store.PARQUET, store.CSV])
def test_records_keep_unusual_dtypes(tmp_path, name):
    f = frame(n_blocks=3, n_steps=2)
    f[S.STEP] = f[S.STEP].astype("int32")
    f[S.BLOCK] = f[S.BLOCK].astype(object)
    f[S.METRIC] = pd.Categorical(f[S.METRIC], categories=[S.PARAM_GRAD_NORM, S.GRAD_NORM, S.ACT_VAR])
    f[S.KIND] = f[S.KIND].astype("string")
    store.write_records(f, tmp_path)
    pd.testing.assert_frame_equal(store.read_records(tmp_path / name), f, check_exact=True)


def test_csv_without_dtypes_file_uses_the_schema(tmp_path):
    f = frame(n_blocks=3, n_steps=2)
    store.write_records(f, tmp_path)
    (tmp_path / store.DTYPES).unlink()
    pd.testing.assert_frame_equal(store.read_records(tmp_path / store.CSV), f, check_exact=True)


def test_read_records_of_a_folder_and_bad_paths(tmp_path):
    f = frame(n_blocks=3, n_steps=2)
    store.write_records(f, tmp_path)
    pd.testing.assert_frame_equal(store.read_records(tmp_path), f)
    with pytest.raises(DataError, match="no records"):
        store.read_records(tmp_path / "nope.csv")


# --- the report -----------------------------------------------------------------------------------------------

def test_report_of_a_110_block_200_step_frame(tmp_path):
    f = frame(n_blocks=110, n_steps=200)
    out = R.write_report(f, tmp_path / "rep")
    expect = {f"{kind}_{m}.png" for kind in ("heatmap", "profile") for m in (S.GRAD_NORM, S.ACT_VAR, S.PARAM_GRAD_NORM)}
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == expect  # one run: no runs_*.png
    for name in pngs:
        w, h = png_size(out / name)
        assert 500 <= w <= 4000 and 300 <= h <= 4000 and (out / name).stat().st_size > 5_000
    assert plt.get_fignums() == []  # every figure closed
    pd.testing.assert_frame_equal(store.read_records(out / store.PARQUET), f)
    v = pd.read_csv(out / R.VERDICTS_CSV)
    direct = A.verdicts(f, step="all")  # a training frame: one verdict per recorded step, never one average
    assert len(v) == len(direct) == 2 * 200 and set(v["phase"]) == {"train"}
    assert list(v[A.VERDICT]) == list(direct[A.VERDICT])
    np.testing.assert_allclose(v[A.FACTOR], direct[A.FACTOR], rtol=1e-12)
    summary = (out / R.SUMMARY).read_text()
    for name in pngs:
        assert f"]({name})" in summary
    for _, r in direct[direct[S.STEP] == 199].iterrows():  # the last step's sentences
        assert A.sentence({**r, "phase": "train"}) in summary


def test_report_of_several_runs_draws_the_run_comparison(tmp_path):
    f = frame(n_blocks=9, n_steps=3, runs=("plain20", "resnet20", "plain20-bn"))
    out = R.write_report(f, tmp_path)
    for m in (S.GRAD_NORM, S.ACT_VAR, S.PARAM_GRAD_NORM):
        assert (out / f"runs_{m}.png").exists()
    text = (out / R.SUMMARY).read_text()
    assert "plain20-bn (train at step 2):" in text and "resnet20 (train at step 2):" in text


def test_missing_metrics_are_reported_not_fatal(tmp_path):
    f = frame(n_blocks=6, n_steps=3, metrics=(S.GRAD_NORM,))
    out = R.write_report(f, tmp_path)
    assert (out / "heatmap_grad_norm.png").exists() and (out / "profile_grad_norm.png").exists()
    assert not (out / "heatmap_act_var.png").exists() and not (out / "profile_param_grad_norm.png").exists()
    for doc in (out / R.SUMMARY, out / R.HTML):
        text = doc.read_text()
        assert "act_var is not in the frame" in text and "param_grad_norm is not in the frame" in text
    v = pd.read_csv(out / R.VERDICTS_CSV)
    assert list(v[A.SIGNAL]) == [A.BACKWARD] * 3  # one per recorded step


def test_html_is_self_contained_and_embeds_every_figure(tmp_path):
    out = R.write_report(frame(n_blocks=8, n_steps=3, runs=("a", "b")), tmp_path)
    page = (out / R.HTML).read_text()
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # the inlined plotly.js names URLs in strings
    assert "cdn.plot.ly" not in markup and len(markup) < len(page)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", markup)
    assert "default-src 'none'" in page  # and the page's CSP forbids every fetch anyway
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    pngs = sorted(out.glob("*.png"))
    assert len(srcs) == len(pngs) == 9
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {p.read_bytes() for p in pngs}
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def test_report_rejects_empty_frames_and_unwritable_folders(tmp_path):
    with pytest.raises(DataError, match="empty"):
        R.write_report(frame().iloc[:0], tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        R.write_report(frame(n_blocks=3, n_steps=1), blocker / "sub")


def test_report_draws_theory_dashed_and_says_where_it_parts(tmp_path):
    """A frame whose config columns name a known model: theory beside measurement in figures and text."""
    from gradscope import agreement as G
    from gradscope import theory as T

    n, steps = 10, 3
    rows = []
    for st in range(steps):  # a Xavier ReLU MLP measured exactly on theory forward, and far off backward
        for k in range(n):
            rows.append((st, f"blocks.{k}", k, S.ACT_VAR, 0.5 ** k))
            rows.append((st, f"blocks.{k}", k, S.GRAD_NORM, 1.3 ** (n - 1 - k)))
    f = pd.DataFrame(rows, columns=[S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE]).assign(
        **{S.KIND: "PlainBlock", S.CALL: 0, S.RUN: "mlp-xavier", S.MODEL: "mlp", S.BN: False, S.RESIDUAL: False,
           S.SHORTCUT: None, S.INIT: "xavier", S.SEED: 0})
    pred = G.predicted_profiles(f, S.ACT_VAR)
    assert pred == {"mlp-xavier": pytest.approx([0.5 ** k for k in range(n)])}
    back = G.predicted_profiles(f, S.GRAD_NORM)["mlp-xavier"]  # by blocks travelled from the output end
    assert back == pytest.approx([math.sqrt(0.5) ** t for t in range(n)])
    out = R.write_report(f, tmp_path, phase="init")  # theory describes initialisation: init frames only
    v = pd.read_csv(out / R.VERDICTS_CSV).set_index(A.SIGNAL)
    assert v.loc["forward", A.AGREES] == True and v.loc["backward", A.AGREES] == False  # noqa: E712
    assert v.loc["backward", A.PREDICTED_FACTOR] == pytest.approx(T.relu_layer_factor("xavier", 1, 1) ** 0.5)
    text = (out / R.SUMMARY).read_text()
    assert "### Theory beside measurement" in text and "disagrees: one seed: measured x1.30 vs theory x0.71" in text
    assert "theory: DISAGREES" in text
    train = pd.read_csv(R.write_report(f, tmp_path / "train", phase="train") / R.VERDICTS_CSV)
    assert train[A.PREDICTED_FACTOR].isna().all()  # no theory attached to training frames


def test_unknown_models_get_no_theory_rather_than_a_guess():
    f = frame(n_blocks=5, n_steps=2).assign(**{S.RUN: "custom", S.MODEL: "my_transformer"})
    v = G.verdicts(f)
    assert v[A.PREDICTED_FACTOR].isna().all() and v[A.AGREES].isna().all()
    assert all("no theory for model 'my_transformer'" in t for t in v[A.THEORY_NOTE])
    assert "theory" not in A.sentence(v.iloc[0])
