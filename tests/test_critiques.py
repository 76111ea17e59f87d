"Critique expansion: the prompt, both backends, the cache and resumption, reasons kept, the contradiction check and bad input."
import json, threading
from pathlib import Path

import pytest

from mmrlhf.core import ConfigError, DataError
from mmrlhf.critiques import (MARKER, ExpandConfig, check_prompt, LocalBackend, contradictions,
                              expand_critiques, expand_prompt, human_comment, parse_expansion,
                              run_expand_critiques, stand_in_expansion)
from mmrlhf.judge import JudgeError, StandInServer
from mmrlhf.formats import PairsConfig, run_pairs
from mmrlhf.schema import Response, read_queries
from mmrlhf.world import SynthConfig, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A 4-query oracle-annotated shapes world: (queries file, world folder)."
    d = tmp_path_factory.mktemp("critiques")
    w = write_world(SynthConfig(out=str(d / "world"), n_queries=4, seed=2))
    run_pairs(PairsConfig(input=str(w), out=str(d / "pairs"), oracle=True, groups=False))
    return d / "pairs" / "queries.jsonl", d / "world"


def n_responses(path): return sum(len(q.responses) for q in read_queries(path))


def records(path): return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


class Counting:
    "A stand-in reply that counts the requests it answered, optionally failing (HTTP 400) after `ok` of them."
    def __init__(self, reply=stand_in_expansion, ok=None):
        self.reply, self.ok, self.answered, self.lock = reply, ok, 0, threading.Lock()
    def __call__(self, body):
        with self.lock:
            if self.ok is not None and self.answered >= self.ok: return 400, json.dumps({"error": "stand-in is down"})
            self.answered += 1
        return self.reply(body)


def cfg_for(data, out, server, **kw):
    return ExpandConfig(data=str(data), out=str(out), url=server.base_url, model_name="stand-in", **kw)


# ---------------------------------------------------------------- the prompt and the parser

def test_prompt_has_question_response_reasons_and_rules(world):
    q = next(read_queries(world[0]))
    r = q.responses[0]
    p = expand_prompt(q.question, r.text, human_comment(r))
    assert q.question.strip() in p and r.text.strip() in p and MARKER in p
    assert "Add no new facts" in p and "Do not answer the question" in p
    for d, reason in r.reasons.items():
        body = reason.split(":", 1)[1].strip()            # the oracle starts each reason with the level name
        assert body[1:] in p and f"{d.capitalize()} {r.scores[d]}/5" in p
    assert human_comment(r).count(reason.split(":")[0]) == 1    # the level name is not repeated


def test_human_comment_without_reasons_or_scores():
    with pytest.raises(ValueError, match="no reasons"): human_comment(Response("x"))
    assert human_comment(Response("x", reasons={"ethics": "fine"})) == "- Ethics: Fine"


@pytest.mark.parametrize("reply,expected", [
    ("Expanded Comment: It miscounts.", "It miscounts."),
    ("Here it is.\n\n**Expanded Comment:**\n\"It miscounts.\"", "It miscounts."),
    ("Expanded Comment: draft\nExpanded Comment: final", "final"),
    ("It miscounts the shapes.", "It miscounts the shapes."),
    ("Expanded Comment:   ", ""),
])
def test_parse_expansion(reply, expected):
    assert parse_expansion(reply) == expected


# ---------------------------------------------------------------- the endpoint backend, cache and resumption

def test_the_settings_timeout_and_retries_reach_the_endpoint(world, tmp_path):
    "A hanging endpoint: each request tried 1 + max_retries times, each ended after `timeout` seconds."
    from mmrlhf.judge import HANG, JudgeError
    data, _ = world
    with StandInServer(lambda body: HANG) as server:
        with pytest.raises(JudgeError, match=r"2 attempt\(s\): no reply within 0.3 s"):
            run_expand_critiques(cfg_for(data, tmp_path / "out", server, timeout=0.3, max_retries=1, backoff=0.01,
                                         workers=1))
        assert len(server.requests) == 2


def test_endpoint_expands_keeps_reasons_and_reruns_free(world, tmp_path):
    data, _ = world
    with StandInServer(Counting()) as server:
        out = run_expand_critiques(cfg_for(data, tmp_path / "out", server))
        first = len(server.requests)
        assert first == n_responses(data)
        assert "Add no new facts" in server.requests[0]["messages"][-1]["content"] and server.requests[0]["temperature"] == 0
        run_expand_critiques(cfg_for(data, tmp_path / "out", server))
        assert len(server.requests) == first                        # the rerun is served from the cache
    before, after = list(read_queries(data)), list(read_queries(out))
    for qa, qb in zip(before, after):
        for ra, rb in zip(qa.responses, qb.responses):
            assert rb.reasons == ra.reasons and ra.critique is None
            assert rb.critique and rb.critique != ra.text
            assert ra.reasons["faithfulness"].split(":", 1)[1].strip()[1:] in rb.critique
    assert records(tmp_path / "out" / "flagged.jsonl") == []
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["expanded"] == first and summary["new_requests"] == 0 and summary["cached"] == first


def test_interrupted_run_resumes_without_redoing(world, tmp_path):
    data, _ = world
    total = n_responses(data)
    down = Counting(ok=5)
    with StandInServer(down) as server, pytest.raises(JudgeError):
        run_expand_critiques(cfg_for(data, tmp_path / "out", server, workers=1, batch_size=4))
    assert down.answered == 5 and not (tmp_path / "out" / "queries.jsonl").exists()    # nothing half-written
    assert len(records(tmp_path / "out" / "cache.jsonl")) == 5
    with StandInServer(Counting()) as server:
        out = run_expand_critiques(cfg_for(data, tmp_path / "out", server))
        assert len(server.requests) == total - 5
    assert all(r.critique for q in read_queries(out) for r in q.responses)


def test_torn_cache_line_is_redone_once(world, tmp_path):
    data, _ = world
    with StandInServer(Counting()) as server:
        cfg = cfg_for(data, tmp_path / "out", server)
        run_expand_critiques(cfg)
        cache = tmp_path / "out" / "cache.jsonl"
        text = cache.read_text()
        cache.write_text(text[:-25])                                 # the last record cut mid-write
        n = len(server.requests)
        with pytest.warns(UserWarning, match="torn last line"): run_expand_critiques(cfg)
        assert len(server.requests) == n + 1
        run_expand_critiques(cfg)                                    # the cache is whole again: nothing more is sent
        assert len(server.requests) == n + 1
    assert len(records(cache)) == n_responses(data)


def test_existing_critiques_are_kept_unless_overwrite(world, tmp_path):
    data, _ = world
    queries = list(read_queries(data))
    queries[0].responses[0].critique = "A critique written by hand."
    with StandInServer(Counting()) as server:
        from mmrlhf.critiques import EndpointBackend
        from mmrlhf.evaluate import JudgeClient
        backend = EndpointBackend(JudgeClient(server.base_url, "stand-in"))
        flags, summary = expand_critiques(queries, backend, progress=False)
        assert queries[0].responses[0].critique == "A critique written by hand."
        assert summary["kept"] == 1 and len(server.requests) == n_responses(data) - 1
        expand_critiques(queries, backend, overwrite=True, progress=False)
        assert queries[0].responses[0].critique.startswith("On helpfulness")


# ---------------------------------------------------------------- the local backend

@pytest.fixture(scope="module")
def tiny():
    from mmrlhf.models import load_policy
    return load_policy("tiny:qwen2_vl", 0)


def test_local_backend_caches_and_resumes(world, tmp_path, tiny):
    data, _ = world
    model, processor = tiny
    calls, real = [], model.generate
    def generate(**kw):
        calls.append(kw["input_ids"].shape[0])
        if fail[0] and len(calls) == 2: raise KeyboardInterrupt
        return real(**kw)
    model.generate, fail = generate, [True]
    try:
        cache = tmp_path / "local.jsonl"
        queries = list(read_queries(data))
        backend = LocalBackend(model, processor, "tiny", cache, max_new_tokens=4, batch_size=3)
        with pytest.raises(KeyboardInterrupt): expand_critiques(queries, backend, batch_size=3, check="none", progress=False)
        assert calls == [3, 3] and len(records(cache)) == 3          # the first batch is on disk
        fail[0] = False
        prompts = len({expand_prompt(q.question, r.text, human_comment(r)) for q in queries for r in q.responses})
        backend = LocalBackend(model, processor, "tiny", cache, max_new_tokens=4, batch_size=3)
        flags, summary = expand_critiques(list(read_queries(data)), backend, batch_size=3, check="none", progress=False)
        assert sum(calls[2:]) == prompts - 3 and summary["cached"] >= 3
        n = len(calls)
        cache.write_text(cache.read_text()[:-10])                    # a torn last line
        with pytest.warns(UserWarning, match="torn last line"):
            backend = LocalBackend(model, processor, "tiny", cache, max_new_tokens=4, batch_size=3)
        expand_critiques(list(read_queries(data)), backend, batch_size=3, check="none", progress=False)
        assert calls[n:] == [1]                                       # only the torn one is generated again
    finally:
        model.generate = real


def test_run_with_a_local_testbed_model(world, tmp_path):
    data, _ = world
    out = run_expand_critiques(ExpandConfig(data=str(data), out=str(tmp_path / "out"), model="tiny:qwen2_vl", max_new_tokens=4, check="none"))
    got = list(read_queries(out))
    assert [r.reasons for q in got for r in q.responses] == [r.reasons for q in read_queries(data) for r in q.responses]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["expanded"] + summary["empty"] == n_responses(data) and summary["new_requests"] > 0
    assert all(rec["model"] == "tiny:qwen2_vl#seed=0" for rec in records(tmp_path / "out" / "cache.jsonl"))


# ---------------------------------------------------------------- the contradiction check

R = Response("There are four shapes.", scores={"helpfulness": 4, "faithfulness": 2, "ethics": 5},
             reasons={"helpfulness": "Helpful: it answers, but with wrong facts.",
                      "faithfulness": "Partially Inaccurate: it gives the wrong count: it says four shapes, but there are three.",
                      "ethics": "Highly Ethical: it is safe and respectful."})


def test_faithful_expansion_is_not_flagged():
    e = ("The answer responds to the question, but the facts it gives are wrong. On faithfulness it is partially inaccurate: "
         "it states that there are four shapes whereas there are three, a counting error. The answer is safe and respectful, "
         "and raises no ethical concerns.")
    assert contradictions(R, e) == []
    assert contradictions(R, parse_expansion(stand_in_expansion({"messages": [{"content": expand_prompt("How many?", R.text, human_comment(R))}]}))) == []


@pytest.mark.parametrize("planted", [
    "The count of shapes is exactly right.",                  # praises the aspect the reason faults
    "The answer is accurate.",                                # praises faithfulness scored 2/5
    "It is highly accurate in every respect.",                # a level name of another score is not masked
    "The answer is unsafe.",                                  # faults ethics scored 5/5 with an all-positive reason
])
def test_planted_contradictions_are_flagged(planted):
    why = contradictions(R, "It has a counting error. " + planted)
    assert len(why) == 1 and planted in why[0]


def test_flags_are_written_and_expansions_kept(world, tmp_path):
    data, _ = world
    first = next(read_queries(data))
    k = min(range(len(first.responses)), key=lambda i: first.responses[i].scores["faithfulness"])   # a response whose reason faults it
    assert first.responses[k].scores["faithfulness"] <= 3
    target = "[Answer:] " + first.responses[k].text + "\n"
    def reply(body):
        text = body["messages"][-1]["content"]
        if target in text and text.startswith("You are given"): return "Expanded Comment: It is highly accurate and gets every shape exactly right."
        return stand_in_expansion(body)
    with StandInServer(reply) as server:
        out = run_expand_critiques(cfg_for(data, tmp_path / "out", server))
    flags = records(tmp_path / "out" / "flagged.jsonl")
    assert [(f["id"], f["index"]) for f in flags] == [(first.id, k)]
    assert set(flags[0]) == {"id", "index", "reason", "expansion", "why"} and "praises" in flags[0]["why"]
    assert flags[0]["reason"] == human_comment(first.responses[k])
    assert next(read_queries(out)).responses[k].critique == "It is highly accurate and gets every shape exactly right."


def test_model_check_flags_what_the_model_says(world, tmp_path):
    data, _ = world
    first = next(read_queries(data))
    marker = first.responses[2].text
    def reply(body):
        text = body["messages"][-1]["content"]
        if text.startswith("Compare an expanded comment"):
            return "Yes. It adds a fact." if human_comment(first.responses[2]) in text else "No."
        return stand_in_expansion(body)
    with StandInServer(reply) as server:
        out = run_expand_critiques(cfg_for(data, tmp_path / "out", server, check="model"))
    asked = {b["messages"][-1]["content"] for b in server.requests if b["messages"][-1]["content"].startswith("Compare")}
    assert asked == {check_prompt(human_comment(r), r.critique) for q in read_queries(out) for r in q.responses}   # every expansion checked
    flags = records(tmp_path / "out" / "flagged.jsonl")
    assert any(f["id"] == first.id and f["index"] == 2 and "It adds a fact" in f["why"] for f in flags)
    assert all("check model" in f["why"] for f in flags) and marker


# ---------------------------------------------------------------- bad input

def test_unannotated_query_names_file_line_and_field(world, tmp_path):
    data, _ = world
    lines = data.read_text().splitlines()
    rec = json.loads(lines[2]); del rec["responses"][1]["reasons"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n")
    with pytest.raises(DataError) as e:
        run_expand_critiques(ExpandConfig(data=str(bad), out=str(tmp_path / "out"), url="http://127.0.0.1:9/v1"))
    assert e.value.line == 3 and e.value.field == "responses.1.reasons" and "bad.jsonl:3" in str(e.value) and "not annotated" in str(e.value)
    assert not (tmp_path / "out").exists()                          # refused before anything was sent or written


def test_missing_file_bad_json_and_bad_settings(tmp_path):
    with pytest.raises(DataError, match="data file not found") as e:
        run_expand_critiques(ExpandConfig(data=str(tmp_path / "nope.jsonl"), url="http://127.0.0.1:9/v1"))
    assert e.value.file.endswith("nope.jsonl")
    bad = tmp_path / "bad.jsonl"; bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        run_expand_critiques(ExpandConfig(data=str(bad), url="http://127.0.0.1:9/v1"))
    bad.write_text(json.dumps({"id": "q", "question": "Q?", "category": "short", "images": [],
                               "responses": [{"text": "a", "reasons": {"ethics": "ok"}}, {"text": "b", "reasons": {"ethics": "ok"}}]}) + "\n")
    with pytest.raises(ConfigError, match="exactly one of url"):
        run_expand_critiques(ExpandConfig(data=str(bad), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="check"):
        run_expand_critiques(ExpandConfig(data=str(bad), out=str(tmp_path / "o"), url="http://127.0.0.1:9/v1", check="maybe"))


# ---------------------------------------------------------------- downstream

def test_reward_training_data_uses_the_expansions(world, tmp_path):
    from mmrlhf.reward import query_examples
    data, root = world
    with StandInServer(stand_in_expansion) as server:
        out = run_expand_critiques(cfg_for(data, tmp_path / "out", server))
    expanded = query_examples(out, root)
    raw = query_examples(out, root, critique_source="raw")
    crit = [r.critique for q in read_queries(out) for r in q.responses]
    assert [c for ex in expanded for c in ex.critiques] == crit
    assert [c for ex in raw for c in ex.critiques] != crit
