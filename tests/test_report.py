"Report: the page renders offline in headless Chromium, bad input is named, the summary marks only significant rows."
import copy, json, os, re

import pytest

from mmrlhf.core import DataError
from mmrlhf.configs import ReportConfig
from mmrlhf.report import (check_comparison, check_rewardbench, check_run, example_inputs,
                           find_chromium, render_census, report_html, run_report, scores_figure,
                           terminal_summary, write_report)


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"): pytest.fail("CI is set but no Chromium binary was found: .ci/run installs Debian's 'chromium'")
        pytest.skip("no Chromium binary (install Debian's 'chromium' or set $CHROMIUM); in CI this fails instead")
    return path


@pytest.fixture
def inputs():
    return example_inputs()


def expected_marks(runs, comparisons, rewardbench):
    "Per figure div: (bar shapes, whiskers) that a drawn page must hold, counted from the inputs."
    keys = {(b, m) for r in runs for b, res in r["benchmarks"].items() for m in res["metrics"]}
    values = sum(len(res["metrics"]) for r in runs for res in r["benchmarks"].values())
    out = {"scores": (len(runs) * len(keys), values)}
    for i, c in enumerate(comparisons): out[f"delta-{i}"] = (len(c["rows"]), len(c["rows"]))
    n_rb = 2 * sum(len(cats) for cats in check_rewardbench(rewardbench).values())
    out["rewardbench"] = (n_rb, n_rb)
    return out


def assert_drawn(census, expected):
    assert set(census) == set(expected), f"figure divs {sorted(census)} != {sorted(expected)}"
    for fig, (bars, whiskers) in expected.items():
        c = census[fig]
        assert c.get("main-svg", 0) >= 1, f"{fig}: no plotly SVG drawn ({c})"
        assert c.get("bars", 0) == bars, f"{fig}: {c.get('bars', 0)} bar shapes drawn, expected {bars}"
        assert c.get("error_bars", 0) == whiskers, f"{fig}: {c.get('error_bars', 0)} whiskers drawn, expected {whiskers}"


def test_report_renders_offline_in_chromium(chromium, inputs, tmp_path):
    runs, comparisons, rewardbench = inputs
    # a second comparison, and a model that lacks one benchmark (a gap, not a bar)
    runs = runs + [{"model": "other", "seed": None, "benchmarks": {"shapes-mcq": runs[0]["benchmarks"]["shapes-mcq"]}}]
    comparisons = comparisons + [{**comparisons[0], "a": "x", "b": "y", "rows": comparisons[0]["rows"][:2]}]
    page = write_report(tmp_path / "r.html", runs, comparisons, rewardbench, title="<test>")
    census = render_census(page, chromium)
    assert_drawn(census, expected_marks(runs, comparisons, rewardbench))


def test_render_check_fails_on_a_page_that_draws_nothing(chromium, inputs, tmp_path):
    "Without its inlined plotly.js the page has the same divs but no charts, and the check must say so."
    text = report_html(*inputs)
    head_script = re.compile(r"<script type='text/javascript'>.*?</script></head>", re.S)
    assert len(head_script.findall(text)) == 1
    (tmp_path / "broken.html").write_text(head_script.sub("</head>", text))
    census = render_census(tmp_path / "broken.html", chromium)
    assert set(census) == {"scores", "delta-0", "rewardbench"}
    with pytest.raises(AssertionError, match="no plotly SVG drawn"):
        assert_drawn(census, expected_marks(*inputs))


def test_page_is_self_contained(inputs):
    text = report_html(*inputs)
    assert text.count("* plotly.js v") == 1 and text.count("Plotly.newPlot(") == 3
    assert not re.search(r"<(script|link)[^>]+(src|href)=", text), "an external resource needs a network"
    assert 4e6 < len(text.encode()) < 8e6
    assert report_html(*inputs) == text                                   # no timestamp: same inputs, same bytes


def test_names_are_escaped(inputs):
    runs, comparisons, _ = inputs
    runs = copy.deepcopy(runs); runs[0]["model"] = "</script><img src=x onerror=alert(1)>"
    text = report_html(runs)
    assert "<img src=x" not in text and "</script><img" not in text


@pytest.mark.parametrize("mutate, where", [
    (lambda r: r.pop("model"), "run.json: model"),
    (lambda r: r["benchmarks"]["shapes-mcq"]["metrics"]["accuracy"].update(ci=[0.8, 0.7]), "benchmarks.shapes-mcq.metrics.accuracy.ci"),
    (lambda r: r["benchmarks"]["shapes-mcq"]["metrics"]["accuracy"].update(value=float("nan")), "metrics.accuracy.value"),
    (lambda r: r["benchmarks"]["shapes-mcq"].update(n=0), "benchmarks.shapes-mcq.n"),
    (lambda r: r.update(seed=True), "run.json: seed"),
])
def test_bad_run_is_named(inputs, mutate, where):
    run = copy.deepcopy(inputs[0][0]); mutate(run)
    with pytest.raises(DataError, match=re.escape(where)):
        check_run(run, "run.json")


@pytest.mark.parametrize("mutate, where", [
    (lambda c: c["rows"][2].update(p_holm=1.2), "rows.2.p_holm"),
    (lambda c: c["rows"][0].pop("significant"), "rows.0.significant"),
    (lambda c: c["rows"].append(dict(c["rows"][0])), "repeats shapes-mcq / accuracy"),
    (lambda c: c.update(rows=[]), "cmp.json: rows"),
    (lambda c: c["rows"][1].update(diff=-c["rows"][1]["diff"]), "rows.1.diff: must be b - a"),
])
def test_bad_comparison_is_named(inputs, mutate, where):
    c = copy.deepcopy(inputs[1][0]); mutate(c)
    with pytest.raises(DataError, match=re.escape(where)):
        check_comparison(c, "cmp.json")


def test_bad_rewardbench_is_named(inputs):
    rb = copy.deepcopy(inputs[2]); rb["critique RM"]["long"]["acc_plus"] = [0.6, 0.46]
    with pytest.raises(DataError, match=re.escape("rb.json: critique RM.long.acc_plus")):
        check_rewardbench(rb, "rb.json")
    with pytest.raises(DataError, match="'all' category"):
        check_rewardbench({"critique RM": {"long": rb["critique RM"]["long"]}}, "rb.json")


def test_bad_input_leaves_the_old_report(inputs, tmp_path):
    page = write_report(tmp_path / "r.html", inputs[0])
    before = page.read_text()
    bad = copy.deepcopy(inputs[1]); bad[0]["rows"][0]["ci"] = None
    with pytest.raises(DataError, match="comparisons.0: rows.0.ci"):
        write_report(page, *inputs[:1], bad)
    assert page.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_missing_value_is_a_gap(inputs):
    runs = copy.deepcopy(inputs[0]); del runs[1]["benchmarks"]["shapes-count"]
    fig = scores_figure(runs)
    acc = [t for t in fig.data if t.xaxis == "x"]
    assert list(acc[1].x) == ["shapes-mcq", "shapes-short", "shapes-count"] and acc[1].y[2] is None
    assert re.search(r"shapes-count\s+accuracy\s+120\s+0\.442 \[0\.350, 0\.533\]\s+—", terminal_summary(runs))


def test_summary_marks_significant_rows_only(inputs):
    runs, comparisons, rewardbench = copy.deepcopy(inputs)
    rows = comparisons[0]["rows"]
    rows[0]["significant"] = True; rows[1]["significant"] = False          # the marks follow the data, not the p-values
    text = terminal_summary(runs, comparisons, rewardbench)
    marked = [l.split()[0] for l in text.splitlines() if re.search(r"\s\*\s\s", l)]
    assert marked == ["shapes-mcq", "shapes-safety", "shapes-hallucination"]
    assert "(paired; * significant after Holm: 3 of 7)" in text
    assert re.search(r"critique RM\s+all\s+120\s+310\s+0\.850 \[0\.800, 0\.890\]\s+0\.670 \[0\.580, 0\.750\]", text)


def test_run_report_reads_json_files(inputs, tmp_path, capsys):
    runs, comparisons, rewardbench = inputs
    names = []
    for i, obj in enumerate(runs):
        (tmp_path / f"run{i}.json").write_text(json.dumps(obj)); names.append(str(tmp_path / f"run{i}.json"))
    (tmp_path / "cmp.json").write_text(json.dumps(comparisons[0])); (tmp_path / "rb.json").write_text(json.dumps(rewardbench))
    cfg = ReportConfig(runs=names, comparisons=[str(tmp_path / "cmp.json")], rewardbench=str(tmp_path / "rb.json"), out=str(tmp_path / "out" / "r.html"))
    res = run_report(cfg)
    assert (tmp_path / "out" / "r.html").read_text() == report_html(runs, comparisons, rewardbench)
    assert (tmp_path / "out" / "report-config.yaml").is_file() and res["runs"] == 2
    assert "opens offline" in capsys.readouterr().out
    with pytest.raises(DataError, match="missing.json: file not found"):
        run_report(ReportConfig(runs=[str(tmp_path / "missing.json")], out=str(tmp_path / "x.html")))
