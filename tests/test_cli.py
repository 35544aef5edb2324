"""The ``deepseek`` command, run as separate processes (``python -m deepseek.cli``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SUBCOMMANDS = ["demo", "compile", "run", "info", "bench"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _cmd(*args):
    return [sys.executable, "-m", "deepseek.cli", *args]


def _parallel(jobs: dict, cwd) -> dict:
    """Run several CLI invocations at once; name -> (returncode, stdout, stderr)."""
    procs = {name: subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=ENV, cwd=str(cwd)) for name, args in jobs.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every invocation of this file, started in two parallel waves (each one is mostly
    Python start-up and ``import torch``; the machine has 2 cores)."""
    d = tmp_path_factory.mktemp("cli")
    dsk = str(d / "X.dsk")
    garbage = d / "garbage.dsk"
    garbage.write_bytes(os.urandom(3000))
    results = _parallel({
        "compile": ("compile", "mnist_cnn", "-o", dsk, "--dynamic-batch", "--batch", "4"),
        "demo": ("demo", "--iters", "20"),
        "help": ("--help",),
        "info_garbage": ("info", str(garbage)),
        "info_missing": ("info", str(d / "missing.dsk")),
        "compile_unknown": ("compile", "no_such_model", "-o", str(d / "u.dsk")),
        **{f"help_{c}": (c, "--help") for c in SUBCOMMANDS},
    }, d)
    if results["compile"][0] == 0:
        results.update(_parallel({
            "info_json": ("info", dsk, "--json"),
            "info_graph": ("info", dsk, "--graph"),
            "run": ("run", dsk, "--dim", "batch=3"),
            "run_no_dim": ("run", dsk),
        }, d))
    return {"dir": d, "dsk": dsk, **results}


@pytest.fixture(scope="module")
def compiled(cli):
    rc, _, err = cli["compile"]
    assert rc == 0, err[-3000:]
    return cli


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_subcommand(cli, command):
    rc, out, err = cli[f"help_{command}"]
    assert rc == 0, err[-2000:]
    assert "example" in out
    assert f"deepseek {command}" in out  # the example shows this very sub-command


def test_top_level_help_lists_subcommands(cli):
    rc, out, _ = cli["help"]
    assert rc == 0
    for c in SUBCOMMANDS:
        assert c in out


def test_compile_writes_artifact(compiled):
    _, out, err = compiled["compile"]
    assert os.path.getsize(compiled["dsk"]) > 100_000  # the MNIST weights are in it
    assert "saved" in out and "X.dsk" in out
    assert "Traceback" not in err


def test_compile_unknown_model_is_a_clean_error(cli):
    rc, _, err = cli["compile_unknown"]
    assert rc == 2
    assert "error:" in err and "no_such_model" in err and "mnist_cnn" in err
    assert "Traceback" not in err
    assert not os.path.exists(cli["dir"] / "u.dsk")


def test_info_json(compiled):
    rc, out, err = compiled["info_json"]
    assert rc == 0, err[-3000:]
    info = json.loads(out)
    for key in ("passes", "partitions", "bytes_moved", "peak_memory_bytes", "fallback_nodes"):
        assert key in info, key
    assert [p["name"] for p in info["passes"]][:2] == ["eliminate_dead_code", "fold_constants"]
    assert info["partitions"] and info["partitions"][0]["backend"] == "cpu"
    assert info["fallback_nodes"] == []
    assert info["bytes_moved"]["optimized"] <= info["bytes_moved"]["unoptimized"]
    assert info["peak_memory_bytes"]["optimized"] > 0


def test_info_text_with_graph(compiled):
    rc, out, err = compiled["info_graph"]
    assert rc == 0, err[-3000:]
    assert "f32[batch,1,28,28]" in out
    assert "convolution(" in out and "return (%" in out


def test_run_with_batch_dim(compiled):
    rc, out, err = compiled["run"]
    assert rc == 0, err[-3000:]
    assert "shape (3, 10)" in out
    m = re.search(r"mean (\S+) std (\S+)", out)
    assert m and float(m.group(2)) > 0  # real random inputs, not zeros


def test_run_without_dim_is_a_clean_error(compiled):
    rc, _, err = compiled["run_no_dim"]
    assert rc == 2
    assert "error:" in err and "--dim" in err
    assert "Traceback" not in err


def test_info_on_garbage_file(cli):
    rc, out, err = cli["info_garbage"]
    assert rc == 2
    assert "error:" in err
    assert "Traceback" not in err
    assert out == ""


def test_info_on_missing_file(cli):
    rc, _, err = cli["info_missing"]
    assert rc == 2
    assert "error:" in err and "no such file" in err
    assert "Traceback" not in err


def test_demo(cli):
    rc, out, err = cli["demo"]
    assert rc == 0, err[-3000:]
    assert "speed-up" in out
    assert "OK" in out and "MISMATCH" not in out
