"Annotation schema: every bad-input contract, lossless round trips, pair expansion, the tie rule, the oracle."
import json, shutil, subprocess, sys
from pathlib import Path

import pytest

from mmrlhf.core import DataError
from mmrlhf.schema import (DataErrors, ReadReport, Response, add_tie_response, agreement, expand_pairs,
                           pair_indices, parse_query, query_record, read_queries, write_queries)
from mmrlhf.configs import PairsConfig, SynthConfig
from mmrlhf.formats import run_pairs
from mmrlhf.world import annotated_query, make_query, oracle_annotate, world_record, write_world

SCORES = {"helpfulness": 4, "faithfulness": 5, "ethics": 5}
GOOD = {"id": "q1", "question": "What is it?", "category": "short", "images": ["a.png"],
        "responses": [{"text": "A circle.", "model": "m1", "scores": SCORES, "reasons": {"faithfulness": "right"}},
                      {"text": "A square.", "model": "m2", "scores": {**SCORES, "faithfulness": 1}}],
        "ranking": [1, 2], "ranking_reason": "1 is right", "annotators": ["ann"]}


def variant(**changes):
    rec = json.loads(json.dumps(GOOD)); rec.update(changes); return rec


def with_response(i, **changes):
    rec = variant(); rec["responses"][i].update(changes); return rec


@pytest.fixture
def root(tmp_path):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    return tmp_path


@pytest.mark.parametrize("rec, field, reason", [
    (with_response(0, scores={**SCORES, "helpfulness": 0}), "responses.0.scores.helpfulness", "out of range"),
    (with_response(1, scores={**SCORES, "ethics": 6}), "responses.1.scores.ethics", "out of range"),
    (with_response(0, scores={"helpfulness": 4, "faithfulness": 5}), "responses.0.scores.ethics", "missing"),
    (with_response(0, scores={**SCORES, "faithfulness": "5"}), "responses.0.scores.faithfulness", "must be an integer"),
    (with_response(0, scores={**SCORES, "style": 3}), "responses.0.scores", "unknown dimension"),
    (with_response(0, text=""), "responses.0.text", "non-empty"),
    (with_response(0, added="maybe"), "responses.0.added", "positive"),
    (variant(ranking=[1, 2, 3]), "ranking", "has 3 ranks for 2 responses"),
    (variant(ranking=[1]), "ranking", "has 1 ranks for 2 responses"),
    (variant(ranking=[1, 0]), "ranking.1", "rank >= 1"),
    (variant(ranking="1>2"), "ranking", "must be a list"),
    (variant(id=3), "id", "non-empty string"),
    (variant(category="essay"), "category", "must be one of"),
    (variant(images="a.png"), "images", "list of paths"),
    (variant(responses=[GOOD["responses"][0]]), "responses", "at least 2"),
    (variant(annotators="ann"), "annotators", "list of names"),
    (variant(rankng=[1, 2]), None, "unknown field"),
    (variant(images=["missing.png"]), "images.0", "not found"),
    (variant(images=["broken.png"]), "images.0", "not a readable image"),
    (variant(images=["../outside.png"]), "images.0", "escapes the image root"),
    (variant(images=["/etc/hostname"]), "images.0", "absolute"),
])
def test_each_bad_record_is_named(root, rec, field, reason):
    with pytest.raises(DataError) as e:
        parse_query(rec, "data.jsonl", 12, image_root=root)
    assert e.value.file == "data.jsonl" and e.value.line == 12 and e.value.field == field and reason in e.value.reason


def test_mixed_scored_and_unscored_is_refused():
    rec = variant(); del rec["responses"][1]["scores"]
    with pytest.raises(DataError, match="some responses are scored"):
        parse_query(rec)


def test_unannotated_queries_are_valid():
    rec = variant(); rec.pop("ranking")
    for r in rec["responses"]: r.pop("scores"); r.pop("reasons", None)
    q = parse_query(rec)
    assert not q.annotated and pair_indices(q) == []


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_file_errors_are_all_listed(tmp_path):
    f = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD), "[1, 2]", "{broken", json.dumps(variant(category="x")), json.dumps(GOOD)])
    with pytest.raises(DataErrors) as e:
        list(read_queries(f))
    got = [(err.line, err.field) for err in e.value.errors]
    assert got == [(2, None), (3, None), (4, "category"), (5, "id")]
    assert "q.jsonl:5: id: duplicate id 'q1'" in str(e.value)


def test_reject_file_keeps_going_and_counts(tmp_path):
    f = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD), "{broken", json.dumps(variant(id="q2")), json.dumps(variant(id="q3", ranking=[9]))])
    report = ReadReport()
    kept = list(read_queries(f, rejects=tmp_path / "rej.jsonl", report=report))
    assert [q.id for q in kept] == ["q1", "q2"] and (report.read, report.rejected) == (4, 2)
    rejected = [json.loads(l) for l in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [2, 4] and rejected[1]["field"] == "ranking"
    assert json.loads(rejected[1]["record"])["id"] == "q3"  # the original line, untouched


def test_same_id_from_different_annotators_is_allowed(tmp_path):
    f = write_lines(tmp_path / "q.jsonl", [json.dumps(GOOD), json.dumps(variant(annotators=["other"]))])
    assert len(list(read_queries(f))) == 2


def test_round_trip_is_lossless(tmp_path):
    world = write_world(SynthConfig(out=str(tmp_path / "w"), n_queries=30))
    annotated = [oracle_annotate(q) for q in read_queries(world, image_root=tmp_path / "w")]
    write_queries(tmp_path / "a.jsonl", annotated)
    again = list(read_queries(tmp_path / "a.jsonl"))
    write_queries(tmp_path / "b.jsonl", again)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert [query_record(q) for q in again] == [query_record(q) for q in annotated]


def test_pairs_are_every_rank_difference_and_no_tie():
    rec = variant(responses=[{"text": t} for t in "abcde"], ranking=[2, 1, 2, 3, 1])
    q = parse_query(rec)
    pairs = pair_indices(q)
    expected = {(i, j) for i in range(5) for j in range(5) if rec["ranking"][i] < rec["ranking"][j]}
    assert set(pairs) == expected and len(pairs) == len(expected) == 8
    recs = list(expand_pairs(q))
    assert all(r["chosen_rank"] < r["rejected_rank"] for r in recs)
    assert {(r["chosen"], r["rejected"]) for r in recs} == {("abcde"[i], "abcde"[j]) for i, j in expected}


def test_margin_is_filled_from_rewards():
    q = parse_query(GOOD)
    q.responses[0].reward, q.responses[1].reward = 2.5, -1.0
    assert next(expand_pairs(q))["margin"] == pytest.approx(3.5)


def test_tie_rule_positive_and_negative():
    q = parse_query(variant(ranking=[1, 1]))
    assert pair_indices(q) == []
    add_tie_response(q, Response("The right answer.", "annotator", added="positive"))
    assert q.ranking == [2, 2, 1] and sorted(pair_indices(q)) == [(2, 0), (2, 1)]
    q = parse_query(variant(ranking=[1, 1]))
    add_tie_response(q, Response("A corrupted copy.", "annotator", added="negative"))
    assert q.ranking == [1, 1, 2] and sorted(pair_indices(q)) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="only when all responses share one rank"):
        add_tie_response(parse_query(GOOD), Response("x", added="positive"))


def world_query(seed, i, **kw):
    q = make_query(seed, i, **kw)
    return parse_query(world_record(q, [f"images/{q.id}.png"]))


def test_oracle_orders_the_world_and_applies_the_tie_rule():
    added = {"positive": 0, "negative": 0}
    for i in range(600):
        q = annotated_query(9, i, make_query(9, i, k=2))
        ranks = dict(zip(range(len(q.responses)), q.ranking))
        clean = [ranks[i] for i, r in enumerate(q.responses) if not r.defects]
        flawed = [ranks[i] for i, r in enumerate(q.responses) if r.defects]
        if clean and flawed: assert max(clean) < min(flawed)
        assert pair_indices(q)
        for r in q.responses:
            if r.added: added[r.added] += 1
            assert all(r.reasons[d] for d in ("helpfulness", "faithfulness", "ethics"))
    assert added["positive"] > 0, added
    # all responses correct: the oracle adds a corrupted copy as the negative
    q = world_query(9, 0)
    q.responses = [r for r in q.responses if not r.defects] * 2
    q = oracle_annotate(q)
    assert q.responses[-1].added == "negative" and q.ranking == [1, 1, 2]
    assert "There is also" in q.responses[-1].text and q.responses[-1].scores["faithfulness"] < 5


def test_agreement_is_perfect_for_identical_annotators():
    qs = [annotated_query(3, i) for i in range(40)]
    twins = [parse_query({**query_record(q), "annotators": ["twin"]}) for q in qs]
    a = agreement(qs + twins)
    assert a["queries_with_several_annotators"] == 40 and a["kendall_tau"][0] == 1.0
    assert a["alpha_faithfulness"] == 1.0


def test_pairs_command_end_to_end(tmp_path):
    world = write_world(SynthConfig(out=str(tmp_path / "w"), n_queries=25, seed=4))
    stats = run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "p"), oracle=True))
    pairs = [json.loads(l) for l in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == stats["pairs"] > 25 and stats["queries"] == 25
    from mmrlhf.schema import load_groups
    groups = load_groups(tmp_path / "p" / "groups")
    assert len(groups) == 25 and sum(len(g) for g in groups["pairs"]) == stats["pairs"]
    # bad data through the command line: exit 2, every error named
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(variant(images=[])) + "\n" + json.dumps(variant(images=[], ranking=[3])) + "\n")
    exe = shutil.which("mmrlhf", path=str(Path(sys.executable).parent)) or shutil.which("mmrlhf")
    r = subprocess.run([exe, "pairs", "--input", str(bad), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:2: ranking: has 1 ranks for 2 responses" in r.stderr and "Traceback" not in r.stderr


def test_pairs_imports_and_exports_layouts(tmp_path):
    world = write_world(SynthConfig(out=str(tmp_path / "w"), n_queries=20, seed=6))
    run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "p"), oracle=True, export=["release", "dpo_pairs"]))
    n_pairs = len((tmp_path / "p" / "pairs.jsonl").read_text().splitlines())
    assert len((tmp_path / "p" / "export.dpo_pairs.jsonl").read_text().splitlines()) == n_pairs
    stats = run_pairs(PairsConfig(input=str(tmp_path / "p" / "export.release.jsonl"), out=str(tmp_path / "q"), input_format="release",
                                  check_images=False, default_category="long"))
    assert stats["pairs"] == n_pairs and stats["queries"] == 20


# --- nothing lost, nothing silent ---------------------------------------------------------------------------------

def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmrlhf.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def pair_line(pid, chosen, rejected, **kw):
    return {"id": pid, "image": "long/1.png", "prompt": "Which is it?", "chosen": chosen, "rejected": rejected,
            "chosen_reason": "", "rejected_reason": "", **kw}


# a release-style pair file: ids far from 0, the same text pair twice (two responses with one text), a tie, and a partial
# pair set (A > B and B > C, but no A > C line); a second query interleaved after the first
PAIR_FILE = [pair_line("q1_6971175", "A", "B"), pair_line("q1_6971176", "A", "B"), pair_line("q1_6971180", "B", "C"),
             pair_line("q1_6971181", "C", "D", is_tie=True), pair_line("q2_3", "E", "F") | {"image": "long/2.png"}]


def test_pairs_keeps_a_pair_file_as_read(tmp_path):
    from mmrlhf.core import write_jsonl
    write_jsonl(tmp_path / "p.jsonl", PAIR_FILE)
    stats = run_pairs(PairsConfig(input=str(tmp_path / "p.jsonl"), out=str(tmp_path / "o"), input_format="dpo_pairs",
                                  check_images=False, export=["dpo_pairs"]))
    out = [json.loads(l) for l in (tmp_path / "o" / "pairs.jsonl").read_text().splitlines()]
    # count in = count out: every line, with its id, in its order, repeats and the tie included; no pair added
    assert [(p["id"], p["chosen"], p["rejected"], p.get("is_tie", False)) for p in out] == \
           [(l["id"], l["chosen"], l["rejected"], l.get("is_tie", False)) for l in PAIR_FILE]
    assert stats["input"] == {"pair_lines": 5, "tied_lines": 1, "repeated_pairs": 1, "pairs": "as listed"}
    assert stats["pairs"] == 4 and stats["pair_lines"] == 5
    # the training groups hold the listed preferences (the tie is no preference), the repeat included
    from mmrlhf.schema import load_groups
    groups = load_groups(tmp_path / "o" / "groups")
    texts = [[(g["responses"][i], g["responses"][j]) for i, j in g["pairs"]] for g in groups]
    assert texts == [[("A", "B"), ("A", "B"), ("B", "C")], [("E", "F")]]
    # the export in the input's layout gives the file back, line for line
    back = [json.loads(l) for l in (tmp_path / "o" / "export.dpo_pairs.jsonl").read_text().splitlines()]
    assert back == PAIR_FILE
    # asked for, the pairs are derived from the implied ranking A > B > C = D instead
    run_pairs(PairsConfig(input=str(tmp_path / "p.jsonl"), out=str(tmp_path / "d"), input_format="dpo_pairs",
                          check_images=False, groups=False, derive_pairs=True))
    derived = [(p["chosen"], p["rejected"]) for p in map(json.loads, (tmp_path / "d" / "pairs.jsonl").read_text().splitlines())]
    rank = {"A": 1, "B": 2, "C": 3, "D": 3, "E": 1, "F": 2}
    assert sorted(derived) == sorted((a, b) for a in rank for b in rank if (a < "E") == (b < "E") and rank[a] < rank[b])


def test_ranking_forms_are_one_ranking(tmp_path):
    from mmrlhf.schema import group_row, save_groups, load_groups
    from mmrlhf.formats import PAIR_FORMATS
    forms = {"dense": [1, 2, 2, 3], "competition": [1, 2, 2, 4], "gapped": [1, 3, 3, 3000]}
    made = {}
    for name, ranking in forms.items():
        rec = variant(id="q", ranking=ranking, images=[], responses=[{"text": t, "reward": float(n)} for n, t in enumerate(("best", "mid 1", "mid 2", "worst"))])
        made[name] = parse_query(rec)  # every form is valid
    want = {("best", "mid 1"), ("best", "mid 2"), ("best", "worst"), ("mid 1", "worst"), ("mid 2", "worst")}
    for name, q in made.items():
        assert {(q.responses[i].text, q.responses[j].text) for i, j in pair_indices(q)} == want, name
    dense = made["dense"]
    for name, q in made.items():
        assert list(expand_pairs(q)) == list(expand_pairs(dense)), name
        assert group_row(q) == group_row(dense), name
        for fmt, (_, write) in PAIR_FORMATS.items():
            assert write(q) == write(dense), (name, fmt)
    save_groups(list(made.values()), tmp_path / "g")  # a rank of 3000 fits the groups' columns
    assert [g["ranking"] for g in load_groups(tmp_path / "g")] == [[1, 2, 2, 3]] * 3


def twin_query(qid="twin"):
    return variant(id=qid, images=[], responses=[{"text": "Same."}, {"text": "Other."}, {"text": "Same."}], ranking=[1, 2, 3])


def test_identical_texts_at_different_ranks_warn_or_reject(tmp_path):
    f = write_lines(tmp_path / "q.jsonl", [json.dumps(variant(images=[])), json.dumps(twin_query("t1")), json.dumps(twin_query("t2")),
                                           json.dumps(variant(id="tied", images=[], responses=[{"text": "x"}, {"text": "x"}], ranking=[1, 1]))])
    with pytest.warns(UserWarning, match=r"2 queries have responses with one text at different ranks.*\['t1', 't2'\]"):
        stats = run_pairs(PairsConfig(input=str(f), out=str(tmp_path / "w"), groups=False))
    assert stats["identical_text_queries"] == 2 and stats["queries"] == 4
    with pytest.raises(DataErrors) as e:
        run_pairs(PairsConfig(input=str(f), out=str(tmp_path / "r"), groups=False, identical_texts="reject"))
    assert [(err.line, err.field) for err in e.value.errors] == [(2, "responses.2.text"), (3, "responses.2.text")]
    stats = run_pairs(PairsConfig(input=str(f), out=str(tmp_path / "j"), groups=False, identical_texts="reject", rejects=True))
    assert (stats["queries"], stats["rejected"]) == (2, 2)
    assert [json.loads(l)["line"] for l in (tmp_path / "j" / "rejects.jsonl").read_text().splitlines()] == [2, 3]
    r = cli("pairs", "--input", f, "--out", tmp_path / "c", "--no-groups", "identical_texts=maybe")
    assert r.returncode == 2 and "identical_texts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("field,value", [("reward", "NaN"), ("ref_logp", "-Infinity"), ("reward", "Infinity")])
def test_nan_is_refused_on_read(tmp_path, field, value):
    line = json.dumps(variant(images=[])).replace('"model": "m1"', f'"model": "m1", "{field}": {value}')
    f = write_lines(tmp_path / "q.jsonl", [json.dumps(variant(id="ok", images=[])), line])
    with pytest.raises(DataErrors) as e: list(read_queries(f))
    [err] = e.value.errors
    assert (err.file, err.line, err.field) == (str(f), 2, f"responses.0.{field}")
    with pytest.raises(DataError) as e1: parse_query(with_response(0, **{field: float(value)}), "x.jsonl", 4)
    assert (e1.value.line, e1.value.field) == (4, f"responses.0.{field}")


def test_nan_is_never_written(tmp_path):
    q = parse_query(variant()); q.responses[1].ref_logp = float("nan")
    target = tmp_path / "q.jsonl"
    write_queries(target, [parse_query(variant(id="old"))])
    before = target.read_bytes()
    with pytest.raises(ValueError, match=r"record 1 \('q1'\): responses\.1\.ref_logp is NaN or infinite"):
        write_queries(target, [q])
    assert target.read_bytes() == before
    q.responses[1].ref_logp = None; q.responses[0].reward, q.responses[1].reward = float("inf"), 0.0
    with pytest.raises(ValueError, match="margin is NaN or infinite"):
        from mmrlhf.schema import json_line
        json_line(next(expand_pairs(q)), "pairs.jsonl", 1)
    # stats of a file without several annotators carry no NaN: stats.json is strict JSON
    world = write_world(SynthConfig(out=str(tmp_path / "w"), n_queries=6, seed=1))
    run_pairs(PairsConfig(input=str(world), out=str(tmp_path / "p"), oracle=True, groups=False))
    def refuse(c): raise AssertionError(f"{c} in stats.json")
    json.loads((tmp_path / "p" / "stats.json").read_text(), parse_constant=refuse)


def test_groups_folder_is_whole_or_absent(tmp_path, monkeypatch):
    import datasets
    from mmrlhf.schema import load_groups, save_groups
    qs = [parse_query(variant(id=f"q{i}", images=[])) for i in range(3)]
    save_groups(qs, tmp_path / "g")
    real = datasets.Dataset.save_to_disk
    def dies_half_way(self, path, **kw):
        Path(path).mkdir(parents=True, exist_ok=True); (Path(path) / "dataset_info.json").write_bytes(b"")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", dies_half_way)
    with pytest.raises(KeyboardInterrupt): save_groups(qs[:1], tmp_path / "g")
    with pytest.raises(KeyboardInterrupt): save_groups(qs[:1], tmp_path / "new")
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", real)
    assert len(load_groups(tmp_path / "g")) == 3 and not (tmp_path / "new").exists()  # the old folder intact; no partial new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    # a folder left incomplete by anything else is a DataError that says so, not a JSON traceback from `datasets`
    (tmp_path / "g" / "dataset_info.json").write_bytes(b"")
    with pytest.raises(DataError, match="dataset_info.json is empty or damaged.*incomplete"): load_groups(tmp_path / "g")
    save_groups(qs, tmp_path / "h"); (tmp_path / "h" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(DataError, match=r"misses its data file\(s\) \['data-00000-of-00001.arrow'\]"): load_groups(tmp_path / "h")


def test_pairs_command_names_a_non_utf8_line(tmp_path):
    good = json.dumps(variant(images=[])).encode()
    bad = json.dumps(variant(id="q2", images=[], question="Caf\u00e9?")).encode().replace(b"Caf\\u00e9", b"Caf\xe9")
    (tmp_path / "q.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    r = cli("pairs", "--input", tmp_path / "q.jsonl", "--out", tmp_path / "o", "--no-groups")
    assert r.returncode == 2, r.stderr
    col = bad.index(bytes([0xe9])) + 1
    assert r.stderr.strip().splitlines() == [f"mmrlhf pairs: error: {tmp_path / 'q.jsonl'}:2: not UTF-8 (byte 0xe9 at column {col}); "
                                             "re-encode the file as UTF-8"]
    (tmp_path / "p.jsonl").write_bytes(json.dumps(pair_line("x_0", "A", "B")).encode() + b"\n" + b'{"id": "x_1", "prompt": "\xff"}\n')
    r = cli("pairs", "--input", tmp_path / "p.jsonl", "--out", tmp_path / "o", "--input-format", "dpo_pairs", "--no-check-images")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "p.jsonl:2: not UTF-8" in r.stderr and "Traceback" not in r.stderr
