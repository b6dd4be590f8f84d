#!/usr/bin/env python
"""Datalist JSON for your own folder of images (same as `tpp-monai prepare`; layouts: docs/DATA_FORMAT.md)."""

import sys

from tpp_monai.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
