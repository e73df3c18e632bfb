"""sdjax exports load in diffusers / transformers and give the reference outputs.

Needs torch + diffusers (not installed by `.[test]`; the export -> import round trip without torch is in
test_convert.py). Run locally with `pip install torch==2.13.0 diffusers` to check the export format.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sdjax import convert  # noqa: E402

MODELS = os.path.join(os.path.dirname(__file__), "fixtures", "models")


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def test_exported_unet_loads_in_diffusers(tmp_path):
  for name in ("unet_sd1", "unet_sdxl"):
    module, params = convert.load_unet(os.path.join(MODELS, name))
    convert.save_component(str(tmp_path / name), "unet", module.config, params)
    model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / name)).eval()
    ref = dict(np.load(os.path.join(MODELS, name, "reference.npz")))
    kwargs = {}
    if "time_ids" in ref:
      kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(ref["text_embeds"]),
                                     "time_ids": torch.from_numpy(ref["time_ids"])}
    with torch.no_grad():
      out = model(nchw(ref["x"]), torch.from_numpy(ref["t"]), torch.from_numpy(ref["context"]), **kwargs).sample
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), ref["out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, kind, cls", [("vae_sd", "vae", lambda: diffusers.AutoencoderKL),
                                             ("clip_sdxl2", "text_encoder",
                                              lambda: transformers.CLIPTextModelWithProjection)])
def test_exported_vae_and_text_encoder_load(tmp_path, name, kind, cls):
  module, params = convert.load_component(os.path.join(MODELS, name), kind)
  convert.save_component(str(tmp_path / name), kind, module.config, params)
  exported = cls().from_pretrained(str(tmp_path / name)).state_dict()
  original = cls().from_pretrained(os.path.join(MODELS, name)).state_dict()
  assert set(exported) == set(original)
  for k, v in original.items():
    assert torch.equal(exported[k], v), k
