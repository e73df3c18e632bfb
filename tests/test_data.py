import numpy as np
import pytest

from sdjax.data import StepBatches, bundled, load_bundled


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


def test_step_batches_are_deterministic_and_cover_each_epoch():
  arrays = {"x": np.arange(100), "y": np.arange(100) * 2}
  a, b = StepBatches(arrays, 10, seed=3), StepBatches(arrays, 10, seed=3)
  for step in (0, 7, 10, 123):
    np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
  np.testing.assert_array_equal(a.batch(5)["y"], 2 * a.batch(5)["x"])
  epoch0 = np.concatenate([a.batch(s)["x"] for s in range(10)])
  epoch1 = np.concatenate([a.batch(s)["x"] for s in range(10, 20)])
  assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
  assert not np.array_equal(epoch0, epoch1), "each epoch is reshuffled"
  assert not np.array_equal(StepBatches(arrays, 10, seed=4).batch(0)["x"], a.batch(0)["x"])


def test_processes_get_disjoint_slices_of_the_global_batch():
  arrays = {"x": np.arange(64)}
  whole = StepBatches(arrays, 16, seed=0).batch(9)["x"]
  parts = [StepBatches(arrays, 16, seed=0, process_index=i, process_count=4).batch(9)["x"] for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(ValueError, match="not divisible"):
    StepBatches(arrays, 10, seed=0, process_count=4)
  with pytest.raises(ValueError, match="exceeds"):
    StepBatches(arrays, 128, seed=0)
