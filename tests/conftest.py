"""Fixtures shared by several test files."""
import pytest

from test_pql import deterministic_return, start_learning_run


@pytest.fixture(scope="session")
def pql_pendulum_returns(tmp_path_factory):
    """pql.py trained on Pendulum with the scalar and with the distributional critic, side by side.

    pql.py gives the same result for the same seed and thread count, so the two runs go at once,
    one thread each: together they take about as long as one (two runs that each spread over both
    cores would slow each other down badly). Returns each deterministic policy's mean return."""
    folders = {critic: tmp_path_factory.mktemp(critic) for critic in ["scalar", "distributional"]}
    runs = {critic: start_learning_run("pql.py", ["--distributional"] if critic == "distributional" else [], folder, one_thread=True)
            for critic, folder in folders.items()}
    return {critic: deterministic_return(runs[critic], folders[critic]) for critic in runs}


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole test session, owned by this process: the benchmark
    scripts, started as subprocesses with RAY_ADDRESS set, connect to it in a second or two instead
    of starting their own (several seconds each). Stopped at the end of the session."""
    import os

    ray = pytest.importorskip("ray", reason="the benchmark grids need ray: pip install -r benchmarks/requirements.txt")
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
