"""The annotation app end to end: a headless Chromium annotating through the real server, a server killed mid-annotation,
concurrent annotators, bad input refused in the page, review, export."""
import json, os, shutil, signal, socket, subprocess, sys, threading, time, urllib.error, urllib.request
from pathlib import Path

import pytest

from mmrlhf.annotate import AnnotateConfig, AnnotationStore, answers_from_record, setup_store
from mmrlhf.report import find_chromium
from mmrlhf.schema import DIMENSIONS, query_record, read_queries
from mmrlhf.world import oracle_annotate
from mmrlhf.world import SynthConfig, write_world


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

        # a rank below 1 is refused beside its field, and not stored
        el = css('input[data-field="rank.0"]'); el.send_keys("0", Keys.TAB)
        _wait(lambda: "below 1" in css('[data-err="rank.0"]').text, what="the range error")
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


# ---------------------------------------------------------------- limits, permissions, origins, rankings (in process)

@pytest.fixture
def local(tmp_path):
    "A store with three queries and alice, bob (annotators) and rita (reviewer); no server."
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=3, seed=5))
    store, links = setup_store(AnnotateConfig(db=str(tmp_path / "db" / "annotations.sqlite"), data=str(world), annotators=["alice", "bob"],
                                              reviewers=["rita"], serve=False))
    oracle = {q.id: answers_from_record(query_record(oracle_annotate(q))) for q in read_queries(world)}
    return store, {n: u.split("=")[1] for n, u in links.items()}, oracle


def _submit_both(store, oracle):
    qid = store.next_query("alice"); assert store.next_query("bob") == qid
    for who in ("alice", "bob"):
        store.save_answers(qid, who, oracle[qid]); store.submit(qid, who)
    return qid


def test_review_note_and_request_size_are_capped(local):
    from fastapi.testclient import TestClient
    from mmrlhf.annotate import MAX_TEXT, AnnotationError, make_app
    store, tokens, oracle = local
    qid = _submit_both(store, oracle)
    client = TestClient(make_app(store))
    rita = {"X-Token": tokens["rita"]}
    with pytest.raises(AnnotationError, match=f"note: is longer than {MAX_TEXT} characters"):
        store.review(qid, "rita", "return", note="x" * (MAX_TEXT + 1))
    r = client.post(f"/api/review/{qid}", json={"decision": "return", "note": "x" * 25_000}, headers=rita)
    assert r.status_code == 422 and f"longer than {MAX_TEXT} characters (it has 25000)" in r.json()["errors"]["note"]
    r = client.post(f"/api/review/{qid}", json={"decision": "return", "note": "x" * 10_000_000}, headers=rita)
    assert r.status_code == 413 and "request body over 262144 bytes" in r.json()["detail"]
    r = client.post(f"/api/review/{qid}", json={"decision": "return", "note": 12}, headers=rita)
    assert r.status_code == 422 and "must be text" in r.json()["errors"]["note"]
    # a body sent in chunks, without its length, is cut off at the same limit
    chunks = (b'{"decision": "return", "note": "' + b"x" * 65536 * 8 + b'"}' for _ in range(1))
    r = client.post(f"/api/review/{qid}", content=chunks, headers={**rita, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert store.rows("SELECT count(*) FROM reviews")[0][0] == 0 and store.review_queue() == [qid]   # nothing stored
    # the annotators' free text: a reason, the ranking's reason and the added response
    nxt = store.next_query("alice"); alice = {"X-Token": tokens["alice"]}
    for field in ("reasons.0.ethics", "ranking_reason", "tie.text"):
        r = client.post(f"/api/answer/{nxt}", json={"field": field, "value": "y" * (MAX_TEXT + 1)}, headers=alice)
        assert r.status_code == 422 and f"longer than {MAX_TEXT}" in r.json()["errors"][field]
    r = client.post(f"/api/answer/{nxt}", json={"field": "reasons.0.ethics", "value": "y" * 10_000_000}, headers=alice)
    assert r.status_code == 413 and store.work(nxt, "alice")["draft"] == {}
    with pytest.raises(ValueError, match="at most 64"):
        store.add_person("n" * 65)


def test_database_and_its_wal_are_created_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        store = AnnotationStore(tmp_path / "a.sqlite", image_root=tmp_path)
        c = store._connect(); c.execute("INSERT INTO meta VALUES ('k', 'v')")   # an open connection keeps -wal and -shm
        try:
            for p in (store.path, Path(f"{store.path}-wal"), Path(f"{store.path}-shm")):
                assert p.exists() and oct(p.stat().st_mode & 0o777) == "0o600", p
        finally: c.close()
        loose = tmp_path / "loose.sqlite"
        AnnotationStore(loose, image_root=tmp_path); loose.chmod(0o644)
        with pytest.warns(UserWarning, match="others can read"):
            AnnotationStore(loose)
    finally: os.umask(old)


def test_origin_is_checked_against_the_public_address_not_the_host_header(setup):
    store, links, server, world = setup
    base, alice = f"http://127.0.0.1:{server.port}", links["alice"].split("=")[1]
    qid = urllib.request.urlopen(urllib.request.Request(base + "/", headers={"X-Token": alice})).url.rsplit("/", 1)[-1]
    def post(headers):
        req = urllib.request.Request(f"{base}/api/answer/{qid}", json.dumps({"field": "rank.0", "value": 1}).encode(),
                                     {"Content-Type": "application/json", "X-Token": alice, **headers})
        try: return urllib.request.urlopen(req).status
        except urllib.error.HTTPError as e: return e.code
    # a rebinding page: its Host and Origin agree with each other, not with the address the app serves
    assert post({"Host": "evil.example", "Origin": "http://evil.example"}) == 403
    assert post({"Host": f"evil.example:{server.port}", "Origin": f"http://evil.example:{server.port}"}) == 403
    assert post({"Origin": "null"}) == 403
    # the app's own address (and its loopback aliases) passes, whatever the Host header says (e.g. behind a proxy)
    assert post({"Host": "proxy.internal", "Origin": f"http://127.0.0.1:{server.port}"}) == 200
    assert post({"Origin": f"http://localhost:{server.port}"}) == 200
    assert post({"Origin": f"http://127.0.0.1:{server.port + 1}"}) == 403


def test_public_url_setting(tmp_path):
    from mmrlhf.annotate import AnnotationServer
    from mmrlhf.core import ConfigError
    world = write_world(SynthConfig(out=str(tmp_path / "world"), n_queries=2, seed=5))
    cfg = AnnotateConfig(db=str(tmp_path / "db.sqlite"), data=str(world), annotators=["alice"], serve=False,
                         public_url="https://Annotate.Example.org:443/")
    store, links = setup_store(cfg)
    assert links["alice"].startswith("https://annotate.example.org/login?token=")
    alice = links["alice"].split("=")[1]
    with AnnotationServer(store, public_url=cfg.public_url) as srv:
        qid = urllib.request.urlopen(urllib.request.Request(srv.url + "/", headers={"X-Token": alice})).url.rsplit("/", 1)[-1]
        def post(origin):
            req = urllib.request.Request(f"{srv.url}/api/answer/{qid}", json.dumps({"field": "rank.0", "value": 1}).encode(),
                                         {"Content-Type": "application/json", "X-Token": alice, "Origin": origin})
            try: return urllib.request.urlopen(req).status
            except urllib.error.HTTPError as e: return e.code
        assert post("https://annotate.example.org") == 200
        assert post(srv.url) == 403                       # the bind address is not the public one
        assert post("http://annotate.example.org") == 403  # nor is another scheme
    with pytest.raises(ConfigError, match="public_url"):
        setup_store(AnnotateConfig(db=str(tmp_path / "db.sqlite"), public_url="annotate.example.org", serve=False))


def test_a_ranking_with_gaps_is_accepted_and_exports(local, tmp_path):
    from mmrlhf.annotate import AnnotationError, check_answer, draft_record
    from mmrlhf.schema import pair_indices, parse_query
    store, tokens, oracle = local
    qid = store.next_query("alice"); q = store.query(qid)
    k = len(q.responses)
    answers = {f: v for f, v in oracle[qid].items() if not f.startswith(("rank.", "tie.", f"scores.{k}", f"reasons.{k}"))}
    store.save_answers(qid, "alice", answers | {"rank.0": 1, "rank.1": 3, "rank.2": 3, "rank.3": 3})
    rec = store.submit(qid, "alice")
    assert rec["ranking"] == [1, 3, 3, 3]
    parsed = parse_query(rec)
    assert parsed.ranking == [1, 3, 3, 3] and pair_indices(parsed) == [(0, 1), (0, 2), (0, 3)]
    store.next_query("bob")
    store.save_answers(qid, "bob", answers | {"rank.0": 1, "rank.1": 2, "rank.2": 2, "rank.3": 2}); store.submit(qid, "bob")
    # the reviewer's table marks ranks that say another order, not other numbers for the same order
    from mmrlhf.annotate import review_rows
    ranks = [r for r in review_rows(store.submissions(qid)) if r["label"].endswith("· rank")]
    assert [r["cells"] for r in ranks] == [["1", "1"], ["3", "2"], ["3", "2"], ["3", "2"]] and not any(r["differ"] for r in ranks)
    store.review(qid, "rita", "accept", accepted="alice")
    assert store.export(tmp_path / "out.jsonl") == 1
    (back,) = read_queries(tmp_path / "out.jsonl")
    assert back.ranking == [1, 3, 3, 3]
    assert check_answer(q, "rank.0", 9) is None and "below 1" in check_answer(q, "rank.0", 0)
    # the other checks stay: every response ranked; all tied needs the tie rule
    assert draft_record(q, answers | {"rank.0": 2, "rank.1": 5, "rank.2": 5}, "x")[1] == {"rank.3": "response 4 has no rank"}
    assert "tie.kind" in draft_record(q, answers | {f"rank.{i}": 3 for i in range(4)}, "x")[1]


def test_export_removes_what_a_killed_export_left(local, tmp_path, capsys):
    from mmrlhf.annotate import AnnotateExportConfig, run_annotate_export
    store, tokens, oracle = local
    qid = _submit_both(store, oracle)
    out = tmp_path / "exp" / "annotated.jsonl"; out.parent.mkdir()
    (out.parent / ".annotated.jsonl.x7k2.tmp").write_text('{"id": "half')     # a killed export's temporary file
    (out.parent / ".other.jsonl.abcd.tmp").write_text("someone else's")       # another writer's: left alone
    run_annotate_export(AnnotateExportConfig(db=str(store.path), out=str(out), which="submitted"))
    assert sorted(p.name for p in out.parent.iterdir()) == [".other.jsonl.abcd.tmp", "annotated.jsonl"]
    assert [q.id for q in read_queries(out, store.image_root)] == [qid, qid] and "removed 1 temporary file" in capsys.readouterr().out
