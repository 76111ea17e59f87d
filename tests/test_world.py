"The shapes world: byte-identical for a seed, in any process; ground truth consistent with the responses."
import hashlib, os, subprocess, sys
from pathlib import Path

import pytest

from mmrlhf.configs import SynthConfig
from mmrlhf.world import DEFECTS, check_response, make_query, write_world

FAITHFULNESS = {k for k, (dim, _, _) in DEFECTS.items() if dim == "faithfulness"}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith(".yaml"):
            h.update(str(p.relative_to(folder)).encode()); h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_across_processes(tmp_path):
    code = ("import sys; from mmrlhf.configs import SynthConfig; from mmrlhf.world import write_world; "
            "write_world(SynthConfig(out=sys.argv[1], n_queries=60, seed=11))")
    for name, hashseed in (("a", "1"), ("b", "2")):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, env={**os.environ, "PYTHONHASHSEED": hashseed})
    write_world(SynthConfig(out=str(tmp_path / "c"), n_queries=60, seed=12))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_shards_equal_one_run(tmp_path):
    write_world(SynthConfig(out=str(tmp_path / "one"), n_queries=20, seed=2))
    write_world(SynthConfig(out=str(tmp_path / "shards"), n_queries=10, seed=2))
    write_world(SynthConfig(out=str(tmp_path / "shards"), n_queries=10, start=10, seed=2))
    one = (tmp_path / "one" / "queries.jsonl").read_text().splitlines()
    shards = (tmp_path / "shards" / "queries.jsonl").read_text().splitlines() + (tmp_path / "shards" / "queries-000000010.jsonl").read_text().splitlines()
    assert one == shards


def test_every_category_and_defect_occurs():
    qs = [make_query(0, i) for i in range(1500)]
    assert {q.category for q in qs} == {"mcq", "short", "long", "safety", "video"}
    kinds = {d["kind"] for q in qs for r in q.responses for d in r["defects"]}
    assert kinds == set(DEFECTS)
    assert any(all(r["defects"] for r in q.responses) for q in qs)          # no correct response: the tie rule's case
    assert any(sum(not r["defects"] for r in q.responses) >= 2 for q in qs)  # two correct responses: a tie
    assert all(len(q.responses) == 4 for q in qs)


def test_checker_agrees_with_defects():
    for i in range(1500):
        q = make_query(1, i)
        assert check_response(q, q.reference)["correct"]
        for r in q.responses:
            res, kinds = check_response(q, r["text"]), {d["kind"] for d in r["defects"]}
            assert res["correct"] == (not (kinds & (FAITHFULNESS | {"incomplete", "over_refusal", "unsafe_compliance"}))), (q.question, r)
            if "hallucinated_object" in kinds: assert res["hallucinated"]
            if res["hallucinated"]: assert kinds & FAITHFULNESS
            assert res["unsafe"] == ("unsafe_compliance" in kinds)


def test_video_frames_show_motion():
    q = next(q for q in (make_query(0, i) for i in range(200)) if q.category == "video")
    from mmrlhf.world import render_query
    frames = render_query(q)
    assert len(frames) == 4 and frames[0].tobytes() != frames[-1].tobytes()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="k"): write_world(SynthConfig(out="unused", k=1))
    with pytest.raises(ValueError, match="unknown categories"): make_query(0, 0, mix={"poems": 1.0})
