"""What operators deploy beside inferscope: Prometheus rules and their unit tests, Kubernetes
manifests for the Prometheus operator, and collector configurations.

They are generated from the metric specification (``inferscope/export/spec.py``), the one the
exporters read, and shipped as files in the package, so that a pip install writes them with no
generator dependency::

    inferscope assets --out ./observability

``write_assets`` does the same from Python. After changing a generator, rewrite the shipped files
with ``python -m inferscope.assets`` (needs PyYAML); tests/test_assets.py fails while they differ.

>>> import tempfile
>>> written = write_assets(tempfile.mkdtemp())
>>> sorted(p.name for p in written)[:2]
['inferscope-rules.test.yml', 'inferscope-rules.week.test.yml']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["AssetExistsError", "generate", "generators", "shipped", "write_assets"]

#: Where the generated files are shipped inside the package.
SHIPPED_DIR = "files"

_HEADER = (
    "# Generated from inferscope's metric specification by `python -m inferscope.assets`;\n"
    "# written out by `inferscope assets`. docs/{doc} explains it.\n"
)


class AssetExistsError(FileExistsError):
    """A file that ``write_assets`` would write exists with other content (and ``overwrite`` is off)."""


def _yaml(document: Any, doc: str) -> str:
    import yaml  # a development dependency: the shipped files need no YAML library

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    body: str = yaml.dump(document, Dumper=Dumper, sort_keys=False, width=2**16, allow_unicode=True)
    return _HEADER.format(doc=doc) + body


def generators() -> dict[str, Callable[[], str]]:
    """How each shipped file is made: relative path -> a function that returns its content (and
    raises ImportError where it needs a package that is not installed)."""
    from . import collectors, dashboards, kubernetes, rule_tests, rules

    return {
        f"prometheus/{rules.RULES_FILE}": lambda: _yaml(rules.rule_groups(), "alerts.md"),
        f"prometheus/{rule_tests.TESTS_FILE}": lambda: _yaml(rule_tests.rule_tests(), "alerts.md"),
        f"prometheus/{rule_tests.WEEK_TESTS_FILE}": lambda: _yaml(rule_tests.week_rule_tests(), "alerts.md"),
        "kubernetes/prometheusrule.yaml": lambda: _yaml(kubernetes.prometheus_rule(), "deploy.md"),
        "kubernetes/podmonitor.yaml": lambda: _yaml(kubernetes.pod_monitor(), "deploy.md"),
        "collectors/rotel.env": collectors.rotel_env,
        "collectors/otelcol-gateway.yaml": lambda: _yaml(collectors.otelcol_gateway(), "deploy.md"),
        **dashboards.generators(),
    }


def generate() -> dict[str, str]:
    """Every asset, freshly generated: relative path -> content."""
    return {path: make() for path, make in generators().items()}


def shipped() -> dict[str, str]:
    """Every asset as shipped in the package: relative path -> content."""
    root = resources.files(__name__) / SHIPPED_DIR
    found: dict[str, str] = {}
    for folder in sorted(root.iterdir(), key=lambda entry: entry.name):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
            if entry.is_file():
                found[f"{folder.name}/{entry.name}"] = entry.read_text(encoding="utf-8")
    return found


def write_assets(out: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Write every shipped asset under ``out`` (created if missing) and return their paths.

    A file already there with the same content is left alone; one with other content raises
    :class:`AssetExistsError` before anything is written, unless ``overwrite`` is true.
    """
    base = Path(out)
    files = {base / relative: content for relative, content in shipped().items()}
    if not overwrite:
        changed = [p for p, content in files.items() if p.exists() and _read(p) != content]
        if changed:
            names = ", ".join(str(p) for p in changed)
            raise AssetExistsError(
                f"these files exist with other content (overwrite them to replace): {names}"
            )
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or _read(path) != content:
            path.write_text(content, encoding="utf-8")
    return list(files)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
