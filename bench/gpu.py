"""One prepared GPU benchmark (under 10 minutes on one H100/H200): SD 2 U-Net training and txt2img.

  python bench/gpu.py --out DIR                 # the full run on a GPU machine
  python bench/gpu.py --out DIR --quick         # tiny shapes, CPU or GPU: checks the script itself in a minute

What it measures, each in its own subprocess (results as JSON lines in DIR/results.jsonl, a table at the end):

1. kernels: each attention implementation (cudnn, pallas_gpu, chunked, xla) at SD 2's 512 px shapes (4,096
   self-attention tokens, 77 cross-attention keys, 5 heads of 64, batch 2, bf16): output and q/k/v gradients
   against a float32 XLA reference on the same bf16 inputs (relative Frobenius error), and its fwd+bwd time.
2. train: the SD 2 base U-Net (865M parameters, MLPerf's model) trained at 512 px on precomputed latents
   [B, 64, 64, 4] and text embeddings [B, 77, 1024] (random data), bf16 compute, float32 params, AdamW and
   EMA in the state: sdjax's train step (`sdjax.train.step.make_train_step` with the diffusion loss, as
   bench/train_step.py builds it), per attention implementation and per-chip batch. images/s from the wall
   time of --steps back-to-back steps after warm-up; MFU = model FLOPs per step (`sdjax.train.mfu`: XLA's
   count of the step traced with XLA attention and no remat) x steps/s over the table's peak
   (`sdjax.train.mfu.peak_tflops`: dense bf16 datasheet, 989 TFLOP/s for H100 SXM/H200).
3. txt2img: a full-size random-weight SD 2 base pipeline (written once as a diffusers folder both sides load),
   512 px, 25 DDIM steps, guidance 7.5 (two U-Net rows per image), batch 1 and 4: sdjax (`pipelines.txt2img`
   under one jit, U-Net in bf16) and diffusers (`torch_dtype=bfloat16`, its default SDPA attention).

Compiles are slow and CPU-bound while timing needs the GPU alone, so the train and txt2img cases compile first
in parallel processes that fill jax's persistent compilation cache (XLA_PYTHON_CLIENT_ALLOCATOR=platform: they
hold no GPU memory); the timed runs then go one at a time, each re-compiling from the cache. A global
--budget (seconds) skips what would not finish; every finished case is in results.jsonl either way.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# (attention, per-chip batch) in the order they are timed: what matters most first.
TRAIN_CASES = [("auto", 16), ("pallas_gpu", 16), ("auto", 32), ("auto", 8), ("chunked", 16), ("xla", 16)]
QUICK_TRAIN_CASES = [("auto", 2), ("chunked", 2)]
TXT_BATCHES = (1, 4)
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"


def emit(**result) -> None:
  print("RESULT " + json.dumps(result), flush=True)


def setup_cache(cache_dir: str) -> None:
  import jax
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def rel_err(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --- 1. attention kernels ---------------------------------------------------------------------------

def worker_kernels(args) -> None:
  import jax
  import jax.numpy as jnp
  from sdjax.models import attention
  b, h, d = 2, 5, 64
  lq = 256 if args.quick else 4096
  impls = ["chunked", "xla"] if jax.default_backend() != "gpu" else ["cudnn", "pallas_gpu", "chunked", "xla"]
  for lk in (lq, 77):
    keys = jax.random.split(jax.random.key(lk), 4)
    q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.bfloat16) for kk, n in zip(keys, (lq, lk, lk)))
    ct = jax.random.normal(keys[3], (b, lq, h, d), jnp.float32)

    def loss(q, k, v, impl):
      out = attention.dot_product_attention(q, k, v, implementation=impl)
      return jnp.sum(out.astype(jnp.float32) * ct), out

    def ref_loss(q, k, v):  # float32 XLA attention on the same (bf16-valued) inputs
      out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
      return jnp.sum(out * ct), out

    (_, ref), ref_g = jax.jit(jax.value_and_grad(ref_loss, (0, 1, 2), has_aux=True))(q, k, v)
    for impl in impls:
      try:
        fn = jax.jit(jax.value_and_grad(lambda q, k, v: loss(q, k, v, impl), (0, 1, 2), has_aux=True))
        (_, out), grads = jax.block_until_ready(fn(q, k, v))
        times = []
        for _ in range(10):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(q, k, v))
          times.append(time.perf_counter() - t0)
        emit(kind="kernel", impl=impl, lq=lq, lk=lk, out_err=rel_err(out, ref),
             grad_err=max(rel_err(g, r) for g, r in zip(grads, ref_g)), fwd_bwd_ms=1e3 * statistics.median(times))
      except Exception as e:  # report and go on: one implementation failing must not hide the others
        emit(kind="kernel", impl=impl, lq=lq, lk=lk, error=f"{type(e).__name__}: {str(e)[:300]}")


# --- 2. training ------------------------------------------------------------------------------------

def build_train(attention: str, batch: int, quick: bool):
  """(jitted step, abstract state, abstract batch, make_state, model FLOPs per step) of the SD 2 base U-Net."""
  import jax
  from flax import linen as nn

  import train_step as ts
  from sdjax import parallel, schedules
  from sdjax.models.unet import UNet, init_args
  from sdjax.train import mfu, optim, state as state_lib
  cfg, side = ts.unet_config("quick" if quick else "sd2_512", "none", None if attention == "auto" else attention)
  unet = UNet(cfg)
  init = lambda r: nn.meta.unbox(unet.init(r, *init_args(cfg)[:3], added_cond=init_args(cfg)[4])["params"])
  tx, lr = optim.make_optimizer(ts.OPTIM, 100_000)
  abstract = jax.eval_shape(lambda r: state_lib.create(init(r), tx, 0), jax.random.key(0))
  boxed = jax.eval_shape(lambda r: unet.init(r, *init_args(cfg)[:3], added_cond=init_args(cfg)[4])["params"],
                         jax.random.key(0))
  mesh = parallel.make_mesh({"data": 1})
  shardings = parallel.state_shardings(abstract, boxed, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch_sharding = parallel.batch_sharding(mesh)
  batch = ts.abstract_batch(cfg, side, batch, batch_sharding)
  schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  step, _, _ = ts.text_conditioned_step(unet, schedule, tx, lr)
  jitted = jax.jit(step, in_shardings=(shardings, {k: batch_sharding for k in batch}),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  make_state = jax.jit(lambda r: state_lib.create(init(r), tx, 0), out_shardings=shardings)
  return jitted, abstract_state, batch, make_state, (lambda: mfu.lowered_flops(step, abstract_state, batch))


def worker_train(args) -> None:
  import jax
  import numpy as np
  setup_cache(args.cache)
  attention, batch = args.case[0], int(args.case[1])
  t0 = time.perf_counter()
  jitted, abstract_state, abstract_batch, make_state, model_flops = build_train(attention, batch, args.quick)
  compiled = jitted.lower(abstract_state, abstract_batch).compile()
  compile_s = time.perf_counter() - t0
  if args.compile_only:
    make_state.lower(jax.random.key(0)).compile()  # the jitted init too (~2 min uncached on an H200 box)
    emit(kind="train_compile", attention=attention, batch=batch, compile_s=compile_s)
    return
  from sdjax.train import mfu
  mem = compiled.memory_analysis()
  flops = model_flops()
  state = make_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  data = {k: jax.device_put(rng.standard_normal(v.shape, np.float32), v.sharding) for k, v in abstract_batch.items()}
  for _ in range(args.warmup):
    state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  s = (time.perf_counter() - t0) / args.steps
  peak = mfu.peak_tflops()
  stats = jax.devices()[0].memory_stats() or {}
  emit(kind="train", attention=attention, batch=batch, s_per_step=s, images_per_s=batch / s,
       model_tflop_per_step=flops / 1e12, tflops=flops / s / 1e12, mfu=(flops / s / 1e12 / peak) if peak else None,
       peak_tflops=peak, compile_s=compile_s, loss=float(metrics["loss"]),
       temp_gib=mem.temp_size_in_bytes / 2 ** 30 if mem else None,
       peak_gib=stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None, device=jax.devices()[0].device_kind)


# --- 3. txt2img -------------------------------------------------------------------------------------

def ensure_pipeline(folder: str, quick: bool) -> None:
  if os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")):
    return
  from sdjax.convert.random import write_random_pipeline
  write_random_pipeline(folder, "sd2", tokenizer=os.path.join(ROOT, "tests/fixtures/models/tokenizer"),
                        full_size=not quick)
  if quick:  # the tiny text encoder has 16 positions, as the fixture tokenizer pads to
    return
  path = os.path.join(folder, "tokenizer", "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:  # pad to 77 tokens as SD 2's tokenizer does (the fixture's says 16)
    json.dump({**config, "model_max_length": 77}, f, indent=2)


def worker_pipeline(args) -> None:
  t0 = time.perf_counter()
  ensure_pipeline(args.folder, args.quick)
  emit(kind="pipeline", write_s=time.perf_counter() - t0)


def worker_sdjax_txt2img(args) -> None:
  import jax
  import numpy as np

  from sdjax import pipelines
  from sdjax.convert import load_pipeline
  setup_cache(args.cache)
  t0 = time.perf_counter()
  pipe = load_pipeline(args.folder, dtype="bfloat16")
  sd, params = pipelines.from_components(pipe.models, pipe.schedule, model_type=pipe.model_type)
  params = jax.device_put(params)
  tokenizers = [pipe.tokenizers["tokenizer"]]
  load_s = time.perf_counter() - t0
  size, steps = (64, 2) if args.quick else (512, 25)
  for b in TXT_BATCHES:
    prompt = pipelines.Prompt(ids=pipelines.tokenize(tokenizers, sd.text_encoders, [PROMPT] * b),
                              negative_ids=pipelines.tokenize(tokenizers, sd.text_encoders, [NEGATIVE] * b),
                              guidance_scale=np.full((b,), 7.5, np.float32))
    keys = jax.random.split(jax.random.key(0), b)
    fn = jax.jit(lambda p, pr, k: pipelines.txt2img(sd, p, pr, k, height=size, width=size, sampler="ddim",
                                                    num_steps=steps))
    t0 = time.perf_counter()
    compiled = fn.lower(params, prompt, keys).compile()
    compile_s = time.perf_counter() - t0
    if args.compile_only:
      emit(kind="txt2img_compile", impl="sdjax", batch=b, compile_s=compile_s)
      continue
    jax.block_until_ready(compiled(params, prompt, keys))
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      images = jax.block_until_ready(compiled(params, prompt, keys))
      times.append(time.perf_counter() - t0)
    assert bool(np.isfinite(np.asarray(images)).all())
    s = statistics.median(times)
    emit(kind="txt2img", impl="sdjax", batch=b, steps=steps, size=size, s_per_batch=s, images_per_s=b / s,
         compile_s=compile_s, load_s=load_s, device=jax.devices()[0].device_kind)


def worker_torch_txt2img(args) -> None:
  import diffusers
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  t0 = time.perf_counter()
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                           requires_safety_checker=False, torch_dtype=torch.bfloat16)
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  pipe = pipe.to(dev)
  pipe.set_progress_bar_config(disable=True)
  load_s = time.perf_counter() - t0
  size, steps = (64, 2) if args.quick else (512, 25)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  for b in TXT_BATCHES:
    call = lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=b, height=size, width=size,
                        num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    with torch.inference_mode():
      call()
      times = []
      for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    emit(kind="txt2img", impl="diffusers", batch=b, steps=steps, size=size, s_per_batch=s, images_per_s=b / s,
         load_s=load_s, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
         versions=f"torch {torch.__version__}, diffusers {diffusers.__version__}")


WORKERS = {"kernels": worker_kernels, "train": worker_train, "pipeline": worker_pipeline,
           "sdjax_txt2img": worker_sdjax_txt2img, "torch_txt2img": worker_torch_txt2img}


# --- the driver -------------------------------------------------------------------------------------

class Driver:
  def __init__(self, args):
    self.args, self.t0, self.results = args, time.perf_counter(), []
    self.log = open(os.path.join(args.out, "log.txt"), "a")

  def left(self) -> float:
    return self.args.budget - (time.perf_counter() - self.t0)

  def cmd(self, worker: str, *extra: str, compile_only: bool = False) -> list[str]:
    a = self.args
    out = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--out", a.out, "--cache", a.cache,
           "--folder", a.folder, "--steps", str(a.steps), "--warmup", str(a.warmup), "--reps", str(a.reps), *extra]
    return out + (["--compile_only"] if compile_only else []) + (["--quick"] if a.quick else [])

  def start(self, worker: str, *extra: str, compile_only: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if compile_only:  # compile processes hold no GPU memory between allocations
      env.update(XLA_PYTHON_CLIENT_ALLOCATOR="platform", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    name = "-".join([worker, *extra, "compile" if compile_only else "run"])
    err = open(os.path.join(self.args.out, f"{name}.err"), "w")
    proc = subprocess.Popen(self.cmd(worker, *extra, compile_only=compile_only), env=env, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    proc.name = name
    return proc

  def collect(self, proc: subprocess.Popen, timeout: float) -> list[dict]:
    try:
      out, _ = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      proc.kill()
      out, _ = proc.communicate()
      self.note(f"{proc.name}: killed after {timeout:.0f} s (budget)")
    got = [json.loads(line[7:]) for line in (out or "").splitlines() if line.startswith("RESULT ")]
    if proc.returncode not in (0, None) and not got:
      with open(os.path.join(self.args.out, f"{proc.name}.err")) as f:
        tail = f.read().strip().splitlines()[-3:]
      got = [{"kind": "error", "worker": proc.name, "rc": proc.returncode, "tail": tail}]
    for r in got:
      r["at_s"] = round(time.perf_counter() - self.t0, 1)
      self.results.append(r)
      with open(os.path.join(self.args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(r) + "\n")
      self.note(json.dumps(r))
    return got

  def note(self, msg: str) -> None:
    line = f"[{time.perf_counter() - self.t0:6.1f} s] {msg}"
    print(line, flush=True)
    self.log.write(line + "\n")
    self.log.flush()

  def run(self) -> None:
    a = self.args
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in a.cases] if a.cases else (
        QUICK_TRAIN_CASES if a.quick else TRAIN_CASES)
    torch_ok = not a.skip_torch and subprocess.run([sys.executable, "-c", "import torch, diffusers"],
                                                   capture_output=True).returncode == 0
    # CPU work first, in parallel: the pipeline folder and every compile (they fill the persistent cache).
    writer = self.start("pipeline") if a.txt2img else None
    compiles = {c: self.start("train", c[0], str(c[1]), compile_only=True) for c in cases}
    if a.kernels:
      self.collect(self.start("kernels"), min(120, self.left()))
    sd_compile = None
    if writer is not None:
      self.collect(writer, self.left() - 60)
      sd_compile = self.start("sdjax_txt2img", compile_only=True)
    for c in cases:  # timed one at a time, in priority order, each as soon as its compile is cached
      self.collect(compiles[c], self.left() - 30)
      if self.left() < 45:
        self.note(f"train {c}: skipped (budget)")
        continue
      self.collect(self.start("train", c[0], str(c[1])), self.left() - 10)
    if writer is not None:
      if torch_ok and self.left() > 60:
        self.collect(self.start("torch_txt2img"), self.left() - 40)
      self.collect(sd_compile, self.left() - 30)
      if self.left() > 30:
        self.collect(self.start("sdjax_txt2img"), self.left() - 5)
    self.report()

  def report(self) -> None:
    rows = [r for r in self.results if r["kind"] == "kernel"]
    print("\n## attention kernels (bf16 inputs vs float32 XLA; fwd+bwd ms)\n")
    for r in rows:
      print(f"| {r['impl']} | {r['lq']}x{r['lk']} | " + (f"{r['out_err']:.2e} | {r['grad_err']:.2e} | "
            f"{r['fwd_bwd_ms']:.2f} |" if "error" not in r else f"{r['error'][:120]} |"))
    print("\n## train (SD 2 base U-Net, 512 px, bf16)\n\n| attention | batch/chip | s/step | images/s | "
          "TFLOP/s | MFU | compile s | peak GiB |\n|---|---|---|---|---|---|---|---|")
    for r in self.results:
      if r["kind"] == "train":
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "—"
        print(f"| {r['attention']} | {r['batch']} | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['tflops']:.0f} | {mfu} | {r['compile_s']:.0f} | {r['peak_gib'] or 0:.1f} |")
    print("\n## txt2img (512 px, 25 DDIM steps, guidance 7.5)\n\n| impl | batch | s/batch | images/s |\n"
          "|---|---|---|---|")
    for r in self.results:
      if r["kind"] == "txt2img":
        print(f"| {r['impl']} | {r['batch']} | {r['s_per_batch']:.3f} | {r['images_per_s']:.2f} |")
    for r in self.results:
      if r["kind"] == "error":
        print(f"ERROR {r['worker']} rc {r['rc']}: {r['tail']}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--out", required=True, help="folder for results.jsonl, log.txt and each worker's stderr")
  p.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
  p.add_argument("--quick", action="store_true", help="tiny shapes: check the script in a minute")
  p.add_argument("--steps", type=int, default=10, help="timed train steps per case")
  p.add_argument("--warmup", type=int, default=2, help="untimed train steps per case")
  p.add_argument("--reps", type=int, default=3, help="timed txt2img calls per batch (median)")
  p.add_argument("--no_txt2img", dest="txt2img", action="store_false")
  p.add_argument("--no_kernels", dest="kernels", action="store_false")
  p.add_argument("--cases", nargs="+", help="train cases ATTENTION:BATCH (default: the list at the top)")
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--cache", help="jax persistent compilation cache (default: OUT/../jax_cache)")
  p.add_argument("--folder", help="random SD 2 pipeline folder (default: /tmp/sdjax_sd2_random)")
  p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
  p.add_argument("--compile_only", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("case", nargs="*", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.cache = args.cache or os.path.join("/tmp", "sdjax_jax_cache" + ("_quick" if args.quick else ""))
  args.folder = args.folder or ("/tmp/sdjax_sd2_random" + ("_quick" if args.quick else ""))
  if args.worker:
    WORKERS[args.worker](args)
    return
  os.makedirs(args.out, exist_ok=True)
  Driver(args).run()


if __name__ == "__main__":
  main()
