"""Train-step cost: measured on this CPU, and planned by XLA for full-size U-Nets on many devices.

  python bench/train_step.py --mode cpu                  # the default job's step time on this machine
  python bench/train_step.py --mode memory               # SD 1.5 / SD 2.1 / SDXL, DP and FSDP, 8/64/256 devices
  python bench/train_step.py --mode memory --models sd1 --devices 8 64 --meshes fsdp
  python bench/train_step.py --quick                     # seconds: tiny configs, 8 fake devices

cpu: configs/default.py through `sdjax.train.trainer.Trainer` (the jitted step `train.py` runs) on the real
MNIST batches: `lower().compile()` time, then the median of --runs steps after --warmup steps
(`block_until_ready` on each); model FLOPs per step, FLOP/s per device and MFU as train.py logs them
(sdjax.train.mfu; a CPU has no peak in the table, so no MFU). Rows: the default config, train.grad_accum_steps=4, model.dtype=bfloat16.

memory: compile only, nothing runs and no parameter is materialised. For each (model, mesh, N) a fresh
subprocess starts with N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set
before jax is imported), builds the abstract train state (float32 params, AdamW mu/nu, EMA) with
`parallel.state_shardings`, jits the real `sdjax.train.step.make_train_step` step with those shardings
(state donated), lowers it on `ShapeDtypeStruct`s and reads `compiled.memory_analysis()` and
`compiled.cost_analysis()`. Per-device batch --per-device-batch (default 1, so the global batch is N).
"""
import argparse
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from sdjax import parallel, schedules  # noqa: E402
from sdjax.convert.single_file import default_configs  # noqa: E402
from sdjax.models import remat as remat_lib  # noqa: E402
from sdjax.models.unet import UNet, UNetConfig, init_args  # noqa: E402
from sdjax.train import losses, mfu, optim, state as state_lib  # noqa: E402
from sdjax.train.losses import LossConfig  # noqa: E402
from sdjax.train.step import StepConfig, make_train_step  # noqa: E402

GiB = 2 ** 30
CONTEXT_LEN = 77
# model -> (default_configs name, latent side, label); latents are image side / 8.
MODELS = {"sd1": ("sd1", 64, "SD 1.5, 512 px"), "sd2": ("sd2_v", 96, "SD 2.1, 768 px"),
          "sd2_512": ("sd2", 64, "SD 2 base, 512 px (MLPerf)"), "sdxl": ("sdxl", 128, "SDXL base, 1024 px")}
QUICK_UNET = {  # tiny SDXL-shaped U-Net (cross-attention and text_time embedding) for --quick
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": [2, 4],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
    "transformer_layers_per_block": [1, 2], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 16, "projection_class_embeddings_input_dim": 32 + 6 * 16}
OPTIM = {"name": "adamw", "lr": 1e-4, "schedule": "constant", "warmup_steps": 500, "final_lr_fraction": 0.0,
         "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, "grad_clip": 1.0}
MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
               "generated_code_size_in_bytes")


# --- shared helpers ---------------------------------------------------------------------------------

def flops_of(compiled) -> float | None:
  """XLA's FLOP count of a compiled call (a dict, or a list of dicts in some jax versions)."""
  cost = compiled.cost_analysis()
  cost = [cost] if isinstance(cost, dict) else (cost or [])
  return sum(float(c.get("flops", 0.0)) for c in cost if c) or None


def has_model_loops(hlo: str) -> bool:
  """Whether the HLO has while loops other than jax.random's (threefry is a loop on CPU): XLA's cost
  analysis counts a loop body once, so such FLOP counts are too low."""
  loops = [line for line in hlo.splitlines() if " while(" in line]
  return any(not re.search(r"threefry|_uniform|_randint|_normal|random_bits", line) for line in loops)


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


# --- cpu mode: the default job's step on this machine -------------------------------------------------

def time_default_step(variant: str | None, overrides: dict, runs: int, warmup: int) -> dict:
  """Compile time and median step time of configs/default.py[:variant] (with `overrides`) via Trainer."""
  from configs.default import get_config
  from sdjax.data import input_pipeline
  from sdjax.train.trainer import Trainer
  config = get_config(variant)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  exp = Trainer.from_config(config)
  data = input_pipeline.pipeline_from_config(config.data, channels=exp.task.model_config.in_channels,
                                             global_batch_size=int(config.train.batch_size), seed=0, label=True)
  batches = [parallel.global_batch(data.batch(s), exp.batch_sharding) for s in range(runs + warmup)]
  state = exp.init_state()
  t0 = time.perf_counter()
  step = exp.train_step().lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i, batch in enumerate(batches):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  s = statistics.median(times)
  throughput = exp.throughput(batches[0])  # model FLOPs per step (sdjax.train.mfu), the device's peak if known
  return {"batch": int(config.train.batch_size), "compile_s": compile_s, "s_per_step": s, "steps_per_s": 1 / s,
          "images_per_s": config.train.batch_size / s, "loss": float(metrics["loss"]),
          "gflops_per_step": throughput.flops_per_step / 1e9, **throughput.metrics(1 / s)}


def cpu_mode(args) -> str:
  cases = [("default (float32)", {}), ("train.grad_accum_steps=4", {"train.grad_accum_steps": 4}),
           ("model.dtype=bfloat16", {"model.dtype": "bfloat16"})]
  if args.quick:
    cases = cases[:1]
  rows = []
  for name, overrides in cases:
    r = time_default_step("tiny" if args.quick else None, overrides, args.runs, args.warmup)
    print(json.dumps({"case": name, **r}), flush=True)
    rows.append([name, f"{r['compile_s']:.1f}", f"{r['s_per_step']:.3f}", f"{r['steps_per_s']:.2f}",
                 f"{r['images_per_s']:.1f}", f"{r['gflops_per_step']:.1f}", f"{r['tflops_per_device'] * 1e3:.1f}",
                 f"{r['mfu']:.1%}" if "mfu" in r else "— (no peak)"])
  return table([f"config (batch {r['batch']})", "compile s", "s/step", "steps/s", "images/s", "model GFLOP/step",
                "GFLOP/s/device", "MFU"], rows)


# --- memory mode: one compile-only case in this process ---------------------------------------------

def unet_config(model: str, remat: str, attention: str | None, dtype: str = "bfloat16") -> tuple[UNetConfig, int]:
  """(U-Net config, latent side) of `model` ("quick" is a tiny U-Net)."""
  if model == "quick":
    d, side = QUICK_UNET, 16
  else:
    name, side, _ = MODELS[model]
    d = default_configs(name)["unet"]
  cfg = UNetConfig.from_diffusers_config(d, dtype=dtype, remat=remat, attention_implementation=attention)
  return cfg, side


def abstract_batch(cfg: UNetConfig, side: int, n: int, sharding) -> dict:
  """ShapeDtypeStructs of a global batch of n latents with their text conditioning."""
  s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  batch = {"image": s((n, side, side, cfg.in_channels)), "context": s((n, CONTEXT_LEN, cfg.cross_attention_dim))}
  _, _, _, _, added = init_args(cfg)
  if added is not None:
    batch.update({k: s((n,) + v.shape[1:]) for k, v in added.items()})
  return batch


def text_conditioned_step(model: UNet, schedule, tx, lr):
  """step(state, batch) -> (state, metrics): sdjax's train step (make_train_step, the diffusion loss) with the
  U-Net reading batch["context"] (and SDXL's "text_embeds"/"time_ids"), as the latent task's step does on
  precomputed latents and text embeddings."""
  loss_cfg = LossConfig()

  def prepare(batch, rng, frozen):
    k_draw, k_model = jax.random.split(rng)
    draws = losses.draw(k_draw, batch["image"].shape, schedule, loss_cfg, 0.0)
    return {**batch, "draws": draws}, k_model

  def loss_fn(params, batch, rng, frozen, state):
    added = {k: batch[k] for k in ("text_embeds", "time_ids") if k in batch} or None
    apply = lambda p, x, t, c, r: model.apply({"params": p}, x, t, c, added_cond=added, train=True,
                                              rngs={"dropout": r})
    return losses.diffusion_loss(apply, params, schedule, batch["image"], batch["context"], batch["draws"], rng,
                                 loss_cfg), {}

  return make_train_step(loss_fn, tx, StepConfig(), lr, prepare=prepare), loss_fn, prepare


def state_bytes_per_device(abstract, shardings) -> int:
  """Sum over state leaves of the bytes of one device's shard."""
  leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
  return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize for a, s in leaves)


def compile_case(model: str, mesh_kind: str, n: int, per_device_batch: int, remat: str,
                 attention: str | None, dtype: str = "bfloat16", run_steps: int = 0) -> dict:
  """Build and compile one full train step on the fake devices; return XLA's plan for one device, the model
  FLOPs (sdjax.train.mfu) and, with `run_steps`, the median time of that many steps after one warm-up."""
  if jax.device_count() != n:
    raise RuntimeError(f"expected {n} devices, jax sees {jax.device_count()} (set XLA_FLAGS before jax starts)")
  t_start = time.perf_counter()
  cfg, side = unet_config(model, remat, attention, dtype)
  unet = UNet(cfg)
  boxed = jax.eval_shape(lambda r: unet.init(r, *init_args(cfg)[:3], added_cond=init_args(cfg)[4])["params"],
                         jax.random.key(0))
  tx, lr = optim.make_optimizer(OPTIM, 100_000)
  abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, 0), nn.meta.unbox(boxed))
  mesh = parallel.make_mesh({mesh_kind: n})
  shardings = parallel.state_shardings(abstract, boxed, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch_sharding = parallel.batch_sharding(mesh)
  batch = abstract_batch(cfg, side, n * per_device_batch, batch_sharding)
  schedule = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  step, _, _ = text_conditioned_step(unet, schedule, tx, lr)
  model_flops = mfu.lowered_flops(step, abstract_state, batch)
  jitted = jax.jit(step, in_shardings=(shardings, {k: batch_sharding for k in batch}),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = jitted.lower(abstract_state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  out = {k: int(getattr(mem, k)) for k in MEMORY_KEYS}
  params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params))
  if run_steps:
    state = jax.jit(lambda p: state_lib.create(p, tx, 0), out_shardings=shardings)(
        nn.meta.unbox(jax.jit(lambda r: unet.init(r, *init_args(cfg)[:3], added_cond=init_args(cfg)[4])["params"])(
            jax.random.key(0))))
    real = {k: jax.device_put(jnp.zeros(v.shape, v.dtype) + 0.1, v.sharding) for k, v in batch.items()}
    times = []
    for _ in range(run_steps + 1):
      t = time.perf_counter()
      state, metrics = compiled(state, real)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    out["s_per_step"] = statistics.median(times[1:])
  out.update(model=model, mesh=mesh_kind, devices=n, per_device_batch=per_device_batch, remat=remat,
             attention=attention or "auto", dtype=dtype, params=params, flops=flops_of(compiled),
             model_flops=model_flops,
             has_loops=has_model_loops(compiled.as_text()),
             state_bytes=state_bytes_per_device(abstract, shardings),
             params_bytes=state_bytes_per_device(abstract.params, shardings.params),
             trace_lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t_start, peak_rss_gib=peak_rss_gib(),
             jax=jax.__version__)
  return out


# --- memory mode: the driver that starts one subprocess per case ------------------------------------

def run_case_subprocess(model, mesh_kind, n, args, remat=None, dtype="bfloat16", run_steps=0) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip())
  cmd = [sys.executable, os.path.abspath(__file__), "--case", model, mesh_kind, str(n),
         "--per-device-batch", str(args.per_device_batch), "--attention", args.attention or "auto",
         "--remat", remat or args.remat, "--dtype", dtype, "--run-steps", str(run_steps)]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.case_timeout)
  except subprocess.TimeoutExpired:
    return {"model": model, "mesh": mesh_kind, "devices": n, "error": f"compile > {args.case_timeout} s, skipped"}
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
      result["wall_s"] = time.perf_counter() - t0
      return result
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
  return {"model": model, "mesh": mesh_kind, "devices": n, "error": f"rc {proc.returncode}: {tail[0][:200]}"}


def gib(x) -> str:
  return f"{x / GiB:.2f}"


def memory_rows(results: list[dict]) -> str:
  rows = []
  for r in results:
    name = MODELS.get(r["model"], (None, None, r["model"]))[2]
    if "error" in r:
      rows.append([name, r["mesh"], r["devices"]] + ["—"] * 9 + [r["error"]])
      continue
    total = r["argument_size_in_bytes"] + r["output_size_in_bytes"] + r["temp_size_in_bytes"] \
        - r["alias_size_in_bytes"]
    flops = f"{r['flops'] / 1e12:.2f}" + (" (loops)" if r["has_loops"] else "") if r["flops"] else "—"
    rows.append([name, r["mesh"], r["devices"], f"{r['params'] / 1e9:.3f}", gib(r["state_bytes"]),
                 gib(r["argument_size_in_bytes"]), gib(r["output_size_in_bytes"]), gib(r["alias_size_in_bytes"]),
                 gib(r["temp_size_in_bytes"]), f"**{gib(total)}**", flops, f"{r['compile_s']:.0f}",
                 f"{r['peak_rss_gib']:.1f}"])
  return table(["model", "mesh", "N", "params (B)", "state GiB/dev", "argument", "output", "alias", "temp",
                "total GiB/dev", "TFLOP/dev", "compile s", "RSS GiB"], rows)


def memory_mode(args) -> str:
  models = ["quick"] if args.quick else args.models
  devices = [8] if args.quick else args.devices
  results = []
  for model in models:
    for n in devices:
      for mesh_kind in args.meshes:
        r = run_case_subprocess(model, mesh_kind, n, args)
        print(json.dumps(r), flush=True)
        results.append(r)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
  attention = args.attention or "auto"
  return (f"per-device batch {args.per_device_batch}, bf16 compute, float32 params, remat={args.remat}, "
          f"attention={attention}\n\n" + memory_rows(results))


def remat_mode(args) -> str:
  """Each remat policy on one device: XLA's memory plan of the float32 train step (batch --per-device-batch)
  and, with --remat-steps, its measured CPU time; FLOPs as XLA counts them (recomputation included) and the
  model FLOPs (sdjax.train.mfu, without)."""
  model = "quick" if args.quick else args.remat_model
  rows = []
  for policy in remat_lib.POLICIES:
    r = run_case_subprocess(model, "data", 1, args, remat=policy, dtype="float32", run_steps=args.remat_steps)
    print(json.dumps(r), flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(r) + "\n")
    if "error" in r:
      rows.append([policy] + ["—"] * 6 + [r["error"]])
      continue
    total = r["argument_size_in_bytes"] + r["output_size_in_bytes"] + r["temp_size_in_bytes"] \
        - r["alias_size_in_bytes"]
    xla = f"{r['flops'] / 1e12:.3f}" + (" (loops)" if r["has_loops"] else "") if r["flops"] else "—"
    rows.append([policy, gib(r["temp_size_in_bytes"]), f"**{gib(total)}**", xla, f"{r['model_flops'] / 1e12:.3f}",
                 f"{r['compile_s']:.0f}", f"{r['s_per_step']:.2f}" if "s_per_step" in r else "—"])
  name = MODELS.get(model, (None, None, model))[2]
  return (f"{name}, batch {args.per_device_batch}, float32, one CPU device, attention={args.attention or 'auto'}\n\n"
          + table(["remat", "temp GiB", "total GiB", "XLA TFLOP", "model TFLOP", "compile s", "s/step"], rows))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--mode", choices=("cpu", "memory", "remat", "all"), default="all")
  p.add_argument("--quick", action="store_true", help="tiny configs, 8 fake devices: a smoke test in seconds")
  p.add_argument("--runs", type=int, default=20, help="cpu mode: timed steps (median)")
  p.add_argument("--warmup", type=int, default=3, help="cpu mode: untimed steps after the compile")
  p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
  p.add_argument("--meshes", nargs="+", choices=("data", "fsdp"), default=["data", "fsdp"])
  p.add_argument("--devices", nargs="+", type=int, default=[8, 64, 256], help="fake device counts")
  p.add_argument("--per-device-batch", type=int, default=1)
  p.add_argument("--remat", default="full", choices=remat_lib.POLICIES, help="memory mode: remat policy per block")
  p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
  p.add_argument("--run-steps", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--remat-model", default="sd1", choices=tuple(MODELS), help="remat mode: the U-Net")
  p.add_argument("--remat-steps", type=int, default=2, help="remat mode: timed steps per policy (0: memory only)")
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "chunked"),
                 help="U-Net attention (auto: sdjax's choice; xla has no loops, so XLA counts all FLOPs)")
  p.add_argument("--case-timeout", type=int, default=900, help="seconds per compile subprocess")
  p.add_argument("--json", help="append each memory case's result to this JSON-lines file")
  p.add_argument("--case", nargs=3, metavar=("MODEL", "MESH", "N"), help=argparse.SUPPRESS)
  args = p.parse_args()
  args.attention = None if args.attention == "auto" else args.attention
  if args.case:  # a subprocess of memory mode
    model, mesh_kind, n = args.case
    r = compile_case(model, mesh_kind, int(n), args.per_device_batch, args.remat, args.attention, args.dtype,
                     args.run_steps)
    print("RESULT " + json.dumps(r), flush=True)
    return
  if args.quick:
    args.runs, args.warmup = 3, 1
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores")
  if args.mode in ("cpu", "all"):
    print("\n## CPU train step (configs/default.py)\n\n" + cpu_mode(args))
  if args.mode in ("memory", "all"):
    print("\n## XLA's per-device plan of a full train step\n\n" + memory_mode(args))
  if args.mode in ("remat", "all"):
    print("\n## Remat policies: memory and CPU time of one train step\n\n" + remat_mode(args))


if __name__ == "__main__":
  main()
