"""Regenerate tests/fixtures/inception_* : pytorch-fid / torch-fidelity reference values for tests/test_fid.py.

Run with the torch venv (torch, pytorch-fid, torch-fidelity, numpy, sdjax importable):
  /work/tvenv/bin/python tools/make_inception_fixtures.py

No download: pytorch-fid's `fid_inception_v3` fetches its weights with `load_state_dict_from_url`; this script
replaces that function (in the pytorch_fid.inception module) by one returning
sdjax.eval.inception.random_state_dict(WEIGHT_SEED), a deterministic numpy state dict the test rebuilds without
torch, so the fixture holds only inputs' seeds and outputs (~150 KB), not the 95 MB of weights.
pytorch-fid's constructor then loads it with `load_state_dict(strict=True)`, which also checks sdjax's key/shape
table against the torch modules. pytorch-fid imports torchvision (for the Inception blocks it subclasses); with a
CUDA torchvision wheel next to a CPU torch, whose compiled ops cannot load, put it on PYTHONPATH and pass
--stub-torchvision-ops to skip torchvision's op registration (only its pure-Python model code is used).

Written:
  inception_parity.npz   pool features/logits of 8 seeded images of 4 sizes through pytorch-fid's InceptionV3
                         (resize + normalisation included); seeded feature sets with pytorch-fid's Fréchet
                         distance, torch-fidelity's KID and precision/recall on them.
  inception_reader_{zip,legacy}.pth + arrays in inception_parity.npz: a tiny state dict saved by torch.save in both
                         file layouts (views, offsets, shared storage, several dtypes) for the restricted reader.
"""
import argparse
import collections
import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
WEIGHT_SEED = 0
IMAGE_SEED = 1234
IMAGE_SIZES = [(64, 64), (64, 64), (75, 100), (75, 100), (299, 299), (299, 299), (350, 320), (350, 320)]


def images():
  """The 8 seeded [H, W, 3] float32 images in [0, 1] (tests/test_fid.py draws the same)."""
  rng = np.random.default_rng(IMAGE_SEED)
  return [rng.random((h, w, 3), dtype=np.float32) for h, w in IMAGE_SIZES]


def feature_sets():
  """Seeded float32 feature sets: a/b full-rank (200 x 64), c/d rank-deficient (40 x 96)."""
  rng = np.random.default_rng(7)
  a = rng.standard_normal((200, 64)).astype(np.float32)
  b = (rng.standard_normal((200, 64)) * 1.1 + 0.05).astype(np.float32)
  c = rng.random((40, 96)).astype(np.float32)
  d = (rng.random((40, 96)) ** 2).astype(np.float32)
  return a, b, c, d


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--stub-torchvision-ops", action="store_true")
  args = ap.parse_args()
  if args.stub_torchvision_ops:
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
  sys.path.insert(0, ROOT)
  import torch
  import torch.nn.functional as F
  from pytorch_fid import inception as fid_inception
  from pytorch_fid.fid_score import calculate_frechet_distance
  from torch_fidelity.metric_kid import kid_features_to_metric
  from torch_fidelity.metric_prc import calculate_precision_recall_full

  from sdjax.eval.inception import random_state_dict

  torch.set_num_threads(2)
  state = random_state_dict(WEIGHT_SEED)

  def fake_download(url, **kwargs):
    assert url == fid_inception.FID_WEIGHTS_URL, url
    sd = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in state.items())
    for k in [k for k in sd if k.endswith(".bn.weight")]:
      sd[k[:-len("weight")] + "num_batches_tracked"] = torch.tensor(0)
    return sd

  fid_inception.load_state_dict_from_url = fake_download
  model = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
  fc_w, fc_b = torch.from_numpy(state["fc.weight"]), torch.from_numpy(state["fc.bias"])
  out = {"weight_seed": np.int64(WEIGHT_SEED), "image_seed": np.int64(IMAGE_SEED),
         "image_sizes": np.array(IMAGE_SIZES, np.int64)}
  pools = []
  with torch.no_grad():
    for img in images():
      x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()  # NCHW, as pytorch-fid feeds it
      pools.append(model(x)[0][:, :, 0, 0])
    pool = torch.cat(pools)
    out["pool"] = pool.numpy()
    out["logits_unbiased"] = pool.mm(fc_w.T).numpy()
    out["logits"] = F.linear(pool, fc_w, fc_b).numpy()
    out["image_sums"] = np.array([img.astype(np.float64).sum() for img in images()])
  print("pool features: mean %.4f std %.4f max %.4f" % (out["pool"].mean(), out["pool"].std(), out["pool"].max()))

  a, b, c, d = feature_sets()
  for name, (x, y) in {"full": (a, b), "lowrank": (c, d)}.items():
    mu1, s1 = np.mean(x, axis=0), np.cov(x, rowvar=False)  # pytorch-fid's calculate_activation_statistics
    mu2, s2 = np.mean(y, axis=0), np.cov(y, rowvar=False)
    out[f"fid_{name}"] = np.float64(calculate_frechet_distance(mu1, s1, mu2, s2))
    print(f"pytorch-fid Fréchet distance ({name}): {out[f'fid_{name}']!r}")
  kid = kid_features_to_metric(torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64)),
                               kid_subsets=20, kid_subset_size=100, verbose=False)
  out["kid"] = np.array([kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]])
  # torch-fidelity's convention: features_1 = generated (b), features_2 = real (a)
  out["precision_recall"] = np.array(calculate_precision_recall_full(torch.from_numpy(b), torch.from_numpy(a), 3))
  print("torch-fidelity KID", out["kid"], "precision/recall", out["precision_recall"])

  # tiny state dicts for the restricted reader, both torch.save layouts
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  tiny = collections.OrderedDict([
    ("w", base), ("w_t", base.t()), ("row", base[2]), ("col", base[:, 3]),
    ("half", torch.linspace(-2, 2, 5, dtype=torch.float16)), ("bf16", torch.linspace(-1, 3, 7, dtype=torch.bfloat16)),
    ("long", torch.tensor([3, -1, 2**40])), ("scalar", torch.tensor(2.5, dtype=torch.float64)),
    ("param", torch.nn.Parameter(torch.ones(2, 3)))])
  torch.save(tiny, os.path.join(OUT, "inception_reader_zip.pth"))
  torch.save(tiny, os.path.join(OUT, "inception_reader_legacy.pth"), _use_new_zipfile_serialization=False)
  for k, v in tiny.items():
    out[f"reader/{k}"] = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()

  np.savez_compressed(os.path.join(OUT, "inception_parity.npz"), **out)
  for n in ("inception_parity.npz", "inception_reader_zip.pth", "inception_reader_legacy.pth"):
    print(n, os.path.getsize(os.path.join(OUT, n)), "bytes")


if __name__ == "__main__":
  main()
