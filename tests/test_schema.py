"Annotation schema: every bad-input contract, lossless round trips, pair expansion, the tie rule, the oracle."
import json, shutil, subprocess, sys
from pathlib import Path

import pytest

from mmrlhf.core import DataError
from mmrlhf.schema import (DataErrors, PairsConfig, ReadReport, Response, add_tie_response, agreement, expand_pairs,
                           oracle_annotate, pair_indices, parse_query, query_record, read_queries, run_pairs, write_queries)
from mmrlhf.synthetic import SynthConfig, make_query, query_record as world_record, write_world

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
        q = oracle_annotate(world_query(9, i, k=2))
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
    qs = [oracle_annotate(world_query(3, i)) for i in range(40)]
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
