"Curation: categories, resumable embedding after a kill, duplicates, ratio sampling, the whole command."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from mmrlhf.core import write_jsonl
from mmrlhf.curation import (CurateConfig, categorise, clip_model, embed_pool, find_duplicates, load_embeddings,
                             near_duplicates, read_pool, run_curate, sample_balanced)
from mmrlhf.synthetic import SynthConfig, write_world


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    world = write_world(SynthConfig(out=str(tmp / "world"), n_queries=240, seed=3))
    recs = [json.loads(l) for l in world.read_text().splitlines()]
    (tmp / "world" / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n broken")
    recs += [{**recs[5], "id": "copy"}, {**recs[6], "id": "gone", "images": ["images/absent.png"]},
             {**recs[7], "id": "bad", "images": ["images/corrupt.png"]}, {**recs[8], "id": "escape", "images": ["../../etc/hostname"]}]
    write_jsonl(tmp / "pool.jsonl", recs)
    return tmp


def test_read_pool_names_bad_items(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "images": ["x.png"], "question": "q"}) + "\n" + json.dumps({"id": "b", "question": "q"}) + "\n")
    with pytest.raises(Exception, match=r"p.jsonl:2: images"):
        list(read_pool(tmp_path / "p.jsonl"))


def test_read_pool_parquet(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"id": "a", "image": "x.png", "question": "Q?\nA. x\nB. y", "answer": "A"}]), tmp_path / "p.parquet")
    (item,) = read_pool(tmp_path / "p.parquet")
    assert item["images"] == ["x.png"] and categorise(item) == "mcq"


def test_long_threshold_is_configurable():
    item = {"question": "Describe.", "reference": "x" * 100}
    assert categorise(item) == "short" and categorise(item, long_threshold=50) == "long"


KILLER = """
import os, sys
from mmrlhf.curation import clip_model, embed_pool
model, pre = clip_model("tiny")
calls = {"n": 0}
encode = model.encode_image
def dying(x):
    calls["n"] += 1
    if calls["n"] == 4: os._exit(9)   # killed in the middle of the second shard
    return encode(x)
model.encode_image = dying
embed_pool(sys.argv[1], sys.argv[2], sys.argv[3], model, pre, batch_size=16, shard_size=48, progress=False)
"""


def test_killed_embedding_resumes_without_recomputing(pool, tmp_path):
    r = subprocess.run([sys.executable, "-c", KILLER, str(pool / "pool.jsonl"), str(pool / "world"), str(tmp_path / "killed")])
    assert r.returncode == 9
    emb_dir = tmp_path / "killed" / "embeddings"
    finished = {p.name: p.stat().st_mtime_ns for p in emb_dir.glob("shard-*")}
    assert sorted(finished) == ["shard-00000.json", "shard-00000.npy"]   # only the first shard was complete
    model, pre = clip_model("tiny")
    embed_pool(pool / "pool.jsonl", pool / "world", tmp_path / "killed", model, pre, batch_size=16, shard_size=48, progress=False)
    assert all((emb_dir / n).stat().st_mtime_ns == t for n, t in finished.items())  # not recomputed
    embed_pool(pool / "pool.jsonl", pool / "world", tmp_path / "clean", model, pre, batch_size=16, shard_size=48, progress=False)
    a, b = load_embeddings(tmp_path / "killed"), load_embeddings(tmp_path / "clean")
    assert a.ids == b.ids and np.array_equal(a.vectors, b.vectors)


def test_bad_images_are_rejected_with_reasons(pool, tmp_path):
    model, pre = clip_model("tiny")
    embed_pool(pool / "pool.jsonl", pool / "world", tmp_path, model, pre, shard_size=100, progress=False)
    emb = load_embeddings(tmp_path)
    reasons = {r["id"]: r["reason"] for r in emb.rejects}
    assert set(reasons) == {"gone", "bad", "escape"}
    assert "escapes the image root" in reasons["escape"] and "FileNotFoundError" in reasons["gone"]
    assert len(emb.ids) == 241
    dups = find_duplicates(emb)
    assert [emb.ids[i] for i in np.flatnonzero(dups["same_image"])] == ["copy"]


def test_near_duplicates_flat_ivf_and_pq_agree():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12000, 32)).astype(np.float32)
    x[11000:11050] = x[:50] + 0.01 * rng.normal(size=(50, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = near_duplicates(x, 0.99, flat_limit=100_000)
    ivf = near_duplicates(x, 0.99, flat_limit=1000, nprobe=64)
    pq = near_duplicates(x, 0.99, flat_limit=1000, ivf_limit=5000, nprobe=64)   # product-quantised, exact re-check
    assert np.flatnonzero(flat).tolist() == list(range(11000, 11050))
    assert np.array_equal(flat, ivf) and np.array_equal(flat, pq)


def test_embeddings_are_memory_mapped_and_centred(pool, tmp_path):
    model, pre = clip_model("tiny")
    embed_pool(pool / "pool.jsonl", pool / "world", tmp_path, model, pre, shard_size=64, progress=False)
    emb = load_embeddings(tmp_path)
    assert all(isinstance(s, np.memmap) for s in emb.shards) and len(emb.shards) == 4
    v = emb.vectors
    raw = np.concatenate([np.asarray(s) for s in emb.shards])
    expect = (raw - raw.mean(0)) / np.linalg.norm(raw - raw.mean(0), axis=1, keepdims=True)
    assert np.allclose(v, expect, atol=1e-5)
    idx = [3, 70, 200]
    assert np.allclose(emb.rows(idx), v[idx]) and emb.ids_of(idx) == [emb.ids[i] for i in idx]


def test_sampling_reaches_the_ratio_and_spreads_over_clusters():
    rng = np.random.default_rng(1)
    cats = np.array(rng.choice(["long", "short", "mcq", "safety"], 5000, p=[0.3, 0.4, 0.2, 0.1]))
    clusters = rng.integers(0, 50, 5000)
    idx, rep = sample_balanced(cats, clusters, 1000, {"long": 4, "short": 5, "mcq": 1}, seed=0)
    got = {c: int((cats[idx] == c).sum()) for c in ("long", "short", "mcq", "safety")}
    rest = 1000 - got["safety"]
    assert got["safety"] == (cats == "safety").sum() and abs(got["long"] - rest * 0.4) <= 1 and abs(got["mcq"] - rest * 0.1) <= 1
    assert rep["long"]["clusters"] == 50
    again, _ = sample_balanced(cats, clusters, 1000, {"long": 4, "short": 5, "mcq": 1}, seed=0)
    assert np.array_equal(idx, again)


def test_shortfall_is_reported_not_hidden():
    cats = np.array(["long"] * 10 + ["short"] * 100 + ["mcq"] * 2)
    _, rep = sample_balanced(cats, np.zeros(len(cats), int), 100, {"long": 4, "short": 5, "mcq": 1})
    assert rep["mcq"] == {"target": 10, "achieved": 2, "clusters": 1, "available": 2}


def test_curate_command(pool, tmp_path):
    exe = Path(sys.executable).parent / "mmrlhf"
    r = subprocess.run([str(exe), "curate", "--pool", str(pool / "pool.jsonl"), "--image-root", str(pool / "world"), "--out", str(tmp_path), "--model", "tiny",
                        "--clusters", "8", "--total", "100", "--shard-size", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "curation.json").read_text())
    assert summary["curated"] == 100 and summary["rejected"] == 3 and summary["duplicates"]["same_image"] == 1
    lines = (tmp_path / "curated.jsonl").read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(l)["responses"] == [] for l in lines)
    html = (tmp_path / "report.html").read_text()
    assert "Curation report" in html and "plotly" in html.lower() and len(html) > 1_000_000  # plotly.js inlined: opens offline


def test_nothing_embeddable_is_a_clear_error(pool, tmp_path):
    exe = Path(sys.executable).parent / "mmrlhf"
    r = subprocess.run([str(exe), "curate", "--pool", str(pool / "pool.jsonl"), "--out", str(tmp_path), "--model", "tiny"], capture_output=True, text=True)
    assert r.returncode == 2 and "could be embedded" in r.stderr and "Traceback" not in r.stderr
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 244


def test_exact_copies_do_not_hide_near_duplicates():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 16)).astype(np.float32); x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1:20] = x[0]                       # nineteen exact copies of item 0
    x[20] = x[0] + 0.005; x[20] /= np.linalg.norm(x[20])   # and one near-duplicate of it
    copies = np.zeros(200, bool); copies[1:20] = True
    assert near_duplicates(x, 0.99, neighbours=8, among=~copies)[20]


def test_two_processes_give_the_same_result_as_one(pool, tmp_path):
    "Under `accelerate launch` the shards are split between processes; the curated set must not change."
    exe = str(Path(sys.executable).parent / "mmrlhf")
    args = ["curate", "--pool", str(pool / "pool.jsonl"), "--image-root", str(pool / "world"), "--model", "tiny",
            "--clusters", "8", "--total", "90", "--shard-size", "32"]
    subprocess.run([exe, *args, "--out", str(tmp_path / "one")], check=True, capture_output=True)
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", exe, *args, "--out", str(tmp_path / "two")]
    r = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=300)
    # The exit status is not asserted: 2-process gloo groups on CPU can abort at interpreter exit after the work is done.
    assert (tmp_path / "two" / "curation.json").exists(), r.stderr[-3000:]
    assert r.stdout.count("curated") == 1          # only the main process writes the outputs
    assert (tmp_path / "one" / "curated.jsonl").read_bytes() == (tmp_path / "two" / "curated.jsonl").read_bytes()
