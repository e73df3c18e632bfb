"""Sample quality and speed of a trained default (MNIST) run.

  python bench/quality.py --workdir runs/default [--num 100] [--steps 50] [--guidance 3.0]
  python bench/quality.py --workdir runs/default --sweep ddim dpmpp_2m deis_3:karras --nfe 5 10   # per sampler

Trains scikit-learn classifiers (logistic regression; an RBF SVM as a stronger second judge) on the
real `train` split of the bundled digits, then reports their accuracy on the real `test` split (for
scale) and on `num` generated samples per class against the class each was conditioned on. Also
prints the run's training speed and compile times from its summary.json / metrics.jsonl.

Also reports, with sdjax's shipped digit classifier (sdjax.eval.digits, trained by tools/train_digit_features.py),
its accuracy on the same images and `digit_fid`: FID (MNIST classifier features), the Fréchet distance between the
classifier's 128-d features of the generated images and of the real `test` split. It is not Inception FID and not
comparable with published FIDs; lower is better, and `digit_fid_real_train` (the same number for as many real
`train` digits, class-balanced) is the floor at that sample size.
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
  p.add_argument("--sweep", nargs="+", metavar="SAMPLER[:karras]",
                 help="instead of one report: judge accuracy per sampler at each --nfe (':karras' adds Karras sigmas)")
  p.add_argument("--nfe", nargs="+", type=int, default=[5, 10], help="--sweep: model evaluations per image")
  args = p.parse_args()

  from sklearn.linear_model import LogisticRegression
  from sklearn.svm import SVC

  from sdjax.data import load_bundled
  from sdjax.eval import digits
  from sdjax.sampling import sample_run

  x_train, y_train = load_bundled("train")
  x_test, y_test = load_bundled("test")
  judges = {"logistic_regression": LogisticRegression(max_iter=2000, C=0.1),
            "rbf_svm": SVC(C=10.0, gamma="scale")}
  for clf in judges.values():
    clf.fit(features(x_train), y_train)

  if args.sweep:
    sweep(args, judges, x_test, y_test)
    return
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
  report["digit_classifier_real_test_acc"] = digits.digit_accuracy(x_test, y_test)
  report["digit_classifier_generated_acc"] = digits.digit_accuracy(gen["images"], gen["labels"])
  report["digit_fid"] = digits.digit_fid(gen["images"])  # FID (MNIST classifier features), not Inception FID
  report["digit_fid_real_train"] = digits.digit_fid(x_train[balanced(y_train, args.num)])

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


def balanced(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of the first `per_class` examples of each class, class by class."""
  return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])


def sweep(args, judges, x_test, y_test) -> None:
  """Judge accuracy of `--num` samples per class for each sampler at each NFE (the run's guidance scale unless
  --guidance), one compile per (sampler, NFE), and their digit_fid (FID with MNIST classifier features, not
  Inception FID) in one extra column per NFE. The NFE counts model evaluations per image as bench/samplers.py
  does (heun/kdpm2: 2 per step but the last; pndm: one more than its steps). Samplers that do not implement the
  run's clip_sample run without it."""
  import time

  from bench.samplers import steps_for
  from sdjax import pipelines, samplers
  from sdjax.eval import digits
  from sdjax.sampling import generate, load_run

  run, model = load_run(args.workdir)
  guidance = float(run.config.sample.guidance_scale if args.guidance is None else args.guidance)
  labels = pipelines.class_grid_labels(model.num_classes, args.num)
  real = {name: float(np.mean(clf.predict(features(x_test)) == y_test)) for name, clf in judges.items()}
  real["digit_classifier"] = digits.digit_accuracy(x_test, y_test)
  print(f"checkpoint step {run.step}, guidance {guidance}, {len(labels)} samples per cell; judges on the real "
        f"test split: " + ", ".join(f"{k} {v:.3f}" for k, v in real.items()))
  print("\n| sampler | " + " | ".join(f"NFE {n}: SVM / logreg" for n in args.nfe) + " | "
        + " | ".join(f"NFE {n}: digit FID" for n in args.nfe) + " |")
  print("|---|" + "---|" * (2 * len(args.nfe)))
  results = []
  for spec in args.sweep:
    name, _, option = spec.partition(":")
    schedule = model.schedule.replace(use_karras_sigmas=True) if option == "karras" else model.schedule
    try:
      samplers.check_schedule(schedule, name)
    except ValueError:  # e.g. clip_sample (the default run's DDPM setting) with a sigma-space sampler: off for it
      schedule = schedule.replace(clip_sample=False)
      samplers.check_schedule(schedule, name)
    cells, fid_cells = [], []
    for nfe in args.nfe:
      steps = steps_for(name, nfe)
      if steps is None:
        cells.append("—")
        fid_cells.append("—")
        continue
      t0 = time.perf_counter()
      images, _ = generate(model._replace(schedule=schedule), run.mesh, labels, seed=args.seed, sampler=name,
                           num_steps=steps, guidance_scale=guidance, batch_size=500, progress=False)
      acc = {k: float(np.mean(clf.predict(features(images)) == labels)) for k, clf in judges.items()}
      acc["digit_classifier"] = digits.digit_accuracy(images, labels)
      digit_fid = digits.digit_fid(images)
      results.append({"sampler": spec, "nfe": nfe, "steps": steps, **acc, "digit_fid": digit_fid,
                      "seconds": time.perf_counter() - t0})
      cells.append(f"{acc['rbf_svm']:.3f} / {acc['logistic_regression']:.3f}")
      fid_cells.append(f"{digit_fid:.2f}")
    print(f"| {spec} | " + " | ".join(cells + fid_cells) + " |", flush=True)
  with open(os.path.join(args.workdir, "quality_sweep.json"), "w") as f:
    json.dump({"checkpoint_step": run.step, "guidance": guidance, "num_per_class": args.num, "real": real,
               "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
