"""The annotation app end to end: a headless Chromium annotating through the real server, a server killed mid-annotation,
concurrent annotators, bad input refused in the page, review, export."""
import json, os, shutil, signal, socket, subprocess, sys, threading, time, urllib.error, urllib.request
from pathlib import Path

import pytest

from mmrlhf.annotate import AnnotateConfig, AnnotationStore, answers_from_record, setup_store
from mmrlhf.report import find_chromium
from mmrlhf.schema import DIMENSIONS, oracle_annotate, query_record, read_queries
from mmrlhf.synthetic import SynthConfig, write_world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait(cond, timeout=20, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond(): return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Server:
    "`mmrlhf annotate` as a separate process that can be killed."
    def __init__(self, db, port):
        self.db, self.port, self.proc = db, port, None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "mmrlhf.cli", "annotate", "--db", str(self.db), "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        def up():
            try: urllib.request.urlopen(f"http://127.0.0.1:{self.port}/login", timeout=1)
            except urllib.error.HTTPError: return True
            except OSError: return False
            return True
        _wait(up, 60, "the server to start")
        return self

    def kill(self):
        self.proc.send_signal(signal.SIGKILL); self.proc.wait(10)


@pytest.fixture
def setup(tmp_path):
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=3, seed=5))
    port = _free_port()
    store, links = setup_store(AnnotateConfig(db=str(tmp_path / "db" / "annotations.sqlite"), data=str(world), annotators=["alice", "bob"],
                                              reviewers=["rita"], port=port, serve=False))
    server = Server(store.path, port).start()
    yield store, links, server, world
    if server.proc.poll() is None: server.kill()


def _browser():
    chromium, driver_bin = find_chromium(), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        if os.environ.get("CI"): pytest.fail("headless Chromium and chromedriver are needed (Debian: chromium, chromium-driver)")
        pytest.skip("needs chromium and chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"): opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


def _draft(store, qid, who="alice"):
    return store.work(qid, who)["draft"]


def test_browser_annotation_survives_a_killed_server(setup):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    store, links, server, world = setup
    oracle = {q.id: answers_from_record(query_record(oracle_annotate(q))) for q in read_queries(world)}
    d = _browser()
    try:
        css = lambda s: d.find_element(By.CSS_SELECTOR, s)
        d.get(links["alice"])
        q1 = d.current_url.rsplit("/", 1)[-1]
        assert "Response 4" in d.page_source and css(".media img").get_attribute("naturalWidth") != "0"

        def fill(answers, only=None):
            for f, v in answers.items():
                if only and not f.startswith(only): continue
                if f.startswith("scores.") and int(f.split(".")[1]) < 4:
                    css(f'input[name="{f}"][value="{v}"]').click()
                elif f.startswith("rank."):
                    el = css(f'input[data-field="{f}"]'); el.clear(); el.send_keys(str(v), Keys.TAB)
                elif f.startswith("reasons.") or f == "ranking_reason":
                    css(f'textarea[data-field="{f}"]').send_keys(v)

        # a rank out of range is refused beside its field, and not stored
        el = css('input[data-field="rank.0"]'); el.send_keys("9", Keys.TAB)
        _wait(lambda: "out of range" in css('[data-err="rank.0"]').text, what="the range error")
        assert "rank.0" not in _draft(store, q1)
        # the keyboard: focus a score and press 4
        radio = css('input[name="scores.0.helpfulness"][value="1"]'); radio.click(); radio.send_keys("4")
        _wait(lambda: _draft(store, q1).get("scores.0.helpfulness") == 4, what="the keyboard score")
        assert css('[data-level="scores.0.helpfulness"]').text == "Helpful"
        # everything but response 3's rank, then submit: the page names what is missing
        answers = {f: v for f, v in oracle[q1].items() if f != "rank.2"}
        fill(answers)
        _wait(lambda: all(_draft(store, q1).get(f) == v for f, v in answers.items()), what="every answer saved")
        css("body").send_keys(Keys.CONTROL, Keys.ENTER)
        _wait(lambda: "response 3 has no rank" in css("#errors").text, what="the missing-rank error")
        assert store.work(q1, "alice")["status"] == "open"
        fill({"rank.2": oracle[q1]["rank.2"]})
        css("#submit").click()
        _wait(lambda: d.current_url.rsplit("/", 1)[-1] != q1, what="the next query")
        assert store.work(q1, "alice")["status"] == "submitted"

        # the second query: half done, then the server dies
        q2 = d.current_url.rsplit("/", 1)[-1]
        fill(oracle[q2], only="scores.0."); fill(oracle[q2], only="reasons.0.")
        _wait(lambda: sum(f.startswith(("scores.0.", "reasons.0.")) for f in _draft(store, q2)) == 3 + sum(f.startswith("reasons.0.") for f in oracle[q2]),
              what="the first response saved")
        server.kill()
        fill(oracle[q2], only="scores.1.")   # typed while the server is down
        _wait(lambda: "retrying" in css("#status").text, what="the page to notice")
        server.start()
        _wait(lambda: all(_draft(store, q2).get(f) == v for f, v in oracle[q2].items() if f.startswith("scores.1.")), 30, "the retried answers")
        d.refresh()
        for f, v in oracle[q2].items():
            if f.startswith(("scores.0.", "scores.1.")): assert css(f'input[name="{f}"][value="{v}"]').is_selected(), f
        fill(oracle[q2], only="scores.2."); fill(oracle[q2], only="scores.3."); fill(oracle[q2], only="reasons.1."); fill(oracle[q2], only="reasons.2.")
        fill(oracle[q2], only="reasons.3."); fill(oracle[q2], only="rank."); fill(oracle[q2], only="ranking_reason")
        _wait(lambda: _draft(store, q2) == oracle[q2], what="the whole second query")
        css("#submit").click()
        _wait(lambda: store.work(q2, "alice")["status"] == "submitted", what="the second submission")

        # bob annotates the first query (through the API, as his page would); rita reviews it in the browser
        with_token = lambda path, data: urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{server.port}{path}", json.dumps(data).encode(), {"Content-Type": "application/json", "X-Token": links["bob"].split("=")[1]}))
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}/", headers={"X-Token": links["bob"].split("=")[1]})
        assert urllib.request.urlopen(req).url.endswith(q1)
        for f, v in oracle[q1].items(): with_token(f"/api/answer/{q1}", {"field": f, "value": v})
        with_token(f"/api/submit/{q1}", {})
        d.delete_all_cookies(); d.get(links["rita"])
        assert d.current_url.endswith("/review")
        css(f'a[href="/review/{q1}"]').click()
        css('button[data-accept="alice"]').click()
        _wait(lambda: store.accepted_ids() == [q1], what="the review")
    finally:
        d.quit()

    n = store.export(store.path.parent / "all.jsonl", "submitted")
    got = list(read_queries(store.path.parent / "all.jsonl", world.parent))
    assert n == 3 and sorted((q.id, q.annotators[0]) for q in got) == sorted([(q1, "alice"), (q2, "alice"), (q1, "bob")])
    mine = {q.id: q for q in got if q.annotators == ["alice"]}
    assert [r.scores for r in mine[q2].responses] == [{d: oracle[q2][f"scores.{i}.{d}"] for d in DIMENSIONS} for i in range(4)]
    assert store.export(store.path.parent / "accepted.jsonl") == 1
    assert store.work(q2, "alice")["seconds"] > 0          # time on the query, from the page's saves
    from mmrlhf.cli import main
    assert main(["annotate-export", "--db", str(store.path), "--out", str(store.path.parent / "cli.jsonl")]) == 0
    assert [q.id for q in read_queries(store.path.parent / "cli.jsonl")] == [q1]
    assert main(["annotate-agreement", "--db", str(store.path), "--out", str(store.path.parent / "agreement.json")]) == 0
    rep = json.loads((store.path.parent / "agreement.json").read_text())
    assert rep["pairs"]["alice|bob"]["queries_with_several_annotators"] == 1 and rep["seconds_per_query"]["alice"]["queries"] == 2


def test_concurrent_annotators(setup):
    store, links, server, world = setup
    base = f"http://127.0.0.1:{server.port}"
    def token(who): return links[who].split("=")[1]
    def call(who, path, data=None):
        req = urllib.request.Request(base + path, None if data is None else json.dumps(data).encode(),
                                     {"Content-Type": "application/json", "X-Token": token(who)})
        return urllib.request.urlopen(req, timeout=30)
    qid = call("alice", "/").url.rsplit("/", 1)[-1]
    assert call("bob", "/").url.endswith(qid)   # both on the same query
    errors = []
    def hammer(who, reasons):
        try:
            for n in range(40): call(who, f"/api/answer/{qid}", {"field": f"reasons.{n % 4}.{DIMENSIONS[n % 3]}", "value": f"{who} {n}"})
            reasons.update(store.work(qid, who)["draft"])
        except Exception as e: errors.append(e)
    got = {"alice": {}, "bob": {}}
    threads = [threading.Thread(target=hammer, args=(w, got[w])) for w in got]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors
    for who in got:
        draft = store.work(qid, who)["draft"]
        expect = {}
        for n in range(40): expect[f"reasons.{n % 4}.{DIMENSIONS[n % 3]}"] = f"{who} {n}"
        assert draft == expect


def test_bad_requests_are_refused(setup):
    store, links, server, world = setup
    base = f"http://127.0.0.1:{server.port}"
    def status(path, data=None, token=None, headers=None):
        h = {"Content-Type": "application/json", **({"X-Token": token} if token else {}), **(headers or {})}
        try: return urllib.request.urlopen(urllib.request.Request(base + path, None if data is None else json.dumps(data).encode(), h)).status
        except urllib.error.HTTPError as e: return e.code
    alice = links["alice"].split("=")[1]
    qid = urllib.request.urlopen(urllib.request.Request(base + "/", headers={"X-Token": alice})).url.rsplit("/", 1)[-1]
    assert status(f"/api/answer/{qid}", {"field": "rank.0", "value": 1}) == 401                     # no token
    assert status(f"/api/answer/{qid}", {"field": "rank.0", "value": 1}, "forged") == 401
    assert status(f"/api/answer/{qid}", {"field": "scores.0.ethics", "value": 0}, alice) == 422   # out of range
    assert status(f"/api/answer/{qid}", {"field": "rank.0", "value": 1}, alice, {"Origin": "http://elsewhere"}) == 403
    assert status("/review", token=alice) == 403                                                   # annotators do not review
    assert status(f"/media/{qid}/99", token=alice) == 404 and status(f"/media/{qid}/0", token=alice) == 200
    other = urllib.request.urlopen(urllib.request.Request(base + "/", headers={"X-Token": links["bob"].split("=")[1]})).url.rsplit("/", 1)[-1]
    assert other == qid
    # a query is never served from a path that leaves the image root, even if the database is edited by hand
    import sqlite3
    with sqlite3.connect(store.path) as c:
        rec = json.loads(c.execute("SELECT record FROM queries WHERE id=?", (qid,)).fetchone()[0])
        rec["images"] = ["../../../../etc/passwd"]
        c.execute("UPDATE queries SET record=? WHERE id=?", (json.dumps(rec), qid))
    assert status(f"/media/{qid}/0", token=alice) == 403
