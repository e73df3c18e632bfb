"""sdjax.lora: init/merge exactness, gradients through merge, diffusers-format files, parity with diffusers+peft."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from sdjax import convert
from sdjax import lora as lora_lib
from sdjax.convert import safetensors_io
from sdjax.lora import LoraConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
UNET = os.path.join(FIXTURES, "models", "unet_sd1")
LORA = os.path.join(FIXTURES, "lora")
ATTN = ("down_blocks_0", "attentions_0", "transformer_blocks_0")


@pytest.fixture(scope="module")
def unet():
  return convert.load_unet(UNET)


@pytest.fixture(scope="module")
def apply(unet):
  module, _ = unet
  return jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))


def randomize(tree, seed, std=0.3):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([std * jax.random.normal(k, a.shape, jnp.float32) for k, a in zip(keys, leaves)])


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([3.0, 617.25], np.float32),
          rng.standard_normal((2, 5, 12)).astype(np.float32))


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_config_validation_names_the_field():
  assert LoraConfig(rank=4).scale == 1.0
  assert LoraConfig(rank=4, alpha=8).scale == 2.0
  assert LoraConfig(rank=2, targets=["to_q"]).targets == ("to_q",)
  for kwargs, field in [(dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(rank=True), "rank"),
                        (dict(rank=2, alpha=0), "alpha"), (dict(rank=2, alpha=float("nan")), "alpha"),
                        (dict(rank=2, targets="to_q"), "targets"), (dict(rank=2, targets=()), "targets"),
                        (dict(rank=2, init="xavier"), "init")]:
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
      LoraConfig(**kwargs)


def test_init_targets_attention_projections_and_merge_at_init_is_exact(unet):
  _, params = unet
  config = LoraConfig(rank=2)
  lora = lora_lib.init(params, config, jax.random.PRNGKey(0))
  layers = traverse_util.flatten_dict(lora)
  # 11 transformer blocks (down 2+2, mid 1, up 3+3) x (attn1, attn2) x (to_q, to_k, to_v, to_out_0) x (down, up)
  assert len(layers) == 11 * 2 * 4 * 2
  assert {p[-2] for p in layers} == {"to_q", "to_k", "to_v", "to_out_0"}
  block = lora["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert block["attn2"]["to_k"]["down"].shape == (12, 2)  # cross-attention keys read the text width
  assert block["attn2"]["to_k"]["up"].shape == (2, 8)
  assert float(jnp.abs(block["attn1"]["to_q"]["down"]).max()) <= 1 / np.sqrt(8)  # kaiming-uniform bound
  assert all(float(jnp.abs(a).max()) == 0 for p, a in layers.items() if p[-1] == "up")
  assert lora_lib.count(lora) == sum(a.size for a in layers.values())

  merged = lora_lib.merge(params, lora, config)
  flat_m, flat_b = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(params)
  assert flat_m.keys() == flat_b.keys()
  assert all(np.array_equal(flat_m[k], flat_b[k]) for k in flat_b)

  gauss = lora_lib.init(params, LoraConfig(rank=4, init="gaussian"), jax.random.PRNGKey(1))
  downs = np.concatenate([np.ravel(a) for p, a in traverse_util.flatten_dict(gauss).items() if p[-1] == "down"])
  assert abs(downs.std() - 1 / 4) < 0.02


def test_targets_by_path_suffix_and_unmatched_targets_are_errors(unet):
  _, params = unet
  lora = lora_lib.init(params, LoraConfig(rank=1, targets=("attn2/to_k",)), jax.random.PRNGKey(0))
  paths = list(traverse_util.flatten_dict(lora))
  assert len(paths) == 11 * 2 and all(p[-3:-1] == ("attn2", "to_k") for p in paths)
  with pytest.raises(ValueError, match=r"\['q_proj', 'to_out\.0'\].*to_q.*Layer names there include"):
    lora_lib.init(params, LoraConfig(rank=1, targets=("to_q", "q_proj", "to_out.0")), jax.random.PRNGKey(0))


def test_merge_matches_float64_and_the_explicit_low_rank_path(unet):
  _, params = unet
  config = LoraConfig(rank=3, alpha=5.0)
  lora = randomize(lora_lib.init(params, config, jax.random.PRNGKey(0)), seed=1)
  merged = jax.jit(lora_lib.merge, static_argnums=2)(params, lora, config)
  flat_m, flat_b = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(params)
  pairs = traverse_util.flatten_dict(lora)
  for path in {p[:-1] for p in pairs}:
    down, up = (np.asarray(pairs[path + (k,)], np.float64) for k in ("down", "up"))
    kernel = np.asarray(flat_b[path + ("kernel",)], np.float64)
    want = kernel + (5.0 / 3) * down @ up
    np.testing.assert_allclose(flat_m[path + ("kernel",)], want, rtol=1e-6, atol=1e-6)
  untouched = [k for k in flat_b if k[:-1] not in {p[:-1] for p in pairs} or k[-1] != "kernel"]
  assert all(np.array_equal(flat_m[k], flat_b[k]) for k in untouched)

  # x @ W' == x @ W + s * (x @ A) @ B for one layer
  path = ATTN + ("attn2", "to_v")
  x = np.random.default_rng(0).standard_normal((7, 12))
  a, b = (np.asarray(pairs[path + (k,)], np.float64) for k in ("down", "up"))
  want = x @ np.asarray(flat_b[path + ("kernel",)], np.float64) + (5.0 / 3) * (x @ a) @ b
  np.testing.assert_allclose(x @ np.asarray(flat_m[path + ("kernel",)], np.float64), want, rtol=1e-5, atol=1e-5)

  # bfloat16 kernels stay bfloat16; the update is computed in float32
  bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  one = traverse_util.unflatten_dict({k: v for k, v in pairs.items() if k[:-1] == path})
  kernel = traverse_util.flatten_dict(lora_lib.merge(bf16, one, config))[path + ("kernel",)]
  assert kernel.dtype == jnp.bfloat16

  bad = {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"to_q": {
      "down": jnp.zeros((8, 2)), "up": jnp.zeros((2, 8))}}}}}}
  with pytest.raises(ValueError, match="attn1/to_q.*rank 3"):
    lora_lib.merge(params, bad, config)


def test_jitted_gradient_step_trains_only_the_lora():
  # the smallest diffusers U-Net fixture (self- and cross-attention, 8-wide context): a 4x faster compile
  folder = os.path.join(FIXTURES, "models", "unet_class")
  module, params = convert.load_unet(folder)
  ref = dict(np.load(os.path.join(folder, "reference.npz")))
  x, t, c, labels = ref["x"], ref["t"], ref["context"], ref["class_labels"]
  config = LoraConfig(rank=2, alpha=4.0)
  lora = lora_lib.init(params, config, jax.random.PRNGKey(0))
  target = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

  def loss_fn(lora, base):
    out = module.apply({"params": lora_lib.merge(base, lora, config)}, x, t, c, labels)
    return jnp.mean((out - target) ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))  # one compilation of the backward pass
  loss, grads = grad_fn(lora, params)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)  # base is not differentiated
  flat = traverse_util.flatten_dict(grads)
  assert all(float(jnp.abs(g).max()) > 0 for p, g in flat.items() if p[-1] == "up")
  assert all(float(jnp.abs(g).max()) == 0 for p, g in flat.items() if p[-1] == "down")  # up == 0 at init

  opt = optax.adam(1e-2)
  updates, _ = opt.update(grads, opt.init(lora))
  lora2 = optax.apply_updates(lora, updates)
  loss2, grads = grad_fn(lora2, params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
  assert float(loss2) < float(loss)


def test_save_load_round_trip_is_exact(unet, tmp_path):
  _, params = unet
  config = LoraConfig(rank=3, alpha=5.0)
  lora = randomize(lora_lib.init(params, config, jax.random.PRNGKey(0)), seed=2)
  path = lora_lib.save(str(tmp_path), lora, config)
  assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
  tensors = safetensors_io.load(path)
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"
  assert tensors[key + ".lora_A.weight"].shape == (3, 8) and tensors[key + ".lora_B.weight"].shape == (8, 3)
  meta = json.loads(safetensors_io.read_metadata(path)["lora_adapter_metadata"])
  assert meta["unet.r"] == 3 and meta["unet.lora_alpha"] == 5.0 and key[5:] in meta["unet.target_modules"]

  loaded, config2 = lora_lib.load(str(tmp_path), params)
  assert (config2.rank, config2.alpha, config2.targets) == (3, 5.0, ("to_k", "to_out_0", "to_q", "to_v"))
  flat, flat2 = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(loaded)
  assert flat.keys() == flat2.keys() and all(np.array_equal(flat[k], flat2[k]) for k in flat)

  # fold_alpha writes alpha = rank with up pre-scaled: the merged weights are the same
  lora_lib.save(str(tmp_path / "folded"), lora, config, fold_alpha=True)
  folded, config3 = lora_lib.load(str(tmp_path / "folded"), params)
  assert config3.alpha == 3 and config3.scale == 1.0
  for a, b in zip(jax.tree_util.tree_leaves(lora_lib.merge(params, folded, config3)),
                  jax.tree_util.tree_leaves(lora_lib.merge(params, lora, config))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_load_errors_name_the_keys(unet, tmp_path):
  _, params = unet
  mod = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  ok = {f"{mod}.lora_A.weight": np.zeros((2, 8), np.float32), f"{mod}.lora_B.weight": np.zeros((8, 2), np.float32)}

  def write(name, tensors):
    folder = tmp_path / name
    folder.mkdir()
    safetensors_io.save(str(folder / lora_lib.FILE_NAME), tensors)
    return str(folder)

  cases = {
      "unknown": (dict(ok, **{"unet.mid_block.attentions.0.to_q.lora_A.weight": np.zeros((2, 8), np.float32)}),
                  r"match no Dense layer.*mid_block\.attentions\.0\.to_q"),
      "shape": ({f"{mod}.lora_A.weight": np.zeros((2, 12), np.float32),
                 f"{mod}.lora_B.weight": np.zeros((8, 2), np.float32)}, r"attn1\.to_q: lora_A \(2, 12\).*8 -> 8"),
      "half": ({f"{mod}.lora_A.weight": np.zeros((2, 8), np.float32)}, r"has lora_A but not lora_B"),
      "text": (dict(ok, **{"text_encoder.x.lora_A.weight": np.zeros((2, 8), np.float32)}), r"\['text_encoder'\]"),
      "kohya": ({"lora_unet_down_blocks_0_x.lora_down.weight": np.zeros((2, 8), np.float32)}, r"kohya"),
      "dora": (dict(ok, **{f"{mod}.lora_magnitude_vector": np.zeros((8,), np.float32)}), r"not LoRA A/B weights"),
  }
  for name, (tensors, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      lora_lib.load(write(name, tensors), params)
  with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors"):
    lora_lib.load(str(tmp_path), params)
  # files written by diffusers' unet.save_lora_adapter have no component prefix; without metadata alpha = rank
  loaded, config = lora_lib.load(write("plain", {k[5:]: v for k, v in ok.items()}), params)
  assert (config.rank, config.scale, config.targets) == (2, 1.0, ("to_q",))


def test_diffusers_lora_file_matches_diffusers_output(unet, apply, tmp_path):
  """tests/fixtures/lora: written by diffusers' save_lora_weights, output from diffusers+peft (no torch here)."""
  _, params = unet
  lora, config = lora_lib.load(LORA, params)
  assert (config.rank, config.alpha, config.targets) == (2, 3.0, ("to_k", "to_out_0"))
  ref = dict(np.load(os.path.join(LORA, "reference.npz")))
  out = apply(lora_lib.merge(params, lora, config), ref["x"], ref["t"], ref["context"])
  assert rel_err(out, ref["out"]) < 1e-4
  assert rel_err(apply(params, ref["x"], ref["t"], ref["context"]), ref["out"]) > 1e-2  # the LoRA matters

  # sdjax writes the same tensors as diffusers' own writer
  lora_lib.save(str(tmp_path), lora, config)
  theirs = safetensors_io.load(os.path.join(LORA, lora_lib.FILE_NAME))
  ours = safetensors_io.load(os.path.join(tmp_path, lora_lib.FILE_NAME))
  assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_exported_lora_matches_diffusers_with_peft(unet, apply, tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTokenizer

  _, params = unet
  config = LoraConfig(rank=3, alpha=5.0)
  lora = randomize(lora_lib.init(params, config, jax.random.PRNGKey(0)), seed=3)
  lora_lib.save(str(tmp_path / "alpha"), lora, config)
  lora_lib.save(str(tmp_path / "folded"), lora, config, fold_alpha=True)
  x, t, c = inputs(seed=4)
  ours = np.asarray(apply(lora_lib.merge(params, lora, config), x, t, c))
  base = np.asarray(apply(params, x, t, c))

  def diffusers_output(folder, use_metadata=True):
    model = UNet2DConditionModel.from_pretrained(UNET).eval()
    if use_metadata:  # the user's entry point
      models = os.path.join(FIXTURES, "models")
      pipe = StableDiffusionPipeline(
          vae=AutoencoderKL.from_pretrained(os.path.join(models, "vae_sd")),
          text_encoder=CLIPTextModel.from_pretrained(os.path.join(models, "clip_sd1")),
          tokenizer=CLIPTokenizer.from_pretrained(os.path.join(models, "tokenizer")), unet=model,
          scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
      pipe.load_lora_weights(folder)
      assert (pipe.unet.peft_config["default_0"].r, pipe.unet.peft_config["default_0"].lora_alpha) == (3, 5.0)
    else:  # a loader that ignores the alpha metadata
      state, alphas = StableDiffusionPipeline.lora_state_dict(folder)
      StableDiffusionPipeline.load_lora_into_unet(state, alphas, model)
    with torch.no_grad():
      out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                  encoder_hidden_states=torch.from_numpy(c)).sample
    return out.permute(0, 2, 3, 1).numpy()

  assert rel_err(ours, base) > 1e-2  # the LoRA matters
  assert rel_err(ours, diffusers_output(str(tmp_path / "alpha"))) < 1e-4
  # a loader that ignores the metadata (so alpha = rank) still gets the right model from a fold_alpha file
  assert rel_err(ours, diffusers_output(str(tmp_path / "folded"), use_metadata=False)) < 1e-4
