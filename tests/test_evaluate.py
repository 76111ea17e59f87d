"Evaluation: answer parsing, refusals, the judge client over loopback, statistics against scipy, leakage."
import json, math, socket, threading, time, warnings

import numpy as np
import pytest
from scipy import stats

from mmrlhf.core import DataError
from mmrlhf.curation import InMemory
from mmrlhf.evaluate import (attack_success, drop_contaminated, exact_match, hallucination_rating,
                             is_refusal, leakage_report, mcq_correct, mcq_letter, mmhal_metrics,
                             refusal_metrics, word_ngrams)
from mmrlhf.judge import JudgeClient, JudgeError, StandInServer, read_reply_cache
from mmrlhf.stats import (Score, aggregate_seeds, bootstrap_ci, compare, compare_benchmarks, holm,
                          mcnemar, paired_bootstrap, permutation_test, score)


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("[c]", "C"), ("The answer is B", "B"), ("Answer: b", "B"),
    ("answer: (d).", "D"), ("**C**", "C"), ("The correct option is C.", "C"), ("B) purple", "B"), ("B. purple", "B"),
    ("It's D", "D"), ("I choose (A) here", "A"), ("The answer is B. Option A is wrong.", "B"),
    ("The answer is a red circle", None), ("I think so", None), ("A or B", None), ("E", None), ("", None),
    ("The answer is E", None), ("Neither of them.", None),
])
def test_mcq_letter(text, expected):
    assert mcq_letter(text, n_options=4) == expected


def test_mcq_letter_by_option_text():
    opts = ["red", "green", "blue"]
    assert mcq_letter("It is green.", options=opts) == "B"
    assert mcq_letter("red or green", options=opts) is None
    assert mcq_letter("D", options=opts) is None  # three options: D is out of range


def test_mcq_correct_and_exact_match():
    assert mcq_correct("The answer is (c)", "C") and not mcq_correct("C", "(B)")
    with pytest.raises(ValueError, match="not an option letter"):
        mcq_correct("A", "blue")
    assert exact_match("The Red circle.", "red circle") and exact_match("two", ["2", "Two"])
    assert not exact_match("red circles", "red circle")


def test_refusals():
    assert is_refusal("I’M SORRY, I can’t do that") and is_refusal("As an AI model, ...") and not is_refusal("Here is how.")
    preds = [{"id": "h1", "prediction": "I cannot help with that.", "harmful": True},
             {"id": "h2", "prediction": "Sure, step one...", "harmful": True},
             {"id": "b1", "prediction": "It is safe.", "harmful": False},
             {"id": "b2", "prediction": "Sorry, but I won't answer.", "harmful": False},
             {"id": "b3", "prediction": None, "harmful": False}]
    m = refusal_metrics(preds)
    assert m["refusal_rate"].value == 0.5 and m["refusal_rate"].ids == ["h1", "h2"] and m["refusal_rate"].outcomes == [True, False]
    assert m["over_refusal"].value == pytest.approx(1 / 3) and m["over_refusal"].n == 3
    assert m["refused"] == [True, False, False, True, False] and m["harmful"] == [True, True, False, False, False]
    assert m["refusal_rate"].low <= 0.5 <= m["refusal_rate"].high
    with pytest.raises(ValueError, match="no 'prediction'"):
        refusal_metrics([{"answer": "x", "harmful": True}])


# ---------------------------------------------------------------- judge over loopback

def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_cache_in_memory_and_on_disk(tmp_path):
    cache = tmp_path / "sub" / "cache.jsonl"
    with StandInServer(lambda body: "reply to " + body["messages"][-1]["content"]) as srv:
        j = JudgeClient(srv.base_url, "m", cache_path=cache)
        assert j.ask("one") == "reply to one" and len(srv.requests) == 1
        assert j.ask("one") == "reply to one" and len(srv.requests) == 1       # served from the cache
        assert j.ask("two") == "reply to two" and len(srv.requests) == 2       # other messages, other key
        assert j.ask("one", system="be strict") and len(srv.requests) == 3
        assert j.ask("one", max_tokens=5) and len(srv.requests) == 4           # other parameters, other key
        j2 = JudgeClient(srv.base_url, "m", cache_path=cache)
        assert [j2.ask("one"), j2.ask("two")] == ["reply to one", "reply to two"] and len(srv.requests) == 4
        j3 = JudgeClient(srv.base_url, "other-model", cache_path=cache)
        j3.ask("one"); assert len(srv.requests) == 5                            # the model is part of the key
    assert srv.requests[0]["temperature"] == 0 and srv.requests[0]["model"] == "m"
    assert len(cache.read_text().splitlines()) == 5


def test_judge_cache_torn_and_corrupt_lines(tmp_path):
    cache = tmp_path / "c.jsonl"
    with StandInServer(lambda body: "ok") as srv:
        JudgeClient(srv.base_url, "m", cache_path=cache).ask("q")
        cache.write_text(cache.read_text() + '{"key": "abc", "rep')   # a killed run's half line
        with pytest.warns(UserWarning, match="torn"):
            j = JudgeClient(srv.base_url, "m", cache_path=cache)
        j.ask("q"); assert len(srv.requests) == 1
        j.ask("q2"); assert len(srv.requests) == 2            # appended after the dropped half line, not onto it
        again = JudgeClient(srv.base_url, "m", cache_path=cache)
        again.ask("q"); again.ask("q2"); assert len(srv.requests) == 2
        cache.write_text("not json\n" + cache.read_text())
        with pytest.raises(DataError, match="c.jsonl:1"):
            JudgeClient(srv.base_url, "m", cache_path=cache)


def test_judge_retries_5xx_then_succeeds():
    n = []
    def reply(body):
        n.append(1)
        return (500, "boom") if len(n) <= 2 else "fine"
    with StandInServer(reply) as srv:
        j = JudgeClient(srv.base_url, "m", backoff=0.01, max_retries=3)
        assert j.ask("x") == "fine"
    assert len(n) == 3 and j.n_requests == 3


def test_judge_retries_429_with_retry_after_then_gives_up():
    with StandInServer(lambda body: (429, '{"error": "slow down"}')) as srv:
        j = JudgeClient(srv.base_url, "m", backoff=0.01, max_retries=2)
        with pytest.raises(JudgeError, match=r"unreachable after 3 attempt\(s\): HTTP 429"):
            j.ask("x")
        assert len(srv.requests) == 3


def test_judge_unreachable_names_the_url():
    port = _closed_port()
    j = JudgeClient(f"http://127.0.0.1:{port}/v1/", "m", backoff=0.01, max_retries=2)
    t0 = time.time()
    with pytest.raises(JudgeError, match=rf"http://127\.0\.0\.1:{port}/v1/chat/completions unreachable after 3 attempt\(s\).*refused"):
        j.ask("x")
    assert j.n_requests == 3 and time.time() - t0 < 5


def test_judge_timeout_is_retried_and_reported():
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)   # accepts connections, never answers
    try:
        j = JudgeClient(f"http://127.0.0.1:{srv.getsockname()[1]}/v1", "m", timeout=0.2, backoff=0.01, max_retries=1)
        with pytest.raises(JudgeError, match="unreachable after 2 attempt"):
            j.ask("x")
    finally: srv.close()


@pytest.mark.parametrize("body,match", [
    ("this is not json", "malformed reply"),
    ('{"choices": []}', "malformed reply"),
    ('{"choices": [{"message": {"content": null}}]}', "malformed reply"),
    ('{"choices": [{"text": "legacy completion"}]}', "malformed reply"),
    ('{"error": {"message": "model not loaded"}}', "returned an error.*model not loaded"),
])
def test_judge_malformed_replies(body, match):
    with StandInServer(lambda b: (200, body)) as srv:
        with pytest.raises(JudgeError, match=match) as e:
            JudgeClient(srv.base_url, "m", backoff=0.01).ask("x")
        assert srv.base_url in str(e.value) and len(srv.requests) == 1          # not retried


def test_judge_client_errors_not_retried_and_key_sent(monkeypatch):
    with StandInServer(lambda body: (401, '{"error": "invalid key"}')) as srv:
        with pytest.raises(JudgeError, match=r"HTTP 401.*invalid key.*\$MY_JUDGE_KEY"):
            JudgeClient(srv.base_url, "m", api_key_env="MY_JUDGE_KEY", backoff=0.01).ask("x")
        assert len(srv.requests) == 1
    # the key travels as a bearer token when the variable is set, and not at all otherwise
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    with StandInServer(lambda body: "ok") as srv:
        JudgeClient(srv.base_url, "m", api_key_env="MY_JUDGE_KEY").ask("x")
        monkeypatch.delenv("MY_JUDGE_KEY")
        JudgeClient(srv.base_url, "m", api_key_env="MY_JUDGE_KEY").ask("y")
    assert [h.get("Authorization") for h in srv.headers] == ["Bearer sk-test", None]


def test_judge_ask_many_keeps_order():
    with StandInServer(lambda body: body["messages"][-1]["content"].upper()) as srv:
        j = JudgeClient(srv.base_url, "m")
        prompts = [f"p{i}" for i in range(20)]
        assert j.ask_many(prompts, workers=4) == [p.upper() for p in prompts]
        assert j.ask_many(prompts) and len(srv.requests) == 20


def test_judge_metrics():
    replies = {"good": "Accurate.\nRating: 5", "bad": "Hallucinates a cat.\n**Rating:** 1", "odd": "no idea"}
    def reply(body):
        p = body["messages"][-1]["content"]
        if p.startswith("You are a classifier"): return "Yes." if "steps" in p.split("Generation:")[1] else "No"
        return replies[p.split("Assistant's answer: ")[1].split("\n")[0]]
    with StandInServer(reply) as srv:
        j = JudgeClient(srv.base_url, "m")
        got = [hallucination_rating(j, "q?", a, "ref", "a red circle") for a in ("good", "bad", "odd")]
        assert [(g["rating"], g["hallucinated"], g["parsed"]) for g in got] == [(5, False, True), (1, True, True), (0, True, False)]
        assert "a red circle" in srv.requests[0]["messages"][-1]["content"] and "ref" in srv.requests[0]["messages"][-1]["content"]
        m = mmhal_metrics(got, ["a", "b", "c"])
        assert m["score"].value == 2.0 and m["hallucination_rate"].value == pytest.approx(2 / 3) and m["unparsed"] == 1
        skip = hallucination_rating(j, "q?", "odd", "ref", "a red circle", unparsed_as=None)
        assert mmhal_metrics(got[:2] + [skip])["hallucination_rate"].n == 2
        assert attack_success(j, "make a weapon", "here are the steps") is True
        assert attack_success(j, "make a weapon", "I won't") is False


# ---------------------------------------------------------------- statistics

def test_score_and_bootstrap_ci():
    x = np.random.default_rng(0).random(100)
    s = score(x)
    assert s.value == pytest.approx(x.sum() / x.size, rel=1e-12) and s.n == 100
    # the interval against two independent computations: scipy's percentile bootstrap and the normal interval with
    # the bootstrap's plug-in standard error (sd with ddof=0 over sqrt(n)); both agree to well within 0.15 standard errors
    se = x.std() / np.sqrt(x.size)
    sp = stats.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", random_state=0).confidence_interval
    z = stats.norm.ppf(0.975)
    assert s.low == pytest.approx(sp.low, abs=0.004) and s.high == pytest.approx(sp.high, abs=0.004)
    assert s.low == pytest.approx(x.mean() - z * se, abs=0.004) and s.high == pytest.approx(x.mean() + z * se, abs=0.004)
    assert bootstrap_ci(x) == (s.value, s.low, s.high) and isinstance(s, Score)
    assert s.to_dict(outcomes=True)["ids"] == list(range(100))


def test_bootstrap_ci_of_the_median_against_its_exact_distribution():
    # with n odd, a resample's median is at most the k-th smallest value exactly when at least (n+1)/2 of the n draws
    # are: P = P(Binomial(n, k/n) >= (n+1)/2). The percentile interval's ends are the order statistics where that
    # probability crosses 2.5% and 97.5%; the Monte Carlo interval may land one order statistic away.
    x = np.random.default_rng(0).random(101); n, xs = x.size, np.sort(x)
    v, lo, hi = bootstrap_ci(x, np.median, n_boot=4000)
    cdf = stats.binom.sf(n // 2, n, np.arange(1, n + 1) / n)
    klo, khi = int(np.argmax(cdf >= 0.025)), int(np.argmax(cdf >= 0.975))
    assert v == xs[n // 2]
    assert xs[klo - 1] <= lo <= xs[klo + 1] and xs[khi - 1] <= hi <= xs[khi + 1]


def test_paired_bootstrap_covers_the_truth_and_rejects_a_real_difference():
    rng = np.random.default_rng(1)
    a = rng.normal(0.3, 1, 400); b = a - 0.25 + rng.normal(0, 0.3, 400)
    r = paired_bootstrap(a, b, n_boot=4000, seed=3)
    assert r["low"] < 0.25 < r["high"] and r["p"] < 0.001 and r["diff"] == pytest.approx(np.mean(a - b))
    # the interval agrees with scipy's percentile bootstrap of the mean difference
    sp = stats.bootstrap((a - b,), np.mean, n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert r["low"] == pytest.approx(sp.low, abs=0.01) and r["high"] == pytest.approx(sp.high, abs=0.01)
    # no real difference: the interval and p-value against the normal approximation of the bootstrap distribution
    # (mean difference, plug-in standard error); Monte Carlo error on p with 2000 resamples is about 0.01
    d = a - (a + rng.normal(0, 1, 400)); se = d.std() / np.sqrt(d.size)
    null = paired_bootstrap(a, a - d, n_boot=2000)
    assert null["diff"] == pytest.approx(d.mean())
    assert null["p"] == pytest.approx(2 * stats.norm.sf(abs(d.mean()) / se), abs=0.03)
    assert null["low"] == pytest.approx(d.mean() - stats.norm.ppf(0.975) * se, abs=0.006)
    assert null["high"] == pytest.approx(d.mean() + stats.norm.ppf(0.975) * se, abs=0.006)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_test_matches_scipy_exactly_on_small_samples(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=9), rng.normal(size=9) + 0.3
    ours = permutation_test(a, b, n_perm=10_000)
    ref = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided")
    assert ours["exact"] and ours["p"] == pytest.approx(ref.pvalue, abs=1e-9)


def test_permutation_test_monte_carlo_close_to_scipy():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=60), rng.normal(size=60) + 0.2
    ours = permutation_test(a, b, n_perm=20_000, seed=1)
    ref = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                                 n_resamples=20_000, random_state=1)
    assert not ours["exact"] and ours["p"] == pytest.approx(ref.pvalue, abs=0.01)


@pytest.mark.parametrize("n10,n01", [(0, 0), (3, 0), (7, 2), (10, 14), (12, 12), (20, 9), (40, 25), (100, 70)])
def test_mcnemar_against_scipy(n10, n01):
    a = [1] * n10 + [0] * n01 + [1] * 30 + [0] * 11
    b = [0] * n10 + [1] * n01 + [1] * 30 + [0] * 11
    r = mcnemar(a, b)
    n = n10 + n01
    assert (r["a_only"], r["b_only"]) == (n10, n01)
    if n == 0: assert r["p"] == 1.0
    elif n < 25:
        assert r["method"] == "exact" and r["p"] == pytest.approx(stats.binomtest(n10, n, 0.5).pvalue, rel=1e-12)
    else:
        chi = (abs(n10 - n01) - 1) ** 2 / n
        assert r["method"] == "chi2" and r["statistic"] == pytest.approx(chi) and r["p"] == pytest.approx(stats.chi2.sf(chi, 1), rel=1e-9)
    forced = mcnemar(a, b, exact=True)
    if n: assert forced["p"] == pytest.approx(stats.binomtest(n10, n, 0.5).pvalue, rel=1e-12)


def test_holm_by_hand():
    # m = 5; sorted p: 0.001 (x5 = 0.005), 0.008 (x4 = 0.032), 0.012 (x3 = 0.036), 0.02 (x2 = 0.04), 0.3 (x1 = 0.3)
    adj, rej = holm([0.02, 0.3, 0.001, 0.012, 0.008], alpha=0.035)
    assert adj == pytest.approx([0.04, 0.3, 0.005, 0.036, 0.032])
    assert rej == [False, False, True, False, True]
    # monotone: a larger raw p never gets a smaller adjusted one, capped at 1
    adj, _ = holm([0.04, 0.03, 0.5, 0.6])  # 0.03*4 = 0.12, 0.04*3 = 0.12, 0.5*2 = 1.0, 0.6*1 -> max(1.0, 0.6)
    assert adj == pytest.approx([0.12, 0.12, 1.0, 1.0])
    assert holm([]) == ([], [])
    with pytest.raises(ValueError): holm([0.5, 1.2])


def test_aggregate_seeds():
    r = aggregate_seeds({1: 0.5, 2: score([1, 1, 0, 0, 1]), 3: 0.7})
    assert r["per_seed"] == {1: 0.5, 2: 0.6, 3: 0.7} and r["mean"] == pytest.approx(0.6) and r["sd"] == pytest.approx(0.1)
    assert aggregate_seeds([0.4])["sd"] is None
    with pytest.raises(ValueError): aggregate_seeds({})


def test_compare_pairs_by_id_and_holm_across_benchmarks():
    a = score([1, 1, 0, 1], ids=["w", "x", "y", "z"]); b = score([1, 0, 0, 0], ids=["z", "y", "x", "w"])  # same items, other order
    r = compare(b, a)  # A's improvement on B, as B -> A
    assert r["diff"] == pytest.approx(0.5) == r["b"] - r["a"] and r["test"] == "McNemar" and r["n"] == 4
    assert compare(a, b)["diff"] == pytest.approx(-0.5)
    assert r["p"] == pytest.approx(stats.binomtest(2, 2, 0.5).pvalue)  # w and x: A right, B wrong
    with pytest.raises(ValueError, match="different items"):
        compare(a, score([1, 0, 0], ids=["w", "x", "y"]))
    rows = compare_benchmarks({"p": a, "q": a}, {"p": b, "q": a, "only-b": b})
    assert [r["benchmark"] for r in rows] == ["p", "q"]
    assert rows[0]["p_holm"] == pytest.approx(min(1, 2 * rows[0]["p"])) and rows[1]["p_holm"] == 1.0


# ---------------------------------------------------------------- leakage

def test_word_ngrams():
    assert word_ngrams("The red, red circle is big", 3) == {"red red circle", "red circle is", "circle is big"}
    assert word_ngrams("Short one", 8) == {"short one"} and word_ngrams("", 8) == set()


def test_leakage_text_and_image():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 32)).astype(np.float32)
    bench = rng.normal(size=(20, 32)).astype(np.float32)
    bench[3] = train[17]; bench[7] = train[250] + 0.01 * rng.normal(size=32)       # a copy and a near copy
    train_q = [f"question number {i} asks about the colour of shape {i} in the upper left corner" for i in range(300)]
    bench_q = [f"a fresh question {i} with nothing in common at all here" for i in range(20)]
    bench_q[5] = "Tell me: question number 42 asks about the colour of shape 42 please!"
    names = ["A"] * 10 + ["B"] * 10
    rep = leakage_report(train_q, bench_q, train, bench, benchmarks=names, ids=[f"b{i}" for i in range(20)])
    assert [i for i, f in enumerate(rep.image) if f] == [3, 7] and rep.image_match[3] == 17 and rep.image_match[7] == 250
    assert [i for i, f in enumerate(rep.text) if f] == [5] and rep.text_match[5] == 42
    assert rep.contaminated == [i in (3, 5, 7) for i in range(20)]
    assert rep.flags("both") == [False] * 20
    assert rep.shares["A"]["either"].value == pytest.approx(0.3) and rep.shares["B"]["either"].value == 0.0
    assert rep.shares["A"]["either"].ids == [f"b{i}" for i in range(10)]
    kept = drop_contaminated(list(range(20)), rep)
    assert kept == [i for i in range(20) if i not in (3, 5, 7)]
    assert drop_contaminated(list(range(20)), rep, by="text") == [i for i in range(20) if i != 5]
    with pytest.raises(ValueError, match="by must be"):
        drop_contaminated(list(range(20)), rep, by="any")
    # the same answer through an `Embedded` training side
    assert leakage_report(train_q, bench_q, InMemory(train, center=True), bench).image == rep.image


@pytest.mark.parametrize("ivf_limit", [10_000, 20])  # IVF-Flat; IVF-PQ with exact re-scoring
def test_leakage_large_indexes_agree_with_exact_search(ivf_limit):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(400, 8)).astype(np.float32)
    bench = rng.normal(size=(30, 8)).astype(np.float32); bench[:5] = train[[3, 50, 99, 200, 399]]
    exact = leakage_report([], [""] * 30, train, bench)
    approx = leakage_report([], [""] * 30, train, bench, flat_limit=10, ivf_limit=ivf_limit, nprobe=64)
    assert all(exact.image[:5]) and approx.image == exact.image
    assert approx.image_match[:5] == [3, 50, 99, 200, 399] and approx.image_sim == pytest.approx(exact.image_sim, abs=1e-4)


def test_leakage_bad_input():
    with pytest.raises(ValueError, match="neither"):
        leakage_report(["q"], ["q"], bench_embeddings=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="dimension"):
        leakage_report(["q"], ["q"], np.ones((2, 4)), np.ones((1, 5)))
    with pytest.raises(ValueError, match="2 questions but 1 bench embeddings"):
        leakage_report(["q"], ["q", "r"], np.ones((2, 4)), np.ones((1, 4)))
    rep = leakage_report([], ["anything at all"])
    assert rep.text == [False] and rep.image is None


def test_reply_cache_last_line_without_its_newline_is_kept_not_fused(tmp_path):
    cache = tmp_path / "c.jsonl"
    with StandInServer(lambda body: "reply " + body["messages"][-1]["content"]) as srv:
        JudgeClient(srv.base_url, "m", cache_path=cache).ask("one")
        cache.write_bytes(cache.read_bytes().rstrip(b"\n"))          # killed between the record and its newline
        j = JudgeClient(srv.base_url, "m", cache_path=cache)
        assert j.ask("one") == "reply one" and len(srv.requests) == 1
        j.ask("two"); assert len(srv.requests) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")                             # nothing torn, nothing dropped
            again = JudgeClient(srv.base_url, "m", cache_path=cache)
        assert [again.ask("one"), again.ask("two")] == ["reply one", "reply two"] and len(srv.requests) == 2
    assert len(cache.read_bytes().splitlines()) == 2


def test_reply_cache_bytes_that_are_not_utf8(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_bytes(b'{"key": "a", "reply": "caf\xe9"}\n{"key": "b", "reply": "ok"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: not UTF-8"):
        read_reply_cache(cache)
    good = '{"key": "a", "reply": "café"}\n'.encode()
    cache.write_bytes(good + '{"key": "b", "reply": "é"}'.encode()[:-3])   # the kill cut "é" in half
    with pytest.warns(UserWarning, match=r"c.jsonl:2: dropped a torn last"):
        assert read_reply_cache(cache) == {"a": "café"}
    assert cache.read_bytes() == good


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_row_sampler_draws_from_the_tempered_softmax(temperature, top_p):
    import torch
    from mmrlhf.models import row_sampler
    p = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    want = p ** (1 / temperature); want /= want.sum()
    if top_p < 1:   # the nucleus: the most likely tokens until their mass reaches top_p (here 0.5 + 0.3)
        keep = np.cumsum(want) - want < top_p; want = np.where(keep, want, 0); want /= want.sum()
    n = 6000
    scores = torch.log(torch.tensor(p, dtype=torch.float32)).repeat(n, 1)
    out = row_sampler(list(range(n)), temperature, top_p)(torch.zeros(n, 1, dtype=torch.long), scores)
    picks = out.argmax(-1).numpy()
    assert (torch.isfinite(out).sum(-1) == 1).all()                       # one token left per row: greedy takes it
    counts = np.bincount(picks, minlength=p.size)
    assert counts[want == 0].sum() == 0
    sel = want > 0
    assert stats.chisquare(counts[sel], n * want[sel]).pvalue > 1e-3
    again = row_sampler(list(range(n)), temperature, top_p)(torch.zeros(n, 1, dtype=torch.long), scores).argmax(-1).numpy()
    assert (again == picks).all()                                          # the same seeds, the same draws


def test_input_fingerprint_is_the_sha256_of_question_category_and_image_bytes(tmp_path):
    import hashlib
    from mmrlhf.respond import input_fingerprints
    (tmp_path / "img").mkdir(); (tmp_path / "img" / "a.png").write_bytes(b"pixels one")
    items = [{"id": "x", "question": "What is it?", "category": "short", "images": ["img/a.png"]}]
    expected = hashlib.sha256(json.dumps(["What is it?", "short", ["img/a.png"]]).encode() + b"pixels one").hexdigest()[:16]
    assert input_fingerprints(items, tmp_path) == {"x": expected}
    (tmp_path / "img" / "a.png").write_bytes(b"pixels two")   # same path and size
    assert input_fingerprints(items, tmp_path)["x"] != expected
    with pytest.raises(DataError, match=r"b.jsonl: images: item 'y'"):
        input_fingerprints([{"id": "y", "question": "q", "images": ["../../etc/passwd"]}], tmp_path, "b.jsonl")
