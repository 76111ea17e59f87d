"""Why the demo's critique reward model scored at chance, and what fixed it: one setting changed at a time.

Every row trains a tiny LLaVA-OneVision reward model (random weights, the same seed) for the row's steps, 4 queries a
step, on 400 oracle-annotated queries of shapes world 0, and grades it on 200 held-out queries of world 1 (1,057
pairs), the critiques being the ones it writes itself (greedy, cut at the row's token limit):

- ACC / ACC+ of the rewards (95% bootstrap intervals over pairs / queries);
- verdict: the share of generated critiques whose three scores ("Helpfulness (4/5) ...") are the oracle's;
- precision / recall of the defects the critiques name against the world's own (`world.critique_quality`);
- and, for the score-only rows ("w/o Task 1"), ACC / ACC+ from the score head with no critique at all.

The rows, cumulative: `as before` is the demo as it was (a tokenizer trained without the annotators' words, so a
critique is ~144 tokens, cut at 32; 300 steps); then the whole critique generated; then a tokenizer that knows the
words (~56 tokens); then 900 and 1,500 steps; score-only at the same steps for comparison.

    OMP_NUM_THREADS=1 .venv/bin/python bench/critic.py                 # every row (about 17 minutes on one core)
    OMP_NUM_THREADS=1 .venv/bin/python bench/critic.py --rows fixed-900 scalar-900 --seed 1
"""
from __future__ import annotations

import argparse, contextlib, datetime, io, json, os, platform, re, tempfile, time
from pathlib import Path

import torch

from mmrlhf.configs import TrainRewardConfig
from mmrlhf.reward import (CritiqueRewardModel, RewardCollator, RewardConfig, RewardLossWeights, RewardTrainer,
                           generate_critiques, rewardbench_metrics, score_examples)
from mmrlhf.schema import DIMENSIONS
from mmrlhf.testbed import build_tiny_vlm, quiet_cpu_run
from mmrlhf.world import annotated_query, critique_quality, make_query, world_reward_examples, world_texts

# name -> (tokenizer knows the critiques' words, steps, longest generated critique, critique task on)
ROWS = {"as-before": (False, 300, 32, True), "whole-critique": (False, 300, 160, True),
        "tokenizer": (True, 300, 80, True), "fixed-900": (True, 900, 80, True),
        "fixed-1500": (True, 1500, 80, True), "scalar-300": (True, 300, 0, False),
        "scalar-900": (True, 900, 0, False), "scalar-1500": (True, 1500, 0, False)}
_VERDICT = re.compile(r"\((\d)/5\)")


def question_answer_texts(seed:int=0, n:int=500) -> list[str]:
    "The tokenizer corpus the test bed had before: questions, references and responses only."
    out = []
    for i in range(n):
        q = make_query(seed, i)
        out += [q.question, q.reference] + [r["text"] for r in q.responses]
    return out


def train(knows_words:bool, steps:int, critique:bool, train_set:list, seed:int, lr:float):
    "A tiny critique (or score-only) reward model trained on `train_set`."
    torch.manual_seed(seed)
    texts = world_texts(0, 500) if knows_words else question_answer_texts(0, 500)
    vlm, processor = build_tiny_vlm("llava_onevision", "tiny", texts=texts, seed=seed)
    model = CritiqueRewardModel(vlm, RewardConfig(vlm.config.text_config.hidden_size))
    cfg = TrainRewardConfig(out=tempfile.mkdtemp(), steps=steps, lr=lr, save_steps=10**9, seed=seed)
    args = cfg.training_arguments(save_strategy="no", logging_steps=steps)
    weights = RewardLossWeights(critique=1.0 if critique else 0.0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, loss_weights=weights,
                            reward_processor=processor, data_collator=RewardCollator(processor, use_critiques=critique))
    with contextlib.redirect_stdout(io.StringIO()): trainer.train()  # the Trainer's log lines
    return model.eval(), processor


def verdicts(critique:str) -> list[int]:
    "The three scores a critique states, in order."
    return [int(v) for v in _VERDICT.findall(critique)][:len(DIMENSIONS)]


def measure(name:str, seed:int, lr:float, n_train:int, n_test:int) -> dict:
    "One row: train, write critiques for the held-out world, grade rewards and critiques."
    knows, steps, tokens, critique = ROWS[name]
    train_set, test_set = world_reward_examples(0, n_train), world_reward_examples(1, n_test)
    t0 = time.time()
    model, processor = train(knows, steps, critique, train_set, seed, lr)
    row = {"row": name, "seed": seed, "steps": steps, "tokenizer_knows_critiques": knows,
           "critique_tokens": tokens, "train_seconds": round(time.time() - t0, 1)}
    if not critique:
        m = rewardbench_metrics(score_examples(model, processor, test_set, False))["all"]
        return row | {"acc": m["acc"], "acc_plus": m["acc_plus"]}
    oracle = [c for e in test_set for c in e.critiques]
    lengths = sorted(len(processor.tokenizer(c)["input_ids"]) for c in oracle)
    written = generate_critiques(model, processor, test_set, max_new_tokens=tokens)
    m = rewardbench_metrics(score_examples(model, processor, written, True))["all"]
    mine = [c for e in written for c in e.critiques]
    same = [verdicts(g) == verdicts(o) for g, o in zip(mine, oracle)]
    truth = [r.defects for i in range(n_test) for r in annotated_query(1, i).responses]
    q = critique_quality(list(zip(mine, truth)), seed)
    return row | {"acc": m["acc"], "acc_plus": m["acc_plus"], "verdict": sum(same) / len(same),
                  "precision": q["precision"], "recall": q["recall"],
                  "oracle_critique_tokens": {"median": lengths[len(lengths) // 2], "max": lengths[-1]},
                  "eval_seconds": round(time.time() - t0 - row["train_seconds"], 1)}


def _ci(v) -> str: return "—" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train", type=int, default=400, help="training queries (world 0)")
    p.add_argument("--test", type=int, default=200, help="held-out queries (world 1)")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/critic_<date>.json)")
    p.add_argument("--dry", action="store_true", help="2 steps, 8 + 4 queries: check that every row runs")
    a = p.parse_args()
    if a.dry:
        for k, (knows, _, tokens, crit) in ROWS.items(): ROWS[k] = (knows, 2, min(tokens, 8), crit)
        a.train, a.test, a.out = 8, 4, a.out or os.path.join(tempfile.mkdtemp(), "critic.json")
    quiet_cpu_run(); os.environ.setdefault("MMRLHF_PROGRESS", "0")
    rows = []
    for name in a.rows:
        rows.append(measure(name, a.seed, a.lr, a.train, a.test)); r = rows[-1]
        print(f"{name:15} steps {r['steps']:5}  ACC {_ci(r['acc'])}  ACC+ {_ci(r['acc_plus'])}  "
              f"verdict {r.get('verdict', float('nan')):.3f}  precision {_ci(r.get('precision'))}  "
              f"recall {_ci(r.get('recall'))}  ({r['train_seconds']:.0f} s)", flush=True)
    out = Path(a.out or f"bench/results/critic_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    meta = {"machine": cpu, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "command": "bench/critic.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()
                                                     if k not in ("rows", "out", "dry")), "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
