"""mkdocs hooks of fedfm's documentation site (declared under ``hooks:`` in ``mkdocs.yml``).

- ``docs/reference/cli.md`` holds the marker ``<!-- fedfm:cli-help -->``; at
  build time it becomes the help of ``fedfm`` and of each of its commands,
  taken from the argparse parser in ``fedfm.cli``, so the page cannot drift
  from the command. If the parser cannot be read, the build fails.
- Docstrings cross-reference in Sphinx's style (``:func:`partition```), which
  mkdocstrings renders literally as ``:func:`` before the code span; the
  role prefix is dropped from the rendered pages, leaving the code span.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

MARKER = "<!-- fedfm:cli-help -->"
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):(?=<code>)")


def _help_texts() -> list[tuple[str, str]]:
    # argparse wraps to the terminal's width; a fixed width keeps the page stable.
    os.environ["COLUMNS"] = "100"
    from fedfm.cli import _parser

    parser = _parser()
    texts = [("fedfm", parser.format_help())]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                texts.append((f"fedfm {name}", sub.format_help()))
    return texts


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the marker with one section per command."""
    if MARKER not in markdown:
        return markdown
    sections = []
    for title, text in _help_texts():
        sections.append(f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return markdown.replace(MARKER, "\n".join(sections))


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Drop Sphinx role prefixes (``:func:``) in front of rendered code spans."""
    return _ROLE.sub("", html)
