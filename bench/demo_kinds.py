"""Per question kind: how many held-out items a demo run's policy gets right and hallucinates on, before and after MM-DPO.

The demo's summary tests accuracy and hallucination over all held-out items and per category (long, short, MCQ,
safety, video). This splits them by the world's question kinds (harmful, benign, where, MCQ, motion, colour, count,
describe), to show which answers MM-DPO changes:

    .venv/bin/python bench/demo_kinds.py runs/demo
"""
from __future__ import annotations

import json, sys
from collections import defaultdict
from pathlib import Path

from mmrlhf.evaluate import run_scores


def kind_counts(run:Path) -> dict:
    "{kind: {items, accuracy: [before, after], hallucination: [before, after]}} of a finished demo run."
    kind = {}
    for line in open(run / "world" / "test" / "queries.jsonl"):
        q = json.loads(line); kind[q["id"]] = q["truth"]["kind"]
    table = defaultdict(lambda: {"items": 0, "accuracy": [0, 0], "hallucination": [0, 0]})
    for j, side in enumerate(("before", "after")):
        scores = run_scores(json.loads((run / "eval" / side / "run.json").read_text()))
        for (_, metric), s in scores.items():
            if metric not in ("accuracy", "hallucination"): continue
            for i, x in zip(s.ids, s.outcomes):
                table[kind[i]][metric][j] += int(x)
                if j == 0 and metric == "accuracy": table[kind[i]]["items"] += 1
    return dict(sorted(table.items()))


if __name__ == "__main__":
    t = kind_counts(Path(sys.argv[1]))
    print("| question kind (items) | accuracy, before → after | hallucination, before → after |")
    print("|---|---|---|")
    for k, r in t.items():
        (a0, a1), (h0, h1) = r["accuracy"], r["hallucination"]
        print(f"| {k} ({r['items']}) | {a0} → {a1} | {h0} → {h1} |")
