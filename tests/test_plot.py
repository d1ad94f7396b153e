"""python -m common.plot: a PNG of the curves of two runs, and clean errors for bad input."""

import json
import math
import os
import struct
import subprocess
import sys

from conftest import ROOT, assert_clean_error


def write_log(run_dir, epochs, knn_every=0, lr=0.03):
    """A log.jsonl as the scripts write it: one JSON object per epoch, kNN entries every knn_every epochs."""
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        for e in range(1, epochs + 1):
            record = {
                "epoch": e,
                "train/lr": lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)),
                "train/loss": 11.0 - 4 * (1 - math.exp(-e * lr / 0.24)),
                "train/acc1": 40.0 + e,
                "train/img_per_s": 900.0 + 10 * math.sin(e),
                "train/epoch_s": 140.0,
            }
            if knn_every and e % knn_every == 0:
                record.update({"knn/acc1": 10 + 50 * (1 - math.exp(-e / 10)), "knn/acc1_random": 25.0, "knn/s": 3.1})
            f.write(json.dumps(record) + "\n")
    return run_dir


def plot(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "common.plot", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_two_runs_to_png(tmp_path):
    a = write_log(tmp_path / "moco_v2", epochs=30, knn_every=5)
    b = write_log(tmp_path / "mochi", epochs=20, lr=0.06)  # no kNN entries: no curve in that panel
    out = tmp_path / "curves.png"
    proc = plot(a, b, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "loss" in proc.stdout and "kNN" in proc.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert 1000 <= width <= 1400 and 600 <= height <= 800 and len(data) > 20_000  # 2 x 2 panels of 600 x 360 px


def test_errors(tmp_path):
    assert_clean_error(plot(tmp_path / "nowhere", "-o", tmp_path / "c.png"), "no such folder")
    os.makedirs(tmp_path / "nolog")
    assert_clean_error(plot(tmp_path / "nolog", "-o", tmp_path / "c.png"), "log.jsonl: no such file")
    (tmp_path / "nolog" / "log.jsonl").write_text("")
    assert_clean_error(plot(tmp_path / "nolog", "-o", tmp_path / "c.png"), "is empty")
    (tmp_path / "nolog" / "log.jsonl").write_text('{"epoch": 1, "train/loss": 1.0}\nnot json\n')
    assert_clean_error(plot(tmp_path / "nolog", "-o", tmp_path / "c.png"), "line 2 is not a JSON object")
    assert not os.path.exists(tmp_path / "c.png")


def test_without_matplotlib(tmp_path):
    run = write_log(tmp_path / "run", epochs=3)
    blocked = (
        "import runpy, sys; sys.modules['matplotlib'] = None; runpy.run_module('common.plot', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", blocked, str(run), "-o", str(tmp_path / "c.png")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert_clean_error(proc, "needs matplotlib")
