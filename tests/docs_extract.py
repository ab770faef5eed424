"""The commands and Python blocks of README.md and docs/*.md, as a reader would copy them.

Shell commands come from fenced ```bash / ```sh / ```shell blocks (every line) and from untagged blocks
(lines that start, unindented, with a known command; indented lines after one continue it, as in a
usage synopsis). Backslash continuations are joined, comments dropped, a here-document keeps its body
and a ``for ... done`` loop is one command. ``Command.key`` is the command with its whitespace
collapsed: what the table of tests/test_docs_commands.py is keyed by.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = ("bash", "sh", "shell")
KNOWN = ("compact-hooks", "make", "torchrun", "deepspeed", "mpirun", "python", "python3", "pytest", "pip",
         "srun")
VENV_PREFIX = ".venv/bin/"
FENCE_OPEN = re.compile(r"^```(\S*)\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
COMPOUND = {"for": "done", "while": "done", "until": "done", "if": "fi"}
SEPARATORS = {";", "&&", "||", "|", "&", "do", "then", "else", "done", "fi"}
FOR_LOOP = re.compile(r"^for (\w+) in ([^;]+); do (.*); done$")


@dataclass(frozen=True)
class Block:
    """A fenced block: the doc (relative path), the line of its opening fence, its language tag, the
    heading it sits under and its lines."""

    doc: str
    line: int
    lang: str
    heading: str
    lines: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class Command:
    """One shell command of a doc: ``key`` (whitespace collapsed) and ``script`` (what bash runs)."""

    doc: str
    line: int
    key: str
    script: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file."""
    doc = str(path.relative_to(ROOT))
    found: list[Block] = []
    heading, start, lang, lines = "", 0, None, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if lang is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif m := FENCE_OPEN.match(line):
                start, lang, lines = n, m.group(1).lower(), []
        elif FENCE_CLOSE.match(line):
            found.append(Block(doc, start, lang, heading, tuple(lines)))
            lang = None
        else:
            lines.append(line)
    return found


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` outside quotes, at the start or after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def first_word(text: str) -> str:
    words = [w for w in text.split() if not ENV_ASSIGN.match(w)]
    return words[0] if words else ""


def starts_with_known(line: str) -> bool:
    word = first_word(line)
    return word in KNOWN or word.startswith(VENV_PREFIX)


def _join(parts: list[str]) -> str:
    text = parts[0]
    for part in parts[1:]:
        text += (" " if text.split()[-1] in ("do", "then", "else") else "; ") + part
    return text


def commands_of(block: Block) -> list[Command]:
    """The shell commands of one block (none for a Python, JSON, ... block)."""
    shell = block.lang in SHELL_LANGS
    if not shell and block.lang:
        return []
    lines, out, i = block.lines, [], 0
    while i < len(lines):
        raw, line_no = lines[i], block.line + 1 + i
        i += 1
        if not shell and (raw[:1].isspace() or not starts_with_known(raw)):
            continue
        text = strip_comment(raw).strip()
        if not text:
            continue
        while text.endswith("\\") and i < len(lines):
            text = text[:-1].rstrip() + " " + strip_comment(lines[i]).strip()
            i += 1
        while not shell and i < len(lines) and lines[i][:1].isspace() and lines[i].strip():
            text += " " + lines[i].strip()  # a usage synopsis continues on indented lines
            i += 1
        script = text
        if m := HEREDOC.search(text):
            body = []
            while i < len(lines) and lines[i].strip() != m.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            script = "\n".join([text, *body, m.group(1)])
        elif (closer := COMPOUND.get(text.split()[0])) is not None:
            parts = [text]
            while i < len(lines) and parts[-1].split()[0] != closer:
                if part := strip_comment(lines[i]).strip():
                    parts.append(part)
                i += 1
            script = text = _join(parts)
        out.append(Command(block.doc, line_no, " ".join(text.split()), script))
    return out


def doc_commands() -> list[Command]:
    return [c for path in doc_files() for b in blocks(path) for c in commands_of(b)]


def python_blocks() -> list[Block]:
    return [b for path in doc_files() for b in blocks(path) if b.lang == "python"]


def python_block(doc: str, heading: str) -> Block:
    """The first Python block of ``doc`` under the heading ``heading``."""
    found = [b for b in blocks(ROOT / doc) if b.lang == "python" and b.heading == heading]
    assert found, f"{doc} has no ```python block under the heading {heading!r}"
    return found[0]


def simple_commands(key: str) -> Iterator[list[str]]:
    """The simple commands of a command line as argv lists, leading ``NAME=value`` and ``export``
    dropped; a ``for VAR in A B; do ...; done`` loop gives its body once per value."""
    if m := FOR_LOOP.match(key):
        var, values, body = m.groups()
        for value in values.split():
            yield from simple_commands(re.sub(r"\$\{?" + var + r"\b\}?", value, body))
        return
    lexer = shlex.shlex(key, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    current: list[str] = []
    for token in [*lexer, ";"]:
        if token in SEPARATORS or set(token) <= set(";&|"):
            while current and (ENV_ASSIGN.match(current[0]) or current[0] == "export"):
                current.pop(0)
            if current:
                yield current
            current = []
        else:
            current.append(token)


def script_flags(path: Path) -> Optional[set[str]]:
    """The options a script's argparse parser declares (None: it declares none), with DeepSpeed's
    when it calls ``deepspeed.add_config_arguments``."""
    flags: set[str] = set()
    argparse_used = False
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "add_argument":
                argparse_used = True
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                          and a.value.startswith("-")}
            elif node.func.attr == "add_config_arguments":
                flags |= {"--deepspeed", "--deepspeed_config", "--deepscale", "--deepscale_config"}
    return flags | {"-h", "--help"} if argparse_used else None


def named_test_problem(ref: str) -> Optional[str]:
    """None when ``"tests/test_x.py::test_name"`` names a test function of that file, else why not."""
    file, _, name = ref.partition("::")
    path = ROOT / file
    if not path.is_file() or not name:
        return f"{ref}: no such test file (write 'tests/test_x.py::test_name')"
    names = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return None if name in names else f"{ref}: {file} has no function {name}"
