"""Issue 39, the BN trace's file and its rules (NumPy only, fast): bn_trace.npz round-trips, stays bounded by thinning
its older samples, is cut back to a checkpoint's step on --resume, refuses a damaged file in one line; the sampling
interval; and the trace subscriber holds to the trainer's contract (events.py's docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from convbn_cli.runs import bn_trace as bt
from convbn_cli.runs.rundir import RunDirError


def _trace(samples=5, channels=(3, 2)):
    names = [f"bn{i}" for i in range(len(channels))]
    t = bt.empty(dict(zip(names, channels)), dict.fromkeys(names, 0.99), dict.fromkeys(names, "biased"), 7)
    rng = np.random.default_rng(0)
    for first in range(1, samples + 1, 7):  # in several calls, as the trainer adds them
        steps = list(range(first, min(first + 7, samples + 1)))
        bt.extend(t, steps, [{n: {q: rng.normal(size=c).astype(np.float32) for q in bt.QUANTITIES}
                              for n, c in zip(names, channels)} for _ in steps])
    return t


def test_a_trace_round_trips_through_its_file(tmp_path):
    t = _trace()
    t.end_step, t.final_mechanism = 5, "precise_bn"
    t.final = {"bn0": {"mean": np.ones(3, np.float32), "variance": np.full(3, 2, np.float32)}}
    path = tmp_path / "bn_trace.npz"
    path.write_bytes(bt.to_bytes(t))
    back = bt.read_trace(path)
    assert back.steps.tolist() == [1, 2, 3, 4, 5] and back.end_step == 5 and back.final_mechanism == "precise_bn"
    assert back.decay == {"bn0": 0.99, "bn1": 0.99} and back.rule["bn1"] == "biased" and back.steps_per_epoch == 7
    for name in t.layers:
        for q in bt.QUANTITIES:
            np.testing.assert_array_equal(back.layers[name][q], t.layers[name][q])
    assert list(back.final) == ["bn0"] and back.final["bn0"]["variance"].tolist() == [2, 2, 2]


def test_a_long_trace_stays_bounded_and_keeps_its_newest_samples_all(monkeypatch):
    monkeypatch.setattr(bt, "MAX_SAMPLES", 20)
    t = _trace(samples=1000, channels=(2,))
    assert len(t) <= 20 and t.layers["bn0"]["batch_mean"].shape == (len(t), 2)
    steps = t.steps.tolist()
    assert steps[-10:] == list(range(991, 1001))  # the newest half: every sample
    assert steps == sorted(set(steps)) and steps[0] == 1  # older ones thinned, none repeated, the start kept
    gaps = np.diff(steps[:-10])
    assert len(steps) >= 15 and gaps.max() <= 1.5 * np.median(gaps)  # spread evenly over the run, not at its start
    assert t.layers["bn0"]["moving_mean"].shape == (len(t), 2)


def test_a_resume_keeps_the_samples_up_to_its_checkpoint_and_drops_the_end_marks():
    t = _trace(samples=9)
    t.end_step, t.final = 9, {"bn0": {"mean": np.zeros(3), "variance": np.ones(3)}}
    kept = bt.up_to(t, 6)
    assert kept.steps.tolist() == [1, 2, 3, 4, 5, 6] and kept.end_step == -1 and kept.final == {}
    assert kept.layers["bn1"]["moving_variance"].shape == (6, 2)


@pytest.mark.parametrize("damage", ["garbage", "steps_back", "shape"])
def test_a_damaged_trace_is_one_line(tmp_path, damage):
    path = tmp_path / "bn_trace.npz"
    t = _trace()
    if damage == "garbage":
        path.write_bytes(b"not a zip at all")
    else:
        if damage == "steps_back":
            t.steps = t.steps[::-1].copy()
        else:
            t.layers["bn0"]["moving_mean"] = t.layers["bn0"]["moving_mean"][:3]
        path.write_bytes(bt.to_bytes(t))
    with pytest.raises(RunDirError) as e:
        bt.read_trace(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_sampling_interval_gives_a_short_epoch_enough_points():
    tf = pytest.importorskip("tensorflow")  # noqa: F841  (train/trace.py imports the model package)
    from convbn_cli.train.trace import POINTS_PER_EPOCH, sampling_interval

    assert sampling_interval(20, 422) == 20  # mnist_bn: every 20 steps, the default
    assert sampling_interval(10, 422) == 10
    assert sampling_interval(10, 35) == 1  # a 35-step run: every step, or its lag has two points
    assert sampling_interval(10, 5 * POINTS_PER_EPOCH) == 5 and sampling_interval(3, 1) == 1


def test_the_trace_subscriber_uses_only_the_trainers_contract():
    pytest.importorskip("tensorflow")
    from test_trainer_contract import _contract, _trainer_uses

    read, call = _contract()
    used = _trainer_uses(REPO / "convbn_cli" / "train" / "trace.py")
    assert {"cfg", "run", "model"} <= set(used)  # the check sees what it reads
    assert set(used) - read - call == set()
    assert [name for name, ctx in used.items() if ctx != {"Load"}] == []


def test_one_sample_measures_as_that_step_of_the_whole_trace():
    """What TensorBoard is handed of a sample (bn/<layer>/lag_*) is the lag bn_trace.png draws at that step."""
    from convbn_cli.present.bn_trace import lag

    t = _trace()
    k = 3
    row = {n: {q: a[q][k] for q in bt.QUANTITIES} for n, a in t.layers.items()}
    one = bt.one_sample(int(t.steps[k]), row)
    assert one.steps.tolist() == [4] and len(one) == 1
    for name in t.layers:
        for key, values in lag(one, name).items():
            assert values.shape == (1,) and values[0] == lag(t, name)[key][k]
