"""Summarise the canvas-length sweep (benchmarks/canvas_sweep.sh): one markdown row per canvas length, then the
JSON of all rows. Reads benchmarks/results/canvas_sweep/c*.json (written by `dgemma eval --out`)."""

import json
import sys
from pathlib import Path

KEYS = [("val_diffusion_ce_t0.5", "diff CE t=0.5", ".3f"), ("val_ar_nll", "AR NLL", ".3f"),
        ("parse_rate_diffusion", "parse diff", ".2f"), ("parse_rate_ar", "parse AR", ".2f"),
        ("judge_ppl_diffusion", "judge ppl diff", ".0f"), ("judge_ppl_ar", "judge ppl AR", ".1f"),
        ("distinct_2_diffusion", "distinct-2 diff", ".2f"), ("passes_per_token_diffusion", "passes/token", ".3f"),
        ("tokens_per_s_diffusion", "tok/s diff", ".0f"), ("tokens_per_s_ar", "tok/s AR", ".0f")]


def main(folder: str = "benchmarks/results/canvas_sweep") -> None:
    rows = []
    for f in sorted(Path(folder).glob("c*.json"), key=lambda p: int(p.stem[1:])):
        d = json.loads(f.read_text())
        rows.append({"canvas": int(f.stem[1:]), "steps": d.get("diffusion_steps_max"),
                     **{k: d.get(k) for k, _, _ in KEYS}})
    print("| canvas | steps | " + " | ".join(h for _, h, _ in KEYS) + " |")
    print("|" + "---|" * (len(KEYS) + 2))
    for r in rows:
        cells = [f"{r[k]:{fmt}}" if isinstance(r[k], (int, float)) else "-" for k, _, fmt in KEYS]
        print(f"| {r['canvas']} | {r['steps']} | " + " | ".join(cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
