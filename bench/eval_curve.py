"""The quality-vs-step curve of a run from its in-training evaluations (config.eval): a table and a picture.

  python train.py --config.eval.every_steps=450 --workdir runs/curve     # the default job, 4 evaluations
  python bench/eval_curve.py --workdir runs/curve --png docs/default_fid_curve.png

Reads the `eval/*` records of WORKDIR/metrics.jsonl (written by sdjax.train.trainer at every
config.eval.every_steps) and the training loss logged nearest before each, prints a markdown table and, with
--png, draws FID and the other metrics against the step (matplotlib, a bench-only dependency).
"""
from __future__ import annotations

import argparse
import json
import os


def read(workdir: str) -> tuple[list[dict], dict[int, float]]:
  evals, losses = [], {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if any(k.startswith("eval/") for k in record):
        evals.append(record)
      elif "loss" in record:
        losses[int(record["step"])] = float(record["loss"])
  if not evals:
    raise SystemExit(f"{workdir}/metrics.jsonl has no eval/* records: train with --config.eval.every_steps=N")
  return evals, losses


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--png", help="write the curve here")
  args = p.parse_args()
  evals, losses = read(args.workdir)
  names = [k for k in evals[0] if k.startswith("eval/") and k != "eval/seconds"]
  print("| step | train loss | " + " | ".join(n[5:] for n in names) + " | eval s |")
  print("|---|---|" + "---|" * len(names) + "---|")
  for r in evals:
    step = int(r["step"])
    before = [s for s in losses if s <= step]
    loss = f"{losses[max(before)]:.4f}" if before else "—"
    print(f"| {step} | {loss} | " + " | ".join(f"{r[n]:.4g}" for n in names) + f" | {r['eval/seconds']:.1f} |")
  if args.png:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [int(r["step"]) for r in evals]
    fid_name = next((n for n in names if n.endswith("fid")), names[0])
    others = [n for n in names if n != fid_name]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, [r[fid_name] for r in evals], "o-", color="tab:red", label=fid_name[5:])
    ax.set_xlabel("training step")
    ax.set_ylabel(fid_name[5:], color="tab:red")
    ax.set_yscale("log")
    if others:
      ax2 = ax.twinx()
      for n in others:
        ax2.plot(steps, [r[n] for r in evals], "s--", label=n[5:])
      ax2.set_ylabel(", ".join(n[5:] for n in others))
      ax2.set_ylim(0, 1.02)
      ax2.legend(loc="center right", fontsize=8)
    ax.set_title(f"{os.path.basename(os.path.normpath(args.workdir))}: in-training evaluation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
  main()
