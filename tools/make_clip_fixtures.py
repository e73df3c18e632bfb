"""Regenerate the CLIP text-encoder fixtures under tests/fixtures/models/ from transformers.

  pip install torch==2.13.0 transformers && python tools/make_clip_fixtures.py

Writes, deterministically:
- `tokenizer/`: a tiny byte-level BPE CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json, as in SD's `tokenizer/` folders). Its merges are learned here from a fixed
  prompt corpus; its ids are those of transformers' CLIPTokenizer, recorded in `tokenizer/reference.npz`.
- `clip_sd1/`, `clip_sd2/`, `clip_sdxl2/`: tiny random transformers text encoders (config.json,
  model.safetensors), perturbed so LayerNorms and biases are nontrivial, with a `reference.npz` each:
  input_ids, attention_mask, last_hidden_state, pooled (`pooler_output`, or `text_embeds` for the
  projection model), hidden_states (all of them, stacked) and the same outputs with the attention mask.

  clip_sd1    CLIPTextModel, quick_gelu, legacy eos_token_id 2 (pooled at argmax of input_ids), padded with
              EOS as SD 1.x. Weights stored in the layout of checkpoints written by transformers 4.x, as
              real SD 1.x folders are: `text_model.` prefix and the `embeddings.position_ids` buffer.
  clip_sd2    CLIPTextModel, gelu (OpenCLIP ViT-H style), eos_token_id = the real EOS id, padded with id 0
              ("!") as SD 2.x. Weights as transformers 5 saves them (no `text_model.` prefix).
  clip_sdxl2  CLIPTextModelWithProjection, gelu, projection_dim 24, padded with 0 as SDXL's tokenizer_2.

Every folder is reloaded with `from_pretrained` and the reference computed from the reloaded model, so the
files on disk are what the outputs belong to. torch/transformers are needed only here.
"""
import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "models")
MAX_LEN = 16  # max_position_embeddings and the tokenizer's model_max_length
VOCAB_TARGET = 1000
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CORPUS = """
a photograph of an astronaut riding a horse on the moon, highly detailed, sharp focus, studio lighting
a watercolor painting of a quiet harbor at sunset with small boats and seagulls, soft colors
portrait of an old fisherman with a white beard, dramatic light, oil on canvas, trending on artstation
a cozy cabin in a snowy forest at night, warm light in the windows, stars in the sky, cinematic
a cute corgi wearing sunglasses sitting on a beach chair, digital art, vibrant, 4k, octane render
an ancient castle on a cliff above a stormy sea, lightning, epic fantasy landscape, matte painting
a bowl of ramen with eggs and green onions, food photography, shallow depth of field, bokeh
a futuristic city skyline with flying cars and neon signs in the rain, cyberpunk, blade runner style
a red fox sleeping under a maple tree in autumn, golden leaves, morning mist, national geographic
an isometric illustration of a tiny workshop full of tools, clean lines, pastel palette, low poly
a marble statue of a woman holding a lantern, museum, dramatic shadows, black and white photograph
a steaming cup of coffee on a wooden table next to an open book, rainy window, hygge, film grain
a dragon made of crystal flying over snowy mountains, ray tracing, unreal engine, hyperrealistic
a child flying a kite in a green meadow, spring flowers, blue sky with fluffy clouds, studio ghibli
close up of a hummingbird drinking nectar from a purple flower, macro lens, high speed photography
an abandoned train station overgrown with plants and vines, post apocalyptic, volumetric light
a robot chef cooking pancakes in a bright kitchen, pixar style, three dimensional render, playful
a knight in silver armor standing in a field of sunflowers, renaissance painting, golden hour
a sailboat crossing a calm lake reflecting pink clouds, minimalism, long exposure, serene mood
an owl perched on a branch under a full moon, ink drawing, intricate linework, dark background
a street market in marrakech with spices lanterns and colorful fabrics, travel photo, crowded
a vintage car parked in front of a diner at dusk, americana, kodachrome, nostalgic atmosphere
a jellyfish glowing in the deep ocean, bioluminescent, underwater photography, dark blue water
a cat astronaut floating inside a space station, earth through the window, whimsical, detailed fur
two hundred paper cranes hanging from the ceiling of a bright gallery, installation art, wide angle
a lighthouse on a rocky coast during a storm, huge waves crashing, dramatic clouds, photorealistic
a bustling medieval tavern with musicians and candles, warm tones, concept art, by greg rutkowski
a glass terrarium with succulents and moss on a sunny windowsill, product shot, white background
a tiger walking through tall grass in the jungle, dappled light, wildlife photography, telephoto
a surreal melting clock on a desert tree branch, salvador dali inspired, oil painting, dreamlike
a pixel art scene of a village with a river and a windmill, sixteen bit, retro video game
a group of penguins on an iceberg under the northern lights, aurora borealis, arctic, award winning
"""


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character table (the base of the byte-level vocabulary)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return dict(zip(range(256), chars))


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE on the corpus' words (CLIP's `</w>` end-of-word marker); ties broken by the pair itself."""
  table = bytes_to_unicode()
  words = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())
  counts = Counter(tuple("".join(table[b] for b in w.encode())) for w in words)
  counts = Counter({w[:-1] + (w[-1] + "</w>",): n for w, n in counts.items()})
  merges = []
  while len(merges) < num_merges:
    pairs = Counter()
    for w, n in counts.items():
      for pair in zip(w, w[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    merged = Counter()
    for w, n in counts.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      merged[tuple(out)] += n
    counts = merged
  return merges


def write_tokenizer(folder: str) -> dict[str, int]:
  base = list(bytes_to_unicode().values())
  vocab_list = base + [c + "</w>" for c in base]
  merges = learn_merges(CORPUS, VOCAB_TARGET - 2 - len(vocab_list))
  vocab_list += ["".join(m) for m in merges] + [BOS, EOS]
  vocab = {tok: i for i, tok in enumerate(vocab_list)}
  assert len(vocab) == len(vocab_list), "duplicate tokens"
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
               "model_max_length": MAX_LEN, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
  return vocab


PROMPTS = ["a photograph of an astronaut riding a horse",
           "A cozy cabin in a snowy forest at night!",
           "portrait of an old fisherman with a white beard, dramatic light, oil on canvas, highly detailed"]


def tokenize(folder: str) -> np.ndarray:
  tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  assert tok.model_max_length == MAX_LEN, tok.model_max_length
  ids = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")["input_ids"]
  np.savez(os.path.join(folder, "reference.npz"), prompts=np.array(PROMPTS), input_ids=ids.astype(np.int32))
  return ids.astype(np.int64)


def perturb(model: torch.nn.Module, seed: int) -> None:
  """Weights ~ N(0, 1/fan_in), biases and LayerNorm offsets ~ 0.1 N(0, 1), LayerNorm scales ~ 1 + 0.2 N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      z = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * z)
      elif name.endswith("bias") or "layer_norm" in name:
        p.copy_(0.1 * z)
      elif "embedding" in name:
        p.copy_(0.5 * z)
      else:
        p.copy_(z / p.shape[1] ** 0.5)


def run(model, ids, mask=None) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                output_hidden_states=True)
  pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
  return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled": pooled.numpy(),
          "hidden_states": torch.stack(out.hidden_states).numpy()}


def to_transformers4_layout(folder: str, max_len: int) -> None:
  """Rewrite model.safetensors with the `text_model.` prefix and the position_ids buffer (old checkpoints)."""
  path = os.path.join(folder, "model.safetensors")
  sd = load_file(path)
  sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
  sd["text_model.embeddings.position_ids"] = torch.arange(max_len, dtype=torch.int64)[None]
  save_file(sd, path, metadata={"format": "pt"})


def make_encoder(name: str, ids: np.ndarray, *, cls, legacy_layout: bool, pad_id: int, seed: int, **config):
  folder = os.path.join(ROOT, name)
  shutil.rmtree(folder, ignore_errors=True)
  torch.manual_seed(seed)
  model = cls(CLIPTextConfig(max_position_embeddings=MAX_LEN, **config)).eval()
  perturb(model, seed)
  model.save_pretrained(folder, safe_serialization=True)
  if legacy_layout:
    to_transformers4_layout(folder, MAX_LEN)
  ids = ids.copy()
  mask = np.zeros_like(ids)
  for row in range(len(ids)):
    end = int(np.argmax(ids[row] == VOCAB_TARGET - 1))  # the tokenizer's EOS
    ids[row, end + 1:] = pad_id
    mask[row, :end + 1] = 1
  loaded = cls.from_pretrained(folder, local_files_only=True).eval()
  plain, masked = run(loaded, ids), run(loaded, ids, mask)
  check = run(model, ids)
  for k in plain:
    np.testing.assert_allclose(plain[k], check[k], rtol=0, atol=0, err_msg=f"{name}: reloaded {k} differs")
  arrays = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32), **plain,
            **{f"masked_{k}": v for k, v in masked.items()}}
  np.savez(os.path.join(folder, "reference.npz"), **arrays)
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  print(f"{name}: {size / 1024:.0f} KiB, pooled {arrays['pooled'].shape}, "
        f"{len(arrays['hidden_states'])} hidden states")


def main():
  tok_folder = os.path.join(ROOT, "tokenizer")
  shutil.rmtree(tok_folder, ignore_errors=True)
  vocab = write_tokenizer(tok_folder)
  assert len(vocab) == VOCAB_TARGET, f"the corpus gave only {len(vocab)} tokens"
  ids = tokenize(tok_folder)
  print("tokenizer ids:\n", ids)
  bos_id, eos_id = vocab[BOS], vocab[EOS]
  common = dict(vocab_size=len(vocab), hidden_size=32, num_attention_heads=4, layer_norm_eps=1e-5)
  make_encoder("clip_sd1", ids, cls=CLIPTextModel, legacy_layout=True, pad_id=eos_id, seed=1, **common,
               intermediate_size=64, num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=32,
               bos_token_id=0, eos_token_id=2, pad_token_id=1)
  make_encoder("clip_sd2", ids, cls=CLIPTextModel, legacy_layout=False, pad_id=0, seed=2, **common,
               intermediate_size=48, num_hidden_layers=2, hidden_act="gelu", projection_dim=32,
               bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=0)
  make_encoder("clip_sdxl2", ids, cls=CLIPTextModelWithProjection, legacy_layout=False, pad_id=0, seed=3, **common,
               intermediate_size=128, num_hidden_layers=3, hidden_act="gelu", projection_dim=24,
               bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=0)


if __name__ == "__main__":
  main()
