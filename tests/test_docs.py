"""The documentation site builds with warnings as errors, and every relative link points somewhere.

``mkdocs build --strict`` (configured in ``mkdocs.yml``) fails on: a page in
``docs/`` missing from the nav, a nav entry or link to a missing page, a link
to a missing ``#anchor``, an absolute link, and any warning of mkdocstrings
or griffe about the API reference (e.g. a documented parameter that is not in
the signature). The link check below also covers ``README.md`` and links from
the docs to files outside ``docs/`` (examples, source), which mkdocs does not see.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [f for f in files if "_hooks" not in f.parts]


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links in ``text`` that point into the repository (code spans and blocks skipped)."""
    text = _CODE.sub("", _FENCE.sub("", text))
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and links within the page
        targets.append(target)
    return targets


def test_link_extraction_skips_code_and_urls() -> None:
    text = "See [a](a.md#x), [b](https://x.org) and [c](#here).\n```\n[d](d.md)\n```\n`[e](e.md)` ![f](img/f.png)"
    assert relative_links(text) == ["a.md#x", "img/f.png"]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    log = done.stdout[-5000:] + done.stderr[-5000:]
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in done.stderr, log
    # The generated parts are really there: the command-line help and the API reference.
    cli = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    assert "fedfm:cli-help" not in cli and "config-reference" in cli and "privacy-report" in cli
    api = (site / "reference" / "strategies.html").read_text(encoding="utf-8")
    assert 'id="fedfm.strategies.register"' in api and 'id="fedfm.strategies.AdapterStrategy"' in api
    for page in ("index.html", "explanation/threat-model.html", "tutorials/first-run.html", "configuration.html"):
        assert (site / page).is_file(), page
