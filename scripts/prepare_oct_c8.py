#!/usr/bin/env python
"""Datalist JSON for OCT-C8 from its official download layout (see tpp_monai.data.datalist.prepare_oct_c8)."""

from tpp_monai.data.datalist import prepare_oct_c8, cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main("OCT-C8", prepare_oct_c8, has_seed=False))
