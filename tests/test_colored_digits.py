"""The coloured, captioned digits (sdjax.data.colored_digits) and their judge (sdjax.eval.colored_digits): the source's
splits, captions and held-out pairs; decolouring gives back the real digit; the judge reads the real test images'
digit and colours; blank and noise images are judged without NaN; a small Classification Accuracy Score run learns."""
import numpy as np
import pytest

from sdjax.data import bundled
from sdjax.data import colored_digits as data
from sdjax.eval import colored_digits as cd
from sdjax.eval import digits


@pytest.fixture(scope="module")
def test_arrays():
  source = data.ColoredDigitsSource("test")
  images, attributes = source.arrays()
  return source, images, attributes


def test_the_source_has_its_splits_captions_and_held_out_pairs(test_arrays):
  source, images, attributes = test_arrays
  train = data.ColoredDigitsSource("train")
  assert (len(train), len(source)) == (4_500, 500)
  assert images.shape == (500, 32, 32, 3) and images.dtype == np.uint8
  raw, labels = bundled.read_raw()
  np.testing.assert_array_equal(source.digits, raw[bundled.split_indices(labels, "test")])
  for i in (0, 137, 499):
    example = source[i]
    digit, fg, bg = attributes[i]
    assert example["caption"] == data.caption(digit, fg, bg) == f"a {fg} {digit} on a {bg} background"
    assert example["label"] == digit == source.labels[i]
    np.testing.assert_array_equal(example["image"], images[i])
  train_attributes = [train.attributes(i) for i in range(len(train))]
  assert [a[0] for a in train_attributes] == train.labels.tolist()
  assert not {(d, f) for d, f, _ in train_attributes} & data.HELD_OUT
  assert {(d, f) for d, f, _ in attributes} >= data.HELD_OUT
  assert len(data.combinations(True)) == 10 and len(data.combinations()) == 80
  # determinism: a second source draws the same colours and paints the same pixels
  again = data.ColoredDigitsSource("test")
  assert [again.attributes(i) for i in range(len(again))] == attributes
  np.testing.assert_array_equal(again[42]["image"], images[42])
  with pytest.raises(IndexError):
    train.attributes(4_500)
  with pytest.raises(ValueError, match="unknown split"):
    data.ColoredDigitsSource("validation")


def test_paint_white_on_black_is_the_padded_digit(test_arrays):
  source, _, _ = test_arrays
  painted = data.paint(source.digits[:20], (255, 255, 255), "black")  # [20, 32, 32, 3]
  assert painted.shape == (20, 32, 32, 3)
  np.testing.assert_array_equal(painted[:, 2:30, 2:30], np.repeat(source.digits[:20], 3, axis=-1))
  assert not painted[:, :2].any() and not painted[:, 30:].any() and not painted[:, :, :2].any()


def test_decolour_gives_back_the_real_digits(test_arrays):
  source, images, _ = test_arrays
  gray = cd.decolour(images)
  assert gray.shape == (500, 28, 28, 1) and gray.dtype == np.uint8
  # within 2 grey levels of the original: uint8 rounding of the paint, and 255/254 stretch of digits peaking at 254
  assert np.abs(gray.astype(int) - source.digits.astype(int)).max() <= 2
  as_floats = cd.decolour(images[:50].astype(np.float32) / 255.0)  # the same images; float32 rounding only
  assert np.abs(as_floats.astype(int) - gray[:50].astype(int)).max() <= 1


def test_judge_reads_the_real_test_images(test_arrays):
  source, images, attributes = test_arrays
  accuracies = cd.score(images, attributes)
  assert accuracies["digit"] >= 0.97
  assert accuracies["foreground"] == accuracies["background"] == 1.0
  assert accuracies["all"] == accuracies["digit"]
  # colours as indices mean the same; the judged digit is the shipped classifier's on the original digit
  indexed = [(d, cd.FOREGROUND_NAMES.index(f), cd.BACKGROUND_NAMES.index(b)) for d, f, b in attributes[:40]]
  assert cd.score(images[:40], indexed) == cd.score(images[:40], attributes[:40])
  judged = cd.judge(images[:40])
  assert judged["foreground_name"].tolist() == [f for _, f, _ in attributes[:40]]
  assert judged["background_name"].tolist() == [b for _, _, b in attributes[:40]]
  np.testing.assert_array_equal(judged["digit"], digits.predict(source.digits[:40]))
  with pytest.raises(ValueError, match="one \\(digit, foreground, background\\) per image"):
    cd.score(images[:3], attributes[:2])
  with pytest.raises(ValueError, match="unknown foreground"):
    cd.score(images[:1], [(0, "purple", "black")])
  with pytest.raises(ValueError, match="32, 32, 3"):
    cd.decolour(source.digits[:2])


def test_blank_and_noise_images_are_judged_without_nan():
  rng = np.random.default_rng(0)
  images = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8),
                     rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)])
  gray = cd.decolour(images)
  assert not gray[:2].any()  # blank: no ink
  judged = cd.judge(images)
  assert judged["foreground"][:2].tolist() == [cd.NO_INK] * 2 and judged["foreground_name"][:2].tolist() == ["none"] * 2
  assert judged["background_name"][:2].tolist() == ["black", "white"]
  assert judged["contrast"][:2].tolist() == [0.0, 0.0]
  for key in ("foreground_rgb", "background_rgb", "contrast"):
    assert np.all(np.isfinite(judged[key])), key
  assert 0 <= judged["foreground"][2] < len(cd.FOREGROUND_NAMES)
  assert set(judged["digit"].tolist()) <= set(range(10))
  accuracies = cd.score(images, [(0, "red", "black")] * 3)
  assert all(0.0 <= v <= 1.0 for v in accuracies.values())


def test_classification_accuracy_score_of_real_painted_digits_beats_chance():
  train = data.ColoredDigitsSource("train")
  idx = np.concatenate([np.flatnonzero(train.labels == k)[:20] for k in range(10)])  # 200 digits, 20 per class
  images = np.stack([train[int(i)]["image"] for i in idx])
  # 5 epochs of batch 10: 100 steps (about 5 s on two CPU cores, mostly the compile); seeds 0-2 scored 0.75-0.79
  cas = cd.classification_accuracy_score(images, train.labels[idx], epochs=5, batch_size=10, augment=False)
  assert np.isfinite(cas) and 0.5 < cas <= 1.0
  with pytest.raises(ValueError, match="at least batch_size"):
    cd.classification_accuracy_score(images[:5], train.labels[idx[:5]], batch_size=10)
