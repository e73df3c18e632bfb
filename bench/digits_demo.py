"""Measure the "Stable Diffusion from scratch" demo on the coloured, captioned digits (README section, configs
vae_digits.py / ldm_digits.py / upscale_digits.py): every use judged by an independent judge
(sdjax.eval.colored_digits: the shipped digit classifier on decoloured images, colours from pixel statistics).

  python bench/digits_demo.py vae --vae runs/vae_digits/vae
  python bench/digits_demo.py text --ldm runs/ldm_digits
  python bench/digits_demo.py txt2img img2img inpaint cas --ldm runs/ldm_digits
  python bench/digits_demo.py upscale --upscaler runs/upscale_digits/upscaler
  python bench/digits_demo.py controlnet --controlnet runs/controlnet_digits
  python bench/digits_demo.py all ...

Each use prints a table, appends its numbers to --results (JSON lines) and writes a picture grid to --grids.
Every image comes from its own seed; the same command gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdjax import io, pipelines  # noqa: E402
from sdjax.data import colored_digits as cd  # noqa: E402
from sdjax.eval import colored_digits as judge_lib  # noqa: E402
from sdjax.eval import digits as digits_lib  # noqa: E402

USES = ("vae", "text", "txt2img", "img2img", "inpaint", "upscale", "cas", "controlnet")


def to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  return np.asarray(io.to_uint8(images))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
  """PSNR in dB of uint8 images over all pixels (or where mask [N, H, W, 1] is 1)."""
  d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
  if mask is not None:
    mask = np.broadcast_to(mask, d.shape)
    mse = d[mask > 0.5].mean()
  else:
    mse = d.mean()
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def spread(n: int, k: int = 16) -> np.ndarray:
  """k indices spread over n (the real test split is in digit order: a grid of its first k would be all 0s)."""
  return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def save_grid(path: str, rows: list[np.ndarray], scale: int = 3) -> None:
  """Rows of uint8 [n, H, W, 3] images as one PNG (each row one line of the grid)."""
  lines = [np.concatenate(list(r), axis=1) for r in rows]
  width = max(line.shape[1] for line in lines)
  lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=128) for line in lines]
  grid = np.concatenate(lines, axis=0)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
  print(f"wrote {path}")


def report(args, use: str, numbers: dict) -> None:
  print(f"\n== {use} ==")
  for k, v in numbers.items():
    print(f"  {k:40s} {v:.4f}" if isinstance(v, float) else f"  {k:40s} {v}")
  with open(args.results, "a") as f:
    f.write(json.dumps({"use": use, **numbers}) + "\n")


REAL_LIMIT = [None]


def real_test() -> tuple[np.ndarray, list[tuple[int, str, str]]]:
  """The real test split (all 500, or the first --real)."""
  images, attrs = cd.ColoredDigitsSource("test").arrays()
  n = REAL_LIMIT[0] or len(images)
  return images[:n], attrs[:n]


# --- stage 1: the VAE ---

def use_vae(args) -> None:
  from sdjax import convert
  vae, params = convert.load_vae(args.vae)
  images, attrs = real_test()

  @jax.jit
  def reconstruct(x):
    mean, _ = vae.apply({"params": params}, x, method="encode")
    return jnp.clip(vae.apply({"params": params}, mean, method="decode"), -1.0, 1.0)

  recon = np.concatenate([to_uint8(reconstruct(to_float(images[i:i + 100]))) for i in range(0, len(images), 100)])
  real_scores = judge_lib.score(images, attrs)
  scores = judge_lib.score(recon, attrs)
  f = vae.config.downscale
  numbers = {"images": len(images), "latent_shape": [32 // f, 32 // f, vae.config.latent_channels],
             "psnr_db": psnr(recon, images)}
  numbers.update({f"recon_{k}": v for k, v in scores.items()})
  numbers.update({f"real_{k}": v for k, v in real_scores.items()})
  report(args, "vae", numbers)
  g = spread(len(images))
  save_grid(os.path.join(args.grids, "digits_vae.png"), [images[g], recon[g]])


# --- stage 2: the text-conditioned U-Net ---

class Sampler:
  """Jitted txt2img / img2img / inpaint of a trained ldm run, at a fixed batch (one compile per mode)."""

  def __init__(self, workdir: str, args):
    from sdjax import jobs
    self.model = jobs.load_workdir(workdir)
    self.sd, self.params = self.model.sd, self.model.params
    self.args = args
    kw = dict(sampler=args.sampler, num_steps=args.steps)
    self._txt2img = jax.jit(lambda p, prompt, keys: pipelines.txt2img(self.sd, p, prompt, keys, height=32, width=32,
                                                                      **kw))
    self._img2img = jax.jit(lambda p, prompt, keys, image: pipelines.img2img(
        self.sd, p, prompt, keys, image, strength=args.strength, **kw))
    self._inpaint = jax.jit(lambda p, prompt, keys, image, mask: pipelines.inpaint(
        self.sd, p, prompt, keys, image, mask, **kw))
    self.batch = args.batch

  def prompt(self, captions: list[str]) -> pipelines.Prompt:
    ids = pipelines.tokenize(self.model.tokenizers, self.sd.text_encoders, captions)
    neg = pipelines.tokenize(self.model.tokenizers, self.sd.text_encoders, [""] * len(captions))
    return pipelines.Prompt(ids=ids, negative_ids=neg,
                            guidance_scale=np.full((len(captions),), self.args.guidance, np.float32))

  def run(self, mode: str, captions: list[str], seeds: np.ndarray, *arrays: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] for N captions (seeds [N]; arrays: img2img's images / inpaint's images, masks)."""
    fn = {"txt2img": self._txt2img, "img2img": self._img2img, "inpaint": self._inpaint}[mode]
    out = []
    for s in range(0, len(captions), self.batch):
      n = len(captions[s:s + self.batch])
      pad = lambda a: np.concatenate([a, np.repeat(a[-1:], self.batch - len(a), 0)]) if len(a) < self.batch else a
      caps = list(captions[s:s + n]) + [captions[s + n - 1]] * (self.batch - n)
      keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(pad(seeds[s:s + n]), jnp.uint32))
      extra = [jnp.asarray(pad(a[s:s + n])) for a in arrays]
      out.append(to_uint8(fn(self.params, self.prompt(caps), keys, *extra))[:n])
    return np.concatenate(out)


def use_text(args) -> None:
  """Are the 80 captions separable in the frozen (random) text encoder's features?"""
  from sdjax import jobs
  model = jobs.load_workdir(args.ldm)
  combos = cd.combinations()
  caps = [cd.caption(*c) for c in combos]
  ids = pipelines.tokenize(model.tokenizers, model.sd.text_encoders, caps)
  emb = np.asarray(pipelines.encode_prompt(model.sd.text_encoders, model.params["text_encoders"], ids)["context"])
  flat = emb.reshape(len(caps), -1).astype(np.float64)
  d = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
  np.fill_diagonal(d, np.inf)
  # Leave-one-out nearest centroid per attribute: does the embedding carry the digit / colour / background
  # in a form that generalises across the other attributes?
  def loo_accuracy(labels):
    labels = np.asarray(labels)
    hits = 0
    for i in range(len(caps)):
      keep = np.arange(len(caps)) != i
      classes = sorted(set(labels[keep]))
      cents = np.stack([flat[keep & (labels == c)].mean(0) for c in classes])
      hits += classes[int(np.argmin(((cents - flat[i]) ** 2).sum(-1)))] == labels[i]
    return hits / len(caps)

  report(args, "text", {
      "captions": len(caps), "feature_dim": int(flat.shape[1]),
      "min_pairwise_distance": float(d.min()), "median_pairwise_distance": float(np.median(d[np.isfinite(d)])),
      "all_distinct": bool(d.min() > 1e-3),
      "loo_centroid_digit": loo_accuracy([c[0] for c in combos]),
      "loo_centroid_foreground": loo_accuracy([c[1] for c in combos]),
      "loo_centroid_background": loo_accuracy([c[2] for c in combos])})


def _seeds(n: int, salt: int) -> np.ndarray:
  return (np.arange(n, dtype=np.int64) + 1_000_003 * salt).astype(np.uint32)


def use_txt2img(args, sampler: Sampler) -> None:
  first = {}  # combination -> its first image, for the grid
  for held_out, salt in ((False, 1), (True, 2)):
    combos = cd.combinations(held_out=held_out)
    targets = [combos[i % len(combos)] for i in range(args.num)]
    t0 = time.perf_counter()
    images = sampler.run("txt2img", [cd.caption(*c) for c in targets], _seeds(args.num, salt))
    secs = time.perf_counter() - t0
    scores = judge_lib.score(images, targets)
    name = "held_out" if held_out else "seen"
    numbers = {"set": name, "images": len(images), "combinations": len(combos), "seconds": secs}
    numbers.update(scores)
    if not held_out:
      numbers["digit_fid"] = float(digits_lib.digit_fid(judge_lib.decolour(images)))
      real, _ = real_test()
      numbers["digit_fid_real_test_decoloured"] = float(digits_lib.digit_fid(judge_lib.decolour(real)))
    report(args, "txt2img", numbers)
    for c, image in zip(targets, images):
      first.setdefault(c, image)
  # One row per (foreground, background), one column per digit; held-out pairs are rows' HELD_OUT cells.
  blank = np.full((32, 32, 3), 128, np.uint8)
  rows = [np.stack([first.get((d, f, b), blank) for d in cd.DIGITS]) for f in cd.FOREGROUNDS for b in cd.BACKGROUNDS]
  save_grid(os.path.join(args.grids, "digits_txt2img.png"), rows)


def use_img2img(args, sampler: Sampler) -> None:
  images, attrs = real_test()
  rng = np.random.default_rng(0)
  names = list(cd.FOREGROUNDS)
  targets = [(d, names[(names.index(f) + int(rng.integers(1, len(names)))) % len(names)], b) for d, f, b in attrs]
  out = sampler.run("img2img", [cd.caption(*t) for t in targets], _seeds(len(images), 3), to_float(images))
  scores = judge_lib.score(out, targets)
  numbers = {"images": len(images), "strength": args.strength}
  numbers.update(scores)
  report(args, "img2img", numbers)
  g = spread(len(images))
  save_grid(os.path.join(args.grids, "digits_img2img.png"), [images[g], out[g]])


def use_inpaint(args, sampler: Sampler) -> None:
  images, attrs = real_test()
  mask = np.zeros(images.shape[:3] + (1,), np.float32)
  mask[:, 16:] = 1.0  # repaint the bottom half
  out = sampler.run("inpaint", [cd.caption(*a) for a in attrs], _seeds(len(images), 4), to_float(images), mask)
  bg = np.stack([np.asarray(cd.BACKGROUNDS[b], np.uint8) for _, _, b in attrs])[:, None, None, :]
  blanked = np.where(mask > 0.5, bg, images).astype(np.uint8)
  scores = judge_lib.score(out, attrs)
  numbers = {"images": len(images), "masked": "bottom half (rows 16-31)"}
  numbers.update(scores)
  numbers["masked_region_psnr_db"] = psnr(out, images, mask)
  numbers["kept_region_psnr_db"] = psnr(out, images, 1.0 - mask)
  numbers["baseline_half_erased_digit_accuracy"] = judge_lib.score(blanked, attrs)["digit"]
  numbers["baseline_half_erased_masked_psnr_db"] = psnr(blanked, images, mask)
  report(args, "inpaint", numbers)
  g = spread(len(images))
  save_grid(os.path.join(args.grids, "digits_inpaint.png"), [images[g], blanked[g], out[g]])


def use_cas(args, sampler: Sampler) -> None:
  rng = np.random.default_rng(1)
  seen = cd.combinations(held_out=False)
  per_class = args.cas_num // 10
  targets = []
  for d in cd.DIGITS:
    options = [c for c in seen if c[0] == d]
    targets += [options[int(rng.integers(len(options)))] for _ in range(per_class)]
  t0 = time.perf_counter()
  images = sampler.run("txt2img", [cd.caption(*t) for t in targets], _seeds(len(targets), 5))
  gen_secs = time.perf_counter() - t0
  labels = np.asarray([t[0] for t in targets])
  cas = judge_lib.classification_accuracy_score(images, labels, seed=0)
  real_images, real_attrs = cd.ColoredDigitsSource("train").arrays()
  real = judge_lib.classification_accuracy_score(real_images, np.asarray([a[0] for a in real_attrs]), seed=0)
  report(args, "cas", {"generated_images": len(images), "generation_seconds": gen_secs,
                       "cas_generated_to_real_test": float(cas), "real_train_to_real_test": float(real)})


def use_upscale(args) -> None:
  """8x8 -> 32x32 on the real test digits: the trained upscaler against bicubic upsampling of the same inputs."""
  from sdjax import upscale as up_lib
  up, params = up_lib.load(args.upscaler)
  images, attrs = real_test()
  f = up.factor
  from sdjax.train.tasks.upscale import downsample
  small = np.asarray(downsample(jnp.asarray(to_float(images)), f, args.downsample))
  bicubic = to_uint8(jax.image.resize(jnp.asarray(small), images.shape, "cubic"))
  guided = args.upscale_guidance > 1.0
  fn = jax.jit(lambda p, prompt, keys, x: up_lib.upscale(up, p, prompt, keys, x, noise_level=args.noise_level,
                                                         sampler=args.upscale_sampler, num_steps=args.steps))
  out = []
  for s in range(0, len(images), args.batch):
    n = len(images[s:s + args.batch])
    idx = np.minimum(np.arange(s, s + args.batch), len(images) - 1)  # pad the last batch with its last image
    caps = [cd.caption(*attrs[i]) for i in idx]
    ids = pipelines.tokenize([up.tokenizer], [up.text_encoder], caps)
    neg = pipelines.tokenize([up.tokenizer], [up.text_encoder], [""] * len(caps)) if guided else None
    prompt = pipelines.Prompt(ids=ids, negative_ids=neg, guidance_scale=np.full((len(caps),), args.upscale_guidance,
                                                                                 np.float32) if guided else None)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(_seeds(len(images), 6)[idx], jnp.uint32))
    out.append(to_uint8(fn(params, prompt, keys, jnp.asarray(small[idx])))[:n])
  out = np.concatenate(out)
  numbers = {"images": len(images), "input": f"{32 // f}x{32 // f}", "output": "32x32",
             "noise_level": args.noise_level, "guidance": args.upscale_guidance,
             "psnr_db": psnr(out, images), "bicubic_psnr_db": psnr(bicubic, images)}
  numbers.update({f"sd_{k}": v for k, v in judge_lib.score(out, attrs).items()})
  numbers.update({f"bicubic_{k}": v for k, v in judge_lib.score(bicubic, attrs).items()})
  report(args, "upscale", numbers)
  g = spread(len(images))
  lowres = to_uint8(jax.image.resize(jnp.asarray(small[g]), (len(g), 32, 32, 3), "nearest"))
  save_grid(os.path.join(args.grids, "digits_upscale.png"), [lowres, bicubic[g], out[g], images[g]])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image intersection over union [N] of boolean masks [N, H, W] (1 where both are empty)."""
  inter, union = (a & b).sum(axis=(1, 2)), (a | b).sum(axis=(1, 2))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def use_controlnet(args) -> None:
  """A trained ControlNet (configs/controlnet_digits.py) on the real test digits: (a) the control image of a real
  digit with that image's caption: the judged digit against the control's, and the IoU of the generated
  foreground (the same silhouette rule, sdjax.data.control_images) with the control silhouette; (b) the same
  prompts and seeds without the ControlNet; (c) the control image of digit A with a caption naming another digit B
  (B = A + 1..9 mod 10, at random; the image's colours): which one the judge sees."""
  from sdjax import control as control_lib, runs
  from sdjax.data import control_images as ci
  run = runs.load(args.controlnet, task="controlnet")
  model = run.model
  sd, params, tok = model.sd, model.params, model.tokenizers
  base_params = {k: v for k, v in params.items() if k != "controlnets"}
  images, attrs = real_test()
  controls = ci.control_images(images, model.control)
  silhouette = ci.ControlConfig("silhouette", model.control.threshold, model.control.border)
  kw = dict(height=32, width=32, sampler=args.sampler, num_steps=args.steps)
  with_cn = jax.jit(lambda p, prompt, keys, ctl: pipelines.txt2img(sd, p, prompt, keys, controlnets=(model.controlnet,),
                                                                   control=(ctl,), **kw))
  without = jax.jit(lambda p, prompt, keys: pipelines.txt2img(sd, p, prompt, keys, **kw))

  def sample(captions, seeds, control=None):
    out = []
    for s in range(0, len(captions), args.batch):
      n = len(captions[s:s + args.batch])
      idx = np.minimum(np.arange(s, s + args.batch), len(captions) - 1)  # pad the last batch with its last row
      caps = [captions[i] for i in idx]
      prompt = pipelines.Prompt(ids=pipelines.tokenize(tok, sd.text_encoders, caps),
                                negative_ids=pipelines.tokenize(tok, sd.text_encoders, [""] * len(caps)),
                                guidance_scale=np.full((len(caps),), args.guidance, np.float32))
      keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds[idx], jnp.uint32))
      if control is None:
        out.append(to_uint8(without(base_params, prompt, keys))[:n])
      else:
        ctl = control_lib.control_input(control[idx], scale=args.control_scale)
        out.append(to_uint8(with_cn(params, prompt, keys, ctl))[:n])
    return np.concatenate(out)

  digit = np.asarray([a[0] for a in attrs])
  mask = controls[..., 0] > 0.5
  fg = lambda x: ci.control_images(x, silhouette)[..., 0] > 0.5
  seeds = _seeds(len(images), 7)
  captions = [cd.caption(*a) for a in attrs]
  t0 = time.perf_counter()
  controlled = sample(captions, seeds, controls)
  secs = time.perf_counter() - t0
  baseline = sample(captions, seeds)
  rng = np.random.default_rng(2)
  other = (digit + rng.integers(1, 10, len(digit))) % 10
  conflict = sample([cd.caption(int(b), f, g) for b, (_, f, g) in zip(other, attrs)], seeds, controls)
  judged = {k: judge_lib.judge(v)["digit"] for k, v in (("cn", controlled), ("base", baseline), ("conf", conflict))}
  # For scale: the control silhouette against another real test digit of the same class (the next one, cyclically):
  # the IoU of "the right digit, not this shape".
  same = np.empty(len(digit), int)
  for d in np.unique(digit):
    idx = np.flatnonzero(digit == d)
    same[idx] = np.roll(idx, -1)
  other_real_iou = iou(mask[same], mask)
  numbers = {"images": len(images), "control": model.control.kind, "step": run.step, "sampler": args.sampler,
             "steps": args.steps, "guidance": args.guidance, "control_scale": args.control_scale,
             "controlnet_seconds": secs,
             "controlnet_digit_matches_control": float((judged["cn"] == digit).mean()),
             "controlnet_iou_mean": float(iou(fg(controlled), mask).mean()),
             "controlnet_iou_median": float(np.median(iou(fg(controlled), mask)))}
  numbers.update({f"controlnet_{k}": v for k, v in judge_lib.score(controlled, attrs).items() if k != "digit"})
  numbers.update({"baseline_digit_matches_control": float((judged["base"] == digit).mean()),
                  "baseline_iou_mean": float(iou(fg(baseline), mask).mean()),
                  "baseline_iou_median": float(np.median(iou(fg(baseline), mask)))})
  numbers.update({f"baseline_{k}": v for k, v in judge_lib.score(baseline, attrs).items() if k != "digit"})
  numbers.update({"conflict_judged_control_digit": float((judged["conf"] == digit).mean()),
                  "conflict_judged_caption_digit": float((judged["conf"] == other).mean()),
                  "conflict_iou_mean": float(iou(fg(conflict), mask).mean()),
                  "same_digit_other_real_iou_mean": float(other_real_iou.mean())})
  report(args, "controlnet", numbers)
  g = spread(len(images))
  ctl_rows = to_uint8(controls[g] * 2.0 - 1.0)
  save_grid(os.path.join(args.grids, "digits_controlnet.png"),
            [ctl_rows, controlled[g], baseline[g], conflict[g], images[g]])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("uses", nargs="+", choices=USES + ("all",))
  p.add_argument("--vae", default="runs/vae_digits/vae")
  p.add_argument("--ldm", default="runs/ldm_digits")
  p.add_argument("--upscaler", default="runs/upscale_digits/upscaler")
  p.add_argument("--controlnet", default="runs/controlnet_digits", help="a controlnet training run's workdir")
  p.add_argument("--control_scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
  p.add_argument("--num", type=int, default=500, help="txt2img images per set (seen, held-out)")
  p.add_argument("--cas_num", type=int, default=5000, help="generated training images for CAS")
  p.add_argument("--sampler", default="ddim")
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--guidance", type=float, default=4.0)
  p.add_argument("--strength", type=float, default=0.6)
  p.add_argument("--noise_level", type=int, default=20)
  p.add_argument("--upscale_guidance", type=float, default=1.0, help="> 1: classifier-free guidance")
  p.add_argument("--upscale_sampler", default="ddim")
  p.add_argument("--downsample", default="area", help="how the low-res inputs are made (as config.upscale.downsample)")
  p.add_argument("--batch", type=int, default=100)
  p.add_argument("--real", type=int, default=0, help="use the first N real test images (0: all 500)")
  p.add_argument("--results", default="/tmp/digits_demo.jsonl")
  p.add_argument("--grids", default="docs")
  args = p.parse_args(argv)
  REAL_LIMIT[0] = args.real or None
  uses = USES if "all" in args.uses else tuple(u for u in USES if u in args.uses)
  sampler = None
  for use in uses:
    if use == "vae":
      use_vae(args)
    elif use == "text":
      use_text(args)
    elif use == "upscale":
      use_upscale(args)
    elif use == "controlnet":
      use_controlnet(args)
    else:
      sampler = sampler or Sampler(args.ldm, args)
      {"txt2img": use_txt2img, "img2img": use_img2img, "inpaint": use_inpaint, "cas": use_cas}[use](args, sampler)
  return 0


if __name__ == "__main__":
  sys.exit(main())
