"""Build the default model's training corpus offline: the English prose of the Python standard
library (pydoc topics + module/class/function docstrings, via ast). Usage:
    python scripts/build_corpus.py OUT.txt
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

import pydoc_data.topics


def prose_ratio(text: str) -> float:
    letters = sum(c.isalpha() or c in " .,;:'\"()-\n" for c in text)
    return letters / max(1, len(text))


def docstrings(root: Path):
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and prose_ratio(doc) > 0.9:
                    yield doc


def main() -> None:
    out = Path(sys.argv[1])
    parts = list(pydoc_data.topics.topics.values())
    parts += list(docstrings(Path(sysconfig.get_paths()["stdlib"])))
    out.write_text("\n\n".join(p.strip() for p in parts) + "\n")
    print(f"{out}: {len(parts)} documents, {out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
