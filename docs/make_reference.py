"""Writes docs/reference.md from the live code: every config field of piccolo_jax.config.base() with its default
and the comment beside it in piccolo_jax/config.py (tasks.*: the defaults of the registry, piccolo_jax/tasks.py,
and its comments), the moved fields, and the flags of every command-line tool (python -m piccolo_jax.NAME).

  python docs/make_reference.py          # from the repository root: (re)writes docs/reference.md
  python docs/make_reference.py --check  # exits 1 with one line if docs/reference.md is not what it would write

Nothing is run: argparse tools' parsers are captured when main() parses, absl tools' flags are defined into a
private FlagValues (absl_flags below; tests/test_docs.py parses the docs' commands with both). The output does
not depend on the terminal (argparse formats at COLUMNS=100).
"""
import argparse
import ast
import contextlib
import functools
import inspect
import io
import os
import pathlib
import sys
import textwrap
import tokenize

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "reference.md"
WIDTH = 100
# Tools in this order first, then any other module of piccolo_jax/ with a main() run as __main__.
ORDER = ("train", "prepare", "convert", "encode", "evaluate", "mine", "export", "merge", "verify")

if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- Comments of the source ------------------------------------------------------------------------------------

class Source:
  """A module's source: its ast, and its comments by line (trailing or comment-only)."""

  def __init__(self, path):
    self.text = pathlib.Path(path).read_text()
    self.tree = ast.parse(self.text)
    self.comment, self.alone = {}, set()  # line -> comment text; lines that hold only a comment
    lines = self.text.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(self.text).readline):
      if tok.type == tokenize.COMMENT:
        row = tok.start[0]
        self.comment[row] = tok.string.lstrip("#").strip()
        if not lines[row - 1][:tok.start[1]].strip():
          self.alone.add(row)

  def block_above(self, line) -> list:
    """The comment-only lines right above `line`, in order."""
    out = []
    while line - 1 in self.alone:
      line -= 1
      out.insert(0, self.comment[line])
    return out


def _dictlike(node):
  """The keyword/key pairs of dict(...), ConfigDict(dict(...)) or {...} (None if node is none of those)."""
  if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
    return [(k.value, k, v) for k, v in zip(node.keys, node.values)]
  if isinstance(node, ast.Call):
    if node.keywords and all(k.arg for k in node.keywords) and not node.args:
      return [(k.arg, k, k.value) for k in node.keywords]
    if len(node.args) == 1 and not node.keywords:
      return _dictlike(node.args[0])
  return None


def config_comments(src: Source) -> tuple[list, dict]:
  """From base() in config.py: [(dotted field paths that share one comment, comment)] in source order, and
  {section: the comment block above its assignment}."""
  fn = next(n for n in src.tree.body if isinstance(n, ast.FunctionDef) and n.name == "base")
  groups, intro = [], {}
  for stmt in fn.body:
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Attribute)):
      continue
    name = stmt.targets[0].attr
    intro[name] = " ".join(src.block_above(stmt.lineno))
    items = _dictlike(stmt.value)
    if items is None:  # A top-level field (c.seed = 0  # comment), or a section built otherwise (c.tasks).
      trailing = stmt.lineno not in src.alone and src.comment.get(stmt.lineno)
      groups.append(([name], [trailing] if trailing else []))
      continue
    starts = {}  # line -> [paths of the keywords that start there]

    def walk(items, prefix):
      for key, at, value in items:
        starts.setdefault(getattr(at, "lineno", value.lineno), []).append(prefix + key)
        if (sub := _dictlike(value)) is not None:
          walk(sub, prefix + key + ".")
    walk(items, name + ".")
    last, lead, continuing = None, [], False
    for line in range(stmt.lineno, stmt.end_lineno + 1):
      text = src.comment.get(line, "")
      if line in src.alone:  # Continues a trailing comment on the line above, else leads the next field.
        (last[1] if continuing else lead).append(text)
        continue
      if line in starts:
        last, lead = (starts[line], lead + ([text] if text else [])), []
        groups.append(last)
      elif text and last is not None:  # A trailing comment on a line where no field starts: the last group's.
        last[1].append(text)
      continuing = bool(text) and last is not None
  return [(paths, " ".join(comments)) for paths, comments in groups], intro


def module_comments(src: Source) -> list:
  """[(names, comment)] of the module-level assignments of tasks.py that name task settings (string constants,
  dict keys or keywords in their value) under a comment block."""
  out = []
  for stmt in src.tree.body:
    if isinstance(stmt, ast.Assign) and (block := src.block_above(stmt.lineno)):
      names = [n.value for n in ast.walk(stmt.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
      names += [k.arg for n in ast.walk(stmt.value) if isinstance(n, ast.Call) for k in n.keywords if k.arg]
      if names:
        out.append((list(dict.fromkeys(names)), " ".join(block)))
  return out


# --- Config fields ---------------------------------------------------------------------------------------------

def _value(v) -> str:
  return "`" + (repr(tuple(v)) if isinstance(v, (list, tuple)) else repr(v)) + "`"


def config_section() -> list[str]:
  from piccolo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from piccolo_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base().copy_and_resolve_references()
  values = config_lib.flat(c)
  groups, intro = config_comments(Source(inspect.getsourcefile(config_lib)))
  out = ["## Config fields", "",
         "`piccolo_jax.config.base()`, the schema every config edits: each field with its default and the comment "
         "beside it in `piccolo_jax/config.py`. Set one with `--config.SECTION.FIELD=VALUE` (train, prepare) or in a "
         "config file (docs/extending.md); `WORKDIR/config.json` holds a run's resolved config."]
  done, section = set(), None
  for paths, comment in groups:
    paths = [p for p in paths if p in values or any(v.startswith(p + ".") for v in values)]
    if not paths or paths[0].split(".")[0] == "tasks":
      continue
    top = paths[0].split(".")[0]
    if top != section:
      section, is_section = top, "." in paths[0]
      out += ["", f"### `{top}`" if is_section else "### Top level", ""]
      if is_section and intro.get(top):
        out += [intro[top], ""]
    fields = [p for p in paths if p in values]
    line = ", ".join([f"`{p}.*`" for p in paths if p not in values] +  # A nested section (model.arch).
                     [f"`{p}` = {_value(values[p])}" for p in fields])
    done.update(fields)
    out.append(f"- {line}" + (f": {comment}" if comment else ""))
  tasks_fields = [p for p in values if p.startswith("tasks.")]
  done.update(tasks_fields)
  out += ["", *tasks_section(c, intro.get("tasks", ""), tasks_lib)]
  if rest := [p for p in values if p not in done]:  # Set outside the assignments parsed above.
    out += ["", "### Other fields", "", *(f"- `{p}` = {_value(values[p])}" for p in rest)]
  if resumable := getattr(config_lib, "RESUMABLE", None):
    out += ["", "### Fields a resumed run may change", "",
            "`config.RESUMABLE` (a prefix ending in `.` is a whole section): a run resumed with other values of "
            "these goes on with a warning; another changed field stops it with a one-line diff (docs/failures.md).",
            "", ", ".join(f"`{p}*`" if p.endswith(".") else f"`{p}`" for p in resumable)]
  out += ["", "### Moved fields", "",
          "Setting one of these, in a config file or as a flag, stops start-up with a line saying where it went:", ""]
  out += [f"- `{k}` {v}" for k, v in config_lib.MOVED.items()]
  return out


def tasks_section(c, intro, tasks_lib) -> list[str]:
  names = list(tasks_lib.TASKS)
  fields = list(dict.fromkeys(f for t in names for f in tasks_lib.TASKS[t].defaults))
  fields += [f for t in names for f in c.tasks[t].keys() if f not in fields]
  doc = inspect.getdoc(tasks_lib).split("\n\n", 1)[1:] or [""]
  out = ["### `tasks.NAME`", ""]
  if intro:
    out += [intro, ""]
  out += [f"One section per task of the registry (`piccolo_jax/tasks.py`, `TASKS[NAME].defaults`). From its "
          f"docstring: {' '.join(doc[0].split())}", ""]
  out += ["| field | " + " | ".join(f"`{t}`" for t in names) + " |", "|---" * (len(names) + 1) + "|"]
  for f in fields:
    cells = [_value(c.tasks[t][f]).replace("|", "\\|") if f in c.tasks[t] else "-" for t in names]
    out.append(f"| `{f}` | " + " | ".join(cells) + " |")
  notes = [(ns, text) for ns, text in module_comments(Source(inspect.getsourcefile(tasks_lib)))
           if any(n in fields for n in ns)]
  if notes:
    out += ["", "Comments in `piccolo_jax/tasks.py`:", ""]
    out += [f"- {', '.join(f'`{n}`' for n in ns if n in fields)}: {text}" for ns, text in notes]
  return out


# --- Command-line tools ----------------------------------------------------------------------------------------

class _Stop(Exception):
  """Raised in place of parsing (argparse) or running (absl) a tool's main()."""

  def __init__(self, parser=None):
    super().__init__()
    self.parser = parser


@functools.cache
def tools() -> tuple[str, ...]:
  """The modules of piccolo_jax/ that run as `python -m piccolo_jax.NAME` (a main() called under __main__)."""
  found = []
  for path in sorted((REPO / "piccolo_jax").glob("*.py")):
    tree = ast.parse(path.read_text())
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    runs = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    if has_main and runs:
      found.append(path.stem)
  return tuple(sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)))


@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def _call_main(module):
  main = module.main
  return main(["--help"]) if inspect.signature(main).parameters else main()


def argparse_parser(name):
  """The argparse parser of piccolo_jax.NAME's main(), captured as it parses (None if it builds none)."""
  import importlib  # pylint: disable=g-import-not-at-top

  def stop(self, *_, **__):
    raise _Stop(self)
  module = importlib.import_module(f"piccolo_jax.{name}")
  if not _uses_argparse(module):
    return None
  with _patched(argparse.ArgumentParser, "parse_args", stop), \
       _patched(argparse.ArgumentParser, "parse_known_args", stop):
    try:
      _call_main(module)
    except _Stop as s:
      return s.parser
  return None


def _uses_argparse(module) -> bool:
  return "argparse" in inspect.getsource(module)


class AbslFlags:
  """piccolo_jax.NAME's absl flags, defined by its main() into a private FlagValues (main's run is not
  started): `values`, and `required`, the names marked required."""

  def __init__(self, name):
    import importlib  # pylint: disable=g-import-not-at-top
    from absl import app, flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    from piccolo_jax import cli  # pylint: disable=g-import-not-at-top
    module = importlib.import_module(f"piccolo_jax.{name}")
    self.values, self.required = flags.FlagValues(), []

    def route(fn):  # fn with flag_values=self.values unless given.
      sig = inspect.signature(fn)

      def call(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        if "flag_values" not in bound.arguments:
          bound.arguments["flag_values"] = self.values
        if fn.__name__ in ("mark_flag_as_required", "mark_flags_as_required"):
          names = bound.arguments.get("flag_names") or [bound.arguments.get("flag_name")]
          self.required += list(names)
        return fn(*bound.args, **bound.kwargs)
      return call

    def stop(*_, **__):
      raise _Stop()
    patches = [(m, n, route(getattr(m, n))) for m in (flags, config_flags) for n in dir(m)
               if callable(getattr(m, n)) and not isinstance(getattr(m, n), type) and _takes_flag_values(getattr(m, n))]
    patches += [(cli, "run", stop), (app, "run", stop)]
    with contextlib.ExitStack() as stack:
      for obj, n, value in patches:
        stack.enter_context(_patched(obj, n, value))
      stack.enter_context(_patched(sys, "argv", [f"piccolo_jax.{name}"]))
      try:
        module.main()
      except _Stop:
        pass

  def help(self) -> str:
    lines = []
    for name in sorted(self.values):
      flag = self.values[name]
      if flag.name != name:  # A short name.
        continue
      default = "required" if name in self.required else f"default: {flag.default!r}"
      head = f"--{name}: {flag.help} ({flag.flag_type()}; {default})"
      lines += textwrap.wrap(head, WIDTH, subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(lines)

  def parse(self, argv):
    """Parses argv ([program, flags...]) as absl's app.run does, sys.argv being argv (the config flag reads its
    overrides from it); raises absl's errors."""
    with _patched(sys, "argv", list(argv)):
      return self.values(list(argv))


def _takes_flag_values(fn) -> bool:
  try:
    return "flag_values" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def is_absl(name) -> bool:
  import importlib  # pylint: disable=g-import-not-at-top
  return "absl" in inspect.getsource(importlib.import_module(f"piccolo_jax.{name}"))


def tools_section() -> list[str]:
  out = ["## Command-line tools", "",
         "`python -m piccolo_jax.NAME`: the argparse tools as `--help` prints them; the absl tools (train, prepare) "
         "their own flags, which `--helpfull` lists among absl's. What each tool does: docs/tools.md; the trainer: "
         "docs/training.md.", ""]
  for name in tools():
    parser = argparse_parser(name)
    if parser is not None:
      text = parser.format_help().rstrip()
    elif is_absl(name):
      f = AbslFlags(name)
      text = (f.help() + "\n\n" + "\n".join(textwrap.wrap(
          "and --config.FIELD=VALUE for every config field (the section above); --helpfull also lists absl's own "
          "flags (logging, --flagfile).", WIDTH)))
    else:
      text = "(no flags)"
    out += [f"### `python -m piccolo_jax.{name}`", ""]
    if parser is None:
      import importlib  # pylint: disable=g-import-not-at-top
      first = (inspect.getdoc(importlib.import_module(f"piccolo_jax.{name}")) or "").split("\n\n")[0]
      out += [" ".join(first.split()), ""]
    out += ["```text", text, "```", ""]
  return out


# --- The page --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _env(**values):
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def render() -> str:
  with _env(COLUMNS=str(WIDTH), LINES="50"):  # argparse's width.
    body = config_section() + [""] + tools_section()
  head = ["# Reference: config fields and command-line flags", "",
          "Generated from the code by `python docs/make_reference.py`: do not edit by hand "
          "(`tests/test_docs.py` fails when it is stale). The ideas behind the fields are in docs/training.md, "
          "docs/data.md, docs/distillation.md and docs/tools.md.", ""]
  return "\n".join(head + body).rstrip() + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(prog="python docs/make_reference.py", description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale, writing nothing")
  args = p.parse_args(argv)
  text = render()
  if args.check:
    if not PAGE.is_file() or PAGE.read_text() != text:
      sys.exit(f"{PAGE.relative_to(REPO)} is stale: run `python docs/make_reference.py` from the repository root")
    return
  PAGE.write_text(text)
  print(f"wrote {PAGE.relative_to(REPO)}")


if __name__ == "__main__":
  main()
