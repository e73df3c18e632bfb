"""Sample quality and speed of a trained default (MNIST) run.

  python bench/quality.py --workdir runs/default [--num 100] [--steps 50] [--guidance 3.0]

Trains scikit-learn classifiers (logistic regression; an RBF SVM as a stronger second judge) on the
real `train` split of the bundled digits, then reports their accuracy on the real `test` split (for
scale) and on `num` generated samples per class against the class each was conditioned on. Also
prints the run's training speed and compile times from its summary.json / metrics.jsonl.
Requires the [test] extra (scikit-learn).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def features(images: np.ndarray) -> np.ndarray:
  return images.reshape(len(images), -1).astype(np.float32) / 255.0


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=100, help="generated samples per class")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--sampler", default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--seed", type=int, default=1234)
  args = p.parse_args()

  from sklearn.linear_model import LogisticRegression
  from sklearn.svm import SVC

  from sdjax.data import load_bundled
  from sdjax.sampling import sample_run

  x_train, y_train = load_bundled("train")
  x_test, y_test = load_bundled("test")
  judges = {"logistic_regression": LogisticRegression(max_iter=2000, C=0.1),
            "rbf_svm": SVC(C=10.0, gamma="scale")}
  for clf in judges.values():
    clf.fit(features(x_train), y_train)

  s = sample_run(args.workdir, seed=args.seed, num=args.num, steps=args.steps, sampler=args.sampler,
                 guidance_scale=args.guidance, batch_size=200, write_pngs=False)
  gen = np.load(os.path.join(s["outdir"], "samples.npz"))
  report = {"checkpoint_step": s["checkpoint_step"], "sampler": s["sampler"], "steps": s["steps"],
            "guidance_scale": s["guidance_scale"], "num_generated": int(len(gen["labels"])),
            "sampler_compile_s": s["compile_s"], "sampling_images_per_s": s["images_per_s"]}
  for name, clf in judges.items():
    report[f"{name}_real_test_acc"] = float(np.mean(clf.predict(features(x_test)) == y_test))
    pred = clf.predict(features(gen["images"]))
    report[f"{name}_generated_acc"] = float(np.mean(pred == gen["labels"]))
    report[f"{name}_generated_per_class"] = [float(np.mean(pred[gen["labels"] == k] == k)) for k in range(10)]

  summary_path = os.path.join(args.workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      run = json.load(f)
    report["train_step_compile_s"] = run.get("train_step_compile_s")
    report["train_wall_s"] = run.get("train_wall_s")
    report["steps_run"] = run.get("steps_run")
  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  steady = records[len(records) // 4:]  # skip the first quarter (compile, warm-up)
  report["steps_per_s"] = float(np.median([r["steps_per_s"] for r in steady]))
  report["images_per_s"] = float(np.median([r["images_per_s"] for r in steady]))
  report["final_loss"] = records[-1]["loss"]

  print("| metric | value |\n|---|---|")
  for k, v in report.items():
    if isinstance(v, float):
      v = f"{v:.4g}"
    elif isinstance(v, list):
      v = " ".join(f"{x:.2f}" for x in v)
    print(f"| {k} | {v} |")
  with open(os.path.join(args.workdir, "quality.json"), "w") as f:
    json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
