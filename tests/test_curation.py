"Curation: categories, resumable embedding after a kill, duplicates, ratio sampling, the whole command."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from mmrlhf.core import ConfigError, DataError, write_jsonl
from mmrlhf.configs import CurateConfig
from mmrlhf.curation import (categorise, clip_model, embed_pool, find_duplicates, load_embeddings,
                             near_duplicates, read_pool, run_curate, sample_balanced)
from mmrlhf.configs import SynthConfig
from mmrlhf.world import write_world


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


KILL_AT = """
import os, sys
from mmrlhf.curation import clip_model, embed_pool
model, pre = clip_model("tiny")
calls = {"n": 0}
encode = model.encode_image
def dying(x):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[5]): os._exit(9)
    return encode(x)
model.encode_image = dying
embed_pool(sys.argv[1], sys.argv[2], sys.argv[3], model, pre, batch_size=16, shard_size=int(sys.argv[4]), progress=False)
"""


def _kill(pool_file, root, out, shard_size, at):
    "Embed in a subprocess that dies at the `at`-th forward pass."
    r = subprocess.run([sys.executable, "-c", KILL_AT, str(pool_file), str(root), str(out), str(shard_size), str(at)], capture_output=True)
    assert r.returncode == 9, r.stderr[-2000:]


def test_killed_embedding_resumes_without_recomputing(pool, tmp_path):
    _kill(pool / "pool.jsonl", pool / "world", tmp_path / "killed", shard_size=48, at=4)   # in the middle of the second shard
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


# ---- resuming only what is still valid: the manifest, the pool's fingerprint, the model -------------------------------

def _curate(pool_file, root, out, **kw):
    cfg = dict(pool=str(pool_file), image_root=str(root), out=str(out), model="tiny", clusters=8, total=100, batch_size=16, shard_size=48)
    return run_curate(CurateConfig(**{**cfg, **kw}))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mmrlhf.cli", "curate", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resume_with_another_shard_size_is_refused(pool, tmp_path):
    "The issue's case: shards of 48 items from a killed run must not be read as shards of 64."
    _kill(pool / "pool.jsonl", pool / "world", tmp_path, 48, 7)   # dies in the third shard of six
    r = _cli("--pool", pool / "pool.jsonl", "--image-root", pool / "world", "--out", tmp_path, "--model", "tiny",
             "--batch-size", 16, "--shard-size", 64, "--clusters", 8, "--total", 100)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "shard_size: 48 -> 64" in r.stderr and "model" not in r.stderr.split("settings (")[1].split(")")[0]
    assert not (tmp_path / "curated.jsonl").exists()


def test_resume_with_another_model_is_refused(pool, tmp_path):
    _kill(pool / "pool.jsonl", pool / "world", tmp_path, 48, 4)
    with pytest.raises(ConfigError, match=r"model: .*weights digest .* -> .*random weights \(seed 1\)"):
        _curate(pool / "pool.jsonl", pool / "world", tmp_path, seed=1)   # other random weights: other embeddings


def _copy_pool(pool, dest):
    "A private copy of the pool and its images, to edit."
    import shutil
    shutil.copytree(pool / "world" / "images", dest / "world" / "images")
    shutil.copy(pool / "pool.jsonl", dest / "pool.jsonl")
    return dest / "pool.jsonl", dest / "world"


def test_resume_after_the_pool_changed_equals_a_fresh_run(pool, tmp_path, capsys):
    pool_file, root = _copy_pool(pool, tmp_path)
    _curate(pool_file, root, tmp_path / "resumed")                       # a finished run on the old pool
    recs = [json.loads(l) for l in pool_file.read_text().splitlines()]
    del recs[100:110]                                                    # lines removed (shifting every later shard)
    recs[10]["question"] = "What colour is the largest shape?"           # a line edited
    from PIL import Image
    img = root / recs[30]["images"][0]
    with Image.open(img) as im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(img)   # an image replaced in place
    write_jsonl(pool_file, recs)
    capsys.readouterr()
    resumed = _curate(pool_file, root, tmp_path / "resumed")
    said = capsys.readouterr().out
    fresh = _curate(pool_file, root, tmp_path / "fresh")
    assert resumed["pool_items"] == fresh["pool_items"] == len(recs)
    for name in ("curated.jsonl", "duplicates.jsonl", "rejects.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    a, b = load_embeddings(tmp_path / "resumed"), load_embeddings(tmp_path / "fresh")
    assert a.ids == b.ids == [str(r["id"]) for r in recs if r["id"] not in {"gone", "bad", "escape"}]
    assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.categories, b.categories)
    assert "re-embedded because their pool items or images changed" in said   # and it says so


def test_killed_run_resumes_to_a_fresh_run_and_leaves_nothing_stale(pool, tmp_path):
    out = tmp_path / "killed"
    _kill(pool / "pool.jsonl", pool / "world", out, 48, 7)
    emb = out / "embeddings"
    finished = {p.name: p.stat().st_mtime_ns for p in emb.glob("shard-*")}
    assert len(finished) == 4                                            # two finished shards
    # what a killed run can leave: temporary files, a stale shard of a larger pool, the report of an earlier run
    for p in (out / ".curated.jsonl.k1l3d.tmp", emb / ".shard-00002.npy.x7q.tmp"): p.write_text("partial")
    for ext in ("json", "npy"): (emb / f"shard-00009.{ext}").write_bytes((emb / f"shard-00000.{ext}").read_bytes())
    (out / "report.html").write_text("an earlier run's report")
    resumed = _curate(pool / "pool.jsonl", pool / "world", out, report=False)
    fresh = _curate(pool / "pool.jsonl", pool / "world", tmp_path / "fresh", report=False)
    assert all((emb / n).stat().st_mtime_ns == t for n, t in finished.items())   # finished shards reused
    for name in ("curated.jsonl", "duplicates.jsonl", "rejects.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert {k: resumed[k] for k in ("pool_items", "curated", "duplicates")} == {k: fresh[k] for k in ("pool_items", "curated", "duplicates")}
    leftovers = sorted(p.name for p in [*out.iterdir(), *emb.iterdir()] if p.name.endswith(".tmp") or p.name.startswith("shard-00009"))
    assert leftovers == [] and not (out / "report.html").exists()
    assert sorted(p.name for p in emb.glob("shard-*.json")) == [f"shard-{i:05d}.json" for i in range(6)]


# ---- bad pools: one line, exit 2 ---------------------------------------------------------------------------------------

def test_empty_pool_is_a_one_line_error(tmp_path):
    (tmp_path / "pool.jsonl").write_text("\n  \n")
    r = _cli("--pool", tmp_path / "pool.jsonl", "--out", tmp_path / "out", "--model", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "pool.jsonl" in r.stderr and "no items" in r.stderr


def test_repeated_id_is_rejected_naming_both_lines(pool, tmp_path):
    recs = [json.loads(l) for l in (pool / "pool.jsonl").read_text().splitlines()][:20]
    recs[12] = {**recs[12], "id": recs[4]["id"]}          # line 13 repeats line 5's id (another question, another image)
    write_jsonl(tmp_path / "p.jsonl", recs)
    model, pre = clip_model("tiny")
    with pytest.raises(DataError, match=rf"p.jsonl:13: id: id '{recs[4]['id']}' is also on line 5"):
        embed_pool(tmp_path / "p.jsonl", pool / "world", tmp_path / "out", model, pre, progress=False)


def test_non_utf8_pool_is_a_one_line_error(pool, tmp_path):
    lines = (pool / "pool.jsonl").read_bytes().splitlines(keepends=True)[:10]
    lines[6] = lines[6].replace(b'"question": "', b'"question": "caf\xe9 ')   # Latin-1, not UTF-8
    (tmp_path / "pool.jsonl").write_bytes(b"".join(lines))
    r = _cli("--pool", tmp_path / "pool.jsonl", "--image-root", pool / "world", "--out", tmp_path / "out", "--model", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert f"{tmp_path / 'pool.jsonl'}:7:" in r.stderr and "UTF-8" in r.stderr


def test_unreadable_parquet_and_dataset_folders_are_data_errors(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"p.parquet: .*Parquet"):
        list(read_pool(tmp_path / "p.parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: .*datasets"):
        list(read_pool(tmp_path / "folder"))


# ---- what was removed, and why: duplicates.jsonl, the counts, the report's thumbnails -----------------------------------

@pytest.fixture(scope="module")
def dup_pool(tmp_path_factory):
    "A pool with an exact copy and a near-duplicate (the same image re-encoded as JPEG)."
    from PIL import Image
    tmp = tmp_path_factory.mktemp("dups")
    world = write_world(SynthConfig(out=str(tmp / "world"), n_queries=150, seed=0))
    recs = [json.loads(l) for l in world.read_text().splitlines()]
    with Image.open(tmp / "world" / recs[3]["images"][0]) as im: im.convert("RGB").save(tmp / "world" / "images" / "near.jpg", quality=90)
    recs += [{**recs[0], "id": "copy-0"}, {**recs[3], "id": "near-3", "images": ["images/near.jpg"]},
             {**recs[1], "id": "gone", "images": ["images/nowhere.png"]}]
    write_jsonl(tmp / "pool.jsonl", recs)
    return tmp, recs


def test_duplicates_are_listed_with_what_they_repeat(dup_pool, tmp_path):
    tmp, recs = dup_pool
    s = _curate(tmp / "pool.jsonl", tmp / "world", tmp_path, total=60)
    dups = {r["id"]: r for r in map(json.loads, (tmp_path / "duplicates.jsonl").read_text().splitlines())}
    assert dups["copy-0"] == {"id": "copy-0", "kind": "exact", "duplicate_of": recs[0]["id"], "kept": recs[0]["id"], "cosine": None,
                              "category": dups["copy-0"]["category"], "same_question": True}
    near = dups["near-3"]
    assert near["kind"] == "near" and near["duplicate_of"] == recs[3]["id"]
    emb = load_embeddings(tmp_path)                          # the cosine, recomputed from the raw vectors
    raw = np.concatenate([np.asarray(x) for x in emb.shards]).astype(np.float64); raw -= raw.mean(0)
    ids = emb.ids
    a, b = raw[ids.index("near-3")], raw[ids.index(recs[3]["id"])]
    assert near["cosine"] >= 0.95 and abs(near["cosine"] - a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 1e-4
    # count in = count out: every pool item is curated, a removed duplicate, not sampled, or rejected, exactly once
    curated = {json.loads(l)["id"] for l in (tmp_path / "curated.jsonl").read_text().splitlines()}
    rejected = {json.loads(l)["id"] for l in (tmp_path / "rejects.jsonl").read_text().splitlines()}
    assert rejected == {"gone"} and not (curated & set(dups)) and not (curated & rejected) and not (set(dups) & rejected)
    not_sampled = {str(r["id"]) for r in recs} - curated - set(dups) - rejected
    assert s["pool_items"] == len(recs) and s["not_sampled"] == len(not_sampled) and s["duplicates_removed"] == len(dups)
    assert f"{len(recs)} pool items = {len(curated)} curated + {len(dups)} duplicates" in s["accounting"]


def test_report_shows_clusters_and_near_duplicates_by_example(dup_pool, tmp_path):
    import base64, io, re
    from PIL import Image
    tmp, recs = dup_pool
    _curate(tmp / "pool.jsonl", tmp / "world", tmp_path, total=60, thumbnails=4)
    html = (tmp_path / "report.html").read_text()
    thumbs = re.findall(r"<img src='data:image/jpeg;base64,([^']+)' title='([^']+)'", html)
    emb = load_embeddings(tmp_path)
    from mmrlhf.curation import cluster
    _, assign = cluster(emb, 8, 0)
    n_near = sum(json.loads(l)["kind"] == "near" for l in (tmp_path / "duplicates.jsonl").read_text().splitlines())
    assert len(thumbs) == sum(min(4, c) for c in np.bincount(assign)) + 2 * n_near
    shown = {t for _, t in thumbs}
    assert {"near-3", recs[3]["id"]} <= shown and shown <= set(emb.ids)
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0][0]))) as im: assert im.format == "JPEG" and max(im.size) <= 96
    assert "Clusters by example" in html and "Near-duplicates closest to the threshold" in html and "http" not in html.split("</script>")[-1]


def test_a_video_file_is_embedded_by_its_first_frame(tmp_path):
    "A pool item naming an .mp4 is embedded as its first frame (decoded here with PyAV directly), categorised video."
    import av
    from PIL import Image
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    with av.open(str(tmp_path / "clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=8); s.width = s.height = 32; s.pix_fmt = "yuv420p"
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")): c.mux(p)
        for p in s.encode(): c.mux(p)
    with av.open(str(tmp_path / "clip.mp4")) as c:
        decoded = [f.to_image() for f in c.decode(c.streams.video[0])]
    decoded[0].save(tmp_path / "first.png"); decoded[-1].save(tmp_path / "last.png")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    recs = [{"id": "vid", "images": ["clip.mp4"], "question": "What changes?"},
            {"id": "first", "images": ["first.png"], "question": "What changes?"},
            {"id": "last", "images": ["last.png"], "question": "What changes?"},
            {"id": "broken", "images": ["broken.mp4"], "question": "What changes?"}]
    write_jsonl(tmp_path / "pool.jsonl", recs)
    model, pre = clip_model("tiny")
    embed_pool(tmp_path / "pool.jsonl", tmp_path, tmp_path / "emb", model, pre, progress=False)
    emb = load_embeddings(tmp_path / "emb")
    raw = dict(zip(emb.ids, np.concatenate([np.asarray(s) for s in emb.shards])))
    assert np.allclose(raw["vid"], raw["first"], atol=1e-6) and not np.allclose(raw["vid"], raw["last"], atol=1e-3)
    assert categorise(next(read_pool(tmp_path / "pool.jsonl"))) == "video"
    reasons = {r["id"]: r["reason"] for r in emb.rejects}
    assert list(reasons) == ["broken"] and "'broken.mp4' does not decode" in reasons["broken"]
