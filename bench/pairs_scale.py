"""Validate, expand and summarise a release-sized annotated file (default 30,000 queries x 4 responses).

Writes the input once (oracle-annotated shapes-world queries, image checks off), then runs `mmrlhf pairs` on it in a
child process and reports wall time and the child's peak memory (max RSS). There is no peer tool for this stage to
compare against: TRL and the released MM-RLHF code take pairs that were expanded elsewhere.

    .venv/bin/python bench/pairs_scale.py [--queries 30000] [--out runs/bench-pairs]
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

from mmrlhf.world import oracle_annotate
from mmrlhf.schema import parse_query, query_record, write_queries
from mmrlhf.world import make_query, world_record


def write_input(path: Path, n: int):
    "An annotated release-sized query file (no images written: image checks are off in the run)."
    def queries():
        for i in range(n):
            q = make_query(0, i)
            yield oracle_annotate(parse_query(world_record(q, [f"images/{q.id}.png"])))
    write_queries(path, queries())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=30000)
    ap.add_argument("--out", default="runs/bench-pairs")
    ap.add_argument("--no-groups", action="store_true", help="skip the Arrow query groups")
    args = ap.parse_args()
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    src = out / "input.jsonl"
    t = time.perf_counter(); write_input(src, args.queries); t_in = time.perf_counter() - t
    exe = Path(sys.executable).parent / "mmrlhf"
    cmd = [str(exe), "pairs", "--input", str(src), "--out", str(out / "result"), "--no-check-images"] + (["--no-groups"] if args.no_groups else [])
    t = time.perf_counter(); subprocess.run(cmd, check=True); wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stats = json.loads((out / "result" / "stats.json").read_text())
    print(json.dumps({"queries": stats["queries"], "pairs": stats["pairs"], "input_mb": round(src.stat().st_size / 2**20, 1),
                      "seconds": round(wall, 1), "peak_rss_mb": round(peak_mb), "groups": not args.no_groups,
                      "input_written_in_s": round(t_in, 1), "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
