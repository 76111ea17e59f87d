"Models behind OpenAI-compatible endpoints: the client on loopback, its failures, and respond/eval runs that mix them with local models."
import base64, hashlib, io, json, logging, threading, time

import pytest
from PIL import Image

from mmrlhf.configs import EvalConfig, RespondConfig, SynthConfig
from mmrlhf.evaluate import run_eval
from mmrlhf.judge import HANG, JudgeClient, JudgeError, StandInServer, user_content
from mmrlhf.respond import run_respond
from mmrlhf.schema import read_queries
from mmrlhf.world import write_world

NO_KEY = "MMRLHF_TEST_NO_SUCH_KEY"   # the endpoints here need no key: never send a real one to loopback


def expected_seed(seed, item_id, spec):
    "An item's sampling seed, computed here from its definition (SHA-256 of [seed, id, model])."
    blob = json.dumps([int(seed), item_id, str(spec)], ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def digest_reply(body):
    "A deterministic reply: the model's name and a hash of everything in the request."
    return f"{body['model']} {hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]}"


def decoded_images(body):
    out = []
    for part in body["messages"][-1]["content"]:
        if part["type"] == "image_url":
            head, data = part["image_url"]["url"].split(",", 1)
            assert head == "data:image/png;base64"
            out.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return out


def user_text(body):
    c = body["messages"][-1]["content"]
    return c if isinstance(c, str) else [p for p in c if p["type"] == "text"][-1]["text"]


class Script:
    "A stand-in's replies: `digest_reply`, until `stop_after` successes; then HTTP 400 (a dead run)."
    def __init__(self, stop_after=None):
        self.stop_after, self.ok, self.lock = stop_after, [], threading.Lock()

    def __call__(self, body):
        with self.lock:
            if self.stop_after is not None and len(self.ok) >= self.stop_after:
                return (400, '{"error": {"message": "the run is stopped here"}}')
            self.ok.append(body)
        return digest_reply(body)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(SynthConfig(out=str(tmp_path_factory.mktemp("w") / "world"), n_queries=40, seed=3))


# ---------------------------------------------------------------- what goes over the wire

def test_requests_follow_the_schema_seeds_and_images_in_order(world, tmp_path):
    lines = world.read_text().splitlines()
    clip = next(i for i, l in enumerate(lines) if len(json.loads(l)["images"]) > 1)   # a clip's frames
    keep = sorted(set(range(10)) | {clip})[:10] if clip >= 10 else list(range(10))
    keep = sorted(set(range(9)) | {clip}) if clip >= 10 else keep
    small = tmp_path / "q.jsonl"
    small.write_text("".join(lines[i] + "\n" for i in keep))
    queries = list(read_queries(small, world.parent))
    assert len(queries) == 10 and any(len(q.images) == 4 for q in queries)
    with StandInServer(Script(), models=["vlm-a"]) as server:
        spec = f"api:vlm-a@{server.base_url}"
        out = run_respond(RespondConfig(data=str(small), image_root=str(world.parent), models=[spec, spec],
                                        out=str(tmp_path / "r"), temperature=0.7, seed=5, max_new_tokens=7,
                                        api_key_env=NO_KEY, workers=3))
    assert server.problems == [] and len(server.requests) == 2 * len(queries)
    by_seed = {b["seed"]: b for b in server.requests}
    answered = list(read_queries(out))
    for q, a in zip(queries, answered):
        for k in (0, 1):
            body = by_seed[expected_seed(5 + k, q.id, spec)]       # model k samples from seed + k
            assert body["model"] == "vlm-a" and body["temperature"] == 0.7 and body["max_tokens"] == 7
            assert body["top_p"] == 1.0 and [m["role"] for m in body["messages"]] == ["user"]
            parts = body["messages"][-1]["content"]
            assert [p["type"] for p in parts] == ["image_url"] * len(q.images) + ["text"]
            assert user_text(body) == q.question
            want = [Image.open(world.parent / p).convert("RGB") for p in q.images]
            got = decoded_images(body)
            assert [im.size for im in got] == [im.size for im in want]
            assert all(g.tobytes() == w.tobytes() for g, w in zip(got, want))   # the very pixels, in order
            assert a.responses[-2 + k].text == digest_reply(body)
            assert a.responses[-2 + k].model == spec
    # the tokens the server reported, summed: 10 per image and a token per word of the question
    usage = json.loads((tmp_path / "r" / "usage.json").read_text())
    assert [(u["model"], u["file"]) for u in usage] == [(spec, "answers-0.jsonl"), (spec, "answers-1.jsonl")]
    for u in usage:
        assert u["prompt_tokens"] == sum(10 * len(q.images) + len(q.question.split()) for q in queries)
        assert u["completion_tokens"] == 2 * len(queries) and u["answers"] == len(queries)


def test_greedy_requests_carry_no_seed_and_text_only_is_a_string(tmp_path):
    with StandInServer(Script()) as server:
        client = JudgeClient(server.base_url, "m", api_key_env=NO_KEY)
        client.chat([{"role": "user", "content": user_content(None, "Say hi.")}])
        client.chat([{"role": "user", "content": user_content(Image.new("RGB", (5, 3), "red"), "Colour?")}])
    assert server.problems == []
    assert server.requests[0]["messages"][0]["content"] == "Say hi." and "seed" not in server.requests[0]
    assert decoded_images(server.requests[1])[0].size == (5, 3)
    assert decoded_images(server.requests[1])[0].getpixel((4, 2)) == (255, 0, 0)


def test_the_stand_in_refuses_what_is_no_chat_completion():
    "The schema check can fail: a request it should refuse is refused, with the problem named."
    bad_png = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    cases = [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad_png}}]}], {}, "does not decode"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}], {}, "not a base64 data URL"),
        ([{"role": "user", "content": [{"type": "picture", "data": "x"}]}], {}, "not a text or (user) image_url part"),
        ([{"role": "robot", "content": "hi"}], {}, "role"),
        ([{"role": "user", "content": "hi"}], {"temperature": 5}, "temperature"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], {}, "last message"),
    ]
    with StandInServer(Script(), models=["m"]) as server:
        client = JudgeClient(server.base_url, "m", api_key_env=NO_KEY, backoff=0.01)
        for messages, params, problem in cases:
            with pytest.raises(JudgeError, match="refused the request: HTTP 400") as e:
                client.chat(messages, **params)
            assert problem in str(e.value)
        with pytest.raises(JudgeError, match="not served here"):
            JudgeClient(server.base_url, "other", api_key_env=NO_KEY).ask("hi")
    assert len(server.requests) == len(cases) + 1 and len(server.problems) >= len(cases) + 1   # a robot's message is not the user's either


# ---------------------------------------------------------------- the key

def test_the_key_comes_from_the_environment_and_never_shows(tmp_path, monkeypatch, capfd, caplog):
    secret = "sk-test-" + "7f3a" * 8
    monkeypatch.setenv("MMRLHF_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)                               # the openai client's own logs too
    def echo_key(body):                                           # a server that quotes the key back
        return (401, json.dumps({"error": {"message": f"Incorrect API key provided: {secret}"}}))
    with StandInServer(echo_key) as server:
        with pytest.raises(JudgeError) as e:
            JudgeClient(server.base_url, "m", api_key_env="MMRLHF_TEST_KEY", backoff=0.01).ask("hi")
    assert "HTTP 401" in str(e.value) and "$MMRLHF_TEST_KEY" in str(e.value) and "***" in str(e.value)
    assert secret not in str(e.value) and secret not in repr(e.value)
    assert server.headers[0].get("authorization") == f"Bearer {secret}"      # sent where it belongs
    pool = tmp_path / "q.jsonl"
    pool.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?", "category": "short", "images": [], "responses": []}) + "\n"
                            for i in range(3)))
    with StandInServer(Script()) as server:
        spec = f"api:m@{server.base_url}"
        run_respond(RespondConfig(data=str(pool), models=[spec, spec], out=str(tmp_path / "r"), max_new_tokens=4,
                                  api_key_env="MMRLHF_TEST_KEY"))
    assert all(h.get("authorization") == f"Bearer {secret}" for h in server.headers)
    assert secret not in json.dumps(server.requests)
    written = b"".join(p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file())
    captured = capfd.readouterr()
    assert secret.encode() not in written and secret not in captured.out + captured.err + caplog.text
    # an unset variable: no key at all, and no Authorization header
    with StandInServer(Script()) as server:
        JudgeClient(server.base_url, "m", api_key_env=NO_KEY).ask("hi")
    assert server.headers[0].get("authorization") is None


def test_each_endpoint_gets_only_its_own_key(tmp_path, monkeypatch):
    "With api_keys, one provider's key never reaches another endpoint; one not listed gets api_key_env's."
    monkeypatch.setenv("MMRLHF_TEST_KEY_A", "key-a"); monkeypatch.setenv("MMRLHF_TEST_KEY_B", "key-b")
    pool = tmp_path / "q.jsonl"
    pool.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?", "category": "short", "images": [], "responses": []}) + "\n"
                            for i in range(2)))
    with StandInServer(Script()) as a, StandInServer(Script()) as b, StandInServer(Script()) as c:
        run_respond(RespondConfig(data=str(pool), out=str(tmp_path / "r"), max_new_tokens=4,
                                  models=[f"api:m@{a.base_url}", f"api:m@{b.base_url}/", f"api:m@{c.base_url}"],
                                  api_key_env=NO_KEY, api_keys={a.base_url + "/": "MMRLHF_TEST_KEY_A",
                                                                b.base_url: "MMRLHF_TEST_KEY_B"}))
    assert {h.get("authorization") for h in a.headers} == {"Bearer key-a"}
    assert {h.get("authorization") for h in b.headers} == {"Bearer key-b"}
    assert {h.get("authorization") for h in c.headers} == {None}      # not listed: api_key_env, unset here


# ---------------------------------------------------------------- failures: each ends in a retry or a clear error

def test_429_waits_for_retry_after_then_succeeds():
    times = []
    def limited(body):
        times.append(time.monotonic())
        return (429, '{"error": "slow down"}', {"Retry-After": "0.5"}) if len(times) < 3 else "fine"
    with StandInServer(limited) as server:
        client = JudgeClient(server.base_url, "m", api_key_env=NO_KEY, backoff=0.01, max_retries=3)
        assert client.ask("x") == "fine"
    assert len(times) == 3 and client.n_requests == 3
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.45       # the server's wait, not the 0.01 s backoff


def test_429_past_the_retries_names_the_status_and_retry_after():
    with StandInServer(lambda body: (429, '{"error": "quota"}', {"Retry-After": "0.05"})) as server:
        client = JudgeClient(server.base_url, "m", api_key_env=NO_KEY, backoff=0.01, max_retries=2)
        with pytest.raises(JudgeError, match=r"unreachable after 3 attempt\(s\): HTTP 429.*quota.*Retry-After: 0.05"):
            client.ask("x")
    assert len(server.requests) == 3


def test_5xx_backs_off_exponentially_then_gives_up():
    times = []
    def broken(body): times.append(time.monotonic()); return (500, '{"error": "boom"}')
    with StandInServer(broken) as server:
        client = JudgeClient(server.base_url, "m", api_key_env=NO_KEY, backoff=0.1, max_retries=2)
        with pytest.raises(JudgeError, match=r"'m' at http://127\.0\.0\.1:\d+/v1/chat/completions unreachable after 3 attempt\(s\): HTTP 500"):
            client.ask("x")
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 3 and gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[1] < 2   # 0.1 s, then 0.2 s
    n = []
    def flaky(body): n.append(1); return (503, "busy") if len(n) < 3 else "up again"
    with StandInServer(flaky) as server:
        assert JudgeClient(server.base_url, "m", api_key_env=NO_KEY, backoff=0.01).ask("x") == "up again"


@pytest.mark.parametrize("body", ["<html>gateway</html>", '{"choices": [{"message": {}}]}', '{"id": "x"}'])
def test_a_malformed_body_is_a_clear_error_and_not_retried(body):
    with StandInServer(lambda b: (200, body)) as server:
        with pytest.raises(JudgeError, match=r"malformed reply from model 'm' at http://127\.0\.0\.1"):
            JudgeClient(server.base_url, "m", api_key_env=NO_KEY, backoff=0.01).ask("x")
    assert len(server.requests) == 1


def test_a_hanging_server_is_ended_by_the_timeout():
    with StandInServer(lambda body: HANG) as server:
        client = JudgeClient(server.base_url, "m", api_key_env=NO_KEY, timeout=0.3, max_retries=1, backoff=0.01)
        t0 = time.monotonic()
        with pytest.raises(JudgeError, match=r"unreachable after 2 attempt\(s\): no reply within 0.3 s"):
            client.ask("x")
        took = time.monotonic() - t0
        assert len(server.requests) == 2
    assert 0.6 <= took < 3


def test_respond_settings_reach_the_client(tmp_path):
    "workers, timeout and max_retries of the config are what the endpoint sees."
    pool = tmp_path / "q.jsonl"
    pool.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Q{i}?", "category": "short", "images": [], "responses": []}) + "\n"
                            for i in range(6)))
    with StandInServer(lambda body: HANG) as server:
        cfg = RespondConfig(data=str(pool), models=[f"api:m@{server.base_url}", "tiny:qwen2_vl"], out=str(tmp_path / "r"),
                            max_new_tokens=4, api_key_env=NO_KEY, timeout=0.3, max_retries=1, backoff=0.01, workers=2)
        with pytest.raises(JudgeError, match=r"2 attempt\(s\): no reply within 0.3 s"):
            run_respond(cfg)
        # two requests in flight, each tried twice; the other four items were never asked
        assert len(server.requests) == 4
    in_flight = []
    lock = threading.Lock()
    def counting(body):
        with lock: in_flight.append(1); peak = len(in_flight)
        time.sleep(0.05)
        with lock: in_flight.pop()
        return f"peak {peak}"
    with StandInServer(counting) as server:
        out = run_respond(RespondConfig(data=str(pool), models=[f"api:m@{server.base_url}", f"api:m@{server.base_url}"],
                                        out=str(tmp_path / "r2"), max_new_tokens=4, api_key_env=NO_KEY, workers=3))
    peaks = [int(r.text.split()[1]) for q in read_queries(out) for r in q.responses[-2:]]
    assert max(peaks) <= 3 and max(peaks) >= 2


# ---------------------------------------------------------------- resuming

def test_an_interrupted_run_resumes_with_exactly_the_remaining_requests(world, tmp_path):
    small = tmp_path / "q.jsonl"
    small.write_text("".join(l + "\n" for l in world.read_text().splitlines()[:12]))
    script = Script(stop_after=5)
    with StandInServer(script) as server:
        spec = f"api:vlm@{server.base_url}"
        cfg = dict(data=str(small), image_root=str(world.parent), models=[spec, spec], max_new_tokens=4,
                   temperature=1.0, api_key_env=NO_KEY, workers=3, batch_size=4)
        with pytest.raises(JudgeError, match="refused the request: HTTP 400.*stopped"):
            run_respond(RespondConfig(out=str(tmp_path / "killed"), **cfg))
        first = [digest_reply(b) for b in script.ok]
        assert len(first) == 5
        n_before = len(server.requests)
        script.stop_after = None
        run_respond(RespondConfig(out=str(tmp_path / "killed"), **cfg))
        resumed = server.requests[n_before:]
        assert len(resumed) == 24 - 5                                  # exactly the rest, nothing asked twice
        assert not {digest_reply(b) for b in resumed} & set(first)
        n_whole = len(server.requests)
        run_respond(RespondConfig(out=str(tmp_path / "whole"), **cfg))
        assert len(server.requests) - n_whole == 24
        run_respond(RespondConfig(out=str(tmp_path / "killed"), **cfg))  # complete: a rerun asks nothing
        assert len(server.requests) - n_whole == 24
    for name in ("answers-0.jsonl", "answers-1.jsonl", "queries.jsonl", "usage.json"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_local_model_and_an_endpoint_in_one_respond_run(world, tmp_path):
    small = tmp_path / "q.jsonl"
    small.write_text("".join(l + "\n" for l in world.read_text().splitlines()[:4]))
    with StandInServer(Script(), models=["big-vlm"]) as server:
        spec = f"api:big-vlm@{server.base_url}"
        out = run_respond(RespondConfig(data=str(small), image_root=str(world.parent), models=["tiny:qwen2_vl", spec],
                                        out=str(tmp_path / "r"), max_new_tokens=4, temperature=0.0, api_key_env=NO_KEY))
    before, after = list(read_queries(small)), list(read_queries(out))
    assert len(after) == 4 and server.problems == [] and len(server.requests) == 4
    for q0, q in zip(before, after):
        assert len(q.responses) == len(q0.responses) + 2 and q.ranking is None
        local, remote = q.responses[-2:]
        assert (local.model, remote.model) == ("tiny:qwen2_vl", spec)
        asked = [b for b in server.requests if user_text(b) == q.question]
        assert remote.text in {digest_reply(b) for b in asked} and not any("seed" in b for b in asked)
    assert (tmp_path / "r" / "answers-1.requests.jsonl").is_file() and not (tmp_path / "r" / "answers-0.requests.jsonl").exists()
    assert [u["model"] for u in json.loads((tmp_path / "r" / "usage.json").read_text())] == [spec]   # only the endpoint costs tokens


def test_respond_40_queries_two_endpoints_and_a_testbed_model_resume_byte_identical(world, tmp_path):
    "The issue's acceptance check: killed during the first endpoint, resumed, the same bytes as a run never killed."
    script = Script(stop_after=27)   # the first batch of 20 written, 7 replies of the next only cached
    with StandInServer(script, models=["gpt-4o", "qwen2-vl-72b"]) as server:
        specs = [f"api:gpt-4o@{server.base_url}", "tiny:qwen2_vl", f"api:qwen2-vl-72b@{server.base_url}"]
        def respond(out):
            return run_respond(RespondConfig(data=str(world), models=specs, out=str(tmp_path / out), max_new_tokens=4,
                                             temperature=0.8, seed=2, batch_size=20, workers=4, api_key_env=NO_KEY,
                                             backoff=0.01))
        with pytest.raises(JudgeError):
            respond("killed")
        assert len(script.ok) == 27 and len((tmp_path / "killed" / "answers-0.jsonl").read_text().splitlines()) == 20 and not (tmp_path / "killed" / "queries.jsonl").exists()
        n_before = len(server.requests)
        script.stop_after = None
        respond("killed")
        assert len(server.requests) - n_before == 80 - 27              # the rest of both endpoints' requests
        n_whole = len(server.requests)
        respond("whole")
        assert len(server.requests) - n_whole == 80
    assert server.problems == []
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for k in range(3):
        for name in (f"answers-{k}.jsonl", f"answers-{k}.settings.json"):
            assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    for name in ("queries.jsonl", "usage.json"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    for k in (0, 2):   # the request caches hold the same replies (appended as they came, so in any order)
        lines = lambda d: sorted((d / f"answers-{k}.requests.jsonl").read_text().splitlines())
        assert lines(killed) == lines(whole) and len(lines(whole)) == 40
    qs = list(read_queries(whole / "queries.jsonl"))
    assert len(qs) == 40 and all([r.model for r in q.responses[-3:]] == specs for q in qs)
    usage = json.loads((whole / "usage.json").read_text())
    assert [u["model"] for u in usage] == [specs[0], specs[2]] and all(u["answers"] == 40 for u in usage)


# ---------------------------------------------------------------- eval

def test_eval_with_an_endpoint_model_resumes_and_reports_usage(tmp_path):
    items = [{"id": f"i{k}", "question": f"What is {k} plus {k}?", "answer": str(2 * k), "category": "math"} for k in range(6)]
    bench = tmp_path / "b.jsonl"; bench.write_text("".join(json.dumps(i) + "\n" for i in items))
    def adder(body):
        k = int(user_text(body).split()[2])
        return str(2 * k) if k % 2 else "no idea"
    stop = {"after": 4}
    lock = threading.Lock()
    def sometimes(body):
        with lock:
            stop["after"] -= 1
            if stop["after"] < 0: return (500, "down")
        return adder(body)
    with StandInServer(sometimes, models=["adder"]) as server:
        cfg = EvalConfig(model=f"api:adder@{server.base_url}", bench=str(bench), out=str(tmp_path / "e"), workers=2,
                         batch_size=3, max_retries=0, backoff=0.01, api_key_env=NO_KEY)
        with pytest.raises(JudgeError, match="HTTP 500"):
            run_eval(cfg)
        n = len(server.requests)
        stop["after"] = 10 ** 6
        run = run_eval(cfg)
        assert len(server.requests) - n == 6 - 4
    m = next(iter(run["benchmarks"].values()))["metrics"]
    assert m["exact_match"]["value"] == pytest.approx(3 / 6)
    assert run["usage"] == {"answers": 6, "prompt_tokens": 6 * 5, "completion_tokens": 3 * 1 + 3 * 2}
    assert json.loads((tmp_path / "e" / "run.json").read_text())["usage"] == run["usage"]


def test_a_video_file_is_sent_as_its_evenly_spread_frames(tmp_path):
    "A query whose medium is an .mp4: the endpoint gets video_frames frames, the first, the last and evenly between."
    import av
    import numpy as np
    levels = [10 * i for i in range(20)]                     # frame i is grey level 10 * i
    with av.open(str(tmp_path / "clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=8); s.width = s.height = 32; s.pix_fmt = "yuv420p"
        for v in levels:
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), v, np.uint8), format="rgb24")): c.mux(p)
        for p in s.encode(): c.mux(p)
    pool = tmp_path / "q.jsonl"
    pool.write_text(json.dumps({"id": "v1", "question": "What changes?", "category": "video", "images": ["clip.mp4"],
                                "responses": []}) + "\n")
    def run(frames, out):
        with StandInServer(Script()) as server:
            spec = f"api:m@{server.base_url}"
            run_respond(RespondConfig(data=str(pool), models=[spec, spec], out=str(out), max_new_tokens=4,
                                      api_key_env=NO_KEY, video_frames=frames))
        return server
    server = run(5, tmp_path / "r")
    got = [round(float(np.asarray(im).mean()) / 10) for im in decoded_images(server.requests[0])]
    assert got == [0, 5, 10, 14, 19]                          # round(i * 19 / 4), counted here by hand
    with pytest.raises(Exception, match="video_frames"):     # a resume with another frame count is refused
        run(8, tmp_path / "r")


def test_respond_killed_by_sigkill_resumes_to_the_same_bytes(world, tmp_path):
    "The run as a process, SIGKILLed in the middle of a request to its second endpoint: the rerun asks exactly the requests"
    " with no cached reply, and writes the bytes of a run never killed."
    import subprocess, sys
    state = {"n": 0, "kill_at": None, "proc": None}
    lock = threading.Lock()
    def reply(body):
        with lock:
            state["n"] += 1
            if state["n"] == state["kill_at"]:
                state["proc"].kill(); state["proc"].wait()            # dead before this request is answered
        return digest_reply(body)
    with StandInServer(reply, models=["gpt-4o", "qwen2-vl-72b"]) as server:
        specs = f"[api:gpt-4o@{server.base_url}, tiny:qwen2_vl, api:qwen2-vl-72b@{server.base_url}]"
        def respond(out):
            cmd = [sys.executable, "-m", "mmrlhf.cli", "respond", "--data", str(world), "--out", str(tmp_path / out),
                   "--models", specs, "max_new_tokens=4", "temperature=0.8", "seed=2", "batch_size=20", "workers=4",
                   f"api_key_env={NO_KEY}", "backoff=0.01"]
            state["proc"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            return state["proc"]
        state["kill_at"] = 40 + 13                                    # the second endpoint's 13th request
        assert respond("killed").wait(timeout=300) == -9
        def whole_lines(path):                                         # a line cut by the kill does not count
            text = path.read_text()
            return sum(1 for line in text.split("\n")[:-1] if line.strip())
        cached = sum(whole_lines(tmp_path / "killed" / f"answers-{k}.requests.jsonl") for k in (0, 2))
        assert 40 + 8 <= cached < 40 + 13 and not (tmp_path / "killed" / "queries.jsonl").exists()
        state["kill_at"], before = None, state["n"]
        assert respond("killed").wait(timeout=300) == 0
        assert state["n"] - before == 80 - cached                      # exactly the requests without a reply
        before = state["n"]
        assert respond("whole").wait(timeout=300) == 0
        assert state["n"] - before == 80
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for name in [f"answers-{k}.jsonl" for k in range(3)] + ["queries.jsonl", "usage.json"]:
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
