"""Curation throughput on this machine, stage by stage, with a projection to a 10M-item pool.

1. CLIP ViT-B-32 image embedding (random weights: the speed is the same as trained ones), fp32 and bf16 autocast on CPU
   (fp16 at batch 256 on a GPU when one is present), preprocessing included.
2. (run first, in a fresh child process, so its peak memory is its own) `mmrlhf curate`'s whole pipeline on a synthetic pool of --items shapes-world items with the tiny CLIP (so the
   embedding does not dominate): pool writing excluded; embedding shards, clustering, dedup, sampling, report; peak RSS.
3. faiss spherical k-means of 1M x 512 vectors into 100 clusters, and near-duplicate search on --items x 512 vectors.

There is no peer to compare against: the paper's curation code was never released and no peer ships one.

    .venv/bin/python bench/curation_scale.py [--items 100000] [--kmeans-points 1000000] [--out runs/bench-curation]
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

import numpy as np


def clip_throughput(n=256, batch=64):
    import torch
    from mmrlhf.curation import clip_model
    from mmrlhf.world import make_query, render_query
    model, pre = clip_model("ViT-B-32")
    ims = [render_query(make_query(0, i), 224)[0] for i in range(n)]
    out = {}
    modes = [("cpu_fp32", None), ("cpu_bf16", torch.bfloat16)]
    for name, dtype in modes:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model.encode_image(torch.stack([pre(im) for im in ims[:batch]]))  # warm-up: kernels are chosen on first use
        t = time.perf_counter()
        for i in range(0, n, batch):
            x = torch.stack([pre(im) for im in ims[i:i + batch]])
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                model.encode_image(x)
        out[name] = round(n / (time.perf_counter() - t), 1)
    if torch.cuda.is_available():
        model = model.cuda(); x = torch.stack([pre(im) for im in ims[:256]]).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            model.encode_image(x); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(10): model.encode_image(x)
            torch.cuda.synchronize()
        out["gpu_fp16_batch256"] = round(2560 / (time.perf_counter() - t), 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--kmeans-points", type=int, default=1_000_000)
    ap.add_argument("--out", default="runs/bench-curation")
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = {"machine": f"{os.cpu_count()} CPUs", "items": a.items}
    from mmrlhf.world import SynthConfig, write_world
    pool = out / "world" / "queries.jsonl"
    if not pool.exists(): write_world(SynthConfig(out=str(out / "world"), n_queries=a.items, seed=0))
    exe = Path(sys.executable).parent / "mmrlhf"
    import shutil; shutil.rmtree(out / "run", ignore_errors=True)  # a finished run would resume instead of embedding
    t = time.perf_counter()
    subprocess.run([str(exe), "curate", "--pool", str(pool), "--out", str(out / "run"), "--model", "tiny", "--total", "30000"], check=True)
    res["curate_pipeline_tiny_clip_s"] = round(time.perf_counter() - t, 1)
    res["curate_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    summary = json.loads((out / "run" / "curation.json").read_text())
    res["curate_embed_s"] = summary["embed_seconds"]
    res["clip_vit_b32_img_per_s"] = clip_throughput()

    import faiss
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.kmeans_points, 512)).astype(np.float32); x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.perf_counter(); km = faiss.Kmeans(512, 100, niter=20, spherical=True, seed=0, max_points_per_centroid=256); km.train(x)
    km.index.search(x, 1); res["kmeans_1m_train_and_assign_s"] = round(time.perf_counter() - t, 1)
    from mmrlhf.curation import near_duplicates
    y = x[:a.items]
    t = time.perf_counter(); near_duplicates(x[:20_000], 0.95); res["near_dup_flat_20k_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter(); near_duplicates(y, 0.95); res[f"near_dup_ivf_{a.items}_s"] = round(time.perf_counter() - t, 1)
    del x, y

    best = max(res["clip_vit_b32_img_per_s"]["cpu_bf16"], res["clip_vit_b32_img_per_s"]["cpu_fp32"])
    res["projection_10m"] = {"clip_embedding_hours_on_this_cpu_best_precision": round(10e6 / best / 3600, 1),
                             "rest_of_pipeline_hours_if_linear": round((res["curate_pipeline_tiny_clip_s"] - summary["embed_seconds"]) * 10e6 / a.items / 3600, 2)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
