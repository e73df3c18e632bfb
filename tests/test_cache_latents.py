"""cache_latents: VAE posteriors (and prompt embeddings) cached on 8 devices equal direct single-device encodes,
read back exactly by the training pipeline; samples independent of batch size; resuming; errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from sdjax.convert import load_text_encoder, load_vae
from sdjax.data import cache_latents, input_pipeline, prepare, preprocess, records
from sdjax.models import clip
from sdjax.models.vae import scale_latents

MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
VAE, VAE_SHIFT = os.path.join(MODELS, "vae_sd"), os.path.join(MODELS, "vae_shift")
CLIP1, CLIP2, TOKENIZER = (os.path.join(MODELS, n) for n in ("clip_sd1", "clip_sdxl2", "tokenizer"))
SIZES = [(40, 48), (64, 56), (33, 50), (48, 48), (70, 36)]  # (width, height)
RES = 32  # vae_sd downscales by 2, vae_shift by 4
N = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A prepared records dir of N random RGB images of varied sizes with captions."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(N):
    w, h = SIZES[i % len(SIZES)]
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"img{i:02d}.png")
    (root / f"img{i:02d}.txt").write_text(f"a photo of thing number {i}")
  out = str(tmp_path_factory.mktemp("records"))
  prepare.prepare(out, list(prepare.scan_folder(str(root))), progress=False)
  return out


def cli(data, output, *extra):
  return cache_latents.main(["--data", data, "--output", str(output), "--vae", VAE, "--resolution", str(RES),
                             "--batch_size", "8", "--examples_per_shard", "4", *extra])


SD1 = ("--dtype", "float32", "--micro_conditioning", "--text_encoder", CLIP1, "--tokenizer", TOKENIZER)


@pytest.fixture(scope="module")
def sd1(data, tmp_path_factory):
  """The CLI on 8 devices: float32 posteriors, SD 1.x prompt embeddings, micro-conditioning."""
  out = tmp_path_factory.mktemp("sd1") / "latents"
  assert cli(data, out, *SD1) == 0
  return str(out)


@pytest.fixture(scope="module")
def direct(data):
  """Single-device references: preprocessed images, time_ids and the VAE's (mean, logvar) for all N."""
  src = records.RecordSource(data)
  opts = preprocess.ImageOptions(resolution=RES, micro_conditioning=True)
  done = [preprocess.process_image(src[i]["image"], opts, np.random.default_rng(0),
                                   original_size=(src[i]["orig_height"], src[i]["orig_width"])) for i in range(N)]
  images = np.stack([d["image"] for d in done])
  vae, params = load_vae(VAE)
  one = jax.devices()[0]
  mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(
      jax.device_put(params, one), jax.device_put(images, one))
  return {"images": images, "time_ids": np.stack([d["time_ids"] for d in done]), "mean": np.asarray(mean),
          "logvar": np.asarray(logvar), "captions": [src[i]["caption"] for i in range(N)],
          "paths": [src[i]["path"] for i in range(N)]}


def read_all(directory):
  src = records.RecordSource(directory, kind="latents")
  return [src[i] for i in range(len(src))]


def stacked(examples, key):
  return np.stack([np.asarray(e[key]) for e in examples])


def test_posteriors_on_8_devices_equal_a_direct_single_device_encode(data, sd1, direct):
  meta = records.read_meta(sd1)
  assert meta["kind"] == "latents" and meta["num_examples"] == N and meta["store"] == "dist"
  assert [s["num_examples"] for s in meta["shards"]] == [4, 4, 2]  # 2 batches of 8, the last one padded
  assert all(s["file"].startswith("latents-p0-") for s in meta["shards"])
  assert meta["shift"] == 0.0 and meta["scale"] == pytest.approx(0.18215) and meta["scaling_factor"] == 0.18215
  assert meta["latent_shape"] == [RES // 2, RES // 2, 4] and meta["resolution"] == RES
  assert meta["vae"] == VAE and meta["dtype"] == "float32" and meta["source"] == f"records:{os.path.abspath(data)}"
  exs = read_all(sd1)
  assert [e["index"] for e in exs] == list(range(N))
  assert [e["caption"] for e in exs] == direct["captions"] and [e["path"] for e in exs] == direct["paths"]
  for key in ("mean", "logvar"):
    got = stacked(exs, key)
    assert got.dtype == np.float32 and got.shape == (N, RES // 2, RES // 2, 4)
    np.testing.assert_allclose(got, direct[key], rtol=1e-5, atol=1e-5, err_msg=key)  # float32 rounding
  np.testing.assert_array_equal(stacked(exs, "time_ids"), direct["time_ids"])
  assert not os.path.exists(os.path.join(sd1, "progress-p0.json"))


def test_training_pipeline_reads_the_cache_back_exactly(data, tmp_path):
  """Float16 posteriors of a VAE with a shift factor -> the pipeline's latents, drawn from (seed, epoch, index)."""
  out = str(tmp_path / "z")
  opts = cache_latents.CacheOptions(vae=VAE_SHIFT, resolution=RES, batch_size=8, examples_per_shard=4)
  meta = cache_latents.cache(out, records.RecordSource(data), opts, progress=False)
  assert meta["shift"] == pytest.approx(0.1159) and meta["scale"] == pytest.approx(0.3611)
  assert meta["dtype"] == "float16" and meta["latent_shape"] == [RES // 4, RES // 4, 8]
  vae, _ = load_vae(VAE_SHIFT)
  z = np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)
  np.testing.assert_allclose((z - meta["shift"]) * np.float32(meta["scale"]), scale_latents(z, vae.config),
                             rtol=1e-6, atol=1e-6)
  exs = read_all(out)
  assert exs[0]["mean"].dtype == np.float16 and "latent" not in exs[0] and "prompt_embeds" not in exs[0]

  cfg = {"source": "latents", "path": out, "num_threads": 2}
  pipe = input_pipeline.pipeline_from_config(cfg, channels=3, global_batch_size=4, seed=7)
  shift, scale = np.float32(meta["shift"]), np.float32(meta["scale"])
  for step in (0, 1, 2):  # step 2 is in epoch 1 (2 steps per epoch)
    batch, epoch = pipe.batch(step), step // pipe.steps_per_epoch
    assert set(batch) == {"latents"} and batch["latents"].shape == (4, 8, 8, 8)
    for row, i in enumerate(pipe.indices(step)):
      mean, logvar = exs[i]["mean"].astype(np.float32), exs[i]["logvar"].astype(np.float32)
      eps = np.random.default_rng([7, epoch, int(i)]).standard_normal(mean.shape, np.float32)
      np.testing.assert_array_equal(batch["latents"][row], (mean + np.exp(0.5 * logvar) * eps - shift) * scale)
  again = input_pipeline.pipeline_from_config(cfg, channels=3, global_batch_size=4, seed=7)
  it = again.iterator(0)
  for step in range(3):
    np.testing.assert_array_equal(next(it)["latents"], pipe.batch(step)["latents"])
  other = input_pipeline.pipeline_from_config(cfg, channels=3, global_batch_size=4, seed=8)
  assert not np.allclose(other.batch(0)["latents"], pipe.batch(0)["latents"])


def test_samples_do_not_depend_on_batch_size_or_devices_and_sdxl_prompts(data, direct, tmp_path):
  """--store sample: example i's draw comes from (seed, i); on 8 devices with SDXL's two text encoders, and
  on 1 device with another batch size."""
  common = dict(vae=VAE, resolution=RES, store="sample", dtype="float32", seed=3, examples_per_shard=4)
  sdxl = cache_latents.CacheOptions(batch_size=8, text_encoder=CLIP1, tokenizer=TOKENIZER,
                                    text_encoder_2=CLIP2, tokenizer_2=TOKENIZER, **common)
  one = cache_latents.CacheOptions(batch_size=3, **common)
  src = records.RecordSource(data)
  cache_latents.cache(str(tmp_path / "a"), src, sdxl, progress=False)
  cache_latents.cache(str(tmp_path / "b"), src, one, devices=jax.devices()[:1], progress=False)
  a, b = read_all(str(tmp_path / "a")), read_all(str(tmp_path / "b"))
  za, zb = stacked(a, "latent"), stacked(b, "latent")
  assert "mean" not in a[0] and za.shape == (N, RES // 2, RES // 2, 4)
  np.testing.assert_allclose(za, zb, rtol=1e-5, atol=1e-5)
  eps = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(3), i), (RES // 2, RES // 2, 4))
                  for i in range(N)])
  np.testing.assert_allclose(za, direct["mean"] + np.exp(0.5 * direct["logvar"]) * eps, rtol=1e-5, atol=1e-5)

  # SDXL: penultimate hidden states of both encoders side by side; the second encoder's pooled output.
  tok = clip.load_tokenizer(TOKENIZER)
  (enc1, p1), (enc2, p2) = load_text_encoder(CLIP1), load_text_encoder(CLIP2)

  def encode(prompts):
    ids = jnp.asarray(clip.tokenize(tok, prompts, 16))
    _, _, h1 = enc1.apply({"params": p1}, ids, output_hidden_states=True)
    _, pooled, h2 = enc2.apply({"params": p2}, ids, output_hidden_states=True)
    return np.concatenate([h1[-2], h2[-2]], -1), np.asarray(pooled)

  embeds, pooled = encode(direct["captions"])
  assert embeds.shape == (N, 16, 32 + 32) and pooled.shape == (N, 24)
  np.testing.assert_allclose(stacked(a, "prompt_embeds"), embeds, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stacked(a, "pooled_prompt_embeds"), pooled, rtol=1e-5, atol=1e-5)
  empty_embeds, empty_pooled = encode([""])
  with np.load(os.path.join(tmp_path / "a", "empty_prompt.npz")) as f:
    np.testing.assert_allclose(f["prompt_embeds"], empty_embeds[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f["pooled_prompt_embeds"], empty_pooled[0], rtol=1e-5, atol=1e-5)


def test_prompt_embeddings_and_caption_dropout(sd1, direct):
  tok = clip.load_tokenizer(TOKENIZER)
  enc, params = load_text_encoder(CLIP1)

  def encode(prompts):  # SD 1.x: the last hidden state
    return np.asarray(enc.apply({"params": params}, jnp.asarray(clip.tokenize(tok, prompts, 16)))[0])

  exs = read_all(sd1)
  np.testing.assert_allclose(stacked(exs, "prompt_embeds"), encode(direct["captions"]), rtol=1e-5, atol=1e-5)
  assert "pooled_prompt_embeds" not in exs[0]
  meta = records.read_meta(sd1)
  assert meta["empty_prompt"] == "empty_prompt.npz"
  with np.load(os.path.join(sd1, "empty_prompt.npz")) as f:
    assert f.files == ["prompt_embeds"]
    empty = f["prompt_embeds"]
  np.testing.assert_allclose(empty, encode([""])[0], rtol=1e-5, atol=1e-5)

  cfg = {"source": "latents", "path": sd1, "num_threads": 1}
  kept = input_pipeline.pipeline_from_config(cfg, channels=3, global_batch_size=5, seed=0).batch(0)
  dropped = input_pipeline.pipeline_from_config({**cfg, "caption_dropout": 1.0}, channels=3, global_batch_size=5,
                                                seed=0)
  batch, indices = dropped.batch(0), dropped.indices(0)
  assert set(batch) == {"latents", "time_ids", "prompt_embeds"}
  np.testing.assert_array_equal(batch["prompt_embeds"], np.broadcast_to(empty, batch["prompt_embeds"].shape))
  np.testing.assert_array_equal(kept["prompt_embeds"], stacked(exs, "prompt_embeds")[indices])
  np.testing.assert_array_equal(batch["time_ids"], direct["time_ids"][indices])


def snapshot(directory):
  return {n: (os.stat(os.path.join(directory, n)).st_mtime_ns, open(os.path.join(directory, n), "rb").read())
          for n in sorted(os.listdir(directory))}


def test_rerun_skips_finished_work_and_an_interrupted_run_resumes(sd1, data, tmp_path, monkeypatch):
  before = snapshot(sd1)
  assert cli(data, sd1, *SD1) == 0
  assert snapshot(sd1) == before  # nothing rewritten

  # The same job, killed after its first shard, then run again: only the missing shards are encoded.
  out = str(tmp_path / "z")
  write_shard, written = records.write_shard, []

  def crash_after_one(path, examples):
    if written:
      raise KeyboardInterrupt
    written.append(os.path.basename(path))
    return write_shard(path, examples)

  monkeypatch.setattr(records, "write_shard", crash_after_one)
  with pytest.raises(KeyboardInterrupt):
    cli(data, out, *SD1)
  assert not os.path.exists(os.path.join(out, "dataset.json"))
  assert os.path.exists(os.path.join(out, "progress-p0.json"))
  first = os.stat(os.path.join(out, written[0])).st_mtime_ns

  def count(path, examples):
    written.append(os.path.basename(path))
    return write_shard(path, examples)

  monkeypatch.setattr(records, "write_shard", count)
  assert cli(data, out, *SD1) == 0
  shards = [s["file"] for s in records.read_meta(out)["shards"]]
  assert written == shards and os.stat(os.path.join(out, shards[0])).st_mtime_ns == first
  assert not os.path.exists(os.path.join(out, "progress-p0.json"))
  for got, want in zip(read_all(out), read_all(sd1)):
    assert got.keys() == want.keys()
    for k in ("mean", "logvar", "prompt_embeds"):
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_bad_input_is_a_one_line_error(data, sd1, tmp_path, capsys):
  def error(*args):
    assert cache_latents.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err

  base = ["--data", data, "--output", str(tmp_path / "o")]
  missing = str(tmp_path / "no_vae")
  assert f"VAE folder {missing!r} does not exist" in error(*base, "--vae", missing, "--resolution", "32")
  assert "--resolution 30 is not divisible by the VAE's downscale factor 4 (try 32)" in error(
      *base, "--vae", VAE_SHIFT, "--resolution", "30")
  assert "--batch_size 6 is not divisible by the 8 devices" in error(
      *base, "--vae", VAE, "--resolution", "32", "--batch_size", "6")
  assert "--text_encoder and --tokenizer go together" in error(
      *base, "--vae", VAE, "--resolution", "32", "--text_encoder", CLIP1)
  assert "exactly one of --data" in error("--output", str(tmp_path / "o"), "--vae", VAE, "--resolution", "32")
  empty = str(tmp_path / "empty")
  prepare.prepare(empty, [], progress=False)
  assert "has no examples" in error("--data", empty, "--output", str(tmp_path / "o"), "--vae", VAE,
                                    "--resolution", "32")
  assert "already holds a dataset of kind 'images'" in error(
      "--data", data, "--output", data, "--vae", VAE, "--resolution", "32")
  assert "made with other settings" in error("--data", data, "--output", sd1, "--vae", VAE, "--resolution", "32")
