#!/usr/bin/env python
"""Datalist JSON for QaTa from its official download layout (see tpp_monai.data.datalist.prepare_qata)."""

from tpp_monai.data.datalist import prepare_qata, cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main("QaTa", prepare_qata))
