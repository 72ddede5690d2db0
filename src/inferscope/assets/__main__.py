"""``python -m inferscope.assets``: rewrite the shipped assets from their generators."""

from __future__ import annotations

from pathlib import Path

from . import SHIPPED_DIR, generate


def main() -> int:
    root = Path(__file__).parent / SHIPPED_DIR
    for relative, content in generate().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
