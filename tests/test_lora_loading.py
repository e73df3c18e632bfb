"""sdjax.lora_loading: two LoRAs (diffusers/peft and kohya format) fused with scales 0.7 and 0.4 into the U-Net and
text encoder give diffusers 0.42's fused outputs (tests/fixtures/lora_fusion, tools/make_lora_fusion_fixtures.py);
kohya and diffusers names of one layer fuse identically; unmatched keys and misfit shapes raise, naming the keys."""
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from sdjax import convert
from sdjax import lora_loading
from sdjax.convert import safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = os.path.join(FIXTURES, "models")
LORAS = os.path.join(FIXTURES, "lora_fusion")
Q = ("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")


@pytest.fixture(scope="module")
def models():
  return (convert.load_unet(os.path.join(MODELS, "unet_sd1")),
          convert.load_text_encoder(os.path.join(MODELS, "clip_sd1")))


@pytest.fixture(scope="module")
def params(models):
  (_, unet), (_, text) = models
  return {"unet": unet, "vae": {}, "text_encoders": (text,)}  # the layout of sdjax.pipelines' params


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_fused_outputs_match_diffusers(models, params):
  (unet, _), (text, _) = models
  ref = np.load(os.path.join(LORAS, "reference.npz"))
  a, b = lora_loading.read(os.path.join(LORAS, "diffusers.safetensors")), lora_loading.read(
      os.path.join(LORAS, "kohya.safetensors"))
  assert (a.format, sorted(a.layers), b.format, sorted(b.layers)) == (
      "diffusers", ["text_encoder", "unet"], "kohya", ["text_encoder", "unet"])
  fused = lora_loading.fuse(params, [(a, float(ref["scales"][0])), (b, float(ref["scales"][1]))])
  assert set(fused) == set(params) and len(fused["text_encoders"]) == 1
  apply = jax.jit(lambda p: unet.apply({"params": p}, ref["x"], ref["t"], ref["context"]))  # one compile
  out, base = apply(fused["unet"]), apply(params["unet"])
  hidden, _ = text.apply({"params": fused["text_encoders"][0]}, ref["ids"])
  # float32 on both sides (measured 7e-7 U-Net, 4e-7 text); the LoRAs move the outputs by ~45% of their max.
  assert rel_err(out, ref["unet"]) < 1e-5 and rel_err(hidden, ref["text"]) < 1e-5
  assert rel_err(base, ref["unet_base"]) < 1e-4 and rel_err(base, ref["unet"]) > 0.1


def test_kohya_and_diffusers_names_fuse_alike(tmp_path, params):
  """Text-encoder self_attn (lora_te_text_model_..._q_proj), SDXL lora_te2_, and a LoRA without alpha."""
  rng = np.random.default_rng(0)
  down, up = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((32, 2)).astype(np.float32)
  kohya = os.path.join(tmp_path, "k.safetensors")
  safetensors_io.save(kohya, {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
                              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
                              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": np.float32(1.0)})
  peft = os.path.join(tmp_path, "p.safetensors")
  safetensors_io.save(peft, {"text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
                             "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": up * 0.5})
  text = params["text_encoders"][0]
  pipe = {"unet": params["unet"], "text_encoders": (text, text)}
  fk, fp = (lora_loading.fuse(pipe, [(f, 0.3)])["text_encoders"] for f in (kohya, peft))
  expected = np.asarray(text["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]) + 0.3 * 0.5 * (
      down.T @ up.T)
  for fused in (fk, fp):
    flat = traverse_util.flatten_dict(fused[1])
    np.testing.assert_allclose(flat[Q], expected, rtol=1e-6, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(fused[0]),
                                                     jax.tree_util.tree_leaves(text)))


def test_unmatched_and_misfit_keys_raise(tmp_path, params):
  rng = np.random.default_rng(1)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  cases = {
      "unmatched": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": f(2, 8, 1, 1),
                     "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": f(8, 2, 1, 1)},
                    "(?s)match no weight of the model.*unet input_blocks_1_1_proj_in"),
      "shape": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": f(2, 9),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": f(8, 2)},
                r"attn1\.to_q: down \(2, 9\) and up \(8, 2\) do not fit"),
      "loha": ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": f(2, 8)}, "hada_w1_a"),
      "component": ({"text_encoder_2.encoder.layers.0.mlp.fc1.lora_A.weight": f(2, 32),
                     "text_encoder_2.encoder.layers.0.mlp.fc1.lora_B.weight": f(64, 2)}, "text_encoder_2, which"),
      "half": ({"unet.conv_in.lora_A.weight": f(2, 4, 3, 3)}, "not both down"),
      "nan": ({"unet.conv_in.lora_A.weight": f(2, 4, 3, 3),
               "unet.conv_in.lora_B.weight": np.full((8, 2, 1, 1), np.nan, np.float32)}, r"unet conv_in: NaN or inf"),
  }
  for name, (tensors, match) in cases.items():
    path = os.path.join(tmp_path, f"{name}.safetensors")
    safetensors_io.save(path, tensors)
    with pytest.raises(ValueError, match=match):
      lora_loading.fuse(params, [(path, 1.0)])


def test_parse_spec():
  assert lora_loading.parse_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
  assert lora_loading.parse_spec("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
  assert lora_loading.parse_spec("c:/x:y.safetensors:-1") == ("c:/x:y.safetensors", -1.0)
  assert lora_loading.parse_spec("d:e") == ("d:e", 1.0)
  for bad in (":0.5", "a:nan", ""):
    with pytest.raises(ValueError, match="PATH:SCALE"):
      lora_loading.parse_spec(bad)


def test_jobs_load_model_fuses_loras_and_names_the_flag(tmp_path):
  """sample.py --lora PATH[:SCALE] -> jobs.load_model(loras=...): the fused weight is W + scale * (alpha / r) B A,
  the model hash changes with it, and a LoRA that does not fit the model is one error naming --lora."""
  from safetensors.numpy import save_file

  from sdjax import jobs
  from sdjax.convert import tree
  from sdjax.convert.random import write_random_pipeline
  folder = str(tmp_path / "sd1")
  write_random_pipeline(folder, "sd1", tokenizer=os.path.join(FIXTURES, "models", "tokenizer"))
  base = jobs.load_model(folder, echo=lambda s: None)
  rng = np.random.default_rng(0)
  down, up = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((16, 2)).astype(np.float32)
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  path = str(tmp_path / "lora.safetensors")
  save_file({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}, path)
  fused = jobs.load_model(folder, loras=[(path, 0.5)], echo=lambda s: None)
  want = tree.from_flax(base.params["unet"])[f"{name}.weight"] + 0.5 * up @ down  # alpha = rank: factor 1
  np.testing.assert_allclose(tree.from_flax(fused.params["unet"])[f"{name}.weight"], want, rtol=1e-6, atol=1e-6)
  assert fused.hash != base.hash
  with pytest.raises(jobs.JobError, match=r"^--lora: .*do not fit the weight"):
    jobs.load_model(folder, loras=[(os.path.join(FIXTURES, "lora_fusion", "diffusers.safetensors"), 0.7)],
                    names={"lora": "--lora"}, echo=lambda s: None)


def test_a_lora_path_that_is_no_regular_file_is_refused_unread(tmp_path, params):
  # A FIFO would block a reader forever and a link to /dev/zero never ends: both are refused before opening.
  fifo, zero = str(tmp_path / "fifo.safetensors"), str(tmp_path / "zero.safetensors")
  os.mkfifo(fifo)
  os.symlink("/dev/zero", zero)
  for path in (fifo, zero):
    with pytest.raises(ValueError, match="not a regular file"):
      lora_loading.fuse(params, [(path, 1.0)])
