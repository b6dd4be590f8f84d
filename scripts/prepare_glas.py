#!/usr/bin/env python
"""Datalist JSON for GlaS from its official download layout (see tpp_monai.data.datalist.prepare_glas)."""

from tpp_monai.data.datalist import prepare_glas, cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main("GlaS", prepare_glas, mask_dir=True))
