"""Run a PEFT benchmark grid (methods x datasets x seeds, with/without TPP) from one JSON/YAML spec.

    python scripts/benchmark_grid.py --spec benchmarks/specs/tiny_grid.json --out runs/tiny_grid
    python scripts/benchmark_grid.py --spec spec.json --out dir --cell 3     # one cell (a cluster job)
    python scripts/benchmark_grid.py --spec spec.json --out dir --list       # cell indices and ids
    python scripts/benchmark_grid.py --spec spec.json --out dir --report     # only rewrite CSV/MD/PNG

Every cell is a run of the spec's bundle (in-process ``monai.bundle.run``: its TPP stage, train.json and
evaluate.json, as tpp_monai.study runs its arms), so the grid's numbers are the bundle's. Finished cells are
skipped on rerun (resumable); see tpp_monai.benchmark.grid for the spec format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpp_monai.benchmark.grid import expand_cells, load_spec, run_grid, write_reports  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cell", type=int, action="append", help="run only this cell index (repeatable)")
    ap.add_argument("--device", default=None, help="override the spec's device")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args(argv)
    spec = load_spec(a.spec)
    if a.device:
        spec["device"] = a.device
    if a.list:
        for c in expand_cells(spec):
            print(c.index, c.cell_id)
        return 0
    if a.report:
        for k, p in write_reports(a.out, spec).items():
            print(k, p)
        return 0
    ran = run_grid(spec, a.out, cells=a.cell)
    print(f"ran {len(ran)} cell(s); results in {a.out}/results.csv, results.md, perf_vs_params.png, perf_vs_memory.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
