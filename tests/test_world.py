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
            assert res["correct"] == (not (kinds & (FAITHFULNESS | {"incomplete", "non_answer", "over_refusal", "unsafe_compliance"}))), (q.question, r)
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


def test_excluded_world_repeats_no_query_of_the_other(tmp_path):
    import json
    from mmrlhf.core import ConfigError
    from mmrlhf.world import world_overlap
    pool = write_world(SynthConfig(out=str(tmp_path / "pool"), n_queries=400))
    plain = write_world(SynthConfig(out=str(tmp_path / "plain"), n_queries=300, seed=1))
    kept = write_world(SynthConfig(out=str(tmp_path / "kept"), n_queries=300, seed=1,
                                   exclude=str(pool)))
    rows = lambda p: [json.loads(line) for line in p.read_text().splitlines()]
    # the repeats counted here by hand: same question, same shapes and colours in the same cells
    def key(r):
        return r["question"], sorted((i["row"], i["col"], i["shape"], i["colour"])
                                     for i in r["truth"]["items"])
    pool_keys = [key(r) for r in rows(pool) if r["category"] != "video"]
    repeats = [r["id"] for r in rows(plain) if r["category"] != "video" and key(r) in pool_keys]
    assert repeats, "the check needs a world pair with repeats to show anything"
    kept_rows = rows(kept)
    assert len(kept_rows) == 300 and not set(repeats) & {r["id"] for r in kept_rows}
    assert not any(key(r) in pool_keys for r in kept_rows if r["category"] != "video")
    # the queries that were kept are the plain world's, byte for byte, in the same order
    plain_rows = {r["id"]: r for r in rows(plain)}
    assert all(plain_rows[r["id"]] == r for r in kept_rows if r["id"] in plain_rows)
    assert world_overlap(pool, plain)["same_query"] >= len(repeats)
    assert world_overlap(pool, kept)["same_query"] == 0
    with pytest.raises(ConfigError, match="exclude: works on a whole world"):
        write_world(SynthConfig(out=str(tmp_path / "x"), start=10, exclude=str(pool)))

