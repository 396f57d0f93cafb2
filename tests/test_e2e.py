"""End to end on real MNIST, as a user runs it: the classic question's network, trained from the command line."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
def test_seed_toy_trains_on_real_mnist_from_the_cli(tmp_path, mnist_cache):
    r = run_cli("train", REPO / "configs/seed_toy.yaml", "train.epochs=1", "data.max_train=15000",
                f"output.root={tmp_path}", "--no-progress", env={"CONVBN_DATA_DIR": str(mnist_cache)})
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout and "test: loss" in r.stdout
    run = tmp_path / "seed_toy" / "1"
    results = json.loads((run / "results.json").read_text())
    assert results["test_acc"] >= 0.95  # one short epoch of a 5x5x32 conv-BN-ReLU net on 13,500 images
    stats = json.loads((run / "bn_stats" / "epoch_1.json").read_text())["layers"]
    assert list(stats) == ["conv1_bn"] and len(stats["conv1_bn"]["gamma"]) == 32
    assert stats["conv1_bn"]["epsilon"] == pytest.approx(1e-5) and stats["conv1_bn"]["decay"] == pytest.approx(0.9)
