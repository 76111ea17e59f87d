"""The README's speed table from `bench/dpo_step.py` result files: one row per file, each method's ratio to TRL.

    python bench/dpo_step_table.py bench/results/dpo_step_{cpu,cpu_gc,cpu-long,cpu-long_gc}_2026-12-03.json
"""
import json, sys

METHODS = ('grouped', 'shared', 'packed')


def row(report):
    "One markdown row: the shape, TRL's pairs/s, each method's x TRL, the token-count limit, packed memory / TRL's."
    by = {r['method']: r for r in report['methods']}
    name = f"`--preset {report['preset_name']}`" + (" `--grad-checkpointing`" if report.get('grad_checkpointing') else "")
    shape = f"{report['image_tokens']:,} image tokens, P ≈ {report['prompt_tokens']:,.0f}, R ≈ {report['response_tokens']:.0f}"
    cells = [f"{name}: {shape}", f"{by['trl']['pairs_per_s']:.2f}"]
    for m in METHODS:
        r = by.get(m)
        cells.append('—' if r is None else ('cannot run' if r.get('skipped') else f"{r['x_trl']:.2f}"))
    cells.append(f"{report['token_count_ratio_limit']:.2f}")
    p = by.get('packed', {})
    cells.append('—' if p.get('memory_x_trl') is None else f"{p['memory_x_trl']:.2f}")
    return '| ' + ' | '.join(cells) + ' |'


def main(paths):
    print("| shape | TRL pairs/s | grouped × TRL | prefix-shared × TRL | packed × TRL | token-count limit | "
          "packed memory ÷ TRL |")
    print("|---|---|---|---|---|---|---|")
    for p in paths: print(row(json.load(open(p))))


if __name__ == '__main__':
    main(sys.argv[1:])
