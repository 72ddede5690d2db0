"""Every code block in README.md and docs/ runs as written, and shows what it really prints.

A block is run according to its language tag:

- ``python``: run in a fresh interpreter, in a temporary directory.
- ``bash``, ``sh``: run by ``bash -eo pipefail``, with this interpreter's environment first on PATH
  (so ``python``, ``pip`` and ``inferscope`` are the ones under test).
- ``console``: each ``$ `` line is a command run as above; the other lines are its output.
- ``yaml``, ``json``: parsed, not run.
- ``text`` and the others (``promql``...): diagrams, output or other languages; not run.

A block may carry a directive: an HTML comment right above it (readers of the rendered page do not
see it) whose body is YAML::

    <!-- doc-test
    setup: |                      # glue run before the block: what the page leaves to the reader
      def featurize(batch): ...
    continue: true                # python: run after the previous python block of the page, in
                                  # the same interpreter (a page that builds one example up)
    output: table                 # the next block is the output; check it (see OUTPUT_CHECKS)
    check: |                      # python: assertions run after the block, for what its comments
      assert ...                  # claim (the stages a call records, say)
    rewrite: {"a": "b"}           # shell: text replaced before running, e.g. to simulate a deploy
    env: {NAME: value}            # environment of the block (null unsets a variable)
    exit: 1                       # the exit status the block ends with (default 0)
    requires: [torch]             # modules it imports that the core install lacks: skipped without
    skip: collector               # not run here, for a reason named in SKIP_REASONS
    expensive: true               # run only under -m expensive (CI runs it once)
    -->

A block without a language tag fails the test unless it is the output another block checks: a
diagram or a sample says so with ``text``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._output import ROOT, copy_of_the_checkout, rows

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_LANGUAGES = {"python", "bash", "sh", "console"}
PARSE_LANGUAGES = {"yaml", "json"}
TIMEOUT_S = 300
BLOCK_MARK = "\n--- doc-test: the block starts here ---\n"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _never() -> bool:
    return False


#: Why a block may not run here: reason -> (whether it runs here anyway, what the skip says).
SKIP_REASONS: dict[str, tuple[Callable[[], bool], str]] = {
    "gpu": (_has_cuda, "needs an NVIDIA GPU with CUDA"),
    "collector": (_never, "sends to an OTLP collector at an address of the reader's own"),
    "service": (_never, "runs the reader's own service (serve.py, app)"),
    "recorded": (_never, "reads what a service recorded over hours (the flight recorder)"),
    "index": (_never, "installs a release from the package index"),
    "test-environment": (_never, "installs the whole test environment; .ci/run does that"),
}

DIRECTIVE_KEYS = {
    "setup",
    "continue",
    "output",
    "check",
    "rewrite",
    "env",
    "exit",
    "requires",
    "skip",
    "expensive",
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    directive: dict[str, Any] = field(default_factory=dict)
    output: Block | None = None  # the block this one's output is checked against
    is_output: bool = False
    group: list[Block] = field(default_factory=list)  # python blocks run before it, continued

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(```+)(\S*)\s*$")
_DIRECTIVE = re.compile(r"<!--\s*doc-test\b(.*?)-->", re.DOTALL)


def parse(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: dict[str, Any] | None = None
    pending_end = -1
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("<!--") and "doc-test" in lines[i]:
            start = i
            while "-->" not in lines[i]:
                i += 1
            match = _DIRECTIVE.search("\n".join(lines[start : i + 1]))
            assert match, f"{page}:{start + 1}: a doc-test comment must end with -->"
            pending = yaml.safe_load(match.group(1)) or {}
            if isinstance(pending, str):  # <!-- doc-test skip: gpu --> on one line reads the same
                pending = yaml.safe_load(pending)
            assert isinstance(pending, dict), f"{page}:{start + 1}: a doc-test directive is a mapping"
            unknown = set(pending) - DIRECTIVE_KEYS
            assert not unknown, f"{page}:{start + 1}: unknown doc-test keys {sorted(unknown)}"
            pending_end = i
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if fence:
            indent, ticks, language = fence.groups()
            end = i + 1
            while not lines[end].strip().startswith(ticks) or lines[end].strip() != ticks:
                end += 1
            body = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
            directive = {}
            if pending is not None and all(not line.strip() for line in lines[pending_end + 1 : i]):
                directive = pending
            pending = None
            blocks.append(Block(page, i + 1, language.lower(), body + "\n", directive))
            i = end + 1
            continue
        i += 1
    # Outputs, and the python blocks that continue earlier ones.
    previous_python: Block | None = None
    for index, block in enumerate(blocks):
        if block.directive.get("output") and block.language != "console" and index + 1 < len(blocks):
            block.output = blocks[index + 1]
            blocks[index + 1].is_output = True
        if block.language == "python":
            if block.directive.get("continue"):
                assert previous_python is not None, f"{block.where}: nothing to continue"
                block.group = [*previous_python.group, previous_python]
            previous_python = block
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in parse(page)]


def _param(block: Block) -> Any:
    marks = [pytest.mark.expensive] if block.directive.get("expensive") else []
    return pytest.param(block, id=block.where, marks=marks)


def _check_output(block: Block, shown: Block, printed: str) -> None:
    how = block.directive["output"]
    assert how in OUTPUT_CHECKS, f"{block.where}: output: {how!r}; accepted: {sorted(OUTPUT_CHECKS)}"
    OUTPUT_CHECKS[how](shown.text, printed, block.where)


def _table(shown: str, printed: str, where: str) -> None:
    """A snapshot table: the same models and stages as shown, each counted at least once (the
    figures themselves depend on the machine)."""
    expected, actual = rows(shown), rows(printed)
    assert expected, f"{where}: the shown output has no table rows"
    assert set(actual) == set(expected), f"{where}: printed\n{printed}"
    for key, (count, *_) in actual.items():
        assert int(count) > 0, f"{where}: {key} counted {count}\n{printed}"


def _shape(text: str) -> list[str]:
    text = re.sub(r"\b[0-9a-f]{8,}\b", "#", text)  # fingerprints, ids
    text = re.sub(r"\d+(\.\d+)*", "#", text)  # counts, versions, timings
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _same_shape(shown: str, printed: str, where: str) -> None:
    """The same lines, with numbers, versions and hex ids taken as placeholders."""
    assert _shape(printed) == _shape(shown), f"{where}: printed\n{printed}"


def _same_lines(shown: str, printed: str, where: str) -> None:
    """Every shown line is printed, in the same order (the output may have more lines); a shown
    line that ends with ``...`` is the start of a printed one."""
    found = iter(line.rstrip() for line in printed.splitlines())
    for line in shown.splitlines():
        line = line.rstrip()
        if not line:
            continue
        if line.endswith("..."):
            matched = any(candidate.startswith(line[:-3]) for candidate in found)
        else:
            matched = any(candidate == line for candidate in found)
        assert matched, f"{where}: {line!r} not printed (in this order):\n{printed}"


OUTPUT_CHECKS = {"table": _table, "shape": _same_shape, "lines": _same_lines}


def _environment(block: Block) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "INFERSCOPE_"))
        or name in ("INFERSCOPE_NO_EXTENSION", "INFERSCOPE_RECORDER")
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["INFERSCOPE_REPO"] = str(ROOT)  # for a block that reads this checkout
    for name, value in (block.directive.get("env") or {}).items():
        if value is None:  # null: unset
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def _run(argv: list[str], block: Block, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = _environment(block)
    if block.directive.get("expensive"):
        env["INFERSCOPE_REPO"] = str(copy_of_the_checkout(cwd))  # an install must not write into ROOT
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    expected = int(block.directive.get("exit", 0))
    assert result.returncode == expected, (
        f"{block.where}: exit {result.returncode}, expected {expected}\n{result.stdout}\n{result.stderr}"
    )
    return result


def _python_source(block: Block) -> str:
    parts = []
    for part in block.group:
        parts += [part.directive.get("setup", ""), part.text]
    if block.group:
        # Earlier blocks run for what they define; what they print is checked by their own test.
        parts.append(f"print({BLOCK_MARK!r}, end='')")
    parts += [block.directive.get("setup", ""), block.text, block.directive.get("check", "")]
    return "\n".join(parts)


def _rewritten(block: Block, text: str) -> str:
    for old, new in (block.directive.get("rewrite") or {}).items():
        assert old in text, f"{block.where}: rewrite: {old!r} is not in the block"
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    "block",
    [_param(block) for block in ALL_BLOCKS if block.language in RUN_LANGUAGES and not block.is_output],
)
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    reason = block.directive.get("skip")
    if reason is not None:
        assert reason in SKIP_REASONS, f"{block.where}: skip: {reason!r}; accepted: {sorted(SKIP_REASONS)}"
        runs_here, why = SKIP_REASONS[reason]
        if not runs_here():
            pytest.skip(why)
    for module in block.directive.get("requires") or []:
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e . --group frameworks)")
    if block.language != "python" and re.search(r"\bpip\b.*\binstall\b", block.text):
        # It would install into the environment that runs the tests: only a block that makes its
        # own virtual environment may run, and that is expensive.
        assert block.directive.get("expensive") and "venv" in block.text, (
            f"{block.where}: a block that installs must make its own virtual environment and be "
            "marked expensive, or be skipped"
        )
    if block.language == "python":
        script = tmp_path / "block.py"
        script.write_text(_python_source(block))
        printed = _run([sys.executable, str(script)], block, tmp_path).stdout
        if block.group:  # only what this block printed
            printed = printed.split(BLOCK_MARK)[-1]
    elif block.language == "console":
        commands = [line[2:] for line in block.text.splitlines() if line.startswith("$ ")]
        assert commands, f"{block.where}: a console block shows commands after '$ '"
        setup = block.directive.get("setup", "")
        script = "\n".join([setup, _rewritten(block, "\n".join(commands))])
        printed = _run(["bash", "-eo", "pipefail", "-c", script], block, tmp_path).stdout
        shown = "\n".join(line for line in block.text.splitlines() if not line.startswith("$ "))
        if shown.strip():
            assert block.directive.get("output"), f"{block.where}: shows output; say how to check it"
            _check_output(block, Block(block.page, block.line, "text", shown), printed)
        return
    else:
        script = "\n".join([block.directive.get("setup", ""), _rewritten(block, block.text)])
        printed = _run(["bash", "-eo", "pipefail", "-c", script], block, tmp_path).stdout
    if block.output is not None:
        _check_output(block, block.output, printed)


@pytest.mark.parametrize(
    "block", [_param(block) for block in ALL_BLOCKS if block.language in PARSE_LANGUAGES]
)
def test_config_block_parses(block: Block) -> None:
    if block.language == "yaml":
        assert yaml.safe_load(block.text) is not None, block.where
    else:
        json.loads(block.text)


def test_every_block_says_what_it_is() -> None:
    untagged = [block.where for block in ALL_BLOCKS if not block.language and not block.is_output]
    assert not untagged, f"code blocks without a language tag (use text for diagrams and samples): {untagged}"


def test_the_page_parser_reads_directives_outputs_and_continuations(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n<!-- doc-test\nsetup: x = 1\noutput: lines\n-->\n```python\nprint(x)\n```\n\n"
        "```\n1\n```\n\n<!-- doc-test continue: true -->\n\n```python\nprint(x + 1)\n```\n"
    )
    first, shown, second = parse(page)
    assert (first.language, first.text, first.directive) == (
        "python",
        "print(x)\n",
        {"setup": "x = 1", "output": "lines"},
    )
    assert first.output is shown and shown.is_output and shown.text == "1\n"
    assert second.group == [first] and second.directive == {"continue": True}


def test_architecture_states_the_record_layout() -> None:
    from inferscope._records import RECORD_DTYPE

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = re.search(r"`RECORD_DTYPE` in `_records.py`: `([^`]*)`\s*\((\d+) bytes", text)
    assert layout, "docs/architecture.md: the record section names RECORD_DTYPE's fields and size"
    kinds = {"u": "<u", "i": "<i"}
    documented = []
    for field_text in layout.group(1).split(","):
        name, kind = field_text.split()
        shape = re.fullmatch(r"([ui])(\d+)(?:\[(\d+)\])?", kind)
        assert shape, field_text
        dtype = f"{kinds[shape.group(1)]}{int(shape.group(2)) // 8}"
        documented.append((name, dtype, (int(shape.group(3)),)) if shape.group(3) else (name, dtype))
    assert documented == RECORD_DTYPE.descr
    assert int(layout.group(2)) == RECORD_DTYPE.itemsize
    assert f"{RECORD_DTYPE.itemsize}-byte record" in text


_HEADER = "model  stage  count  p50 ms  p95 ms  p99 ms  cpu/wall  errors\n"
_TABLE = _HEADER + "fraud v3  -  200  1.0  1.0  1.0  0.03  0\n"


@pytest.mark.parametrize(
    ("check", "shown", "printed", "passes"),
    [
        # An empty table, as a snippet that never calls its model prints.
        (_table, _TABLE, _HEADER + "backend: c\n", False),
        (_table, _TABLE, _TABLE.replace("200", "3"), True),
        (_same_shape, "2 change(s):\n  added  x  16\n", "1 change(s):\n", False),
        (
            _same_shape,
            "changed  fingerprint  b0e9b27fa8366d17 -> 4d9f9fae100dc68a\n",
            "changed fingerprint c7c72a277167e366 -> 3b1b317918f39756\n",
            True,
        ),
        (_same_lines, "a\nb\n", "b\na\n", False),
        (
            _same_lines,
            "got 'fast'; accepted: one of ...\n",
            "x\ngot 'fast'; accepted: one of 'minimal'\n",
            True,
        ),
    ],
)
def test_an_output_check_fails_exactly_when_the_output_differs(check, shown, printed, passes) -> None:
    if passes:
        check(shown, printed, "here")
    else:
        with pytest.raises(AssertionError):
            check(shown, printed, "here")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of a page."""
    found = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_links_between_pages_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path_text, _, anchor = target.partition("#")
        path = (page.parent / path_text).resolve() if path_text else page
        missing_anchor = bool(anchor) and path.suffix == ".md" and anchor not in _anchors(path)
        if not path.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"
