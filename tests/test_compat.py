"""Isaac Gym runs on Python 3.8 with torch <= 2.4: the scripts must stay importable there."""
import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sources_need_at_most_python_3_8():
    files = [os.path.join(REPO, name) for name in ["envs.py", "pql.py", "pql_threaded.py"]]
    files += glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vermin"), "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
                             *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_vermin_catches_newer_syntax(tmp_path):
    """The check above can fail: a 3.10 match statement is reported."""
    newer = tmp_path / "newer.py"
    newer.write_text("match 1:\n    case 1:\n        pass\n")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vermin"), "-t=3.8-", "--no-tips", "--violations", str(newer)],
                            capture_output=True, text=True)
    assert result.returncode != 0
