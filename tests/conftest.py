"""Fixtures shared by several test files."""
import importlib.util
import shutil
import subprocess
import sys
import tempfile

import pytest

from test_pql import REPO, deterministic_return, end_with_parent, start_learning_run


# The two slowest pieces of work that do not depend on timing start as soon as the tests are
# collected, at the lowest CPU priority (nice 19): the two pql.py learning runs (the same result
# for the same seed and thread count, however slowly they run) and the compiling of mjlab's Warp
# kernels. They use the core that other tests leave idle (most tests keep one core busy), and the
# tests that need them run last.
BACKGROUND = {}
WAITS_FOR_BACKGROUND = {"pql_pendulum_returns", "mjlab_kernels"}


def pytest_collection_modifyitems(session, config, items):
    """The tests that wait for the background work run last, so that it has the whole session to finish."""
    waiting = [item for item in items if WAITS_FOR_BACKGROUND & set(getattr(item, "fixturenames", ()))]
    items[:] = [item for item in items if item not in waiting] + waiting


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    if "pql_pendulum_returns" in needed:
        folders = {critic: tempfile.mkdtemp(prefix=f"pql-learning-{critic}-") for critic in ["scalar", "distributional"]}
        BACKGROUND["pql_pendulum"] = {
            critic: (start_learning_run("pql.py", ["--distributional"] if critic == "distributional" else [], folder,
                                        one_thread=True, background=True), folder)
            for critic, folder in folders.items()}
    if "mjlab_kernels" in needed and sys.version_info >= (3, 10) and importlib.util.find_spec("mjlab") is not None:
        warm_up = "import torch, envs; env = envs.make_env('mjlab:Mjlab-Cartpole-Balance', 2); env.reset(); env.step(torch.zeros(2, 1))"
        lowest_priority = ["nice", "-n", "19"] if shutil.which("nice") else []
        BACKGROUND["mjlab"] = subprocess.Popen([*lowest_priority, sys.executable, "-c", warm_up], cwd=REPO,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=end_with_parent)


def pytest_sessionfinish(session):
    """Stops what is still running (after -x, Ctrl-C or a deselected waiter) and removes its folders.
    (If pytest itself is killed, the kernel ends the background runs: end_with_parent.)"""
    for process, folder in BACKGROUND.get("pql_pendulum", {}).values():
        process.kill()
        process.communicate()
        shutil.rmtree(folder, ignore_errors=True)
    if "mjlab" in BACKGROUND:
        BACKGROUND["mjlab"].kill()
        BACKGROUND["mjlab"].wait()


@pytest.fixture(scope="session")
def pql_pendulum_returns():
    """pql.py trained on Pendulum with the scalar and with the distributional critic, side by side.

    pql.py gives the same result for the same seed and thread count, so the two runs go at once,
    one thread each, in the background from the start of the session (above). Returns each
    deterministic policy's mean return."""
    runs = BACKGROUND["pql_pendulum"]
    return {critic: deterministic_return(process, folder) for critic, (process, folder) in runs.items()}


@pytest.fixture(scope="session")
def mjlab_kernels():
    """Waits for the background compile of mjlab's Warp kernels (if it ran): the tests then load
    them from Warp's cache instead of compiling them themselves. Its failure is left to the tests."""
    if "mjlab" in BACKGROUND:
        try:
            BACKGROUND["mjlab"].wait(timeout=900)
        except subprocess.TimeoutExpired:
            BACKGROUND["mjlab"].kill()  # the tests then compile what they need themselves


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole test session, owned by this process: the benchmark
    scripts, started as subprocesses with RAY_ADDRESS set, connect to it in a second or two instead
    of starting their own (several seconds each). Stopped at the end of the session."""
    import os

    ray = pytest.importorskip("ray", reason="the benchmark grids need ray: pip install -r benchmarks/requirements.txt")
    # Ray starts its workers at nice 15 unless told otherwise; the runs of the benchmark tests are
    # foreground work here, ahead of the background work above (nice 19).
    os.environ.setdefault("RAY_worker_niceness", "0")
    context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    address = context.address_info["gcs_address"]
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
