"""Input-pipeline throughput on this CPU, and whether the default job's training loop waits for its data.

  python bench/data.py                   # all tables (about 6 minutes on 2 cores)
  python bench/data.py --quick           # smoke test, < 60 s: tiny images, few batches, configs/default.py:tiny
  python bench/data.py --skip-train      # loader tables only
  python bench/data.py --cache /tmp/d    # where the synthetic photos and their records live (reused)

Dataset: --num-images synthetic photo-like JPEGs (quality 90: smooth colour gradients, soft-edged shapes,
sensor-like noise, so decoding costs what a photo of that size costs) per resolution R, at a 4:3 source
size of 1.5R x 1.125R (384x288 for 256 px, 768x576 for 512 px), each with a .txt caption. They are written
once into --cache and converted with `sdjax.data.prepare.prepare` (timed on every run).

prepare: images/s of `prepare.prepare` (read, fully decode, write ArrayRecord shards; its default 8 threads).

loader: `input_pipeline.pipeline_from_config` on the records (resize the shorter side to R, random crop,
random flip; global batch --batch-size, --threads reader threads, prefetch 2), then `Pipeline.iterator(0)`:
one untimed batch, then images/s over --batches batches (the dataset is small, so that is several epochs;
grain reshuffles each). Median of --runs runs; "cores busy" is the process CPU time over wall time. Also a
row with caption tokenization (tests/fixtures/models/tokenizer, a CLIP BPE tokenizer) and the default job's
bundled 28x28 MNIST digits (configs/default.py's data group, batch 64, its 4 threads).

stages: where one example's time goes, serially in the main thread (no grain; median of --runs passes after an
untimed one): reading and msgpack-decoding the record, then `preprocess.process_image`'s steps one at a time
(decode, resize + crop, to float32 in [-1, 1]), the whole `ExampleTransform` (those plus flip and
tokenization), stacking a batch and `parallel.global_batch` (placing it on the devices), per image; "serial
images/s" is one thread doing read + transform + stack + place.

train: configs/default.py's jitted train step (`sdjax.train.trainer.Trainer`, batch 64) fed from batches
built and placed on the devices beforehand ("in memory") or from the real loader, `next(iterator)` +
`parallel.global_batch` every step as `sdjax.train.trainer.train` does. Two timings each: the median
of --steps steps with `block_until_ready` after every step (so a batch's host-side cost is on the critical
path), and the loop as `train` runs it (no sync per step; total wall time / steps). --rounds rounds
alternate the two feeds so that load from other processes hits both alike.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from sdjax import parallel  # noqa: E402
from sdjax.data import input_pipeline, prepare, preprocess  # noqa: E402
from sdjax.data.pipeline import stack  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "tests", "fixtures", "models", "tokenizer")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown")
SHAPES = ("circle", "square", "triangle", "stripe", "blob")
SCENES = ("on a gradient background", "in soft light", "at dusk", "on a table", "in a field", "under a sky")


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def source_size(resolution: int) -> tuple[int, int]:
  """(width, height) of the 4:3 source photos for `resolution`: 1.5R x 1.125R."""
  return resolution * 3 // 2, resolution * 9 // 8


# --- the synthetic photos ---------------------------------------------------------------------------

def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
  """A photo-like RGB image (gradient, soft shapes, noise) and a caption that describes it."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
  ramp = rng.uniform(-120, 120, (2, 3)).astype(np.float32)
  base = rng.uniform(60, 200, 3).astype(np.float32) + xx[..., None] * ramp[0] + yy[..., None] * ramp[1]
  freq, phase = rng.uniform(2, 8, 2), rng.uniform(0, 2 * np.pi, 2)
  base += 18 * (np.sin(freq[0] * np.pi * xx + phase[0]) * np.cos(freq[1] * np.pi * yy + phase[1]))[..., None]
  img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  layer = img.copy()
  draw = ImageDraw.Draw(layer)
  words = []
  for _ in range(int(rng.integers(4, 10))):
    colour = int(rng.integers(len(COLOURS)))
    shape = int(rng.integers(len(SHAPES)))
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    r = rng.uniform(0.05, 0.3) * min(width, height)
    box = (cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5))
    if SHAPES[shape] in ("circle", "blob"):
      draw.ellipse(box, fill=fill)
    elif SHAPES[shape] == "triangle":
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif SHAPES[shape] == "stripe":
      draw.line([(cx - 2 * r, cy - r), (cx + 2 * r, cy + r)], fill=fill, width=max(2, int(r / 4)))
    else:
      draw.rectangle(box, fill=fill)
    words.append(f"a {COLOURS[colour]} {SHAPES[shape]}")
  img = Image.blend(img, layer.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))), 0.85)
  noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
  img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
  caption = "a photo of " + ", ".join(words[:-1]) + f" and {words[-1]} {SCENES[int(rng.integers(len(SCENES)))]}"
  return img, caption


def write_photos(folder: str, n: int, width: int, height: int) -> float:
  """n JPEGs (quality 90) with .txt captions in `folder`, unless already there; returns the mean file KiB."""
  done = os.path.join(folder, "DONE")
  if not os.path.exists(done):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
      img, caption = synthetic_photo(rng, width, height)
      img.save(os.path.join(folder, f"{i:05d}.jpg"), "JPEG", quality=90)
      with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
        f.write(caption)
    open(done, "w").close()
  sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".jpg")]
  return float(np.mean(sizes)) / 1024


def build_dataset(cache: str, resolution: int, n: int) -> dict:
  """Synthetic photos for `resolution` (reused) and their records (prepared now, timed)."""
  width, height = source_size(resolution)
  root = os.path.join(cache, f"photos_{width}x{height}_n{n}")
  t0 = time.perf_counter()
  kib = write_photos(os.path.join(root, "images"), n, width, height)
  generate_s = time.perf_counter() - t0
  items = list(prepare.scan_folder(os.path.join(root, "images")))
  records = os.path.join(root, "records")
  t0 = time.perf_counter()
  meta = prepare.prepare(records, items, progress=False, source="bench/data.py")
  prepare_s = time.perf_counter() - t0
  if meta["num_examples"] != n:
    raise RuntimeError(f"prepare wrote {meta['num_examples']} of {n} examples: {meta['skipped_reasons']}")
  return {"resolution": resolution, "width": width, "height": height, "n": n, "jpeg_kib": kib,
          "generate_s": generate_s, "prepare_s": prepare_s, "prepare_images_per_s": n / prepare_s,
          "records": records}


# --- loader throughput ------------------------------------------------------------------------------

def close(batches) -> None:
  batches.close()


def loader_rate(cfg: dict, *, channels: int, batch_size: int, num_batches: int, label: bool = False) -> dict:
  """images/s of `Pipeline.iterator(0)` over num_batches batches after one untimed batch."""
  data = input_pipeline.pipeline_from_config(cfg, channels=channels, global_batch_size=batch_size, seed=0,
                                             label=label)
  batches = data.iterator(0)
  t0 = time.perf_counter()
  first = next(batches)
  first_s = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(batches)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  close(batches)
  time.sleep(0.2)  # let cancelled reads drain before the next measurement
  return {"images_per_s": num_batches * batch_size / wall, "cores_busy": cpu / wall, "first_batch_s": first_s,
          "batch_mib": sum(v.nbytes for v in first.values()) / 2 ** 20,
          "epochs": num_batches * batch_size / data.num_examples}


def median_rate(cfg: dict, runs: int, **kwargs) -> dict:
  results = [loader_rate(cfg, **kwargs) for _ in range(runs)]
  best = sorted(results, key=lambda r: r["images_per_s"])[len(results) // 2]
  return {**best, "runs": [round(r["images_per_s"], 1) for r in results]}


def records_cfg(records: str, resolution: int, threads: int, tokenizer: str = "") -> dict:
  return {"source": "records", "path": records, "resolution": resolution, "crop": "random", "random_flip": True,
          "tokenizer": tokenizer, "caption_dropout": 0.1 if tokenizer else 0.0, "num_threads": threads,
          "prefetch": 2}


def stage_costs(cfg: dict, *, channels: int, batch_size: int, n: int, repeats: int, label: bool = False) -> dict:
  """Serial per-image milliseconds of the loader's stages, in this thread (no grain): the median of `repeats`
  passes over n examples after an untimed one (a fresh process's first large allocations are several times
  slower: the first pass's stack of a 512 px float32 batch took 15x longer than later ones)."""
  data = input_pipeline.pipeline_from_config(cfg, channels=channels, global_batch_size=batch_size, seed=0,
                                             label=label)
  sharding = parallel.batch_sharding(parallel.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1}))
  passes = [stage_pass(data, cfg, sharding, channels, n) for _ in range(repeats + 1)][1:]
  return {k: None if passes[0][k] is None else statistics.median(p[k] for p in passes) for k in passes[0]}


def stage_pass(data, cfg: dict, sharding, channels: int, n: int) -> dict:
  batch_size = data.local_batch_size
  idx = [i % data.num_examples for i in range(n)]
  t0 = time.perf_counter()
  raw = [data.source[i] for i in idx]
  read = time.perf_counter() - t0
  decode = resize = to_float = None
  if isinstance(raw[0]["image"], bytes) and cfg.get("resolution"):
    # The steps of preprocess.process_image, one at a time (no flip or crop: they cost ~0.1 ms).
    res, decode, resize, to_float = int(cfg["resolution"]), 0.0, 0.0, 0.0
    for ex in raw:
      t0 = time.perf_counter()
      img = preprocess.to_mode(preprocess.decode_image(ex["image"]), channels)
      t1 = time.perf_counter()
      h, w = preprocess.resized_size(img.height, img.width, res)
      img = img.resize((w, h), Image.BILINEAR).crop((0, 0, res, res))
      t2 = time.perf_counter()
      np.asarray(img, np.float32) / 127.5 - 1.0
      t3 = time.perf_counter()
      decode, resize, to_float = decode + t1 - t0, resize + t2 - t1, to_float + t3 - t2
  t0 = time.perf_counter()
  out = [data.transform(ex, np.random.default_rng(i)) for i, ex in enumerate(raw)]
  transform = time.perf_counter() - t0
  groups = [out[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [out]
  t0 = time.perf_counter()
  stacked = [stack(g) for g in groups]
  stack_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in stacked:
    jax.block_until_ready(parallel.global_batch(b, sharding))
  place_s = time.perf_counter() - t0
  per = lambda s, k: None if s is None else 1e3 * s / k
  stacked_n = sum(len(g) for g in groups)
  return {"read_ms": per(read, n), "decode_ms": per(decode, n), "resize_ms": per(resize, n),
          "to_float_ms": per(to_float, n), "transform_ms": per(transform, n), "stack_ms": per(stack_s, stacked_n),
          "place_ms": per(place_s, stacked_n), "serial_images_per_s": n / (read + transform + stack_s + place_s)}


def fmt(x, spec=".2f") -> str:
  return "—" if x is None else format(x, spec)


def stage_row(name: str, s: dict, spec: str = ".2f") -> list:
  keys = ("read_ms", "decode_ms", "resize_ms", "to_float_ms", "transform_ms", "stack_ms", "place_ms")
  return [name] + [fmt(s[k], spec) for k in keys] + [f"{s['serial_images_per_s']:.0f}"]


def loader_tables(args, datasets: list[dict]) -> str:
  from configs.default import get_config

  rows, stage_rows = [], []
  for d in datasets:
    res = d["resolution"]
    src = f"{d['width']}x{d['height']} JPEG"
    for threads in args.threads:
      r = median_rate(records_cfg(d["records"], res, threads), args.runs, channels=3, batch_size=args.batch_size,
                      num_batches=args.batches)
      print(json.dumps({"case": "loader", "resolution": res, "threads": threads, **r}), flush=True)
      rows.append([f"{res} px", src, threads, "no", args.batch_size, f"{r['images_per_s']:.0f}",
                   f"{r['images_per_s'] / args.batch_size:.1f}", f"{r['cores_busy']:.2f}",
                   f"{r['batch_mib']:.0f}"])
    s = stage_costs(records_cfg(d["records"], res, 1), channels=3, batch_size=args.batch_size, n=args.stage_images,
                    repeats=args.runs)
    print(json.dumps({"case": "stages", "resolution": res, **s}), flush=True)
    stage_rows.append(stage_row(f"{res} px ({src})", s))
  d = datasets[0]
  threads = max(args.threads)
  cfg = records_cfg(d["records"], d["resolution"], threads, TOKENIZER)
  r = median_rate(cfg, args.runs, channels=3, batch_size=args.batch_size, num_batches=args.batches)
  print(json.dumps({"case": "loader+tokenizer", "resolution": d["resolution"], "threads": threads, **r}),
        flush=True)
  rows.append([f"{d['resolution']} px", f"{d['width']}x{d['height']} JPEG", threads, "yes (CLIP BPE, 77)",
               args.batch_size, f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / args.batch_size:.1f}",
               f"{r['cores_busy']:.2f}", f"{r['batch_mib']:.0f}"])
  s = stage_costs(cfg, channels=3, batch_size=args.batch_size, n=args.stage_images, repeats=args.runs)
  stage_rows.append(stage_row(f"{d['resolution']} px + tokenizer", s))

  config = get_config("tiny" if args.quick else None)
  mnist = config.data.to_dict()
  batch = int(config.train.batch_size)
  r = median_rate(mnist, args.runs, channels=int(config.model.in_channels), batch_size=batch,
                  num_batches=args.batches * (2 if args.quick else 4), label=True)
  print(json.dumps({"case": "loader:bundled", **r}), flush=True)
  rows.append(["28 px (default job)", "bundled MNIST, TFDS ArrayRecord", mnist["num_threads"], "no", batch,
               f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / batch:.1f}", f"{r['cores_busy']:.2f}",
               f"{r['batch_mib']:.1f}"])
  s = stage_costs(mnist, channels=int(config.model.in_channels), batch_size=batch, n=args.stage_images * 2,
                  repeats=args.runs, label=True)
  stage_rows.append(stage_row("28 px MNIST (default job)", s, ".3f"))

  prep = table(["source photos", "JPEG KiB (mean)", "images", "prepare s", "prepare images/s"],
               [[f"{d['width']}x{d['height']}", f"{d['jpeg_kib']:.0f}", d["n"], f"{d['prepare_s']:.2f}",
                 f"{d['prepare_images_per_s']:.0f}"] for d in datasets])
  load = table(["resolution", "source", "threads", "captions", "batch", "images/s", "batches/s", "cores busy",
                "batch MiB"], rows)
  stages = table(["case", "read record", "decode", "resize + crop", "to float", "transform (all)", "stack",
                  "place on devices", "serial images/s"], stage_rows)
  return (f"### prepare\n\n{prep}\n\n### loader (median of {args.runs} runs of {args.batches} batches after 1; "
          f"random crop + flip, prefetch 2)\n\n{load}\n\n### per-image stages, serial (ms/image; "
          f"\"transform (all)\" is the pipeline's whole transform: decode, resize, flip, crop, to float, "
          f"tokenize)\n\n{stages}")


# --- the default job: in-memory batches vs the real loader -----------------------------------------

def time_default_job(args) -> str:
  from configs.default import get_config
  from sdjax.train.trainer import Trainer

  config = get_config("tiny" if args.quick else None)
  exp = Trainer.from_config(config)
  batch_size = int(config.train.batch_size)
  data = input_pipeline.pipeline_from_config(config.data, channels=exp.task.model_config.in_channels,
                                             global_batch_size=batch_size, seed=int(config.seed), label=True)
  in_memory = [parallel.global_batch(data.batch(s), exp.batch_sharding) for s in range(args.steps)]
  jax.block_until_ready(in_memory)
  state = exp.init_state()
  t0 = time.perf_counter()
  step = exp.train_step().lower(state, in_memory[0]).compile()
  compile_s = time.perf_counter() - t0
  batches = data.iterator(0)

  def run(feed: str, steps: int, sync: bool) -> tuple[list[float], float]:
    nonlocal state
    times = []
    t_all = time.perf_counter()
    for i in range(steps):
      t0 = time.perf_counter()
      if feed == "memory":
        batch = in_memory[i % len(in_memory)]
      else:
        batch = parallel.global_batch(next(batches), exp.batch_sharding)
      state, metrics = step(state, batch)
      if sync:
        jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    jax.block_until_ready(state)
    return times, (time.perf_counter() - t_all) / steps

  for feed in ("memory", "loader"):
    run(feed, args.warmup, True)
  synced = {"memory": [], "loader": []}
  loop = {"memory": [], "loader": []}
  for r in range(args.rounds):
    order = ("memory", "loader") if r % 2 == 0 else ("loader", "memory")
    for feed in order:
      synced[feed] += run(feed, args.steps, True)[0]
      loop[feed].append(run(feed, args.steps, False)[1])
  close(batches)
  out = {feed: {"synced_s": statistics.median(synced[feed]), "loop_s": statistics.median(loop[feed])}
         for feed in synced}
  print(json.dumps({"case": "default job", "compile_s": compile_s, "batch": batch_size, **out,
                    "loop_rounds": loop}), flush=True)
  base = out["memory"]
  names = {"memory": "in-memory batches (placed on the devices beforehand)",
           "loader": "real loader (`next(iterator)` + `parallel.global_batch` each step)"}
  rows = []
  for feed in ("memory", "loader"):
    o = out[feed]
    rows.append([names[feed], f"{o['synced_s']:.3f}", f"{o['synced_s'] / base['synced_s']:.2f}",
                 f"{o['loop_s']:.3f}", f"{o['loop_s'] / base['loop_s']:.2f}", f"{batch_size / o['loop_s']:.0f}"])
  variant = ":tiny" if args.quick else ""
  return (f"configs/default.py{variant}, batch {batch_size}, train step compile {compile_s:.1f} s; "
          f"{args.rounds} rounds x {args.steps} steps per feed\n\n"
          + table(["feed", "s/step, synced (median)", "× in-memory", "s/step, as the loop runs", "× in-memory",
                   "images/s (loop)"], rows))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--quick", action="store_true", help="tiny images, few batches, configs/default.py:tiny; < 60 s")
  p.add_argument("--resolutions", nargs="+", type=int, default=[256, 512])
  p.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4], help="grain reader threads per loader row")
  p.add_argument("--batch-size", type=int, default=32, help="loader rows: global batch")
  p.add_argument("--batches", type=int, default=40, help="loader rows: timed batches per run")
  p.add_argument("--runs", type=int, default=3, help="loader rows: runs (median); stage rows: timed passes")
  p.add_argument("--num-images", type=int, default=256, help="synthetic photos per resolution")
  p.add_argument("--stage-images", type=int, default=64, help="images timed serially per stage row")
  p.add_argument("--steps", type=int, default=20, help="train: steps per feed and round")
  p.add_argument("--warmup", type=int, default=3, help="train: untimed steps per feed after the compile")
  p.add_argument("--rounds", type=int, default=2, help="train: rounds alternating the two feeds")
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sdjax_bench_data"),
                 help="folder for the synthetic photos (kept and reused) and their records")
  p.add_argument("--skip-loader", action="store_true", help="only the default job's train step")
  p.add_argument("--skip-train", action="store_true", help="only the dataset and loader tables")
  args = p.parse_args()
  if args.quick:
    args.resolutions, args.threads, args.batch_size, args.batches, args.runs = [64], [1, 2], 8, 4, 1
    args.num_images, args.stage_images, args.steps, args.warmup, args.rounds = 32, 16, 3, 1, 1
  t_start = time.perf_counter()
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}")
  if not args.skip_loader:
    datasets = []
    for res in args.resolutions:
      d = build_dataset(args.cache, res, args.num_images)
      print(json.dumps({"case": "prepare", **d}), flush=True)
      datasets.append(d)
    print("\n## Input pipeline: loader throughput\n\n" + loader_tables(args, datasets), flush=True)
  if not args.skip_train:
    print("\n## Input pipeline: the default job's train step, in-memory batches vs the real loader\n\n"
          + time_default_job(args), flush=True)
  print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
