"""Shared pytest set-up: deterministic, small, CPU-friendly."""

import contextlib
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared, busy
    CPU two OpenMP threads of a niced process spin at their barriers (measured: an EfficientNet-Lite0 forward at
    64 px took 3.3 s with 2 threads, 0.03 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DEMO_CACHE = Path(__file__).resolve().parents[1] / ".tpp_cache" / "demo_ct"


@pytest.fixture(scope="session")
def cache() -> Path:
    """The real demo data cache (pyradiomics + invesalius CT slices), built once and reused."""
    from tpp_monai.data import demo_data as dd

    try:
        return dd.build_demo_cache(DEMO_CACHE, size=96, verbose=False)
    except dd.RegistryUnreachable as e:
        pytest.skip(f"package registry unreachable, demo data not built: {e}")


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def label_server(cmd: list, env: dict, cwd: Path, url: str, timeout: float):
    """Start a label server subprocess (own process group, log in ``cwd/server.log``), wait until ``url``
    answers, yield the process; stop the whole group afterwards (the server and its train subprocess)."""
    import os
    import signal
    import subprocess

    log_path = Path(cwd) / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_serving(proc, url, log_path, timeout)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)


def wait_until_serving(proc, url: str, log_path: Path, timeout: float) -> None:
    """Poll ``url/info/`` until the label server answers 200; fail with its log if it exits or times out."""
    import time

    import requests

    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() - t0 > timeout:
            raise RuntimeError(f"server not up after {timeout} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)


def run_interrupted(trainer, stop_at: int | None, exc: type[BaseException] = KeyboardInterrupt):
    """Run an ignite engine; with ``stop_at``, raise ``exc`` once that iteration completes (a simulated
    kill) and expect it. Returns the iteration the run started from (after any resume)."""
    from ignite.engine import Events

    start = trainer.state.iteration
    if stop_at is None:
        trainer.run()
        return start

    @trainer.on(Events.ITERATION_COMPLETED(once=stop_at))
    def _crash(engine):
        raise exc("simulated interruption")

    with pytest.raises(exc):
        trainer.run()
    return start
