"""Run the MONAI model zoo's own CI steps on bundles in a zoo-layout folder (helper of tests/test_zoo_ci.py).

    python tests/zoo_ci_driver.py ZOO_DIR MODELS_DIR MODE EXCLUSIONS_JSON BUNDLE [BUNDLE ...]

In one process (each of the zoo's scripts imports MONAI again, which is most of its time), for BUNDLE...:
``ci/prepare_schema.py``'s ``main`` (the schema into each bundle's ``eval/``), ``ci/verify_bundle.py``'s ``verify``
in MODE (min / full), and ``ci/get_bundle_requirements.py``'s ``get_requirements`` (writes
``requirements_<bundle>.txt`` into the current folder). The zoo's code runs unchanged; the only thing added is what
a bundle that cannot pass a check gets in the zoo itself: its name in the lists of ``ci/bundle_custom_data.py``
(read from EXCLUSIONS_JSON, our ``bundles/common/zoo_ci.json``). The zoo's files are imported, never modified.
Prints one ``ZOO_RESULT {json}`` line per bundle: bundle, ok, error (with its cause), seconds.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    zoo, models, mode, exclusions_file, *bundles = argv
    sys.path.insert(0, str(Path(zoo) / "ci"))
    import bundle_custom_data  # the zoo's exclusion lists
    import prepare_schema
    import verify_bundle
    from get_bundle_requirements import get_requirements

    exclusions = json.loads(Path(exclusions_file).read_text())
    for name, entries in exclusions.items():
        if name.startswith("_"):
            continue
        if not isinstance(getattr(bundle_custom_data, name, None), list):
            raise SystemExit(f"{exclusions_file}: {name} is not a list of the zoo's ci/bundle_custom_data.py")
        getattr(bundle_custom_data, name).extend(entries)  # the same list objects verify_bundle imported
    prepare_schema.main(bundles, models)
    failed = 0
    for bundle in bundles:
        start = time.perf_counter()
        try:
            verify_bundle.verify(bundle, models, mode)
            result = {"bundle": bundle, "ok": True, "error": ""}
        except Exception as e:  # noqa: BLE001 - reported to the test, which names it
            cause = f" <- {e.__cause__!r}" if e.__cause__ is not None else ""
            result = {"bundle": bundle, "ok": False, "error": f"{e!r}{cause}",
                      "traceback": traceback.format_exc()[-3000:]}
            failed += 1
        result["seconds"] = round(time.perf_counter() - start, 2)
        get_requirements(bundle, models)
        print("ZOO_RESULT " + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
