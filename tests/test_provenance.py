"""Content credentials (sdjax.provenance): PNGs signed with a throwaway CA-issued certificate read back with
c2pa's Reader (generator, generation settings, prompts as text or SHA-256, a valid and, with the CA as trust
anchor, trusted signature), tEXt metadata and pixels kept, tampering detected, atomic writes, and clear errors
for bad keys and certificates and a missing c2pa-python."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax import io, provenance
from test_watermark import sd1  # noqa: F401 - the tiny SD 1 model fixture of the job tests

RECORD = {"file": "00000_000.png", "prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 1234,
          "sampler": "euler", "steps": 20, "guidance_scale": 7.5, "guidance_rescale": 0.0, "height": 16, "width": 24,
          "mode": "text2img", "strength": None, "model": "/models/sd15", "model_hash": "0123456789abcdef",
          "sdjax_version": "0.1.0", "watermark": "none"}
TEXT = {k: str(v) for k, v in RECORD.items() if k != "file"}  # what sdjax.jobs writes as tEXt chunks


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return provenance.throwaway_chain(str(tmp_path_factory.mktemp("c2pa")))


def image(seed=0, h=16, w=24):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_signed_png_reads_back(chain, tmp_path):
  """Both prompt modes: generator, settings, prompts as text or their SHA-256, valid (trusted with the root),
  tEXt metadata and pixels as written, no temporary files left; an unsigned PNG reads as None."""
  pixels = image()
  for mode in provenance.PROMPT_MODES:
    signer = provenance.load_signer(chain["key"], chain["chain"], mode)
    assert signer.alg == "es256" and signer.prompt_mode == mode
    path = str(tmp_path / f"{mode}.png")
    provenance.save_png(path, pixels, TEXT, signer, RECORD)
    with Image.open(path) as im:
      assert dict(im.text) == TEXT  # the generation metadata sdjax.jobs compares on re-runs
      np.testing.assert_array_equal(np.asarray(im), pixels)

    got = provenance.read(path)
    assert got["claim_generator"] == "sdjax 0.1.0"
    assert got["validation_state"] == "Valid"  # sound, but its root is in no trust list
    assert got["failures"] == ["signingCredential.untrusted"]
    assert got["signature"]["common_name"] == "sdjax test signer"
    assert got["manifest"]["title"] == f"{mode}.png"
    created = [a for a in got["actions"] if a["action"] == "c2pa.created"]
    assert created and created[0]["digitalSourceType"] == provenance.SOURCE_TYPE
    gen = got["generation"]
    fields = {k: v for k, v in RECORD.items() if k in provenance.FIELDS}
    assert {k: gen[k] for k in provenance.FIELDS if k in gen} == fields
    if mode == "text":
      assert (gen["prompt"], gen["negative_prompt"]) == (RECORD["prompt"], RECORD["negative_prompt"])
      assert "prompt_sha256" not in gen
    else:
      assert gen["prompt_sha256"] == provenance.prompt_hash(RECORD["prompt"])
      assert gen["negative_prompt_sha256"] == provenance.prompt_hash(RECORD["negative_prompt"])
      assert "prompt" not in gen and "negative_prompt" not in gen
    assert "model" not in gen  # a local path

  with open(chain["root"]) as f:
    trusted = provenance.read(path, trust_anchors=f.read())
  assert trusted["validation_state"] == "Trusted" and trusted["failures"] == []
  assert sorted(os.listdir(tmp_path)) == ["hash.png", "text.png"]

  plain = str(tmp_path / "plain.png")
  provenance.save_png(plain, pixels, TEXT)  # no signer: sdjax.io.save_png alone
  assert provenance.read(plain) is None and dict(Image.open(plain).text) == TEXT


def test_tampering_is_detected(chain, tmp_path):
  """The hard binding covers the pixels and the tEXt chunks: changing either reads back as invalid."""
  signer = provenance.load_signer(chain["key"], chain["chain"])
  path = str(tmp_path / "a.png")
  provenance.save_png(path, image(), TEXT, signer, RECORD)
  data = open(path, "rb").read()
  for old, new in ((b"a red fox", b"a red cat"), (data[data.index(b"IDAT") + 8:][:4], None)):
    i = data.index(old)
    bad = data[:i] + (new or bytes(b ^ 0xFF for b in old)) + data[i + len(old):]
    with open(tmp_path / "bad.png", "wb") as f:
      f.write(bad)
    got = provenance.read(str(tmp_path / "bad.png"))
    assert got["validation_state"] == "Invalid" and any("mismatch" in c for c in got["failures"]), got["failures"]


def test_sign_png_in_place_and_atomic(chain, tmp_path):
  """sign_png may sign a file in place; a file c2pa cannot sign leaves the destination untouched and no
  temporary file behind."""
  signer = provenance.load_signer(chain["key"], chain["chain"])
  path = str(tmp_path / "b.png")
  io.save_png(path, image(1), TEXT)
  provenance.sign_png(path, path, provenance.manifest_for(RECORD), signer)
  assert provenance.read(path)["generation"]["seed"] == 1234 and dict(Image.open(path).text) == TEXT
  before = open(path, "rb").read()
  with open(tmp_path / "junk.png", "wb") as f:
    f.write(b"not a png")
  with pytest.raises(provenance.ProvenanceError):
    provenance.sign_png(str(tmp_path / "junk.png"), path, provenance.manifest_for(RECORD), signer)
  assert open(path, "rb").read() == before
  assert sorted(os.listdir(tmp_path)) == ["b.png", "junk.png"]


def test_bad_credentials(chain, tmp_path, monkeypatch):
  """Every bad key or certificate is one clear error at start-up, naming the flag; no key: no signer."""
  names = {"c2pa_key": "--c2pa_key", "c2pa_cert": "--c2pa_cert", "c2pa_prompt": "--c2pa_prompt"}
  load = lambda key, cert, mode="hash": provenance.load_signer(key, cert, mode, names=names)  # noqa: E731
  assert load(None, None) is None
  other = provenance.throwaway_chain(str(tmp_path), days=1)  # another key, and a root that is no signing certificate
  fifo = str(tmp_path / "fifo")
  os.mkfifo(fifo)
  garbage = str(tmp_path / "garbage.pem")
  with open(garbage, "w") as f:
    f.write("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
  cases = [
      ((chain["key"], None), "--c2pa_key needs --c2pa_cert"),
      ((None, chain["chain"]), "--c2pa_cert needs --c2pa_key"),
      ((chain["key"], chain["chain"], "plain"), "--c2pa_prompt: 'plain' is not one of hash, text"),
      ((str(tmp_path / "no.pem"), chain["chain"]), f"--c2pa_key: {tmp_path / 'no.pem'} does not exist"),
      ((str(tmp_path), chain["chain"]), "is a directory, not a PEM file"),
      ((fifo, chain["chain"]), "is not a regular file"),
      ((garbage, chain["chain"]), "holds no PEM private key"),
      ((chain["key"], garbage), "--c2pa_cert: " + garbage + " holds no PEM certificate"),
      ((other["key"], chain["chain"]), "does not match the certificate"),
      ((chain["key"], chain["key"]), "holds no PEM certificate"),
      ((chain["root_key"], chain["root"]), "c2pa cannot sign with"),  # a CA's self-signed certificate
  ]
  for args, message in cases:
    with pytest.raises(provenance.ProvenanceError) as e:
      load(*args)
    assert message in str(e.value), (args, str(e.value))

  monkeypatch.setitem(sys.modules, "c2pa", None)  # as if c2pa-python were not installed
  with pytest.raises(provenance.ProvenanceError, match="needs the c2pa-python package: pip install c2pa-python"):
    load(chain["key"], chain["chain"])
  assert load(None, None) is None  # no key: the package is not needed



def test_a_job_signs_every_png_it_writes(chain, sd1, tmp_path, monkeypatch):
  """jobs.Job(c2pa=signer): each image (watermarked first) and grid.png carry valid credentials with that
  image's own seed and settings; job.json records the signing, so continuing the folder unsigned is refused."""
  import json

  from sdjax import jobs, watermark
  from test_watermark import fake_renderer, run_job

  fake_renderer(monkeypatch)
  signer = provenance.load_signer(chain["key"], chain["chain"])
  run_job(sd1, tmp_path, c2pa=signer, grid=False)
  with open(tmp_path / "index.jsonl") as f:
    index = [json.loads(line) for line in f]
  assert len(index) == 3
  for rec in index:
    got = provenance.read(str(tmp_path / rec["file"]))
    assert got["validation_state"] == "Valid" and got["generation"]["seed"] == rec["seed"]
    assert got["generation"]["prompt_sha256"] == provenance.prompt_hash(rec["prompt"])
    with Image.open(tmp_path / rec["file"]) as im:
      assert im.text["watermark"] == rec["watermark"]
      if rec["watermark"] == watermark.LABEL:
        assert watermark.detect(np.asarray(im.convert("RGB"))).match
  with open(tmp_path / "job.json") as f:
    assert json.load(f)["c2pa"] is True
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
  with pytest.raises(jobs.JobError, match="c2pa=True, this one has False"):
    run_job(sd1, tmp_path)
