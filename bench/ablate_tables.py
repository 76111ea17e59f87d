"""The README's ablation tables, as markdown, from an `mmrlhf ablate` results file.

    .venv/bin/python bench/ablate_tables.py runs/demo/ablate/results.json
    .venv/bin/python bench/ablate_tables.py bench/results/ablate_2026-12-03.json   # a recorded run
"""
from __future__ import annotations

import json, sys


def pct(x:float) -> str: return f"{100 * x:.1f}%"
def pts(x:float) -> str: return f"{100 * x:+.1f}".replace("-", "−")
def pval(p:float) -> str: return f"{p:.2g}" if p < 0.995 else "1"
def msd(m:dict) -> str: return f"{pct(m['mean'])} ± {100 * m['sd']:.1f}"


def reward_table(r:dict) -> str:
    "Critique against score-only: mean ± sd over seeds, and the per-seed paired ACC tests."
    s = r["summary"]; lines = ["| reward model | ACC | ACC+ | critique − scalar, ACC per seed (Holm p) |",
                               "|---|---|---|---|"]
    tests = ", ".join(f"{pts(t['diff'])} ({pval(t['p_holm'])})" for t in r["tests"] if t["metric"] == "acc")
    for name, label in (("scalar", "score only"), ("critique", "critique, own critiques")):
        m = s[name]
        lines.append(f"| {label} | {msd(m['acc'])} | {msd(m['acc_plus'])} | "
                     f"{tests if name == 'critique' else ''} |")
    return "\n".join(lines)


def beta_table(r:dict) -> str:
    "Fixed, dynamic and implicit β: mean ± sd over seeds and the β each run trained with."
    s = r["summary"]; lines = ["| β | accuracy | hallucination | β in training (seed 0) |", "|---|---|---|---|"]
    labels = {"fixed": "fixed 0.1 (standard DPO)", "dynamic": "dynamic β(δ) (the paper)",
              "implicit": "implicit, batch-level (the release)"}
    for name, label in labels.items():
        m = s[name]; b = next(x["beta"] for x in r["rows"] if x["variant"] == name)
        lines.append(f"| {label} | {msd(m['accuracy'])} | {msd(m['hallucination'])} | "
                     f"{b['min']:.3f} to {b['max']:.3f}, median {b['median']:.3f} |")
    return "\n".join(lines)


def tests_table(r:dict) -> str:
    "Every paired test against fixed β: the difference, its interval and the Holm-adjusted p."
    lines = ["| variant | seed | metric | fixed → variant | difference [95% CI] | Holm p |",
             "|---|---|---|---|---|---|"]
    for t in r["tests"]:
        lines.append(f"| {t['variant']} | {t['seed']} | {t['metric']} | {pct(t['a'])} → {pct(t['b'])} | "
                     f"{pts(t['diff'])} [{pts(t['low'])}, {pts(t['high'])}] | {pval(t['p_holm'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    d = json.load(open(sys.argv[1])); d = d.get("results", d)
    if "reward" in d: print("reward\n" + reward_table(d["reward"]) + "\n")
    if "beta" in d: print("beta\n" + beta_table(d["beta"]) + "\n\n" + tests_table(d["beta"]) + "\n")
    if "grid" in d: print("grid\n" + tests_table(d["grid"]))
