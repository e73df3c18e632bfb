"""Malformed safetensors files are refused with one-line errors naming the file, the tensor and the rule."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdjax.convert import CorruptCheckpointError, safetensors_io


def _write(path, header, data=b"", raw_header=None, length=None):
  blob = raw_header if raw_header is not None else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if length is None else length))
    f.write(blob)
    f.write(data)
  return str(path)


def _t(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# (id, kwargs for _write, regex the message must match)
CASES = [
  ("negative_offset", dict(header={"a": _t(offsets=(-8, 0)), "b": _t(offsets=(0, 8))}, data=bytes(8)),
   "'a'.*data_offsets.*non-negative"),
  ("overlap", dict(header={"a": _t(offsets=(0, 8)), "b": _t(offsets=(4, 12))}, data=bytes(12)),
   "'b'.*overlap"),
  ("same_span_twice", dict(header={"a": _t(offsets=(0, 8)), "b": _t(offsets=(0, 8))}, data=bytes(8)),
   "'b'.*overlap"),
  ("gap", dict(header={"a": _t(offsets=(0, 8)), "b": _t(offsets=(12, 20))}, data=bytes(20)), "'b'.*gap"),
  ("not_from_zero", dict(header={"a": _t(offsets=(4, 12))}, data=bytes(12)), "'a'.*gap"),
  ("begin_after_end", dict(header={"a": _t(shape=(0,), offsets=(0, 0)), "b": _t(shape=(0,), offsets=(8, 0))},
                           data=bytes(8)), "'b'.*begin after end"),
  ("size_mismatch", dict(header={"a": _t(shape=(3,), offsets=(0, 8))}, data=bytes(8)), "'a' has 8 bytes.*12"),
  ("trailing_bytes", dict(header={"a": _t()}, data=bytes(16)), "trailing bytes"),
  ("truncated", dict(header={"a": _t()}, data=bytes(4)), "truncated"),
  ("header_is_a_list", dict(header=[1, 2]), "JSON list, not an object"),
  ("header_is_a_string", dict(header="x"), "JSON str, not an object"),
  ("entry_is_a_string", dict(header={"a": "F32"}), "'a'.*JSON str, not an object"),
  ("no_data_offsets", dict(header={"a": {"dtype": "F32", "shape": [2]}}, data=bytes(8)), "'a'.*no 'data_offsets'"),
  ("no_dtype", dict(header={"a": {"shape": [2], "data_offsets": [0, 8]}}, data=bytes(8)), "'a'.*no 'dtype'"),
  ("no_shape", dict(header={"a": {"dtype": "F32", "data_offsets": [0, 8]}}, data=bytes(8)), "'a'.*no 'shape'"),
  ("offsets_not_a_pair", dict(header={"a": _t(offsets=(0, 4, 8))}, data=bytes(8)), "'a'.*pair"),
  ("float_offsets", dict(header={"a": _t(offsets=(0.0, 8.0))}, data=bytes(8)), "'a'.*pair"),
  ("shape_overflows_int64", dict(header={"a": _t(shape=(2**40, 2**40), offsets=(0, 8))}, data=bytes(8)),
   "'a'.*overflows int64"),
  ("bytes_overflow_int64", dict(header={"a": _t(dtype="F64", shape=(2**61,), offsets=(0, 8))}, data=bytes(8)),
   "'a'.*overflows int64"),
  ("negative_dim", dict(header={"a": _t(shape=(-1, -2), offsets=(0, 8))}, data=bytes(8)),
   "'a'.*non-negative integers"),
  ("shape_not_a_list", dict(header={"a": _t(shape=(2,)) | {"shape": 2}}, data=bytes(8)), "'a'.*shape 2 "),
  ("unknown_dtype", dict(header={"a": _t(dtype="F128")}, data=bytes(8)), "'a'.*unsupported dtype 'F128'"),
  ("dtype_not_a_string", dict(header={"a": _t(dtype=4)}, data=bytes(8)), "'a'.*unsupported dtype 4"),
  ("metadata_not_strings", dict(header={"__metadata__": {"k": 1}}), "__metadata__"),
  ("metadata_a_list", dict(header={"__metadata__": ["k"]}), "__metadata__"),
  ("header_longer_than_file", dict(header={}, length=1000), "header length 1000 > file size"),
  ("header_over_limit", dict(header={}, length=2**40), "header length .* > limit 100000000"),
  ("header_not_utf8", dict(header=None, raw_header=b'{"\xff": 1}'), "not UTF-8 JSON"),
  ("header_not_json", dict(header=None, raw_header=b"{not json"), "not UTF-8 JSON"),
  ("empty_header", dict(header=None, raw_header=b""), "not UTF-8 JSON"),
]


@pytest.mark.parametrize("kwargs,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_safetensors_are_refused_with_a_one_line_message(tmp_path, kwargs, pattern):
  path = _write(tmp_path / "bad.safetensors", **kwargs)
  for read in (safetensors_io.load, safetensors_io.read_header, safetensors_io.read_metadata):
    with pytest.raises(CorruptCheckpointError, match=pattern) as e:
      read(path)
    assert isinstance(e.value, ValueError)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_a_file_too_short_for_a_header_is_refused(tmp_path):
  path = tmp_path / "short.safetensors"
  path.write_bytes(b"\x01\x02")
  with pytest.raises(CorruptCheckpointError, match="too short for a header"):
    safetensors_io.load(str(path))


def test_files_written_by_the_safetensors_library_load_bit_exactly(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "f32": rng.standard_normal((3, 5)).astype(np.float32),
    "f16": rng.standard_normal((7,)).astype(np.float16),
    "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
    "f64": np.array([np.nan, -0.0, np.inf]),
    "i64": rng.integers(-2**62, 2**62, (4,), dtype=np.int64),
    "i8": np.arange(-5, 5, dtype=np.int8),
    "u8": np.arange(256, dtype=np.uint8).reshape(16, 16),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float32),
    "scalar": np.array(1.5, np.float32),
  }
  path = str(tmp_path / "ok.safetensors")
  save_file(tensors, path, metadata={"format": "np"})
  back = safetensors_io.load(path)
  assert back.keys() == tensors.keys()
  for name, a in tensors.items():
    assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
    assert back[name].tobytes() == a.tobytes(), name
  assert safetensors_io.read_metadata(path) == {"format": "np"}
  # And what sdjax writes, the library reads back the same.
  ours = str(tmp_path / "ours.safetensors")
  safetensors_io.save(ours, tensors)
  from safetensors.numpy import load_file  # noqa: PLC0415
  theirs = load_file(ours)
  for name, a in tensors.items():  # (some library versions give a 0-d tensor back as shape (1,): bytes only)
    assert theirs[name].dtype == a.dtype and theirs[name].tobytes() == a.tobytes(), name


def test_a_corrupt_model_index_is_named_by_every_pipeline_loader(tmp_path):
  """load_pipeline, the safety checker loader and sdjax.upscale.load share one model_index.json reader: invalid
  JSON (here: bytes that are not UTF-8) is one ValueError naming the file, never a JSONDecodeError traceback."""
  from sdjax import upscale
  from sdjax.convert import diffusers as dconv
  from sdjax.convert import safety_checker
  (tmp_path / "model_index.json").write_bytes(b"\xff\xfe{not json")
  for load in (dconv.load_pipeline, safety_checker.load_safety_checker, upscale.load):
    with pytest.raises(ValueError, match=r"model_index.json: not valid JSON"):
      load(str(tmp_path))
