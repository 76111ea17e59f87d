"""Choose the demo's MM-DPO learning rate, SFT weight γ and steps on a validation world, never on the test world.

The paper picked γ from {0, 0.1, 0.25, 0.5, 1.0} and the learning rate by a grid search per base model. This does
the same for the demo's policy. Every row trains MM-DPO (dynamic β from the run's own reward-model δ) from a
finished demo run's SFT policy on the run's scored pool, then answers a validation world greedily: seed + 2 (the
test world is seed + 1), its first 600 queries (200 cannot tell a 4-point change from noise), none repeating a
query of the pool. Each row is compared with the SFT policy on the same items (paired; McNemar; Holm over the two
metrics of the row). The demo's held-out test world is not read.

    .venv/bin/python bench/dpo_tune.py --run runs/demo                            # the default rows
    .venv/bin/python bench/dpo_tune.py --run runs/demo --rows g1-lr2e-4-s200 g0.5-lr5e-4-s200

A row's name is g<γ>-lr<learning rate>-s<steps>, with -b<β_ori> for another β_ori than train-dpo's default and
-v when the vision tower is trained too (the paper freezes it).
Rows already in <run>/tune are read, not retrained.
"""
from __future__ import annotations

import argparse, contextlib, datetime, io, json, os, time
from pathlib import Path

from mmrlhf.configs import DemoConfig, EvalConfig, SynthConfig, TrainDPOConfig
from mmrlhf.dpo import run_train_dpo
from mmrlhf.evaluate import run_eval, run_scores
from mmrlhf.stats import compare_benchmarks, score
from mmrlhf.world import world_overlap, write_world

ROWS = ["g1-lr5e-4-s200", "g1-lr5e-4-s300", "g1-lr5e-4-s400", "g0.25-lr2e-4-s300"]  # the recorded grid
METRICS = ("accuracy", "hallucination")


def parse_row(name:str) -> dict:
    "g<γ>-lr<lr>-s<steps>[-b<β_ori>][-v] -> the settings."
    vision = name.endswith("-v"); name = name.removesuffix("-v")
    name, _, beta = name.partition("-b")
    g, lr, s = name.split("-lr")[0][1:], name.split("-lr")[1].split("-s")[0], name.split("-s")[-1]
    return {"gamma": float(g), "lr": float(lr), "steps": int(s),
            "beta": float(beta) if beta else TrainDPOConfig().beta, "train_vision": vision}


def overall(run_json:Path, metric:str, seed:int):
    "A metric over every item of an eval run, as a `Score`."
    vals, ids = [], []
    for (bench, m), s in run_scores(json.loads(run_json.read_text())).items():
        if m == metric: vals += list(s.outcomes); ids += list(s.ids)
    return score(vals, ids, seed=seed)


def evaluate(model:Path, bench:Path, out:Path, demo:DemoConfig):
    "Answer the validation world greedily (skipped when done)."
    if (out / "run.json").exists(): return out / "run.json"
    with contextlib.redirect_stdout(io.StringIO()):
        run_eval(EvalConfig(model=str(model), name=out.parent.name, out=str(out), bench=str(bench),
                            bench_name="shapes", max_new_tokens=demo.max_new_tokens,
                            batch_size=demo.generate_batch, seed=demo.seed))
    return out / "run.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished `mmrlhf demo` run folder")
    ap.add_argument("--rows", nargs="*", default=ROWS)
    ap.add_argument("--n-valid", type=int, default=600)
    args = ap.parse_args()
    run = Path(args.run); tune = run / "tune"
    demo = DemoConfig.from_yaml(run / "config.yaml")
    valid = tune / "world"
    if not (valid / "queries.jsonl").exists():
        write_world(SynthConfig(out=str(valid), n_queries=args.n_valid, seed=demo.seed + 2,
                                exclude=str(run / "world" / "pool" / "queries.jsonl")))
    leak = world_overlap(run / "world" / "pool" / "queries.jsonl", valid / "queries.jsonl")
    print("validation world:", leak)
    sft_run = evaluate(run / "models" / "sft", valid / "queries.jsonl", tune / "sft" / "eval", demo)
    base = {("shapes", m): overall(sft_run, m, demo.seed) for m in METRICS}
    print(f"SFT policy: accuracy {base['shapes', 'accuracy'].value:.3f}, "
          f"hallucination {base['shapes', 'hallucination'].value:.3f}")
    rows = []
    for name in args.rows:
        s, out, t0 = parse_row(name), tune / name, time.time()
        if not (out / "final").exists():
            with contextlib.redirect_stdout(io.StringIO()):
                run_train_dpo(TrainDPOConfig(data=str(run / "ref" / "queries.jsonl"),
                                             image_root=str(run / "world" / "pool"),
                                             base=str(run / "models" / "sft"), out=str(out),
                                             steps=s["steps"], lr=s["lr"], gamma=s["gamma"],
                                             beta=s["beta"], train_vision=s["train_vision"],
                                             save_steps=s["steps"], logging_steps=max(1, s["steps"] // 5),
                                             seed=demo.seed))
        run_json = evaluate(out / "final", valid / "queries.jsonl", out / "eval", demo)
        after = {("shapes", m): overall(run_json, m, demo.seed) for m in METRICS}
        tests = {r["metric"]: r for r in compare_benchmarks(base, after, seed=demo.seed)}
        row = {"row": name, **s, "seconds": round(time.time() - t0, 1)}
        for m in METRICS:
            r = tests[m]
            row[m] = {"after": after["shapes", m].value, "diff": (r["diff"], r["low"], r["high"]),
                      "p_holm": r["p_holm"]}
        rows.append(row)
        print(f"{name:>20}: " + "; ".join(f"{m} {row[m]['after']:.3f} ({row[m]['diff'][0]:+.3f} "
                                         f"[{row[m]['diff'][1]:+.3f}, {row[m]['diff'][2]:+.3f}], "
                                         f"p_holm {row[m]['p_holm']:.3g})" for m in METRICS)
              + f"; {row['seconds']:.0f} s", flush=True)
    result = {"run": str(run), "validation": {"seed": demo.seed + 2, "queries": args.n_valid, **leak},
              "sft": {m: base["shapes", m].value for m in METRICS}, "rows": rows,
              "machine": open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].split("\n")[0].strip()
              + f", {os.cpu_count()} cores", "date": datetime.date.today().isoformat()}
    path = Path(__file__).parent / "results" / f"dpo_tune_{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
