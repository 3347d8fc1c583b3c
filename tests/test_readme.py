"""README's "Using it" script and its Python example run as written: the blocks are taken out of README.md
and run (bash, then python), with only the variables the script itself offers set (`M=tiny-qwen3`, homes and
ports of this test), in a scratch folder that holds the same `.venv` and `kvswap/` as the repository root."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def block(name: str) -> str:
    m = re.search(rf"<!-- readme-test: {name} -->\n```(?:sh|python)\n(.*?)```", README, flags=re.S)
    assert m, f"README.md has no block marked readme-test: {name}"
    return m.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_using_it_script_and_python_example_run_as_written(tmp_path, tiny_engine):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (the script reads /metrics with it)")
    work = tmp_path / "work"
    work.mkdir()
    (work / "kvswap").symlink_to(REPO / "kvswap")  # as in the repository: the package and its data
    (work / ".venv").symlink_to(Path(sys.prefix))  # the venv this test runs in
    env = {**os.environ, "M": "tiny-qwen3", "A": str(tmp_path / "a"), "B": str(tmp_path / "b"),
           "PA": str(_free_port()), "PB": str(_free_port())}
    script = block("using-it")
    try:
        run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                             text=True, timeout=780)
        assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        out = run.stdout
        assert re.search(r"^bafkrei\w+$", out, flags=re.M)  # publish printed the CID
        assert "fetched bafkrei" in out and "audited" in out
        assert "kvswap_fetches_total{outcome=\"done\"} 1.0" in out
        assert (work / "report" / "report.html").is_file()
        example = subprocess.run([sys.executable, "-c", block("python")], cwd=work, env=env, capture_output=True,
                                 text=True, timeout=300)
        assert example.returncode == 0, example.stderr[-3000:]
        assert example.stdout.strip()  # the continuation it printed
    finally:  # a failed script may leave its daemons running
        for home in ("a", "b"):
            subprocess.run([sys.executable, "-m", "kvswap", "node", "stop", "--home", str(tmp_path / home)],
                           capture_output=True, timeout=60)
