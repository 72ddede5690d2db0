"""``python -m inferscope.assets``: rewrite the shipped assets from their generators."""

from __future__ import annotations

import sys
from pathlib import Path

from . import SHIPPED_DIR, generators


def main() -> int:
    root = Path(__file__).parent / SHIPPED_DIR
    for relative, make in generators().items():
        try:
            content = make()
        except ImportError as error:
            print(f"{relative}: kept as shipped: {error}", file=sys.stderr)
            continue
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
