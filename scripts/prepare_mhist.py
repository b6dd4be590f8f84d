#!/usr/bin/env python
"""Datalist JSON for MHIST from its official download layout (see tpp_monai.data.datalist.prepare_mhist)."""

from tpp_monai.data.datalist import prepare_mhist, cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main("MHIST", prepare_mhist))
