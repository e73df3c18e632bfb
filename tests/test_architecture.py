"""The one-way layering of sdjax (docs/architecture.md), checked on the source: every `import` statement in
sdjax/, at module level or inside a function, is an edge.

  models -> schedules/samplers -> pipelines -> {train, runs, jobs} -> CLIs

Nothing outside sdjax/train imports it but sdjax/runs.py; the trainer imports no task; no import cycles.
"""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PKG = os.path.join(ROOT, "sdjax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _graph() -> dict[str, set[str]]:
  """{module: the sdjax modules it imports} (`from sdjax.x import y` counts sdjax.x.y if it is a module)."""
  files = {}
  for folder, _, names in os.walk(PKG):
    for name in names:
      if name.endswith(".py"):
        files[_module_name(os.path.join(folder, name))] = os.path.join(folder, name)
  graph = {}
  for mod, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    for node in ast.walk(tree):
      if id(node) in typing_only:  # annotations only: not an import at run time
        continue
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith("sdjax"))
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        if not base.startswith("sdjax"):
          continue
        deps.add(base)
        deps.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files)
    graph[mod] = {d for d in deps if d in files and d != mod}
  return graph


def test_only_training_and_runs_import_the_training_package():
  offenders = {m: sorted(d for d in deps if d == "sdjax.train" or d.startswith("sdjax.train."))
               for m, deps in _graph().items()
               if not (m == "sdjax.train" or m.startswith("sdjax.train.") or m == "sdjax.runs")}
  assert not {m: d for m, d in offenders.items() if d}, offenders


def test_inference_layers_do_not_import_upwards():
  lower = ("sdjax.models", "sdjax.schedules", "sdjax.samplers", "sdjax.guidance", "sdjax.convert", "sdjax.pipelines")
  upper = ("sdjax.train", "sdjax.runs", "sdjax.jobs", "sdjax.sampling", "sdjax.data")
  bad = {m: sorted(d for d in deps if d.startswith(upper)) for m, deps in _graph().items() if m.startswith(lower)}
  assert not {m: d for m, d in bad.items() if d}, bad


def test_the_trainer_and_the_step_import_no_task():
  graph = _graph()
  for mod in ("sdjax.train.trainer", "sdjax.train.step", "sdjax.train.task"):
    assert not {d for d in graph[mod] if d.startswith("sdjax.train.tasks")}, (mod, graph[mod])


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  cycles = []

  def visit(m, path):
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        cycles.append(path[path.index(d):] + [d])
      elif d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  # A package's __init__ importing its own submodules (re-exports) and those importing siblings through the
  # package is how Python packages are built; a cycle between two different modules otherwise is not allowed.
  real = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") or c[0].startswith(x + ".")
                                       for x in c)]
  assert not real, real
