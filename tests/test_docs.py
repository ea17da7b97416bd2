"""Docs a new user can trust: docs/reference.md is what docs/make_reference.py writes from the code, and every
command in a code block of README.md and docs/*.md is checked as far as CI can without running it.

Checked, for a command as written (synopsis brackets `[...]` dropped, each `a|b` alternative tried):
- `python -m piccolo_jax.NAME ARGS`: NAME is a tool (a main() run as __main__); an argparse tool's own parser
  parses ARGS; for the absl tools (train, prepare) --config=NAME resolves, every --config.FIELD override names a
  field (piccolo_jax.cli's checks), absl parses every flag into the resolved config with the tool's own flag
  definitions (types, required flags), config.check accepts the config, and each data.datasets entry has only
  known keys. Paths are not required to exist (/path/to/stella is a placeholder) and nothing runs.
- `make TARGET`: the Makefile has the target (PARTLY below: running it).
- `launch/SCRIPT.sh ARGS`: the script takes ARGS (its --dry-run exits 0, nothing launched) and the train
  command it would run passes the trainer's checks above.
- ```python blocks: their imports resolve and every attribute they read from an imported name exists.
"""
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import pathlib
import re
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("python", "python3", ".venv/bin/python")
HELP = ("-h", "--help", "--helpfull", "--helpshort")  # absl's app.run defines --helpfull and --helpshort.

# What the checks above leave out, by the command's start: nothing here runs in CI.
PARTLY = {
    "make demo": "creates .venv, installs, then trains for minutes: only the target is checked",
    "make test": "creates .venv, installs, then runs this suite: only the target is checked",
    "launch/local.sh": "running it trains: its --dry-run and the train commands it prints are checked",
    "launch/slurm.sh": "submitting needs SLURM (sbatch): its --dry-run and the train command are checked",
    "launch/tpu_pod.sh": "creating and using a TPU slice needs gcloud and a project: its --dry-run (with a "
                         "stand-in git remote: the script clones the checkout's origin) and the train command are "
                         "checked",
}
# Commands no check above applies to, each with the reason (a command neither checked nor listed fails).
UNCHECKED = {}


def _load_reference():
  spec = importlib.util.spec_from_file_location("make_reference", REPO / "docs" / "make_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


reference = _load_reference()


# --- Commands of the docs --------------------------------------------------------------------------------------

def code_blocks(path):
  """(language, first line number, text) of each fenced block."""
  lang, start, lines = None, 0, []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.lstrip().startswith("```"):
      if lang is None:
        lang, start, lines = line.strip()[3:].strip(), n + 1, []
      else:
        yield lang, start, "\n".join(lines)
        lang = None
    elif lang is not None:
      lines.append(line)


def shell_commands(path):
  """(line number, command text) of each command line of the shell-like blocks, continuations joined."""
  for lang, start, text in code_blocks(path):
    if lang in ("python", "json", "text"):
      continue
    lines, n = text.split("\n"), 0
    while n < len(lines):
      first, line = n, lines[n]
      while line.rstrip().endswith("\\") and n + 1 < len(lines):
        n += 1
        line = line.rstrip()[:-1] + " " + lines[n].strip()
      n += 1
      words = line.split()
      if words and (words[0] in PROGRAMS or words[0] in ("make", "bash") or re.fullmatch(r"launch/\S+\.sh", words[0])):
        yield start + first, line.strip()


def words(command):
  """Shell words of a synopsis line: [(text, quoted mask)], a `#` comment dropped, backslashes and quotes
  resolved; the mask tells the characters that stood inside quotes (or after a backslash)."""
  out, text, mask, quote, i, started = [], [], [], None, 0, False
  while i < len(command):
    ch = command[i]
    if quote:
      if ch == quote:
        quote = None
      else:
        text.append(ch)
        mask.append(True)
    elif ch in "'\"":
      quote, started = ch, True
    elif ch == "\\" and i + 1 < len(command):
      i += 1
      text.append(command[i])
      mask.append(True)
      started = True
    elif ch.isspace():
      if started:
        out.append(("".join(text), mask))
      text, mask, started = [], [], False
    elif ch == "#" and not started:
      break
    else:
      text.append(ch)
      mask.append(False)
      started = True
    i += 1
  assert quote is None, f"unterminated quote in {command!r}"
  if started:
    out.append(("".join(text), mask))
  return out


def variants(command) -> list[list[str]]:
  """argv lists of a synopsis line: unquoted `[` `]` and `...` dropped; a word with unquoted `|` is each of its
  alternatives in turn (the n-th variant takes the n-th, or the last one)."""
  argvs = []
  for text, mask in words(command):
    kept = [(c, q) for c, q in zip(text, mask) if q or c not in "[]"]
    if not kept or "".join(c for c, _ in kept) == "...":
      continue
    alts, cur = [], ""
    for c, q in kept:
      if c == "|" and not q:
        alts.append(cur)
        cur = ""
      else:
        cur += c
    argvs.append(alts + [cur])
  n = max((len(a) for a in argvs), default=1)
  return [[a[min(i, len(a) - 1)] for a in argvs] for i in range(n)]


COMMANDS = [(f"{p.relative_to(REPO)}:{n}", c) for p in DOCS for n, c in shell_commands(p)]
PYTHON_BLOCKS = [(f"{p.relative_to(REPO)}:{n}", t) for p in DOCS for lang, n, t in code_blocks(p) if lang == "python"]


# --- Checks ----------------------------------------------------------------------------------------------------

_PARSERS = {}


def check_tool(name, args):
  """Raises AssertionError naming what in `python -m piccolo_jax.NAME ARGS` would not parse."""
  assert name in reference.tools(), f"piccolo_jax.{name} is not a tool; tools: {', '.join(reference.tools())}"
  if any(a in HELP for a in args):
    return
  if name not in _PARSERS:
    _PARSERS[name] = reference.argparse_parser(name)
  if (parser := _PARSERS[name]) is not None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      try:
        parser.parse_args(args)
      except SystemExit:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None
    return
  check_config_tool(name, args)


def check_config_tool(name, args):
  """The absl tools: the config resolves, overrides name fields, absl parses the flags, the config is valid."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from piccolo_jax import cli, config as config_lib, sources  # pylint: disable=g-import-not-at-top
  try:
    argv = cli.resolve_argv([f"piccolo_jax.{name}", *args])
    cli.check_overrides(argv)
  except SystemExit as e:
    raise AssertionError(str(e)) from None
  values = reference.AbslFlags(name)
  try:
    values.parse(argv)
  except flags.Error as e:
    raise AssertionError(f"absl: {e}") from None
  c = values.values["config"].value
  try:
    config_lib.check(c)
    for entry in c.data.datasets:
      sources.check_entry(entry)
  except ValueError as e:
    raise AssertionError(str(e)) from None


def check_make(args):
  targets = re.findall(r"^(\w[\w.-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M)
  for t in args:
    assert t in targets, f"Makefile has no target {t!r} (targets: {', '.join(targets)})"


def script_options(script) -> dict:
  """{option: takes a value} from the script's `case $1 in --opt) ...; shift [2] ;;` loop."""
  out = {}
  for opts, body in re.findall(r"^\s*(-[-\w|]+)\)(.*?);;", script.read_text(), re.M):
    for opt in opts.split("|"):
      out[opt] = "shift 2" in body
  return out


def check_launch(script_name, args):
  script = REPO / script_name
  assert script.is_file(), f"no {script_name}"
  options, i = script_options(script), 0
  while i < len(args) and args[i].startswith("-"):
    assert args[i] in options, f"{script_name}: unknown option {args[i]} (it takes {', '.join(options)})"
    i += 2 if options[args[i]] else 1
  assert len(args) - i >= 2, f"{script_name}: expected CONFIG WORKDIR after its options, got {args[i:]}"
  config, workdir, extra = args[i], args[i + 1], args[i + 2:]
  env = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="remote.origin.url",
             GIT_CONFIG_VALUE_0="https://example.invalid/piccolo_jax.git")  # tpu_pod.sh clones origin.
  dry = subprocess.run(["bash", str(script), "--dry-run", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=30)
  assert dry.returncode == 0, f"{script_name} --dry-run: exit {dry.returncode}: {dry.stderr.strip()}"
  check_tool("train", [f"--config={config}", f"--workdir={workdir}", *extra])
  for line in dry.stdout.splitlines():  # The train commands it prints, where they are plain shell words.
    try:
      argv = shlex.split(line)
    except ValueError:
      continue
    for j in range(len(argv) - 1):
      if argv[j:j + 2] == ["-m", "piccolo_jax.train"]:
        check_tool("train", argv[j + 2:])


def check_command(command):
  for argv in variants(command):
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes.
      argv = argv[1:]
    if argv[0] == "bash":
      argv = argv[1:]
    if argv[0] in PROGRAMS and argv[1:2] == ["-m"] and argv[2].startswith("piccolo_jax."):
      check_tool(argv[2].split(".", 1)[1], argv[3:])
    elif argv[0] == "make":
      check_make(argv[1:])
    elif argv[0].startswith("launch/"):
      check_launch(argv[0], argv[1:])
    else:
      assert command in UNCHECKED, "no check applies: add one to tests/test_docs.py or list it in UNCHECKED"


# --- Tests -----------------------------------------------------------------------------------------------------

def test_reference_page_is_current():
  page = REPO / "docs" / "reference.md"
  assert page.is_file() and page.read_text() == reference.render(), (
      "docs/reference.md is stale: run `python docs/make_reference.py` from the repository root")


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading a config file.
def test_doc_command_parses(where, command, monkeypatch):
  monkeypatch.chdir(REPO)  # --config=NAME looks in ./configs; data paths are relative to the root.
  error = None
  try:
    check_command(command)
  except AssertionError as e:
    error = str(e)
  if error:
    pytest.fail(f"{where}: {command}\n  {error}", pytrace=False)


def test_every_doc_has_commands_and_the_lists_name_real_ones():
  texts = [c for _, c in COMMANDS]
  assert {"README.md", "docs/tools.md", "docs/data.md", "docs/failures.md"} <= {w.split(":")[0] for w, _ in COMMANDS}
  for key in (*PARTLY, *UNCHECKED):
    assert any(t.startswith(key) or t == key for t in texts), f"{key!r} is listed but no doc command starts with it"


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_doc_python_names_exist(where, code):
  tree, names = ast.parse(code), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      module = importlib.import_module(node.module)
      for a in node.names:
        names[a.asname or a.name] = (getattr(module, a.name) if hasattr(module, a.name)
                                     else importlib.import_module(f"{node.module}.{a.name}"))
    elif isinstance(node, ast.Import):
      for a in node.names:
        names[a.asname or a.name.split(".")[0]] = importlib.import_module(a.name.split(".")[0])
  for node in ast.walk(tree):
    chain = []
    while isinstance(node, ast.Attribute):
      chain.insert(0, node.attr)
      node = node.value
    if chain and isinstance(node, ast.Name) and node.id in names:
      obj = names[node.id]
      for attr in chain:
        assert hasattr(obj, attr), f"{where}: {node.id}.{'.'.join(chain)}: no {attr!r}"
        obj = getattr(obj, attr)
