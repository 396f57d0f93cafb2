"""Where a training step's time goes, op by op: TensorFlow's profiler over convbn's own compiled training call.

Builds the config's trainer (data in memory, model, optimizer, the in-graph training call of train/steps.py), runs
a few calls to warm up, times `--calls` calls of `train.steps_per_execution` steps, then records as many again
under `tf.profiler.experimental` and reads the trace (the XSpace protobuf TensorFlow writes) back: the time of
every op executed on TensorFlow's compute threads, summed per op type and per part of the step (gathering the
batch, forward, backward, optimizer, the running sums). Op times add up to more than the wall time: the two
inter-op threads run ops side by side.

    python bench/step_profile.py [--config configs/mnist_fast.yaml] [--calls 5] [--top 14] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def part_of(name: str, op_type: str) -> str:
    """Which part of the step an op belongs to, from its name in the traced graph."""
    if "gradient_tape" in name:
        return "backward"
    if "/convbn" in name or name.startswith("convbn"):
        return "forward"
    if "adam" in name.lower() or "sgd" in name.lower() or "optimizer" in name.lower():
        return "optimizer"
    if op_type in ("GatherV2", "ResourceGather") or "load" in name.lower():
        return "batch"
    if op_type.startswith("Assign") or "sums" in name:
        return "optimizer and sums"
    return "loss, sums, loop"


def read_trace(logdir: Path, steps: int, kind=None):
    """({op type: (ms per step, ops per step)}, {part: (ms per step, ops per step)}) from the profiler's trace;
    `kind(name, op_type)`: the first table keyed by what it returns instead of by op type."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = max(logdir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    by_type, by_part = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):
            continue
        for event in line.events:
            full = plane.event_metadata[event.metadata_id].name
            if ":" not in full or "::" in full:  # "name:OpType" is an op; "ExecutorState::Process" is not
                continue
            name, op_type = full.rsplit(":", 1)
            ms = event.duration_ps / 1e9
            first = kind(name, op_type) if kind else op_type
            for table, key in ((by_type, first), (by_part, part_of(name, op_type))):
                table[key][0] += ms / steps
                table[key][1] += 1 / steps
    return by_type, by_part


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist_fast.yaml"))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from convbn_cli.tf_setup import import_tensorflow

    tf = import_tensorflow()
    sys.path.insert(0, str(ROOT / "bench"))
    from peak import cpu_info
    from step_time import make_caller  # the trainer and its timed call, as the side-by-side comparison builds them

    call, name, _, per_call, _ = make_caller(args.config, args.set)
    for _ in range(3):
        call()
    walls = [call() for _ in range(args.calls)]
    logdir = Path(tempfile.mkdtemp())
    tf.profiler.experimental.start(str(logdir))
    for _ in range(args.calls):
        call()
    tf.profiler.experimental.stop()
    by_type, by_part = read_trace(logdir, args.calls * per_call)

    print(cpu_info())
    print(f"{name}, {per_call} steps per call; wall time {statistics.median(walls):.1f} ms/step "
          f"(median of {args.calls} calls)")
    print("| op type | ms/step | ops/step |\n| --- | ---: | ---: |")
    for op_type, (ms, n) in sorted(by_type.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {op_type} | {ms:.2f} | {n:.0f} |")
    rest = sorted(by_type.items(), key=lambda kv: -kv[1][0])[args.top:]
    print(f"| {len(rest)} other op types | {sum(v[0] for _, v in rest):.2f} | {sum(v[1] for _, v in rest):.0f} |")
    print("\n| part of the step | ms/step (op time) | ops/step |\n| --- | ---: | ---: |")
    for part, (ms, n) in sorted(by_part.items(), key=lambda kv: -kv[1][0]):
        print(f"| {part} | {ms:.2f} | {n:.0f} |")
    print(f"| all ops | {sum(v[0] for v in by_part.values()):.2f} | {sum(v[1] for v in by_part.values()):.0f} |")


if __name__ == "__main__":
    main()
