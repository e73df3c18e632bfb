"""docs/architecture.md's worked example, run for real: a task added as one file (tests/example_task.py: the
task and its config), with nothing else touched, trains through the one trainer, resumes exactly and loads
back through sdjax.runs."""
import os

import jax
import numpy as np

import example_task
from conftest import losses
from sdjax import runs
from sdjax.data import input_pipeline
from sdjax.train import run, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train):
  c = example_task.get_config().unlock()
  c.train.update(train)
  return c.lock()


def test_the_documented_example_is_this_file():
  with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
    doc = f.read()
  with open(example_task.__file__) as f:
    code = f.read()
  assert code in doc, "docs/architecture.md must show tests/example_task.py verbatim"


def test_a_task_added_in_one_file_trains_resumes_and_loads(tmp_path):
  assert task.get("classifier") is example_task.Classifier
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  summary = run(_config(), full)
  assert summary["final_step"] == 60 and summary["steps_run"] == 60
  run(_config(num_steps=30), part)
  assert run(_config(), part)["start_step"] == 30  # resumed from the checkpoint at step 30
  a, b = losses(full), losses(part)
  assert sorted(a) == sorted(b) == list(range(10, 61, 10))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  assert a[60] < 0.5 * a[10]

  loaded = runs.load(full)
  assert loaded.task == "classifier" and loaded.step == 60
  model, params = loaded.model
  data = input_pipeline.pipeline_from_config(example_task.get_config().data, channels=1, global_batch_size=256,
                                             seed=1, label=True)
  batch = data.batch(0)
  logits = model.apply({"params": jax.device_get(params)}, batch["image"])
  accuracy = float(np.mean(np.argmax(logits, -1) == batch["label"]))
  assert accuracy > 0.8, accuracy
