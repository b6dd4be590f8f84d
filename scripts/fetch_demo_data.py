#!/usr/bin/env python
"""Fetch real medical images from registry packages and build the demo cache (see tpp_monai.data.demo_data)."""

from __future__ import annotations

import argparse
import sys

from tpp_monai.data.demo_data import DEFAULT_CACHE, SOURCES, DemoDataError, build_demo_cache


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(DEFAULT_CACHE), help="cache directory (default: %(default)s)")
    p.add_argument("--size", type=int, default=96, help="slice size in pixels (default: %(default)s)")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    p.add_argument("--drop-downloads", action="store_true", help="delete the downloaded archives afterwards")
    a = p.parse_args(argv)
    try:
        out = build_demo_cache(a.out, size=a.size, sources=tuple(a.sources), force=a.force,
                               keep_downloads=not a.drop_downloads)
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
