"""Every `make TARGET` the README and docs tell users to run is a target of the Makefile."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def _named_in_docs() -> dict[str, set[str]]:
    named = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        # In backticks (prose may wrap a command over two lines) or at the start of a line
        # of a code block.
        found = re.findall(r"`make ([a-z][\w-]*)", re.sub(r"\s+", " ", text))
        found += re.findall(r"^\s*make ([a-z][\w-]*)", text, re.M)
        for target in found:
            named.setdefault(target, set()).add(doc.name)
    return named


def test_every_make_command_in_the_docs_exists():
    named, targets = _named_in_docs(), _targets()
    assert {"test", "demo", "bench-compare", "bench-scale"} <= set(named)  # the scan sees them
    missing = {t: sorted(docs) for t, docs in named.items() if t not in targets}
    assert not missing, f"make targets named in the docs but not in the Makefile: {missing}"
