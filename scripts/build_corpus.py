#!/usr/bin/env python3
"""Build the default model's training corpus from English prose that is available offline.

Sources, both shipped with Debian / CPython and free to redistribute (PSF licence):
- the reStructuredText sources of the Python documentation (Debian package `python3.X-doc`,
  `/usr/share/doc/python3.X/html/_sources`): tutorial, library and language reference, HOWTOs,
  FAQs, "What's New"; the C-API part is left out (mostly signatures);
- the docstrings of the standard library's pure-Python modules, read with `ast` (nothing is
  imported, so no module's import-time side effects run).

Only prose paragraphs are kept: code blocks, directives, tables, headings and link targets are
dropped and inline markup (`:func:`x``, ``literal``, *emphasis*) is reduced to its text. The
output is one UTF-8 file, paragraphs separated by a blank line, duplicates removed.

Usage: scripts/build_corpus.py OUT.txt [--install-docs] [--docs DIR] [--stdlib DIR]
`--install-docs` runs `apt-get install python3.X-doc` when the documentation is missing.
"""

from __future__ import annotations

import argparse
import ast
import glob
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROLE = re.compile(r":[a-zA-Z0-9_:+-]+:`(?:[~!]?)([^`<]*?)\s*(?:<[^`>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
LITERAL = re.compile(r"``([^`]+)``")
INTERPRETED = re.compile(r"`([^`]+)`_{0,2}")
EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
FOOTNOTE = re.compile(r"\s*\[#?[\w-]*\]_")
SUBST = re.compile(r"\|[\w-]+\|_?")
WORD = re.compile(r"[A-Za-z]+")
UNDERLINE = re.compile(r"^[=\-~^\"'`#*+]{3,}$")
# directives, tables, bullet and enumerated lists, bold lead-ins, line blocks
NON_PROSE_STARTS = (".. ", "+-", "==", "--", "**", "* ", "- ", "#. ", "|")
CODE_DIRECTIVES = (".. code", ".. doctest", ".. testcode", ".. productionlist")
SKIP_DOC_DIRS = ("c-api",)


def inline_text(text: str) -> str:
    """Reduce reST inline markup to plain text."""
    text = ROLE.sub(lambda m: m.group(1).lstrip("~!"), text)
    text = LINK.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    text = INTERPRETED.sub(r"\1", text)
    text = EMPHASIS.sub(r"\1", text)
    text = FOOTNOTE.sub("", text)
    text = SUBST.sub("", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def is_prose(paragraph: str) -> bool:
    """A paragraph that reads as English sentences: mostly words, ends like a sentence."""
    words = WORD.findall(paragraph)
    if len(words) < 8 or paragraph[-1] not in ".:?!)":
        return False
    alpha = sum(len(w) for w in words)
    return alpha / max(1, len(paragraph)) > 0.6 and not paragraph.startswith((">>>", "$", "%"))


def rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reST document (code blocks, directives, tables and titles dropped)."""
    out: list[str] = []
    code_indent: int | None = None   # inside a literal block introduced by '::' or a code directive
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if code_indent is not None:
            if indent > code_indent:
                continue
            code_indent = None
        first = lines[0].strip()
        starts_code = lines[-1].rstrip().endswith("::")
        is_title = any(UNDERLINE.match(ln.strip()) for ln in lines[1:2] + lines[-1:])
        if first == ".." or first.startswith(NON_PROSE_STARTS) or is_title:
            if starts_code or first.startswith(CODE_DIRECTIVES):
                code_indent = indent       # the directive's indented body is code
            continue
        paragraph = inline_text(" ".join(ln.strip() for ln in lines))
        if starts_code:
            code_indent = indent
            paragraph = re.sub(r"\s*::$", ":", paragraph)
            if paragraph.endswith(" :"):
                paragraph = paragraph[:-2] + "."
        if is_prose(paragraph):
            out.append(paragraph)
    return out


def docs_dir(explicit: str | None, install: bool) -> Path | None:
    """The reST sources of the installed Python documentation (installing them if asked)."""
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob("/usr/share/doc/python3.*/html/_sources"))
    if not found and install:
        for package in (f"python3.{sys.version_info.minor}-doc", "python3-doc"):
            if subprocess.run(["apt-get", "install", "-y", "-q", package]).returncode == 0:
                break
        found = sorted(glob.glob("/usr/share/doc/python3.*/html/_sources"))
    return Path(found[-1]) if found else None


def documentation(root: Path) -> list[str]:
    paragraphs: list[str] = []
    for path in sorted(root.rglob("*.txt")):
        if path.relative_to(root).parts[0] in SKIP_DOC_DIRS:
            continue
        paragraphs += rst_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    return paragraphs


def docstrings(stdlib: Path) -> list[str]:
    """Prose paragraphs of module, class and function docstrings of the pure-Python stdlib."""
    paragraphs: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs += rst_paragraphs(doc)
    return paragraphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output text file")
    parser.add_argument("--docs", help="reST sources of the Python docs (default: /usr/share/doc/python3.*)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library directory")
    parser.add_argument("--install-docs", action="store_true", help="apt-get install the docs if missing")
    args = parser.parse_args(argv)
    root = docs_dir(args.docs, args.install_docs)
    doc_paras = documentation(root) if root else []
    if root is None:
        print("warning: Python documentation sources not found (use --install-docs); "
              "using docstrings only", file=sys.stderr)
    kept = list(dict.fromkeys(doc_paras + docstrings(Path(args.stdlib))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    print(f"{out}: {len(kept)} paragraphs ({len(doc_paras)} from {root}), {out.stat().st_size / 1e6:.1f} MB, "
          f"{sum(len(p.split()) for p in kept) / 1e6:.2f} M words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
