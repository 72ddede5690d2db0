"""Capture the environment, save it, and see what changed: the first question after a cost regression.

Run it as is. It saves this process's environment, then compares it with a copy where a deploy
"changed" numpy and OMP_NUM_THREADS, and prints the differences the way `inferscope env --diff` does:

    python examples/environment_diff.py

The same from the command line, before and after a deploy:

    inferscope env > before.json
    ...deploy...
    inferscope env > after.json
    inferscope env --diff before.json after.json
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from inferscope.system.fingerprint import diff, environment, fingerprint, render_diff, resource_attributes


def main() -> None:
    before = environment()
    print(f"fingerprint {before['fingerprint']}, usable CPUs {before['cpu']['usable_cpus']}")
    print(f"resource attributes: {json.dumps(resource_attributes(before), indent=2)}")

    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "before.json"
        saved.write_text(json.dumps(before, indent=2))
        reloaded = json.loads(saved.read_text())

    # What a deploy might change: a library upgrade and a thread setting.
    after = copy.deepcopy(reloaded)
    after["packages"]["numpy"] = "0.0.0-after-deploy"
    after["threads_env"]["OMP_NUM_THREADS"] = "16"
    after["fingerprint"] = fingerprint(after)

    print(render_diff(diff(reloaded, after)))


if __name__ == "__main__":
    main()
