"""Structure of the package gptjax/, read from its source with `ast` (nothing is imported, so
this runs in a second and never loads JAX).

Allowed import direction (an arrow points at what a module may import):

    programs (a `__main__` block: main, bench, sweep, report, train_tokenizer, ...)
      -> cli (what the programs share: flag parsing, one-line errors)
      -> the library, in layers: a module imports only modules in layers below its own,
         never one above it, never cli, never a program.

So the import graph has no cycles, and every gptjax import sits at the top of its module,
where the graph can be read: an import of a gptjax module inside a function is the usual way
to hide a cycle, and is not allowed (heavy or optional third-party packages may still be
imported lazily). Modules stay under MAX_MODULE_LINES lines and functions under
MAX_FUNCTION_LINES.

Each check is its own test and names every offender, so a failing run is a to-do list.
"""

import ast
import collections
import dataclasses
import os

import pytest

PACKAGE = "gptjax"
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Programs that exist, besides any module with an `if __name__ == "__main__":` block.
PROGRAMS = {"main", "bench", "sweep", "report", "tokenize", "train_tokenizer", "serve"}
# Shared by the programs only: programs import it, the library does not.
PROGRAM_SIDE = {"cli"}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# "module.qualified.name" of functions allowed past MAX_FUNCTION_LINES.
LONG_FUNCTIONS_ALLOWED = {"config.default_config"}  # the config defaults, one key a line


@dataclasses.dataclass(frozen=True)
class Import:
  """One import of a gptjax module: `src` imports `dst` at src.py:line."""

  src: str
  dst: str
  line: int
  lazy: bool  # inside a function body

  def where(self) -> str:
    return f"{PACKAGE}/{self.src}.py:{self.line}"


def _modules() -> dict[str, ast.Module]:
  """Every gptjax/*.py, parsed, by module name (`__init__` for the package itself)."""
  trees = {}
  for name in sorted(os.listdir(PACKAGE_DIR)):
    if name.endswith(".py"):
      path = os.path.join(PACKAGE_DIR, name)
      with open(path, encoding="utf-8") as f:
        trees[name[:-3]] = ast.parse(f.read(), path)
  return trees


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
  """The gptjax modules an import statement loads (a name that is not a module file, as in
  `from gptjax import x` with x defined in __init__, counts as the package, `__init__`)."""
  if isinstance(node, ast.Import):
    out = []
    for alias in node.names:
      parts = alias.name.split(".")
      if parts[0] == PACKAGE:
        out.append(parts[1] if len(parts) > 1 else "__init__")
    return out
  if node.level > 1:  # above the package
    return []
  parts = (node.module or "").split(".") if node.module else []
  if node.level == 0:
    if not parts or parts[0] != PACKAGE:
      return []
    parts = parts[1:]
  if parts:  # from gptjax.x import y / from .x import y
    return [parts[0]]
  return [a.name if a.name in MODULES else "__init__" for a in node.names]


def _imports(src: str, tree: ast.Module) -> list[Import]:
  found = []

  def visit(node: ast.AST, lazy: bool) -> None:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      found.extend(Import(src, dst, node.lineno, lazy) for dst in _targets(node))
    inside = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inside)

  visit(tree, False)
  return found


IMPORTS = [imp for name, tree in MODULES.items() for imp in _imports(name, tree)]


def _has_main_block(tree: ast.Module) -> bool:
  """A top-level `if __name__ == "__main__":` (either way round)."""
  for node in tree.body:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
      continue
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
      continue
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    if names == ["__name__"] and consts == ["__main__"]:
      return True
  return False


def _programs() -> set[str]:
  return {n for n, t in MODULES.items() if _has_main_block(t)} | (PROGRAMS & set(MODULES))


def _edges() -> dict[str, dict[str, list[Import]]]:
  """src -> dst -> the import statements behind that edge (modules that exist only)."""
  graph = collections.defaultdict(lambda: collections.defaultdict(list))
  for imp in IMPORTS:
    if imp.dst in MODULES:
      graph[imp.src][imp.dst].append(imp)
  return graph


def _strongly_connected(graph) -> list[set[str]]:
  """Tarjan's algorithm; the components of more than one module, or one importing itself."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1 or v in graph.get(v, ()):
        out.append(component)

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return out


def _shortest_path(graph, start: str, goal: str, within: set[str]) -> list[str]:
  """Breadth-first path start -> ... -> goal through modules in `within`."""
  previous = {start: None}
  queue = collections.deque([start])
  while queue:
    v = queue.popleft()
    if v == goal:
      path = []
      while v is not None:
        path.append(v)
        v = previous[v]
      return path[::-1]
    for w in sorted(graph.get(v, ())):
      if w in within and w not in previous:
        previous[w] = v
        queue.append(w)
  raise AssertionError(f"no path {start} -> {goal} inside its component")


def _cycles(graph) -> list[list[str]]:
  """One shortest cycle through every import edge that lies on a cycle, without repeats: each
  is a place to cut. A cycle is spelled from its alphabetically first module."""
  cycles = set()
  for component in _strongly_connected(graph):
    for src in component:
      for dst in graph[src]:
        if dst in component:
          cycle = [src] + (_shortest_path(graph, dst, src, component) if dst != src else [src])
          ring = cycle[:-1]
          k = ring.index(min(ring))
          cycles.add(tuple(ring[k:] + ring[:k] + [ring[k]]))
  return sorted([list(c) for c in cycles], key=lambda c: (len(c), c))


def test_no_import_cycles():
  graph = _edges()
  lines = []
  for cycle in _cycles(graph):
    lines.append(" -> ".join(cycle))
    for src, dst in zip(cycle, cycle[1:]):
      where = ", ".join(i.where() + (" (in a function)" if i.lazy else "") for i in graph[src][dst])
      lines.append(f"    {src} -> {dst}: {where}")
  if lines:
    pytest.fail(
      f"import cycles among {PACKAGE} modules (lazy imports included); move the shared piece "
      "down a layer:\n" + "\n".join(lines),
      pytrace=False,
    )


def test_the_cycle_finder_spells_out_every_cycle():
  graph = {
    "hf": {"inference": [], "model": []},
    "inference": {"hf": [], "model": []},
    "model": {"config": []},
    "config": {"errors": []},
    "errors": {"model": [], "errors": []},
  }
  assert _cycles(graph) == [
    ["errors", "errors"],
    ["hf", "inference", "hf"],
    ["config", "errors", "model", "config"],
  ]


def test_no_lazy_imports_of_gptjax_modules():
  lazy = sorted((i for i in IMPORTS if i.lazy), key=lambda i: (i.src, i.line, i.dst))
  if lazy:
    pytest.fail(
      f"{PACKAGE} modules imported inside a function (import them at the top of the module; "
      "if that makes a cycle, move the shared piece down a layer):\n"
      + "\n".join(f"  {i.where()}: imports {i.dst}" for i in lazy),
      pytrace=False,
    )


def test_library_never_imports_programs():
  programs = _programs()
  lines = []
  for imp in sorted(IMPORTS, key=lambda i: (i.src, i.line, i.dst)):
    if imp.src in programs:
      continue
    if imp.dst in programs:
      lines.append(f"  {imp.where()}: library module {imp.src} imports program {imp.dst}")
    elif imp.dst in PROGRAM_SIDE and imp.src not in PROGRAM_SIDE:
      lines.append(f"  {imp.where()}: library module {imp.src} imports {imp.dst} (programs only)")
  if lines:
    pytest.fail(
      f"programs ({', '.join(sorted(programs))}) and {', '.join(sorted(PROGRAM_SIDE))} sit above "
      "the library; the library never imports them:\n" + "\n".join(lines),
      pytrace=False,
    )


# The library, upper to lower (docs/DESIGN.md's module map): a module imports only modules
# below it. A new module takes its place here, which is where its design is decided.
LAYERS = [
  "loop",
  "train",
  "chat",
  "export",
  "evaluation",
  "offline",
  "serve_bench",
  "inference",
  "openai_api",
  "scheduler",
  "engine",
  "row_sampling",
  "slot_cache",
  "checkpoint",
  "checkpoint_compat",
  "decode",
  "data",
  "tfds_data",
  "task_data",
  "packing",
  "chat_template",
  "tokenizer",
  "hf",
  "loss",
  "optim",
  "metrics",
  "scores",
  "quantize",
  "model",
  "attention",
  "layers",
  "int8_kernel",
  "runtime",
  "sharding",
  "workdir",
  "config",
  "tree_checks",
  "storage",
  "errors",
]


def test_library_imports_point_down_the_layers():
  programs = _programs()
  library = set(MODULES) - programs - PROGRAM_SIDE - {"__init__"}
  unplaced = sorted(library - set(LAYERS))
  upward = [
    f"  {imp.where()}: {imp.src} imports {imp.dst}, which sits above it"
    for imp in sorted(IMPORTS, key=lambda i: (i.src, i.line, i.dst))
    if imp.src in LAYERS and imp.dst in LAYERS and LAYERS.index(imp.dst) <= LAYERS.index(imp.src)
  ]
  if unplaced or upward:
    pytest.fail(
      (
        f"library modules missing from LAYERS (place them): {', '.join(unplaced)}\n"
        if unplaced
        else ""
      )
      + "\n".join(upward),
      pytrace=False,
    )


def test_modules_are_short():
  lines = []
  for name in sorted(MODULES):
    with open(os.path.join(PACKAGE_DIR, f"{name}.py"), encoding="utf-8") as f:
      n = len(f.read().splitlines())
    if n > MAX_MODULE_LINES:
      lines.append(f"  {PACKAGE}/{name}.py: {n} lines")
  if lines:
    pytest.fail(
      f"modules over {MAX_MODULE_LINES} lines (split them by responsibility):\n" + "\n".join(lines),
      pytrace=False,
    )


def _functions(module: str, tree: ast.Module):
  """(qualified name, def line, length in lines without decorators) of every function and
  method, nested ones included on their own."""
  out = []

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f"{prefix}.{child.name}"
        if not isinstance(child, ast.ClassDef):
          out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
        visit(child, name)
      else:
        visit(child, prefix)

  visit(tree, module)
  return out


def test_functions_are_short():
  lines = []
  for module, tree in sorted(MODULES.items()):
    for name, line, n in sorted(_functions(module, tree), key=lambda f: f[1]):
      if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_ALLOWED:
        lines.append(f"  {PACKAGE}/{module}.py:{line}: {name} is {n} lines")
  if lines:
    pytest.fail(
      f"functions over {MAX_FUNCTION_LINES} lines (decorators excluded; split them into named "
      "helpers):\n" + "\n".join(lines),
      pytrace=False,
    )
