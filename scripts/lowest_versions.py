"""Print pip constraints pinning each runtime dependency to its declared minimum.

``make test-lowest`` installs outboxer with these constraints into its own virtualenv and
runs a marked subset of the tests there, so the ``>=`` bounds in pyproject.toml stay true.
Only the runtime dependencies and the user-facing extras are pinned (not ``test`` or ``dev``:
the test tools may be as new as they like).

    python scripts/lowest_versions.py > constraints.txt
    python scripts/lowest_versions.py --check     # this interpreter has exactly those
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)")


def lowest(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Each runtime dependency's declared minimum version, by normalized name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = list(project["dependencies"])
    for extra, requirements in project.get("optional-dependencies", {}).items():
        if extra not in ("dev", "test"):
            declared += [r for r in requirements if not r.startswith(project["name"])]
    pins: dict[str, str] = {}
    for requirement in declared:
        match = LOWER_BOUND.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} declares no >= lower bound")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        version = match.group(3)
        if pins.get(name, version) != version:
            raise SystemExit(f"{name} has two lower bounds: {pins[name]} and {version}")
        pins[name] = version
    return pins


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4]]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def check() -> int:
    """Exit status 1 (and say which) unless every pinned package is installed at its pin."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = []
    for name, wanted in lowest().items():
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "missing"
        if _release(found) != _release(wanted):
            wrong.append(f"{name} {found} (declared minimum {wanted})")
    if wrong:
        sys.stderr.write("not the lowest declared versions: " + ", ".join(wrong) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        raise SystemExit(check())
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in lowest().items()))
