"""Data: the bundled digits, the grain pipeline (order, hosts, resumption), preprocessing, prepare, TFDS."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from sdjax.data import bundled, input_pipeline, load_bundled, prepare, preprocess, records, sources
from sdjax.data.pipeline import Pipeline

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "models", "tokenizer")


@pytest.fixture(scope="module")
def raw():
  return bundled.read_raw()


def test_bundled_splits_round_trip_through_tfds_exactly(raw):
  images, labels = raw
  assert images.shape == (5000, 28, 28, 1) and np.bincount(labels).tolist() == [500] * 10
  seen = []
  for split, per_class in (("train", 450), ("test", 50)):
    x, y = load_bundled(split)
    idx = bundled.split_indices(labels, split)
    assert x.dtype == np.uint8 and x.shape == (10 * per_class, 28, 28, 1)
    assert np.bincount(y).tolist() == [per_class] * 10
    np.testing.assert_array_equal(x, images[idx])  # ArrayRecord/PNG round trip is lossless
    np.testing.assert_array_equal(y, labels[idx])
    seen.append(set(idx.tolist()))
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 5000
  with pytest.raises(ValueError, match="unknown split"):
    load_bundled("validation")


def test_bundled_pipeline_gives_the_default_jobs_batches(raw):
  """The default config's loader: the digits as float32 in [-1, 1] with their labels, in grain's order."""
  from configs.default import get_config

  pipe = input_pipeline.pipeline_from_config(get_config().data, channels=1, global_batch_size=64, seed=0,
                                             label=True)
  assert pipe.num_examples == 4500 and pipe.steps_per_epoch == 70
  batch = next(pipe.iterator(0))
  assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  # Each row is a real digit of its label, scaled exactly.
  images, labels = raw
  source = sources.BundledSource("train")
  for row, i in enumerate(pipe.indices(0)[:5]):
    ex = source[int(i)]
    np.testing.assert_array_equal(batch["image"][row], ex["image"].astype(np.float32) / 127.5 - 1.0)
    assert batch["label"][row] == ex["label"]


# --- order, hosts, resumption ---------------------------------------------------------------------------

def ident(ex, rng):
  return {"x": np.int64(ex["i"]), "u": np.float32(rng.random())}


def pipe(n=100, batch=10, seed=3, **kw):
  return Pipeline([{"i": i} for i in range(n)], ident, batch, seed, **kw)


def test_same_seed_same_batches_each_epoch_a_fresh_permutation():
  a, b = pipe(), pipe()
  for step in (0, 7, 10, 123):
    np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
  it = a.iterator(0)
  got = [next(it)["x"] for _ in range(20)]
  epoch0, epoch1 = np.concatenate(got[:10]), np.concatenate(got[10:])
  assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
  assert not np.array_equal(epoch0, epoch1), "each epoch is reshuffled"
  assert not np.array_equal(pipe(seed=4).batch(0)["x"], a.batch(0)["x"])
  np.testing.assert_array_equal(got[13], a.batch(13)["x"])  # the iterator and random access agree


def test_remainder_of_an_epoch_is_dropped():
  p = pipe(n=25, batch=10)
  assert p.steps_per_epoch == 2
  epoch0 = np.concatenate([p.batch(s)["x"] for s in range(2)])
  assert len(set(epoch0.tolist())) == 20


def test_hosts_read_disjoint_contiguous_slices_that_cover_the_epoch():
  whole = pipe(n=64, batch=16)
  hosts = [pipe(n=64, batch=16, process_index=i, process_count=4) for i in range(4)]
  seen = []
  for step in range(4):  # one epoch
    parts = [h.batch(step) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), whole.batch(step)["x"])
    # Per-example randomness depends on the example, not on the host that reads it.
    np.testing.assert_array_equal(np.concatenate([p["u"] for p in parts]), whole.batch(step)["u"])
    seen += [set(p["x"].tolist()) for p in parts]
  assert sum(len(s) for s in seen) == 64 and set().union(*seen) == set(range(64))
  with pytest.raises(ValueError, match="not divisible"):
    pipe(batch=10, process_count=4)
  with pytest.raises(ValueError, match="exceeds"):
    pipe(batch=128)


@pytest.mark.parametrize("threads", [1, 4])
def test_resume_mid_epoch_reproduces_the_remaining_batches(threads):
  ref = [b["x"] for b, _ in zip(pipe(num_threads=threads).iterator(0), range(16))]
  it = pipe(num_threads=threads).iterator(0)
  for _ in range(7):
    next(it)
  saved = json.loads(json.dumps(it.state()))  # it goes through the checkpoint as JSON
  assert saved["next_step"] == 7 and saved["iterator"]
  resumed = pipe(num_threads=threads).iterator(7, saved)
  for step in range(7, 16):
    np.testing.assert_array_equal(next(resumed)["x"], ref[step])
  # Resuming on a different number of hosts: each host continues with its slice of the same global batches.
  halves = [pipe(process_index=i, process_count=2).iterator(7, saved) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), ref[7])
  with pytest.raises(ValueError, match="for step 7, not 8"):
    pipe().iterator(8, saved)


def test_resume_with_a_different_order_warns(caplog):
  saved = pipe().iterator(0).state()
  pipe(seed=5).iterator(0, saved)
  assert "different data order" in caplog.text


# --- preprocessing --------------------------------------------------------------------------------------

def gradient_image(w, h, mode="RGB"):
  y, x = np.mgrid[0:h, 0:w]
  rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)
  img = Image.fromarray(rgb)
  return img if mode == "RGB" else img.convert(mode)


def png_bytes(img):
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def test_resize_center_crop_and_micro_conditioning_follow_diffusers_rules():
  img = gradient_image(60, 40)  # w=60, h=40: the shorter side (h) -> 32, w -> int(32 * 60 / 40) = 48
  opts = preprocess.ImageOptions(resolution=32, crop="center", micro_conditioning=True)
  out = preprocess.process_image(png_bytes(img), opts, np.random.default_rng(0))
  expect = np.asarray(img.resize((48, 32), Image.BILINEAR).crop((8, 0, 40, 32)), np.float32) / 127.5 - 1
  np.testing.assert_array_equal(out["image"], expect)
  # (original h, w, crop top, crop left, target h, w), as StableDiffusionXLPipeline._get_add_time_ids.
  np.testing.assert_array_equal(out["time_ids"], [40, 60, 0, 8, 32, 32])
  tall = preprocess.process_image(png_bytes(gradient_image(30, 61)), opts, np.random.default_rng(0))
  # h: int(32 * 61 / 30) = 65 -> top = round(33 / 2) = 16 (Python rounds half to even, as torchvision)
  np.testing.assert_array_equal(tall["time_ids"], [61, 30, 16, 0, 32, 32])
  # The original size recorded at prepare time (before a --max_size downscale) wins.
  small = preprocess.process_image(png_bytes(img), opts, np.random.default_rng(0), original_size=(400, 600))
  np.testing.assert_array_equal(small["time_ids"][:2], [400, 600])


def test_random_crop_and_flip_are_drawn_from_the_examples_generator():
  img = gradient_image(50, 40)
  opts = preprocess.ImageOptions(resolution=32, crop="random", random_flip=True, micro_conditioning=True)
  resized = np.asarray(img.resize((40, 32), Image.BILINEAR), np.float32) / 127.5 - 1
  flips, lefts = set(), set()
  for seed in range(40):
    out = preprocess.process_image(png_bytes(img), opts, np.random.default_rng(seed))
    again = preprocess.process_image(png_bytes(img), opts, np.random.default_rng(seed))
    np.testing.assert_array_equal(out["image"], again["image"])
    top, left = (int(v) for v in out["time_ids"][2:4])
    assert top == 0 and 0 <= left <= 8
    flipped = not np.allclose(out["image"], resized[:, left:left + 32])
    if flipped:  # flip first, then crop: the crop corner is in the flipped image
      np.testing.assert_array_equal(out["image"], resized[:, ::-1][:, left:left + 32])
    flips.add(flipped)
    lefts.add(left)
  assert flips == {True, False} and len(lefts) > 3


def test_modes_grayscale_and_transparency():
  rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
  out = preprocess.process_image(png_bytes(rgba), preprocess.ImageOptions(), np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], np.ones((8, 8, 3), np.float32))
  gray = preprocess.process_image(png_bytes(gradient_image(8, 8)), preprocess.ImageOptions(channels=1),
                                  np.random.default_rng(0))
  assert gray["image"].shape == (8, 8, 1)
  with pytest.raises(ValueError, match="crop must be one of"):
    preprocess.ImageOptions(crop="left")


def test_captions_tokenized_and_dropped_with_the_configured_probability():
  from sdjax.models.clip import load_tokenizer, tokenize

  tok = load_tokenizer(TOKENIZER)
  t = preprocess.ExampleTransform(tokenizer=preprocess.CaptionTokenizer([tok, tok], 77, dropout=0.3))
  empty, cat = tokenize(tok, "", 77)[0], tokenize(tok, "a photo of a cat", 77)[0]
  dropped = 0
  for seed in range(400):
    out = t({"caption": "a photo of a cat"}, np.random.default_rng(seed))
    assert out["input_ids"].shape == (77,) and out["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(out["input_ids"], out["input_ids_2"])
    if np.array_equal(out["input_ids"], empty):
      dropped += 1
    else:
      np.testing.assert_array_equal(out["input_ids"], cat)
  assert 90 <= dropped <= 150  # Binomial(400, 0.3): mean 120, sd 9.2
  with pytest.raises(ValueError, match="no caption field"):
    t({"image": b""}, np.random.default_rng(0))


# --- prepare: image-caption folders, manifests, bad data ----------------------------------------------

def make_folder(root, n=6):
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    gradient_image(20 + 4 * i, 24).save(os.path.join(root, f"img{i}.png"))
    with open(os.path.join(root, f"img{i}.txt"), "w") as f:
      f.write(f"picture number {i}\n")
  return root


def test_prepare_folder_with_sidecars_and_bad_files(tmp_path):
  src = make_folder(str(tmp_path / "src"))
  sub = os.path.join(src, "sub")
  os.makedirs(sub)
  gradient_image(16, 16).save(os.path.join(sub, "j.jpg"), quality=90)
  with open(os.path.join(sub, "j.json"), "w") as f:
    json.dump({"caption": "a json caption"}, f)
  # Bad data: truncated, not an image, empty caption, no caption.
  data = open(os.path.join(src, "img0.png"), "rb").read()
  open(os.path.join(src, "trunc.png"), "wb").write(data[:len(data) // 2])
  open(os.path.join(src, "trunc.txt"), "w").write("cut off")
  open(os.path.join(src, "junk.jpg"), "wb").write(b"this is not a jpeg")
  open(os.path.join(src, "junk.txt"), "w").write("junk")
  gradient_image(8, 8).save(os.path.join(src, "empty.png"))
  open(os.path.join(src, "empty.txt"), "w").write("  \n")
  gradient_image(8, 8).save(os.path.join(src, "nocap.png"))

  out = str(tmp_path / "out")
  assert prepare.main(["--input", src, "--output", out, "--examples_per_shard", "3"]) == 0
  meta = records.read_meta(out)
  assert meta["num_examples"] == 7 and len(meta["shards"]) == 4 and meta["num_skipped"] == 4
  assert meta["skipped_reasons"] == {"unreadable or truncated image": 2, "empty caption": 1, "no caption": 1}
  skipped = dict(line.rstrip("\n").split("\t") for line in open(os.path.join(out, "skipped.txt")))
  assert {os.path.basename(p) for p in skipped} == {"trunc.png", "junk.jpg", "empty.png", "nocap.png"}

  source = records.RecordSource(out)
  by_path = {source[i]["path"]: source[i] for i in range(len(source))}
  ex = by_path[os.path.join(src, "img2.png")]
  assert ex["caption"] == "picture number 2" and (ex["height"], ex["width"]) == (24, 28)
  assert ex["image"] == open(os.path.join(src, "img2.png"), "rb").read()  # original bytes, lossless
  assert by_path[os.path.join(sub, "j.jpg")]["caption"] == "a json caption"

  # The prepared folder trains through the pipeline: every image resized and cropped.
  p = input_pipeline.pipeline_from_config({"source": "records", "path": out, "resolution": 16, "crop": "random",
                                           "random_flip": True}, channels=3, global_batch_size=7, seed=0)
  batch = p.batch(0)
  assert batch["image"].shape == (7, 16, 16, 3) and -1 <= batch["image"].min() and batch["image"].max() <= 1


def test_prepare_from_manifests_and_downscale(tmp_path):
  src = make_folder(str(tmp_path / "src"), n=3)
  with open(tmp_path / "m.csv", "w") as f:
    f.write("file_name,text\n" + "".join(f"src/img{i}.png,caption {i}\n" for i in range(3)))
  with open(tmp_path / "m.jsonl", "w") as f:
    f.writelines(json.dumps({"image": f"src/img{i}.png", "prompt": f"p{i}"}) + "\n" for i in range(3))
  for manifest, first in (("m.csv", "caption 0"), ("m.jsonl", "p0")):
    out = str(tmp_path / manifest.replace(".", "_"))
    meta = prepare.prepare(out, prepare.collect(None, str(tmp_path / manifest))[0], progress=False, max_size=12)
    assert meta["num_examples"] == 3
    ex = records.RecordSource(out)[0]
    assert ex["caption"] == first and min(ex["height"], ex["width"]) == 12 and ex["orig_height"] == 24
    assert Image.open(io.BytesIO(ex["image"])).size == (ex["width"], ex["height"])
  # A folder holding metadata.jsonl uses it.
  os.rename(tmp_path / "m.jsonl", os.path.join(src, "metadata.jsonl"))
  with open(os.path.join(src, "metadata.jsonl"), "w") as f:
    f.write(json.dumps({"file_name": "img1.png", "text": "from the manifest"}) + "\n")
  items, _ = prepare.collect(src, None)
  assert items == [(os.path.join(src, "img1.png"), "from the manifest")]
  with pytest.raises(ValueError, match="no caption column"):
    prepare.read_manifest(str(tmp_path / "m.csv"), caption_column="nope")


def test_prepare_reports_a_missing_folder(tmp_path, capsys):
  missing = str(tmp_path / "nowhere")
  assert prepare.main(["--input", missing, "--output", str(tmp_path / "o")]) == 2
  assert f"input folder {missing!r} does not exist" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="not a prepared sdjax dataset"):
    records.RecordSource(str(tmp_path))


def test_a_corrupt_record_at_training_time_names_its_file(tmp_path):
  good = png_bytes(gradient_image(8, 8))
  exs = [records.encode({"image": good, "caption": "ok", "path": f"/data/{i}.png"}) for i in range(3)]
  exs.append(records.encode({"image": good[:40], "caption": "bad", "path": "/data/broken.png"}))
  records.write_shard(str(tmp_path / "s.array_record"), exs)
  records.write_meta(str(tmp_path), {"kind": "images", "num_examples": 4,
                                     "shards": [{"file": "s.array_record", "num_examples": 4}]})
  p = input_pipeline.pipeline_from_config({"source": "records", "path": str(tmp_path), "resolution": 8},
                                          channels=3, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="/data/broken.png: unreadable or truncated image"):
    p.batch(0)


# --- TFDS --------------------------------------------------------------------------------------------

BUILDER = '''
import sys
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 3)), "text": tfds.features.Text(),
        "id": np.int32}))
  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12)}
  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"picture": Image.new("RGB", (10 + i, 12), (20 * i, 0, 0)), "text": f"red {i}", "id": i}

TinyCaptions(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
'''


def test_tfds_dataset_prepared_elsewhere_is_read_by_name_offline(tmp_path):
  data_dir = str(tmp_path / "tfds")
  script = tmp_path / "build.py"
  script.write_text(BUILDER)
  r = subprocess.run([sys.executable, str(script), data_dir], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  # This process never defined the builder: TFDS reads it from the prepared files.
  cfg = {"source": "tfds", "name": "tiny_captions", "data_dir": data_dir, "image_key": "picture",
         "caption_key": "text", "resolution": 8, "tokenizer": TOKENIZER, "max_length": 16}
  p = input_pipeline.pipeline_from_config(cfg, channels=3, global_batch_size=4, seed=0)
  batch = p.batch(0)
  assert batch["image"].shape == (4, 8, 8, 3) and batch["input_ids"].shape == (4, 16)
  src = p.source
  assert len(src) == 12 and src[0]["caption"].startswith("red ")
  with pytest.raises(ValueError, match="no feature 'caption'"):
    sources.TfdsSource("tiny_captions", "train", data_dir, image_key="picture", caption_key="caption")
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.TfdsSource("tiny_captions", "test", data_dir)


def test_unprepared_tfds_dataset_says_which_manual_step_to_take(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"not prepared in .*tfds build mnist --data_dir DIR"):
    sources.TfdsSource("mnist", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="neither a registered TFDS builder nor prepared"):
    sources.TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))
  with pytest.raises(ValueError, match="unknown source 'folder'"):
    sources.open_source("folder")


# --- through the training loop ------------------------------------------------------------------------

def test_training_on_a_prepared_folder_resumes_with_the_same_examples(tmp_path):
  """train() on a prepared image-caption folder (random crops and flips, unconditional model): stopping at
  step 2 and resuming gives the losses of an uninterrupted run, so the checkpointed iterator state put the
  reader back exactly (examples and their augmentations)."""
  from configs.default import get_config
  from conftest import losses
  from sdjax.train.trainer import train

  out = str(tmp_path / "prepared")
  prepare.prepare(out, prepare.collect(make_folder(str(tmp_path / "src"), n=12), None)[0], progress=False)

  def config(steps):
    c = get_config("tiny")
    c.data.source, c.data.path, c.data.resolution = "records", out, 16
    c.data.crop, c.data.random_flip = "random", True
    c.model.num_class_embeds, c.model.in_channels, c.model.out_channels = 0, 3, 3
    c.model.block_out_channels, c.model.mid_block_attention = (8,), False
    c.model.down_block_types, c.model.up_block_types = ("DownBlock2D",), ("UpBlock2D",)
    c.train.batch_size, c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 8, steps, 1, 2
    c.sample.num_steps, c.sample.per_class, c.data.num_classes = 2, 1, 2
    c.optim.schedule = "constant"
    return c

  train(config(4), str(tmp_path / "ref"))
  train(config(2), str(tmp_path / "run"))
  summary = train(config(4), str(tmp_path / "run"))
  assert summary["start_step"] == 2
  ref, run = losses(str(tmp_path / "ref")), losses(str(tmp_path / "run"))
  assert sorted(ref) == [1, 2, 3, 4]
  np.testing.assert_allclose([run[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=1e-6)
