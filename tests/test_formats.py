"Published layouts: lossless round trips, pair sets kept through every layout, and bad input named by file, line and field."
import json
from pathlib import Path

import pytest

from mmrlhf.core import DataError, read_jsonl, write_jsonl
from mmrlhf.formats import (FORMATS, PAIR_FORMATS, convert, from_llamafactory, from_release, from_reward_bench,
                            from_swift, from_trl, group_pairs, parse_ranking, ranking_string, read_dpo_pairs,
                            read_format, read_release, read_reward_bench, to_dpo_pairs, to_llamafactory, to_release,
                            to_reward_bench, to_swift, to_trl, write_dpo_pairs, write_release, write_reward_bench)
from mmrlhf.schema import pair_indices, parse_query, query_record, write_queries
from mmrlhf.world import make_query, oracle_annotate, world_record

RELEASE = {"id": "ai2d_azuregpt_4569", "question": "Which stage comes after the larva?", "answer": "The pupa.",
           "image": "long/ai2d/4569.png",
           "models_output": ["The pupa stage.", "The pupa, then the adult.", "The egg.", "An adult butterfly lays eggs."],
           "faithfulness": [5, 4, 4, 2], "helpfulness": [5, 4, 4, 1], "ethical": [5, 5, 5, 5],
           "final_ranking": [1, 2, 2, 3],
           "score_reasons": ["Correct and direct.", "Correct but says more.", "Wrong stage.", "Off topic."],
           "ranking_reason": "1 answers exactly; 2 and 3 are equally flawed; 4 ignores the question."}

DPO = [{"id": "llava_7_0", "image": "short/coco/7.jpg", "prompt": "<image>\nWhat colour is the bus?", "chosen": "Red.", "rejected": "Blue.",
        "chosen_reason": "Matches the image.", "rejected_reason": "The bus is red.", "reference_chosen_logp": -3.5, "reference_rejected_logp": -4.0},
       {"id": "llava_7_1", "image": "short/coco/7.jpg", "prompt": "<image>\nWhat colour is the bus?", "chosen": "Red.", "rejected": "A car.",
        "chosen_reason": "Matches the image.", "rejected_reason": "Not a colour, and wrong.", "reference_chosen_logp": -3.5, "reference_rejected_logp": -9.25,
        "ls_factor": 0.5},
       {"id": "llava_7_2", "image": "short/coco/7.jpg", "prompt": "<image>\nWhat colour is the bus?", "chosen": "Blue.", "rejected": "A car.",
        "chosen_reason": "The bus is red.", "rejected_reason": "A second opinion on this one.", "reference_chosen_logp": -4.0, "reference_rejected_logp": -9.25},
       {"id": "vid_3_0", "video": "video/clip_3", "prompt": "Where does the ball go?", "chosen": "Left.", "rejected": "Up.",
        "chosen_reason": "", "rejected_reason": ""}]


def text_pairs(q):
    return {(q.responses[i].text, q.responses[j].text) for i, j in pair_indices(q)}


def world_query(seed, i):
    q = make_query(seed, i)
    return oracle_annotate(parse_query(world_record(q, [f"images/{q.id}.png"])))


def error(fn) -> DataError:
    with pytest.raises(DataError) as e: fn()
    return e.value


# --- rankings ---------------------------------------------------------------------------------------------------

def test_ranking_forms():
    assert parse_ranking("1>2=3>4", 4) == [1, 2, 2, 3]
    assert parse_ranking(" 3 = 1 > 2 ", 3) == [1, 2, 1]
    assert parse_ranking([2, 3, 1], 3) == [2, 3, 1]
    assert parse_ranking([2, 3, 1], 3, ranking_as="order") == [3, 1, 2]
    for ranks in ([1, 2, 2, 3], [3, 1, 2, 1], [1, 1]):
        assert parse_ranking(ranking_string(ranks), len(ranks)) == ranks
    with pytest.raises(ValueError): parse_ranking([1, 2], 2, ranking_as="best")


@pytest.mark.parametrize("value,why", [("a>b", "'a' is not a response number"), ("1>>2", "empty place"), ("1>4", "there is no response 4"),
                                       ("1=1>2", "ranked twice"), ("1>2", "[3] are not ranked"), ([1, 2], "has 2 entries for 3 responses"),
                                       ([1, 0, 2], "must be an integer >= 1"), ({"a": 1}, "must be a list or a string")])
def test_bad_rankings(value, why):
    e = error(lambda: parse_ranking(value, 3, file="data.jsonl", line=9))
    assert (e.file, e.line) == ("data.jsonl", 9) and e.field.startswith("final_ranking") and why in e.reason


# --- the release ---------------------------------------------------------------------------------------------------

def test_release_round_trip_is_lossless(tmp_path):
    q = from_release(RELEASE)
    assert to_release(q) == RELEASE
    assert (q.category, q.images, q.reference, q.ranking) == ("long", ["long/ai2d/4569.png"], "The pupa.", [1, 2, 2, 3])
    assert q.responses[3].scores == {"helpfulness": 1, "faithfulness": 2, "ethics": 5}
    assert q.responses[2].critique == "Wrong stage."
    write_release([q], tmp_path / "data.jsonl")
    assert [r for _, r in read_jsonl(tmp_path / "data.jsonl")] == [RELEASE]
    # the query is valid in our own schema too
    assert query_record(parse_query(query_record(q))) == query_record(q)


def test_release_string_and_order_rankings():
    assert from_release({**RELEASE, "final_ranking": "1>2=3>4"}).ranking == [1, 2, 2, 3]
    assert to_release(from_release({**RELEASE, "final_ranking": "1>2=3>4"}))["final_ranking"] == [1, 2, 2, 3]
    assert from_release({**RELEASE, "final_ranking": [4, 1, 2, 3]}, ranking_as="order").ranking == [2, 3, 4, 1]


def test_release_categories_and_video():
    for sub in ("short", "long", "mcq", "safety"):
        assert from_release({**RELEASE, "image": f"{sub}/x/1.png"}).category == sub
    clip = {k: v for k, v in RELEASE.items() if k != "image"} | {"video": "clips/42"}
    q = from_release(clip)
    assert (q.category, q.images) == ("video", ["clips/42"])
    assert to_release(q) == clip
    multi = from_release({**RELEASE, "image": ["mcq/1.png", "mcq/2.png"]})
    assert multi.images == ["mcq/1.png", "mcq/2.png"] and to_release(multi)["image"] == ["mcq/1.png", "mcq/2.png"]


def test_unannotated_release_record():
    rec = {k: RELEASE[k] for k in ("id", "question", "image", "models_output")}
    q = from_release(rec)
    assert not q.annotated and all(r.scores is None for r in q.responses)
    assert to_release(q) == rec


@pytest.mark.parametrize("change,field,why", [
    ({"final_ranking": "a>b"}, "final_ranking", "'a' is not a response number"),
    ({"final_ranking": [1, 2, 3]}, "final_ranking", "has 3 entries for 4 responses"),
    ({"helpfulness": [5, 4, 4]}, "helpfulness", "has 3 scores for 4 responses"),
    ({"ethical": [5, 5, "5", 5]}, "ethical.2", "must be an integer score 1..5"),
    ({"faithfulness": [5, 4, 0, 2]}, "faithfulness.2", "must be an integer score 1..5, got 0"),
    ({"faithfulness": None}, "faithfulness", "missing"),
    ({"score_reasons": ["a", "b"]}, "score_reasons", "has 2 texts for 4 responses"),
    ({"models_output": ["only one"]}, "models_output", "need at least 2 responses"),
    ({"models_output": ["a", "", "c", "d"]}, "models_output.1", "non-empty string"),
    ({"image": "images/1.png"}, "image", "names no category"),
    ({"video": "video/1"}, "video", "an image or a video, not both"),
    ({"final_rankng": [1, 2, 2, 3]}, None, "unknown field(s) ['final_rankng']"),
    ({"id": 7}, "id", "non-empty string"),
])
def test_bad_release_records_are_named(tmp_path, change, field, why):
    rec = {**RELEASE, **change}
    write_jsonl(tmp_path / "data.jsonl", [RELEASE | {"id": "ok"}, rec])
    e = error(lambda: list(read_release(tmp_path / "data.jsonl")))
    assert (e.file, e.line, e.field) == (str(tmp_path / "data.jsonl"), 2, field)
    assert why in e.reason, e.reason


def test_release_duplicate_ids_and_default_category(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [RELEASE, RELEASE])
    e = error(lambda: list(read_release(tmp_path / "data.jsonl")))
    assert (e.line, e.field) == (2, "id")
    assert from_release({**RELEASE, "image": "images/1.png"}, default_category="mcq").category == "mcq"
    with pytest.raises(ValueError): from_release(RELEASE, default_category="poem")


# --- pair layouts ---------------------------------------------------------------------------------------------------

def test_dpo_pairs_lossless_with_side_mappings(tmp_path):
    write_jsonl(tmp_path / "dpo_pairs.jsonl", DPO)
    extras, pairs = {}, {}
    qs = read_dpo_pairs(tmp_path / "dpo_pairs.jsonl", extras, pairs)
    assert [(q.id, q.category, q.question, q.ranking) for q in qs] == [("llava_7", "short", "What colour is the bus?", [1, 2, 3]), ("vid_3", "video", "Where does the ball go?", [1, 2])]
    assert qs[0].responses[2].critique == "Not a colour, and wrong."
    assert extras[("llava_7", "Red.", "A car.")] == {"reference_chosen_logp": -3.5, "reference_rejected_logp": -9.25, "ls_factor": 0.5}
    assert extras[("llava_7", "Blue.", "A car.")]["rejected_reason"] == "A second opinion on this one."
    write_dpo_pairs(qs, tmp_path / "out.jsonl", extras, pairs)
    out = [r for _, r in read_jsonl(tmp_path / "out.jsonl")]
    # the prompt comes back without the media token (MM-RLHF's loader strips and re-adds it); everything else is identical
    assert out == [{**r, "prompt": r["prompt"].replace("<image>\n", "")} for r in DPO]


def test_dpo_pairs_without_extras_warns():
    with pytest.warns(UserWarning, match="reference_chosen_logp"):
        group_pairs(DPO)


def test_reward_bench_lossless(tmp_path):
    bench = [{"id": "mcq_12", "image": "mcq/12.png", "prompt": "Which option?", "chosen": "B", "rejected": "C", "chosen_reason": "B is right.", "rejected_reason": "C is wrong."},
             {"id": "mcq_12", "image": "mcq/12.png", "prompt": "Which option?", "chosen": "C", "rejected": "A", "chosen_reason": "C is wrong.", "rejected_reason": "A is worse.",
              "rewards": [0.1, -2.0], "critic": ["meh", "bad"]},
             {"id": "safety_9", "image": "data/safety/9.png", "prompt": "How do I...?", "chosen": "I can't help.", "rejected": "Sure.", "chosen_reason": "", "rejected_reason": ""}]
    write_jsonl(tmp_path / "bench.jsonl", bench)
    extras, pairs = {}, {}
    qs = read_reward_bench(tmp_path / "bench.jsonl", extras, pairs)
    assert [(q.id, q.category, q.ranking) for q in qs] == [("mcq_12", "mcq", [1, 2, 3]), ("safety_9", "safety", [1, 2])]
    write_reward_bench(qs, tmp_path / "out.jsonl", extras, pairs)
    assert [r for _, r in read_jsonl(tmp_path / "out.jsonl")] == bench
    # without the given pairs, the derived ranking adds the implied B > A
    assert len(to_reward_bench(qs[0])) == 3


def test_reward_bench_uses_the_substring_rule():
    rec = {"id": "x", "image": "short/mcq_1.png", "prompt": "Q?", "chosen": "a", "rejected": "b"}
    assert from_reward_bench([rec])[0].category == "mcq"
    assert group_pairs([{**rec, "id": "x_0"}])[0].category == "short"


@pytest.mark.parametrize("fmt", list(PAIR_FORMATS))
def test_pair_layouts_round_trip(fmt):
    read, write = PAIR_FORMATS[fmt]
    q = from_release(RELEASE)
    lines = write(q)
    assert len(lines) == len(pair_indices(q)) == 5
    [back] = read(lines)
    assert (back.question, back.images, back.category) == (q.question, q.images, q.category)
    assert {r.text for r in back.responses} == {r.text for r in q.responses}
    assert text_pairs(back) == text_pairs(q)
    # writing the regrouped query gives the same lines (up to order and, for ids, numbering)
    again = write(back)
    key = lambda l: json.dumps({k: v for k, v in l.items() if k != "id"}, sort_keys=True)
    assert sorted(map(key, again)) == sorted(map(key, lines))


@pytest.mark.parametrize("fmt", list(PAIR_FORMATS))
def test_pair_layouts_keep_side_fields_and_pairs_exactly(fmt):
    read, write = PAIR_FORMATS[fmt]
    lines = write(from_release(RELEASE))[::2]  # a partial set: 3 of the 5 pairs
    lines = [{**l, "weight": n} for n, l in enumerate(lines)]
    extras, pairs = {}, {}
    qs = read(lines, extras=extras, pairs=pairs)
    assert [l for q in qs for l in write(q, extras, pairs)] == lines


@pytest.mark.parametrize("fmt", list(PAIR_FORMATS))
def test_cyclic_pairs_are_an_error(tmp_path, fmt):
    read, write = PAIR_FORMATS[fmt]
    q = from_release(RELEASE)
    lines = write(q)
    c = dict(lines[0])
    flipped = write(q, pairs={q.id: [(1, 0)]})[0]  # the first pair the other way round
    write_jsonl(tmp_path / "p.jsonl", lines + [flipped])
    e = error(lambda: read_format(tmp_path / "p.jsonl", fmt))
    assert e.file == str(tmp_path / "p.jsonl") and e.line in (1, 6) and e.field is not None
    assert "form a cycle" in e.reason and "'The pupa stage.'" in e.reason
    assert c == lines[0]


def test_pair_line_errors_name_line_and_field(tmp_path):
    good = DPO[0]
    cases = [({**good, "id": "nosuffix"}, "id", "no '_<number>'"),
             ({**good, "chosen": ""}, "chosen", "non-empty"),
             ({**good, "rejected": good["chosen"]}, "rejected", "same text"),
             ({**good, "ls_factor": "big"}, "ls_factor", "must be a number"),
             ({**good, "is_tie": "yes"}, "is_tie", "true or false"),
             ({**good, "image": 5}, "image", "path or a list of paths"),
             ({**good, "prompt": "<image>\n"}, "prompt", "no text besides"),
             ({**good, "image": "short/other.jpg"}, "image", "differs from line 1")]
    for rec, field, why in cases:
        write_jsonl(tmp_path / "p.jsonl", [good, rec])
        e = error(lambda: read_dpo_pairs(tmp_path / "p.jsonl", extras={}))
        assert (e.line, e.field) == (2, field) and why in e.reason, (field, e)


def test_ties_in_pairs():
    a = {"id": "q_0", "image": "long/1.png", "prompt": "Q?", "chosen": "A", "rejected": "B"}
    qs = group_pairs([a, {**a, "id": "q_1", "chosen": "B", "rejected": "C", "is_tie": True}], extras={})
    assert qs[0].ranking == [1, 2, 2]
    e = error(lambda: group_pairs([a, {**a, "id": "q_1", "chosen": "A", "rejected": "B", "is_tie": True}], "p", extras={}))
    assert (e.line, e.field) == (1, "chosen") and "tied" in e.reason


def test_layout_specific_errors():
    q = from_release(RELEASE)
    trl = to_trl(q)[0]
    assert error(lambda: from_trl([{**trl, "images": ["a.png", "b.png"]}], "t")).reason == "has 1 image placeholder(s) for 2 image(s)"
    assert error(lambda: from_trl([{**trl, "chosen": trl["chosen"] * 2}], "t")).field == "chosen"
    lf = to_llamafactory(q)[0]
    assert error(lambda: from_llamafactory([{**lf, "conversations": [{"from": "gpt", "value": "<image>x"}]}], "l")).field == "conversations.0.from"
    assert "2 <image> token(s) for 1 image(s)" in error(lambda: from_llamafactory([{**lf, "conversations": [{"from": "human", "value": "<image><image>x"}]}], "l")).reason
    sw = to_swift(q)[0]
    assert error(lambda: from_swift([{**sw, "rejected_response": None}], "s")).field == "rejected_response"
    assert error(lambda: from_swift([{**sw, "messages": sw["messages"][::-1]}], "s")).field == "messages.0.role"


def test_trl_rows_are_what_trl_expects():
    trl_utils = pytest.importorskip("trl.data_utils")
    for row in to_trl(from_release({**RELEASE, "image": ["long/1.png", "long/2.png"]})):
        assert trl_utils.is_conversational(row)
        msgs = trl_utils.prepare_multimodal_messages(row["prompt"] + row["chosen"], images=row["images"])
        assert [p["image"] for p in msgs[0]["content"] if p["type"] == "image"] == row["images"]


# --- shapes-world queries through everything ---------------------------------------------------------------------

def test_world_queries_keep_their_pairs_in_every_layout():
    world = [world_query(s, i) for s in (0, 1) for i in range(300)]
    for fmt, (read, write) in PAIR_FORMATS.items():
        back = {(b.question, tuple(b.images)): b for b in read([l for w in world for l in write(w)], default_category="long")}
        assert len(back) == len(world)
        for w in world:
            b = back[w.question, tuple(w.images)]
            assert {r.text for r in b.responses} == {r.text for r in w.responses}, (fmt, w.id)
            assert text_pairs(b) == text_pairs(w), (fmt, w.id)
            if w.category == "video" and fmt not in ("trl",): assert b.category == "video", (fmt, w.id)
    for w in world:
        b = from_release(to_release(w), default_category="long")
        assert [(r.text, r.scores) for r in b.responses] == [(r.text, r.scores) for r in w.responses]
        assert (b.ranking, b.reference, b.question, b.images) == (w.ranking, w.reference, w.question, w.images)


@pytest.mark.parametrize("dst", FORMATS)
def test_convert_between_every_pair_of_layouts(tmp_path, dst):
    world = [world_query(3, i) for i in range(60)]
    write_queries(tmp_path / "w.jsonl", world)
    want = {(w.question, tuple(w.images)): text_pairs(w) for w in world}
    for src in FORMATS:
        convert(tmp_path / "w.jsonl", tmp_path / f"{src}.jsonl", "mmrlhf", src)
        stats = convert(tmp_path / f"{src}.jsonl", tmp_path / f"{src}-{dst}.jsonl", src, dst, default_category="long")
        assert stats["queries"] == len(world) and stats["queries_without_pairs"] == 0
        got = read_format(tmp_path / f"{src}-{dst}.jsonl", dst, default_category="long")
        assert {(g.question, tuple(g.images)): text_pairs(g) for g in got} == want, (src, dst)


def test_convert_same_layout_is_identity_and_warns_when_fields_stay_behind(tmp_path):
    write_jsonl(tmp_path / "dpo.jsonl", DPO)
    convert(tmp_path / "dpo.jsonl", tmp_path / "same.jsonl", "dpo_pairs", "dpo_pairs")
    assert [r for _, r in read_jsonl(tmp_path / "same.jsonl")] == [{**r, "prompt": r["prompt"].replace("<image>\n", "")} for r in DPO]
    with pytest.warns(UserWarning, match="ls_factor"):
        stats = convert(tmp_path / "dpo.jsonl", tmp_path / "trl.jsonl", "dpo_pairs", "trl")
    assert stats["extras_left_behind"] == 3 and stats["lines"] == 4
    with pytest.raises(ValueError, match="unknown format"): convert(tmp_path / "dpo.jsonl", tmp_path / "x", "dpo_pairs", "csv")


def test_all_tied_queries_have_no_pairs_to_write(tmp_path):
    tied = from_release({**RELEASE, "final_ranking": [1, 1, 1, 1]})
    write_release([tied, from_release({**RELEASE, "id": "other"})], tmp_path / "r.jsonl")
    stats = convert(tmp_path / "r.jsonl", tmp_path / "p.jsonl", "release", "dpo_pairs")
    assert stats["queries_without_pairs"] == 1 and stats["lines"] == 5


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "data.jsonl"
    write_release([from_release(RELEASE)], target)
    before = target.read_bytes()
    bad = from_release(RELEASE)
    bad.responses = None  # a broken query makes the writer fail after the first line
    with pytest.raises(TypeError): write_release([from_release({**RELEASE, "id": "new"}), bad], target)
    assert target.read_bytes() == before


# --- exports a trainer can use as written ------------------------------------------------------------------------

def cli(*args, cwd=None):
    import subprocess, sys
    return subprocess.run([sys.executable, "-m", "mmrlhf.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def lines_of(path):
    return [r for _, r in read_jsonl(path)]


def test_keep_pairs_round_trips_repeats_ties_and_ids_in_every_layout():
    base = {"image": "long/1.png", "prompt": "Q?", "chosen_reason": "", "rejected_reason": ""}
    dpo = [{"id": "q_900", **base, "chosen": "A", "rejected": "B"}, {"id": "q_901", **base, "chosen": "A", "rejected": "B", "ls_factor": 0.3},
           {"id": "q_905", **base, "chosen": "B", "rejected": "C"}, {"id": "q_906", **base, "chosen": "C", "rejected": "D", "is_tie": True}]
    [q] = group_pairs(dpo, keep_pairs=True)
    assert [(p["chosen"], p["rejected"], p.get("id"), p.get("tie", False)) for p in q.pairs] == \
           [(0, 1, "q_900", False), (0, 1, "q_901", False), (1, 2, "q_905", False), (2, 3, "q_906", True)]
    assert to_dpo_pairs(q) == dpo and pair_indices(q) == [(0, 1), (0, 1), (1, 2)]
    # through our own file and back: the pairs travel with the query
    back = parse_query(json.loads(json.dumps(query_record(q))))
    assert to_dpo_pairs(back) == dpo
    # the pair layouts without ties keep every preference line, repeats included, in order
    for fmt in ("trl", "llamafactory", "swift"):
        read, write = PAIR_FORMATS[fmt]
        rows = write(q)
        assert len(rows) == 3
        [again] = read(rows, keep_pairs=True)
        assert [(again.responses[p["chosen"]].text, again.responses[p["rejected"]].text) for p in again.pairs] == [("A", "B"), ("A", "B"), ("B", "C")]
        assert write(again) == rows, fmt


def test_dpo_pairs_export_carries_margins_and_reference_logps():
    q = from_release(RELEASE)
    for n, r in enumerate(q.responses): r.reward, r.ref_logp = 2.0 - n, -10.0 - 3 * n
    lines = to_dpo_pairs(q)
    assert len(lines) == 5
    import math
    for line, (i, j) in zip(lines, pair_indices(q)):
        c, r = q.responses[i], q.responses[j]
        # the names MM-RLHF's DPODataset reads (llava/train/train_dpo.py): reference_*_logp, ls_factor
        assert (line["reference_chosen_logp"], line["reference_rejected_logp"]) == (c.ref_logp, r.ref_logp)
        delta = c.reward - r.reward
        assert line["margin"] == pytest.approx(delta)
        # with --ls_factor_weight w the release's β·(1 + w·ls_factor) is the paper's β(1 + w(1 - e^(-kδ))), k = 0.5
        assert line["ls_factor"] == pytest.approx(1 - math.exp(-0.5 * delta))
    # without rewards or reference log-probs there is nothing to carry, and nothing made up
    plain = to_dpo_pairs(from_release(RELEASE))[0]
    assert not {"reference_chosen_logp", "reference_rejected_logp", "margin", "ls_factor"} & set(plain)
    # a partial set is not carried either: both responses need the number
    q.responses[1].ref_logp = None
    assert "reference_chosen_logp" not in to_dpo_pairs(q, pairs={q.id: [(1, 2)]})[0]


def test_nan_in_a_pair_file_is_refused(tmp_path):
    bad = json.dumps(DPO[0]).replace("-3.5", "NaN")
    (tmp_path / "p.jsonl").write_text(json.dumps(DPO[1]) + "\n" + bad + "\n")
    e = error(lambda: read_dpo_pairs(tmp_path / "p.jsonl", extras={}))
    assert (e.line, e.field) == (2, "reference_chosen_logp")
    e = error(lambda: group_pairs([{**DPO[0], "ls_factor": float("inf")}], "mem", extras={}))
    assert (e.line, e.field) == (1, "ls_factor")


@pytest.fixture
def world_dir(tmp_path):
    from mmrlhf.world import SynthConfig, write_world
    return write_world(SynthConfig(out=str(tmp_path / "w"), n_queries=12, seed=2))


def test_exports_point_trainers_at_images_from_any_folder(tmp_path, world_dir, monkeypatch):
    from mmrlhf.formats import PairsConfig
    from mmrlhf.formats import run_pairs
    out = tmp_path / "p"
    run_pairs(PairsConfig(input=str(world_dir), out=str(out), oracle=True, groups=False, export=["trl", "swift", "llamafactory", "dpo_pairs"]))
    elsewhere = tmp_path / "elsewhere"; elsewhere.mkdir(); monkeypatch.chdir(elsewhere)
    import datasets
    trl = datasets.load_dataset("json", data_files=str(out / "export.trl.jsonl"), split="train")
    trl = trl.cast_column("images", datasets.Sequence(datasets.Image()))
    assert all(im.size[0] > 0 for row in trl for im in row["images"])  # opened from another working directory
    for fmt in ("swift", "llamafactory"):
        paths = [p for rec in lines_of(out / f"export.{fmt}.jsonl") for p in rec.get("images", rec.get("videos", []))]
        assert paths and all(Path(p).is_absolute() and Path(p).exists() for p in paths), fmt
    # the release's own layout keeps paths relative to the image root (its loader joins them onto image_folder)
    media = [r.get("image", r.get("video")) for r in lines_of(out / "export.dpo_pairs.jsonl")]
    assert all(not Path(p).is_absolute() for m in media for p in ([m] if isinstance(m, str) else m))
    run_pairs(PairsConfig(input=str(world_dir), out=str(tmp_path / "rel"), oracle=True, groups=False, export=["trl"], absolute_images=False))
    assert all(not Path(p).is_absolute() for r in lines_of(tmp_path / "rel" / "export.trl.jsonl") for p in r["images"])


def test_a_missing_image_stops_the_export(tmp_path, world_dir):
    from mmrlhf.formats import PairsConfig
    from mmrlhf.formats import run_pairs
    from mmrlhf.core import DataError as DE
    run_pairs(PairsConfig(input=str(world_dir), out=str(tmp_path / "p"), oracle=True, groups=False, export=["dpo_pairs"]))
    pairs_file = tmp_path / "p" / "export.dpo_pairs.jsonl"
    first = lines_of(pairs_file)[0]
    media = first.get("image", first.get("video"))
    img = media if isinstance(media, str) else media[0]
    (Path(world_dir).parent / img).unlink()
    with pytest.raises(DE) as e:
        run_pairs(PairsConfig(input=str(pairs_file), out=str(tmp_path / "x"), input_format="dpo_pairs", image_root=str(Path(world_dir).parent),
                              default_category="long", groups=False, export=["trl"]))
    assert e.value.field == "images.0" and e.value.line == 1 and f"image {img!r} not found" in e.value.reason
    assert not (tmp_path / "x" / "export.trl.jsonl").exists()
    r = cli("pairs", "--input", pairs_file, "--out", tmp_path / "y", "--input-format", "dpo_pairs", "--image-root", Path(world_dir).parent,
            "--default-category", "long", "--no-groups", "export=[swift]")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_llamafactory_export_registers_itself(tmp_path):
    out = tmp_path / "lf"; out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    world = [world_query(5, i) for i in range(20)]
    clips = [q for q in world if q.category == "video" and len(q.images) == 1]
    from mmrlhf.formats import write_format
    write_format(world, out / "export.llamafactory.jsonl", "llamafactory")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"}  # the entry that was there stays
    entry = info["export.llamafactory"]
    assert (entry["file_name"], entry["formatting"], entry["ranking"]) == ("export.llamafactory.jsonl", "sharegpt", True)
    present = {k for rec in lines_of(out / "export.llamafactory.jsonl") for k in rec}
    assert set(entry["columns"].values()) == present and entry["columns"]["messages"] == "conversations"
    assert ("videos" in present) == bool(clips)
    # an image-free set has no media columns at all
    write_format([from_release({k: v for k, v in RELEASE.items() if k != "image"}, default_category="long")], out / "text.jsonl", "llamafactory")
    assert set(json.loads((out / "dataset_info.json").read_text())["text"]["columns"]) == {"messages", "chosen", "rejected"}
    (out / "dataset_info.json").write_text("{broken")
    e = error(lambda: write_format(world, out / "export.llamafactory.jsonl", "llamafactory"))
    assert e.file == str(out / "dataset_info.json") and "not valid JSON" in e.reason


def test_convert_keeps_repeated_lines_and_their_ids(tmp_path):
    base = {"image": "long/1.png", "prompt": "Q?", "chosen_reason": "", "rejected_reason": ""}
    dpo = [{"id": "q_900", **base, "chosen": "A", "rejected": "B", "ls_factor": 0.1},
           {"id": "q_901", **base, "chosen": "A", "rejected": "B", "ls_factor": 0.3},
           {"id": "q_905", **base, "chosen": "B", "rejected": "C", "is_tie": True}]
    write_jsonl(tmp_path / "in.jsonl", dpo)
    stats = convert(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "dpo_pairs", "dpo_pairs")
    assert lines_of(tmp_path / "out.jsonl") == dpo and stats["lines"] == 3
    with pytest.warns(UserWarning) as caught:
        stats = convert(tmp_path / "in.jsonl", tmp_path / "swift.jsonl", "dpo_pairs", "swift")
    said = " ".join(str(w.message) for w in caught)
    assert "1 tied pair(s) are not written" in said and "3 pair line(s) carry field(s) ['is_tie', 'ls_factor']" in said
    assert stats["extras_left_behind"] == 3
    assert [(r["messages"][1]["content"], r["rejected_response"]) for r in lines_of(tmp_path / "swift.jsonl")] == [("A", "B"), ("A", "B")]
