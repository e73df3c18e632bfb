"""Full-size SD 1.5 U-Net: sdjax (jax.jit) against diffusers (PyTorch, float32, CPU), forward and fwd+bwd.

  python bench/models.py [--batch 1 4] [--runs 3] [--quick] [--no-backward] [--no-torch] [--attention xla]

The U-Net is `sdjax.convert.single_file.default_configs("sd1")["unet"]` (runwayml/stable-diffusion-v1-5,
859.5M parameters) on 64x64x4 latents (512 px images), timestep 500, a [B, 77, 768] text context.
Cases: forward, and forward+backward (gradient of mean(output ** 2) w.r.t. all parameters), per batch.

- sdjax: `jax.jit(f).lower(...).compile()` is timed as the compile time; then one warm-up call and the
  median of `--runs` calls (`block_until_ready`). FLOPs per call come from XLA's `compiled.cost_analysis()`
  (it counts a while-loop body once, so where the compiled call has loops, i.e. chunked attention, the FLOPs
  are those of the same call compiled with --attention xla, which does the same arithmetic without loops).
  A case whose XLA temp + output buffers (`compiled.memory_analysis()`) plus 1 GiB exceed 90% of MemAvailable is
  reported as not fitting instead of being run.
- torch: diffusers' `UNet2DConditionModel.from_config(same dict)` in float32, `torch.set_num_threads(cores)`,
  `torch.no_grad()` for the forward, `loss.backward()` for fwd+bwd (gradients set to None before each
  call); one warm-up call, then the median of `--runs` calls.
- Both run the same random weights (torch's initialisation, converted with
  `sdjax.convert.diffusers.load_state_dict`) on the same inputs; the forward outputs and the losses are
  compared (max |sdjax - torch| / max |torch|). sdjax runs first and is freed before torch builds the
  same seed-0 model again, so the two never hold their weights, gradients and activations at once.

torch and diffusers are optional: without them (or with --no-torch) only sdjax is measured, on weights
from `jax.jit(UNet(cfg).init)`. --quick swaps in a tiny U-Net (16x16 latents, 32-wide context) as a
smoke test that runs in seconds.
"""
import argparse
import ctypes
import dataclasses
import gc
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from sdjax.convert import diffusers as convert  # noqa: E402
from sdjax.convert.single_file import default_configs  # noqa: E402
from sdjax.models import attention  # noqa: E402
from sdjax.models import unet as unet_lib  # noqa: E402

TIMESTEP = 500
CONTEXT_LEN = 77
QUICK = {  # a tiny SD-1.x-shaped U-Net for the smoke test
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "sample_size": 16,
}


def median_time(fn, runs: int) -> tuple:
  """(median wall time of `runs` calls of fn() after one warm-up call, the last result); fn blocks."""
  result = fn()
  times = []
  for _ in range(runs):
    result = None  # drop the previous outputs (a full gradient tree for fwd+bwd) before the next call
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), result


def flops_of(compiled) -> float | None:
  """FLOPs per call from XLA's cost analysis (a dict, or a list of dicts in some jax versions)."""
  cost = compiled.cost_analysis()
  if cost is None:
    return None
  if isinstance(cost, dict):
    cost = [cost]
  total = sum(float(c.get("flops", 0.0)) for c in cost if c)
  return total or None


def mem_available() -> int | None:
  """Bytes of MemAvailable from /proc/meminfo (None where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def release_memory() -> None:
  """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def make_inputs(batch: int, size: int, in_channels: int, context_dim: int, seed: int = 0):
  """NCHW latents [B, C, H, W] and a context [B, 77, D], float32 numpy (the same for both frameworks)."""
  rng = np.random.default_rng(seed + batch)
  x = rng.standard_normal((batch, in_channels, size, size), dtype=np.float32)
  context = rng.standard_normal((batch, CONTEXT_LEN, context_dim), dtype=np.float32)
  return x, context


# --- torch ---------------------------------------------------------------------------------------------

def import_torch():
  try:
    import diffusers
    import torch
  except ImportError as e:
    sys.exit(f"bench/models.py: torch and diffusers are needed for the comparison ({e}); "
             "install them (pip install torch diffusers) or pass --no-torch to time sdjax alone")
  return torch, diffusers


def torch_model(config: dict):
  """diffusers' U-Net of `config` with the random weights of seed 0 (the same on every call)."""
  torch, diffusers = import_torch()
  torch.manual_seed(0)
  return diffusers.UNet2DConditionModel.from_config(config).eval()


def torch_weights(config: dict) -> dict:
  """The state dict of `torch_model(config)` as numpy arrays (views of the torch tensors)."""
  return {k: v.detach().numpy() for k, v in torch_model(config).state_dict().items()}


def run_torch(config: dict, cases, inputs, runs: int):
  """Times every case in diffusers; returns ({case: s/call}, {case: output or loss})."""
  torch, _ = import_torch()
  torch.set_num_threads(os.cpu_count())
  model = torch_model(config)
  n_params = sum(p.numel() for p in model.parameters())
  print(f"torch: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads", flush=True)
  times, results = {}, {}
  for mode, batch in cases:
    x, context = (torch.from_numpy(a) for a in inputs[batch])
    if mode == "forward":
      def call():
        with torch.no_grad():
          return model(x, TIMESTEP, encoder_hidden_states=context).sample
      times[mode, batch], out = median_time(call, runs)
      results[mode, batch] = out.numpy()
    else:
      def call():
        model.zero_grad(set_to_none=True)
        loss = model(x, TIMESTEP, encoder_hidden_states=context).sample.square().mean()
        loss.backward()
        return loss.detach()
      times[mode, batch], loss = median_time(call, runs)
      results[mode, batch] = float(loss)
      model.zero_grad(set_to_none=True)
    release_memory()
    print(f"torch {mode} batch {batch}: {times[mode, batch]:.3f} s/call (peak RSS so far "
          f"{peak_rss_gib():.1f} GiB)", flush=True)
  return times, results


# --- sdjax ---------------------------------------------------------------------------------------------

def run_sdjax(cfg: unet_lib.UNetConfig, params, cases, inputs, runs: int):
  """Compiles and times every case; returns {case: (compile s, s/call or None, flops, output or loss, note)}."""
  def functions(cfg):
    module = unet_lib.UNet(cfg)

    def forward(p, x, t, context):
      return module.apply({"params": p}, x, t, context)

    def loss_and_grad(p, x, t, context):
      return jax.value_and_grad(lambda q: jnp.mean(jnp.square(forward(q, x, t, context))))(p)
    return {"forward": forward, "fwd+bwd": loss_and_grad}

  out = {}
  for mode, batch in cases:
    x_nchw, context = inputs[batch]
    args = (params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.full((batch,), float(TIMESTEP), jnp.float32),
            jnp.asarray(context))
    t0 = time.perf_counter()
    compiled = jax.jit(functions(cfg)[mode]).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = flops_of(compiled)
    note = ""
    if " while(" in compiled.as_text():  # chunked attention: XLA counts loop bodies once; count the xla graph
      xla_cfg = dataclasses.replace(cfg, attention_implementation="xla")
      flops = flops_of(jax.jit(functions(xla_cfg)[mode]).lower(*args).compile())
      note = "FLOPs counted with xla attention; "
    mem = compiled.memory_analysis()
    need = None if mem is None else mem.temp_size_in_bytes + mem.output_size_in_bytes
    avail = mem_available()
    if need is not None:
      note += f"XLA temp+output {need / 2 ** 30:.1f} GiB"
    # The parameters are resident already; leave a margin for the inputs, the runtime and other processes.
    if need is not None and avail is not None and need + 2 ** 30 > 0.9 * avail:
      why = f"does not fit: XLA temp+output {need / 2 ** 30:.1f} GiB, {avail / 2 ** 30:.1f} GiB available"
      out[mode, batch] = (compile_s, None, flops, None, why)
      print(f"sdjax {mode} batch {batch}: skipped, {out[mode, batch][-1]}", flush=True)
      continue
    call = lambda: jax.block_until_ready(compiled(*args))
    seconds, result = median_time(call, runs)
    result = np.asarray(result) if mode == "forward" else float(result[0])
    del compiled, call
    release_memory()
    out[mode, batch] = (compile_s, seconds, flops, result, note)
    print(f"sdjax {mode} batch {batch}: compile {compile_s:.1f} s, {seconds:.3f} s/call, {note} "
          f"(peak RSS so far {peak_rss_gib():.1f} GiB)", flush=True)
  return out


# --- main ----------------------------------------------------------------------------------------------

def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
  p.add_argument("--runs", type=int, default=3, help="timed calls per case after one warm-up (default 3)")
  p.add_argument("--quick", action="store_true", help="a tiny U-Net on 16x16 latents: a smoke test in seconds")
  p.add_argument("--no-backward", action="store_true", help="forward only")
  p.add_argument("--no-torch", action="store_true", help="time sdjax alone (no torch/diffusers needed)")
  p.add_argument("--attention", default=None, choices=attention.IMPLEMENTATIONS,
                 help="sdjax attention implementation (default: automatic)")
  args = p.parse_args()
  if args.runs < 1 or any(b < 1 for b in args.batch):
    p.error("--runs and --batch must be >= 1")

  config = default_configs("sd1")["unet"]
  if args.quick:
    config = {**config, **QUICK}
  size = config["sample_size"]
  cfg = unet_lib.UNetConfig.from_diffusers_config(config, attention_implementation=args.attention)
  modes = ["forward"] + ([] if args.no_backward else ["fwd+bwd"])
  cases = [(mode, b) for mode in modes for b in args.batch]
  inputs = {b: make_inputs(b, size, cfg.in_channels, cfg.cross_attention_dim) for b in args.batch}

  versions = f"jax {jax.__version__}, flax {flax.__version__}"
  if not args.no_torch:
    torch, diffusers = import_torch()
    versions += f", torch {torch.__version__}, diffusers {diffusers.__version__}"
  print(f"# {'Tiny (--quick)' if args.quick else 'SD 1.5'} U-Net, {size}x{size}x{cfg.in_channels} latents, "
        f"context [B, {CONTEXT_LEN}, {cfg.cross_attention_dim}], t={TIMESTEP}, float32, median of {args.runs}")
  print(f"{versions}; jax device {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"{cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"load average {os.getloadavg()[0]:.2f} at start", flush=True)

  torch_times, torch_results = {}, {}
  if args.no_torch:
    init_args = unet_lib.init_args(cfg)
    params = nn.meta.unbox(jax.jit(unet_lib.UNet(cfg).init)(jax.random.key(0), *init_args))["params"]
  else:
    # torch's seed-0 weights in sdjax's layout (a copy); the torch model goes with the state-dict views
    _, params = convert.load_state_dict("unet", cfg, torch_weights(config))
    release_memory()
  params = jax.device_put(params)
  release_memory()
  n_params = sum(a.size for a in jax.tree.leaves(params))
  print(f"sdjax: {n_params / 1e6:.1f}M parameters, attention implementation "
        f"{cfg.attention_implementation or 'automatic'}", flush=True)
  # sdjax first, then torch, each with the process to itself: sdjax's fwd+bwd is the larger footprint.
  jax_out = run_sdjax(cfg, params, cases, inputs, args.runs)
  del params
  release_memory()
  if not args.no_torch:
    torch_times, torch_results = run_torch(config, cases, inputs, args.runs)

  print()
  if torch_results:
    for case, ref in torch_results.items():
      got = jax_out[case][3]
      if got is None:
        continue
      if case[0] == "forward":
        ref = ref.transpose(0, 2, 3, 1)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        print(f"{case[0]} batch {case[1]}: max |sdjax - torch| / max |torch| = {err:.2e}")
      else:
        print(f"{case[0]} batch {case[1]}: loss sdjax {got:.7g}, torch {ref:.7g}, "
              f"relative difference {abs(got - ref) / abs(ref):.2e}")
  print("\n| case | sdjax compile s | sdjax s/call | torch s/call | ratio | GFLOPs/call | sdjax GFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  for case in cases:
    compile_s, seconds, flops, _, note = jax_out[case]
    torch_s = torch_times.get(case)
    cells = [f"{case[0]}, batch {case[1]}", f"{compile_s:.1f}",
             f"{seconds:.3f}" if seconds else f"— ({note})",
             f"{torch_s:.3f}" if torch_s else "—",
             f"{seconds / torch_s:.2f}" if seconds and torch_s else "—",
             (f"{flops / 1e9:,.1f}" if flops >= 1e10 else f"{flops / 1e9:.3f}") if flops else "—",
             f"{flops / 1e9 / seconds:.1f}" if flops and seconds else "—"]
    print("| " + " | ".join(cells) + " |")
  print(f"\npeak RSS of the process: {peak_rss_gib():.1f} GiB; load average (1, 5, 15 min) at the end: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
  main()
