"""One command-line style: Hydra overrides for `pipeline` and `pipeline.tune`; bad input is one line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import tune

REPO = Path(__file__).resolve().parent.parent


def _cli(tmp_path: Path, module: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    stores = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    stores += (
        [f"hydra.run.dir={tmp_path}/outputs"] if module == "pipeline" else [f"tune.storage=sqlite:///{tmp_path}/o.db"]
    )
    cmd = [sys.executable, "-m", module, *stores, *overrides]
    env = {**os.environ, "QB_DEBUG": "", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _one_error_line(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["pipeline", "pipeline.tune"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, module):
    done = _cli(tmp_path, module, "method=group_wise", "method.bits=9")
    _one_error_line(done, "error: method: bits must be an integer in 2..8, got 9")


def test_debug_shows_the_traceback(tmp_path):
    done = _cli(tmp_path, "pipeline", "method=group_wise", "method.bits=9", "debug=true")
    assert done.returncode != 0 and "Traceback" in done.stderr and "bits must be an integer" in done.stderr
    done = _cli(tmp_path, "pipeline.tune", "method=group_wise", "method.bits=9", env={"QB_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "bits must be an integer" in done.stderr


def test_a_sweep_experiment_without_multirun_is_refused(tmp_path):
    # Hydra would ignore the sweep and run only the default method (fp)
    done = _cli(tmp_path, "pipeline", "experiment=compare")
    _one_error_line(done, "experiment compare is a sweep over method=fp,ptq_static,")
    assert "run it with --multirun" in done.stderr and not (tmp_path / "mlflow.db").exists()


def _main_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        tune.main(list(argv))
    assert exit_.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


def test_tune_takes_hydra_overrides_only(capsys):
    assert "tune.workers=2" in _main_error(capsys, "--workers", "2", "method=group_wise")
    assert "Could not find 'experiment/nope'" in _main_error(capsys, "experiment=nope")
    assert "experiment compare is a sweep" in _main_error(capsys, "experiment=compare")
    assert "tune.workers must be a positive integer" in _main_error(capsys, "tune.workers=0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: device=cuda is not bad input here")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("device=cuda",),
            r"error: device=cuda but (this torch \(.*\) has no CUDA|no GPU is visible): "
            r"use device=cpu \(or device=auto\)",
        ),
        (("device=tpu",), "error: device must be one of auto, cpu, cuda, cuda:N, got 'tpu'"),
        (
            ("device=cpu", "kernels=cuda_int4_tinygemm"),
            "error: kernels=cuda_int4_tinygemm runs on cuda, this run is on cpu: use kernels=auto",
        ),
    ],
)
def test_a_device_this_machine_cannot_serve_is_one_error_line(tmp_path, overrides, message):
    done = _cli(tmp_path, "pipeline", "method=group_wise", *overrides)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(message, errors[0]), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
