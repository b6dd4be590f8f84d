#!/usr/bin/env python
"""Datalist JSON for ChestXrayPA from its official download layout (see tpp_monai.data.datalist.prepare_chestxray_pa)."""

from tpp_monai.data.datalist import prepare_chestxray_pa, cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main("ChestXrayPA", prepare_chestxray_pa))
