"""The shared training loop as two CPU processes (gloo) against one process at the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

JOB = Path(__file__).with_name("dist_train_job.py")


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, str(JOB), one, "8"], tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    _run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29517",
          str(JOB), two, "4"], tmp_path)
    log_one, log_two = json.loads(Path(one + ".json").read_text()), json.loads(Path(two + ".json").read_text())
    assert log_one["world_size"] == 1
    assert log_two["world_size"] == 2
    losses_one = [h["loss/train"] for h in log_one["history"]]
    losses_two = [h["loss/train"] for h in log_two["history"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    weights_one, weights_two = load_file(one + ".safetensors"), load_file(two + ".safetensors")
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-3, atol=1e-4)  # Adam amplifies float noise in near-zero gradients
