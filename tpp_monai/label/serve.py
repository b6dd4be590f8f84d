"""Start the tpp_label MONAI Label server on 127.0.0.1 unless told otherwise.

    python -m tpp_monai.label.serve --studies studies [--port 8000] [--host 127.0.0.1] [--conf KEY VALUE ...]

``monailabel start_server`` listens on 0.0.0.0 by default; this launcher passes ``--host 127.0.0.1``
unless a host is given (``--host`` / ``-i``, read with monailabel's own argument parser), and runs monailabel with this interpreter (the ``monailabel`` shell
wrapper runs whatever ``python`` is first on PATH). Every other argument goes to ``start_server``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_HOST = "127.0.0.1"
DEFAULT_APP = Path(__file__).resolve().parents[2] / "apps" / "tpp_label"


def server_argv(args: Sequence[str]) -> list[str]:
    """The ``monailabel.main start_server`` command line for ``args``: loopback and our app unless given."""
    from tpp_monai.label.safety import start_server_args

    args = list(args)
    given = start_server_args(args)  # monailabel's own parser: --host, -i, abbreviations, the last one wins
    if given.host is None:
        args += ["--host", DEFAULT_HOST]
    if not given.app:
        if not DEFAULT_APP.is_dir():
            raise SystemExit(f"apps/tpp_label not found next to the package ({DEFAULT_APP}); pass --app <folder>")
        args += ["--app", str(DEFAULT_APP)]
    return [sys.executable, "-m", "monailabel.main", "start_server", *args]


def main(argv: Sequence[str] | None = None) -> None:
    cmd = server_argv(sys.argv[1:] if argv is None else argv)
    os.execv(cmd[0], cmd)  # the server replaces this process (signals and the exit code are its own)


if __name__ == "__main__":
    main()
