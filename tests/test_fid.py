"""FID evaluation vs the PyTorch references (fixtures from tools/make_inception_fixtures.py, no torch here):
the FID InceptionV3 vs pytorch-fid's (random weights rebuilt from a numpy seed, resize and normalisation
included, sharded over 8 devices), the restricted .pth reader, Fréchet distance vs pytorch-fid, KID and
precision/recall vs torch-fidelity and float64 numpy brute force, streaming statistics vs np.cov.
"""
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from sdjax import parallel
from sdjax.eval import fid, inception, precision_recall, torch_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "inception_parity.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def state(ref):
  return inception.random_state_dict(int(ref["weight_seed"]))


def _images(ref):
  rng = np.random.default_rng(int(ref["image_seed"]))  # as the tool draws them
  imgs = [rng.random((h, w, 3), dtype=np.float32) for h, w in ref["image_sizes"]]
  np.testing.assert_allclose([i.astype(np.float64).sum() for i in imgs], ref["image_sums"], rtol=1e-12)
  return imgs


def test_features_match_pytorch_fid_sharded_and_unsharded(ref, state):
  params = inception.params_from_state_dict(state)
  imgs = _images(ref)
  # pytorch-fid's resize per input size (64x64, 75x100, 299x299 identity, 350x320), then one network compile
  resized = np.concatenate([np.asarray(jax.jit(inception.resize_bilinear)(np.stack(imgs[i:i + 2])))
                            for i in range(0, len(imgs), 2)])
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  sharded = inception.features(params, jax.device_put(resized, parallel.batch_sharding(mesh)))
  assert sharded["pool"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  plain = inception.features(params, resized)
  for k in ("pool", "logits", "logits_unbiased"):
    got, want = np.asarray(sharded[k]), ref[k]
    scale = np.abs(want).max()
    # float32 rounding through ~50 convolutions: measured 3.5e-7 of the feature scale (pool max ~99)
    assert np.abs(got - want).max() <= 1e-5 * scale, (k, np.abs(got - want).max() / scale)
    # per-device batch 1 vs 8 picks other conv loops: measured 1.7e-6 of the scale, float32 rounding too
    np.testing.assert_allclose(got, np.asarray(plain[k]), rtol=0, atol=1e-5 * scale)
  assert ref["pool"].std() > 1.0  # the random network is far from degenerate


def test_preprocess_uint8_resize_and_shape_errors():
  x = np.random.default_rng(0).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(x)),
                                np.asarray(inception.preprocess(x.astype(np.float32) / 255)))
  m = inception._bilinear_matrix(5, 299)
  np.testing.assert_allclose(m.sum(1), 1, rtol=1e-6)
  np.testing.assert_array_equal(inception._bilinear_matrix(299, 299), np.eye(299, dtype=np.float32))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    inception.preprocess(np.zeros((1, 8, 8, 1), np.float32))


def test_load_params_from_npz_and_clear_errors(tmp_path, state):
  path = str(tmp_path / "inception.npz")
  with open(path, "wb") as f:
    np.savez(f, **state)
  loaded = inception.load_params(path)
  want = inception.params_from_state_dict(state)
  jax.tree.map(np.testing.assert_array_equal, loaded, want)
  assert loaded["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)

  bad = dict(state)
  del bad["Mixed_6b.branch7x7_2.bn.running_var"]
  with pytest.raises(ValueError, match=r"missing key 'Mixed_6b.branch7x7_2.bn.running_var'"):
    inception.params_from_state_dict(bad)
  bad = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"key 'fc.weight' has shape \(1000, 2048\).*needs \(1008, 2048\)"):
    inception.params_from_state_dict(bad)
  bad = dict(state, **{"AuxLogits.fc.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'AuxLogits.fc.weight'"):
    inception.params_from_state_dict(bad)
  ok = dict(state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)})
  inception.params_from_state_dict(ok)  # BatchNorm's counter is ignored
  garbage = tmp_path / "pt_inception.pth"
  garbage.write_bytes(b"\x80\x02not a checkpoint at all")
  with pytest.raises(ValueError, match="pt_inception.pth: not a readable torch.save state dict"):
    inception.load_params(str(garbage))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inception.load_params(str(tmp_path / "absent.pth"))


def test_restricted_reader_reads_both_torch_layouts(ref):
  for layout in ("zip", "legacy"):
    sd = torch_pickle.load(os.path.join(FIXTURES, f"inception_reader_{layout}.pth"))
    assert list(sd) == ["w", "w_t", "row", "col", "half", "bf16", "long", "scalar", "param"], layout
    for k, v in sd.items():
      want = ref[f"reader/{k}"]
      assert v.shape == want.shape, (layout, k)
      np.testing.assert_array_equal(v.astype(np.float64) if k == "bf16" else v, want)
    assert sd["half"].dtype == np.float16 and sd["long"].dtype == np.int64 and sd["scalar"].dtype == np.float64


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo this must never run",))


def test_restricted_reader_refuses_code_and_truncation(tmp_path):
  evil = tmp_path / "evil.pth"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"w": _RunsCode()}, protocol=2))
  with pytest.raises(torch_pickle.TorchPickleError, match=r"refusing to load (posix|os|nt)\.system"):
    torch_pickle.load(str(evil))
  data = open(os.path.join(FIXTURES, "inception_reader_legacy.pth"), "rb").read()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:-40])
  with pytest.raises(torch_pickle.TorchPickleError, match="cut.pth: storage .* truncated"):
    torch_pickle.load(str(cut))


def _feature_sets():
  rng = np.random.default_rng(7)  # as tools/make_inception_fixtures.py feature_sets()
  a = rng.standard_normal((200, 64)).astype(np.float32)
  b = (rng.standard_normal((200, 64)) * 1.1 + 0.05).astype(np.float32)
  c = rng.random((40, 96)).astype(np.float32)
  d = (rng.random((40, 96)) ** 2).astype(np.float32)
  return a, b, c, d


def test_streaming_stats_frechet_distance_and_stats_files(ref, tmp_path):
  a, b, c, d = _feature_sets()
  for name, (x, y) in {"full": (a, b), "lowrank": (c, d)}.items():
    # uneven batches, merged in a tree as devices/hosts would
    parts = [fid.FeatureStats.of(x[i:i + 13]) for i in range(0, len(x), 13)]
    left = fid.FeatureStats.empty(x.shape[1]).update(x[:0])
    for p in parts[:2]:
      left = left.merge(p)
    right = parts[2]
    for p in parts[3:]:
      right = right.merge(p)
    sx, sy = left.merge(right), fid.FeatureStats.of(y)
    x64 = x.astype(np.float64)
    assert sx.count == len(x)
    np.testing.assert_allclose(sx.mu, x64.mean(0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(sx.sigma, np.cov(x64, rowvar=False), rtol=0, atol=1e-13)
    got = fid.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    # pytorch-fid (scipy sqrtm; its mu is a float32 mean): measured 1.1e-8 (full) and 7e-8 (rank-deficient) relative
    assert abs(got - ref[f"fid_{name}"]) <= 1e-6 * ref[f"fid_{name}"], (name, got, ref[f"fid_{name}"])
    assert abs(fid.frechet_distance(sx.mu, sx.sigma, sx.mu, sx.sigma)) < 1e-9 * np.trace(sx.sigma)

  path = str(tmp_path / "stats" / "ref.npz")
  fid.save_stats(path, sx.mu, sx.sigma)
  with np.load(path) as z:
    assert sorted(z.files) == ["mu", "sigma"]
  mu, sigma = fid.load_stats(path)
  np.testing.assert_array_equal(mu, sx.mu)
  np.testing.assert_array_equal(sigma, sx.sigma)
  with open(tmp_path / "wrong.npz", "wb") as f:
    np.savez(f, mean=mu, sigma=sigma)
  with pytest.raises(ValueError, match="missing 'mu'"):
    fid.load_stats(str(tmp_path / "wrong.npz"))


def test_kid_matches_torch_fidelity(ref):
  a, b, _, _ = _feature_sets()
  mean, std = fid.kid(a, b, num_subsets=20, subset_size=100)
  np.testing.assert_allclose([mean, std], ref["kid"], rtol=1e-10)
  # one subset of everything: the unbiased MMD^2 with (x.y / d + 1)^3 written out in float64
  x, y = a.astype(np.float64), b.astype(np.float64)
  k = lambda p, q: (p @ q.T / 64 + 1) ** 3
  m = len(x)
  want = ((k(x, x).sum() - np.trace(k(x, x)) + k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
          - 2 * k(x, y).mean())
  assert fid.kid(a, b, num_subsets=1, subset_size=m)[0] == pytest.approx(want, rel=1e-12)
  with pytest.raises(ValueError, match="subset size 1000"):
    fid.kid(a, b)


def test_precision_recall_vs_float64_brute_force_and_torch_fidelity(ref):
  real, fake, _, _ = _feature_sets()

  def reference(real, fake, k=3):
    r, f = real.astype(np.float64), fake.astype(np.float64)
    dist = lambda p, q: np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1))
    r_rad = np.sort(dist(r, r), axis=1)[:, k]  # index k skips the point itself
    f_rad = np.sort(dist(f, f), axis=1)[:, k]
    return (dist(f, r) <= r_rad[None]).any(1).mean(), (dist(r, f) <= f_rad[None]).any(1).mean()

  got = precision_recall.precision_recall(real, fake, k=3, block=64)  # 4 blocks, the last padded
  assert got == pytest.approx(reference(real, fake), abs=1e-12)
  assert got == pytest.approx(tuple(ref["precision_recall"]), abs=1e-6)  # torch-fidelity averages in float32
  assert 0 < got[0] < 1 and 0 < got[1] <= 1
