"""Text-to-image throughput of a full-size SD 1.5 pipeline: sdjax against diffusers (PyTorch) in one run.

  python bench/sampling.py                                   # 512 px, 25 steps, DDIM, batch 1 and 4
  python bench/sampling.py --size 256 --steps 2 --batch 1    # a quick check (minutes)
  python bench/sampling.py --skip_torch                      # sdjax rows only
  python bench/sampling.py --steps 1,3 --batch 1 --reps 1    # on a busy machine: fit s/step, estimate 25 steps

The pipeline is SD 1.5's architecture with random weights (`sdjax.convert.random.write_random_pipeline(...,
full_size=True)`, 1.07B parameters, float32), written once as a diffusers folder (--folder, ~4 GB) that both
sides load, so both run the same weights. Every image: one prompt and one negative prompt (classifier-free
guidance at 7.5, so each step is one U-Net call on 2B latents), --steps steps of --sampler (the same scheduler
family on both sides: sdjax's sampler of that name, diffusers' matching scheduler `from_config` of the
folder's), the VAE decode, float32 throughout.

sdjax: `sdjax.pipelines.txt2img` under one `jax.jit` (params an argument, not constants), compiled ahead of
time (`lower(...).compile()`, timed), then --warmup untimed calls and --reps timed calls (`block_until_ready`),
the median reported. The U-Net FLOPs per step are XLA's `cost_analysis()` of one U-Net call on [2B, h, w, 4]
compiled with XLA attention (chunked attention has loops, whose bodies XLA counts once).
diffusers: `StableDiffusionPipeline.from_pretrained(folder)`, `torch.set_num_threads(cores)`,
`torch.inference_mode()`, output_type="np"; one warm-up call with --torch_warmup_steps steps, then --reps timed
calls, the median reported.

With several --steps, every (batch, steps) case is timed, and a second table fits each implementation's time
as fixed + steps x per-step between the smallest and largest step count (the fixed part: text
encoder, VAE decode, per-call set-up) and estimates --target_steps from it.

Each implementation runs in its own subprocess, so the peak RSS (`getrusage` maxrss) is that implementation's
own (weights, loading, activations). torch and diffusers are optional: without them (or with --skip_torch)
only sdjax rows are printed.
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"
GUIDANCE = 7.5
# sdjax sampler -> diffusers scheduler class (the same algorithm; see sdjax.schedules._SAMPLER_OF_CLASS).
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "lms": "LMSDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def emit(**result) -> None:
  print("RESULT " + json.dumps(result), flush=True)


def ensure_pipeline(folder: str) -> None:
  """Write the random pipeline unless present; its tokenizer pads to 77 tokens as SD 1.5's does (the test
  fixture's tokenizer says model_max_length 16, and both sides pad to that)."""
  if not (os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isfile(
      os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))):
    from sdjax.convert.random import write_random_pipeline
    t0 = time.perf_counter()
    print(f"writing a random full-size SD 1.5 pipeline to {folder} ...", file=sys.stderr, flush=True)
    write_random_pipeline(folder, "sd1", tokenizer=os.path.join(ROOT, "tests/fixtures/models/tokenizer"),
                          full_size=True)
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  path = os.path.join(folder, "tokenizer", "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  if config.get("model_max_length") != 77:
    with open(path, "w") as f:
      json.dump({**config, "model_max_length": 77}, f, indent=2)


# --- sdjax ------------------------------------------------------------------------------------------

def unet_flops(sd, unet_params, b: int, context_len: int, size: int) -> float | None:
  """XLA's FLOPs of one guided U-Net call (2B latents: uncond + cond), compiled with XLA attention (chunked
  attention has loops, whose bodies XLA's cost analysis counts once). Compile only; nothing runs."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  h, w, c = sd.latent_shape(size, size)
  unet = sd.unet.clone(config=dataclasses.replace(sd.unet.config, attention_implementation="xla"))
  shapes = (jax.ShapeDtypeStruct((2 * b, h, w, c), jnp.float32), jax.ShapeDtypeStruct((2 * b,), jnp.float32),
            jax.ShapeDtypeStruct((2 * b, context_len, sd.unet.config.cross_attention_dim), jnp.float32))
  try:
    cost = jax.jit(lambda p, x, t, e: unet.apply({"params": p}, x, t, e)).lower(unet_params, *shapes).compile(
        ).cost_analysis()
  except Exception as e:  # best-effort
    print(f"  no U-Net cost analysis: {e}", file=sys.stderr)
    return None
  cost = [cost] if isinstance(cost, dict) else (cost or [])
  return sum(float(x.get("flops", 0.0)) for x in cost if x) or None


def run_sdjax(args, cases: list[tuple[int, int]]) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sdjax import pipelines
  from sdjax.convert import load_pipeline

  t0 = time.perf_counter()
  overrides = {"attention_implementation": args.attention} if args.attention else {}
  pipe = load_pipeline(args.folder, **overrides)
  sd, params = pipelines.from_components(pipe.models, pipe.schedule, model_type=pipe.model_type)
  tokenizers = [pipe.tokenizers["tokenizer"]]
  params = jax.device_put(params)
  del pipe
  load_s = time.perf_counter() - t0
  print(f"sdjax: loaded in {load_s:.0f} s (peak RSS {peak_rss_gib():.1f} GiB)", file=sys.stderr, flush=True)

  flops = {}
  for b, steps in cases:
    prompt = pipelines.Prompt(
        ids=pipelines.tokenize(tokenizers, sd.text_encoders, [PROMPT] * b),
        negative_ids=pipelines.tokenize(tokenizers, sd.text_encoders, [NEGATIVE] * b),
        guidance_scale=np.full((b,), GUIDANCE, np.float32))
    keys = jax.random.split(jax.random.key(0), b)

    def fn(params, prompt, keys):
      return pipelines.txt2img(sd, params, prompt, keys, height=args.size, width=args.size,
                               sampler=args.sampler, num_steps=steps)

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, prompt, keys).compile()
    compile_s = time.perf_counter() - t0
    print(f"sdjax batch {b}, {steps} steps: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)

    if b not in flops:
      flops[b] = unet_flops(sd, params["unet"], b, prompt.ids[0].shape[1], args.size)
    for i in range(args.warmup):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, prompt, keys))
      print(f"  warm-up {i + 1}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    times = []
    for i in range(args.reps):
      t0 = time.perf_counter()
      images = jax.block_until_ready(compiled(params, prompt, keys))
      times.append(time.perf_counter() - t0)
      print(f"  run {i + 1}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    assert images.shape == (b, args.size, args.size, 3) and bool(jnp.isfinite(images).all())
    emit(impl="sdjax", batch=b, steps=steps, times=times, compile_s=compile_s, load_s=load_s, unet_flops=flops[b],
         peak_rss_gib=peak_rss_gib(), load=os.getloadavg()[0])


# --- diffusers (PyTorch) ----------------------------------------------------------------------------

def run_torch(args, cases: list[tuple[int, int]]) -> None:
  import diffusers
  import torch

  torch.set_num_threads(os.cpu_count())
  t0 = time.perf_counter()
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                           requires_safety_checker=False, torch_dtype=torch.float32)
  pipe.scheduler = getattr(diffusers, SCHEDULERS[args.sampler]).from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  load_s = time.perf_counter() - t0
  print(f"diffusers: loaded in {load_s:.0f} s, {type(pipe.scheduler).__name__}, {torch.get_num_threads()} threads "
        f"(peak RSS {peak_rss_gib():.1f} GiB)", file=sys.stderr, flush=True)

  def call(b, steps):
    with torch.inference_mode():
      return pipe(prompt=[PROMPT] * b, negative_prompt=[NEGATIVE] * b, height=args.size, width=args.size,
                  num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images

  warm = set()
  for b, steps in cases:
    if b not in warm:
      warm.add(b)
      t0 = time.perf_counter()
      call(b, min(args.torch_warmup_steps, steps))
      print(f"diffusers batch {b}: warm-up ({min(args.torch_warmup_steps, steps)} steps) "
            f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    times = []
    for i in range(args.reps):
      t0 = time.perf_counter()
      images = call(b, steps)
      times.append(time.perf_counter() - t0)
      print(f"  run {i + 1}: {times[-1]:.1f} s", file=sys.stderr, flush=True)
    assert images.shape == (b, args.size, args.size, 3)
    emit(impl="diffusers", batch=b, steps=steps, times=times, compile_s=None, load_s=load_s, unet_flops=None,
         peak_rss_gib=peak_rss_gib(), load=os.getloadavg()[0])


# --- driver -----------------------------------------------------------------------------------------

def run_worker(impl: str, args) -> list[dict]:
  """Run one implementation in a subprocess; its progress goes to stderr, its RESULT lines are returned."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--folder", args.folder,
         "--batch", args.batch, "--steps", args.steps, "--size", str(args.size), "--sampler", args.sampler,
         "--reps", str(args.reps), "--warmup", str(args.warmup), "--torch_warmup_steps", str(args.torch_warmup_steps)]
  if args.attention:
    cmd += ["--attention", args.attention]
  results = []
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      if line.startswith("RESULT "):
        results.append(json.loads(line[len("RESULT "):]))
      print(line, end="", file=sys.stderr)  # the raw RESULT lines too, for the log
  if proc.returncode:
    print(f"{impl} worker exited with status {proc.returncode}", file=sys.stderr)
  return results


def versions(torch_ok: bool) -> str:
  import flax
  import jax
  out = [f"jax {jax.__version__}", f"flax {flax.__version__}"]
  if torch_ok:
    import diffusers
    import torch
    out += [f"torch {torch.__version__}", f"diffusers {diffusers.__version__}"]
  return ", ".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
  p.add_argument("--steps", default="25", help="comma-separated step counts; with two or more, the per-step "
                 "slope and fixed cost are fitted and --target_steps extrapolated")
  p.add_argument("--target_steps", type=int, default=25)
  p.add_argument("--size", type=int, default=512, help="image height and width (px)")
  p.add_argument("--sampler", default="ddim", choices=sorted(SCHEDULERS))
  p.add_argument("--reps", type=int, default=3, help="timed calls per case (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed sdjax calls after compiling")
  p.add_argument("--torch_warmup_steps", type=int, default=2, help="steps of diffusers' untimed warm-up call")
  p.add_argument("--attention", default=None, choices=("xla", "chunked"),
                 help="sdjax U-Net attention (default: automatic, which is xla at 64x64 latents on CPU)")
  p.add_argument("--folder", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sdjax-bench-sd15"),
                 help="the random-weight pipeline folder (written if absent, ~4 GB)")
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--worker", choices=("sdjax", "diffusers"), help=argparse.SUPPRESS)
  args = p.parse_args()
  batches = [int(b) for b in args.batch.split(",")]
  step_counts = [int(n) for n in args.steps.split(",")]
  cases = [(b, n) for b in batches for n in step_counts]
  if args.worker:
    (run_sdjax if args.worker == "sdjax" else run_torch)(args, cases)
    return

  torch_ok = not args.skip_torch
  if torch_ok and not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
    print("torch or diffusers is not installed: sdjax rows only", file=sys.stderr)
    torch_ok = False
  ensure_pipeline(args.folder)
  load_start = os.getloadavg()
  t_start = time.perf_counter()
  print(f"{versions(torch_ok)}; {os.cpu_count()} CPU cores; load average (1, 5, 15 min) at start: "
        + ", ".join(f"{x:.2f}" for x in load_start), flush=True)
  results = run_worker("sdjax", args)
  if torch_ok:
    results += run_worker("diffusers", args)
  for r in results:
    r["s"] = statistics.median(r["times"])

  def ratio(rows, r, key):  # diffusers' time over sdjax's (= sdjax images/s over diffusers') in the same case
    other = [o for o in rows if o["impl"] == "diffusers" and (o["batch"], o["steps"]) == (r["batch"], r["steps"])]
    return f"{other[0][key] / r[key]:.2f}" if r["impl"] == "sdjax" and other else "—"

  rows = []
  for r in results:
    compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "—"
    gflops = f"{r['unet_flops'] / 1e9:,.1f}" if r["unet_flops"] else "—"
    rows.append([r["impl"], r["batch"], r["steps"], f"{r['s']:.1f}", f"{r['batch'] / r['s']:.4f}", compile_s,
                 ratio(results, r, "s"), len(r["times"]), f"{r['peak_rss_gib']:.1f}", gflops])
  print(f"\n## txt2img, random-weight SD 1.5 (1.07B params, float32), {args.size}x{args.size}, {args.sampler}, "
        f"guidance {GUIDANCE} (negative prompt), sdjax attention {args.attention or 'automatic'}\n")
  print(table(["impl", "batch", "steps", "s/batch", "images/s", "compile s", "ratio (sdjax/diffusers images/s)",
               "timed runs", "peak RSS GiB", "U-Net GFLOPs/step (2B latents)"], rows))

  if len(step_counts) > 1:  # per-step cost from the slope, fixed cost (text encoder, VAE decode) the intercept
    lo, hi = min(step_counts), max(step_counts)
    est = []
    for r in results:
      if r["steps"] != hi:
        continue
      r_lo = [o for o in results if (o["impl"], o["batch"], o["steps"]) == (r["impl"], r["batch"], lo)]
      if not r_lo:
        continue
      per_step = (r["s"] - r_lo[0]["s"]) / (hi - lo)
      fixed = r_lo[0]["s"] - lo * per_step
      est.append({"impl": r["impl"], "batch": r["batch"], "steps": None, "per_step": per_step, "fixed": fixed,
                  "s": fixed + args.target_steps * per_step})
    print(f"\nFrom the {lo}- and {hi}-step times: s per step (slope), fixed s (intercept: text encoder, VAE decode, "
          f"set-up) and the estimate for {args.target_steps} steps:\n")
    print(table(["impl", "batch", "s/step", "fixed s", f"est. s/batch at {args.target_steps} steps", "est. images/s",
                 "ratio (sdjax/diffusers images/s)", "ratio per step"],
                [[e["impl"], e["batch"], f"{e['per_step']:.2f}", f"{e['fixed']:.1f}", f"{e['s']:.1f}",
                  f"{e['batch'] / e['s']:.4f}", ratio(est, e, "s"), ratio(est, e, "per_step")] for e in est]))
  print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average (1, 5, 15 min) at the end: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()))

if __name__ == "__main__":
  main()
