"""Data-parallel calibration: two CPU processes on gloo give the single process's sums, operators and outputs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_windows, saved_tiny_llama, tiny_model
from ghostlayers import load
from ghostlayers.capture import CaptureSpec, capture

SPEC = CaptureSpec(grams=frozenset({1, 2}), cross=frozenset({(1, 4), (2, 3)}), cosine=frozenset({(1, 4)}),
                   mlp=frozenset({(0, 1), (0, 4)}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = capture(tiny_model("qwen2", layers=6), random_windows(7, 20), SPEC, batch_size=2, progress=False)
        if rank == 0:
            torch.save({"tensors": list(stats.tensors()), "tokens": stats.tokens, "sequences": stats.sequences}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_sums(tmp_path):
    out = tmp_path / "sums.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    ref = capture(tiny_model("qwen2", layers=6), random_windows(7, 20), SPEC, batch_size=2, progress=False)
    assert got["tokens"] == ref.tokens == 140 and got["sequences"] == ref.sequences == 7  # 7 windows: 4 + 3
    want = list(ref.tensors())
    assert len(got["tensors"]) == len(want)
    for a, b in zip(got["tensors"], want):
        assert a.dtype == torch.float64
        assert float((a - b).norm()) <= 1e-9 * max(float(b.norm()), 1e-300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory)


def prune(model_dir: Path, out: Path, extra: list[str], ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--master-port", str(free_port()), "-m", "ghostlayers"] if ranks > 1 else [sys.executable, "-m", "ghostlayers"]
    argv = ["prune", "--model", model_dir, "--calib", model_dir.parent / "prose.txt", "--calib-samples", 9,
            "--seq-len", 32, "--out", out, "--quiet", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, *map(str, argv)], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("extra", [["--drop", 2],
                                   ["--drop", 2, "--select", "ghost-greedy", "--fit", "sequential", "--eps", "cv",
                                    "--folds", 3],
                                   ["--select", "manual", "--layers", "1,3", "--refit", "all", "--refit-ridge", "cv",
                                    "--folds", 3],
                                   ["--drop", 2, "--select", "loss", "--select-windows", 3],
                                   ["--drop", 2, "--select", "loss-greedy", "--select-windows", 3, "--refit", "none"]])
def test_torchrun_prune_equals_one_process(model_dir, tmp_path, extra):
    one = prune(model_dir, tmp_path / "one", extra, ranks=1)
    assert one.returncode == 0, one.stderr
    two = prune(model_dir, tmp_path / "two", extra, ranks=2)
    assert two.returncode == 0, two.stderr
    m1, _, man1 = load(tmp_path / "one")
    m2, _, man2 = load(tmp_path / "two")
    assert man1["removed_layers"] == man2["removed_layers"] and man2["calibration"]["ranks"] == 2
    assert man1["calibration"]["tokens"] == man2["calibration"]["tokens"] == 9 * 32
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert float((a.double() - b.double()).norm()) <= 1e-6 * max(float(a.double().norm()), 1e-30), name
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits, m2(ids).logits, rtol=1e-5, atol=1e-5)


def test_other_commands_refuse_torchrun(model_dir, tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "ghostlayers", "info", str(model_dir)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "only prune runs data-parallel" in proc.stderr
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 6
