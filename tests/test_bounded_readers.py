"""Reliability round 3 (issue 27), the readers: everything convbn reads back from runs and sweeps or from a user
is bounded, refuses FIFOs and special files, checks declared sizes before decoding, and fails in one ConvbnError
line, never a traceback: the cases an adversarial probe found, and a fuzz test per reader."""

import json
import os
import random
import signal
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_raw, write_idx
from convbn_cli.errors import ConvbnError

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO opened for reading waits for a writer) fails the test instead of hanging it."""
    def alarm(signum, frame):
        raise TimeoutError("the read blocked")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny, valid PNG whose header declares width x height pixels (its CRC fixed), as a hostile file would."""
    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's data follows the 8-byte signature and chunk head
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def zip_declaring(path: Path, members: dict, declared: dict = ()) -> Path:
    """A zip of `members` (name -> bytes) in which the members named in `declared` claim another uncompressed
    size in both their local header and the central directory."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = bytearray(path.read_bytes())
    for name, size in dict(declared).items():
        raw = name.encode()
        for sig, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
            at = data.find(sig)
            while at >= 0 and data[at + name_at:at + name_at + len(raw)] != raw:
                at = data.find(sig, at + 1)
            data[at + size_at:at + size_at + 4] = struct.pack("<I", size)
    path.write_bytes(bytes(data))
    return path


def npy_header_only(path: Path, shape, dtype=np.uint8) -> bytes:
    """An .npy (header, no data) declaring `shape`."""
    import io

    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,) * len(shape), dtype))
    header["shape"] = tuple(shape)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def mutations(data: bytes, n: int, seed: int = 0):
    """`n` damaged versions of `data`: flipped bytes, cuts, insertions, repeated or random chunks."""
    rng = random.Random(seed)
    for _ in range(n):
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(5)
            if op == 0 and d:
                for _ in range(rng.randint(1, 8)):
                    d[rng.randrange(len(d))] = rng.randrange(256)
            elif op == 1:
                d = d[:rng.randrange(len(d) + 1)]
            elif op == 2:
                at = rng.randrange(len(d) + 1)
                d[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            elif op == 3 and d:
                a = rng.randrange(len(d))
                d[a:a] = d[a:a + rng.randint(1, 200)] * rng.randint(1, 5)
            else:
                d = bytearray(rng.randbytes(rng.randint(0, 300)))
        yield bytes(d)


def fuzz(path: Path, valid: bytes, read, n: int = int(os.environ.get("CONVBN_FUZZ_N", "150"))):
    """Every damaged version of `valid` written at `path` is read fine or refused as a ConvbnError."""
    read()  # the undamaged file reads
    for k, data in enumerate(mutations(valid, n)):
        path.write_bytes(data)
        try:
            read()
        except ConvbnError:
            pass
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"mutation {k} of {path.name}: {type(e).__name__}: {e}") from e


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------------- runs, sweeps


def a_run(tmp_path) -> Path:
    from convbn_cli.config import dump_config, load_config

    run = tmp_path / "runs" / "tiny" / "1"
    run.mkdir(parents=True)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    (run / "config.yaml").write_text(dump_config(load_config(cfg_file)))
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 0.9 + e / 100,
             "lr": 0.01, "train_ce": 0.5, "images_per_s": 900.0, "epoch_time_s": 1.0, "wall_time_s": 1.0 * e,
             "checkpoint": f"ckpt-{10 * e}"} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "results.json").write_text(json.dumps({"test_acc": 0.93, "best_val_acc": 0.92, "wall_time_s": 2.5,
                                                  "best_epoch": 2, "stopped_early": None}))
    (run / "run.json").write_text(json.dumps({"time": "2026-12-01T10:00:00+00:00", "argv": ["convbn"]}))
    return run


DAMAGE = {  # file -> what a hand edit or a damaged disk left there (each one found by the adversarial probe)
    "metrics.jsonl": ['{"epoch": 1, "val_acc": 0.9}\n',  # no wall_time_s
                      '{"epoch": 1, "wall_time_s": 1.0, "val_acc": "0.9"}\n',  # a string accuracy
                      '{"epoch": true, "wall_time_s": 1.0}\n', '[' * 100_000 + "\n"],
    "results.json": ['{"test_acc": "high"}', '{"wall_time_s": [1]}', '{"best_epoch": 1.5}', "[]", "{" * 100_000],
    "run.json": ['{"time": 20261201}', '"text"'],
    "config.yaml": ["data: !!binary aGVsbG8=\n", "model: !!set {a, b}\n", "train: !!timestamp 2020-01-01\n",
                    "[" * 5000],
}


@pytest.mark.parametrize("name,text", [(n, t) for n, texts in DAMAGE.items() for t in texts])
def test_a_damaged_run_is_listed_with_its_problem_and_compare_is_one_line(tmp_path, name, text):
    from click.testing import CliRunner

    from convbn_cli.cli import main

    good, bad = a_run(tmp_path), a_run(tmp_path / "other")
    (bad / name).write_text(text)
    runner = CliRunner()
    listing = runner.invoke(main, ["runs", str(tmp_path), "--json"])
    assert listing.exit_code == 0, listing.output
    out = json.loads(listing.output)
    assert [r["path"] for r in out["runs"]] == [str(good)]
    assert len(out["unreadable"]) == 1 and out["unreadable"][0]["run"] == str(bad)
    assert name in out["unreadable"][0]["problem"] and "\n" not in out["unreadable"][0]["problem"]
    compare = runner.invoke(main, ["runs", "compare", str(good), str(bad), "--plot", str(tmp_path / "c.png")])
    assert compare.exit_code == 2, compare.output
    assert compare.output.count("error:") == 1 and "Traceback" not in compare.output and name in compare.output


def test_fifos_are_refused_without_blocking(tmp_path, no_hang):
    from click.testing import CliRunner

    from convbn_cli.analysis.predict import load_inputs
    from convbn_cli.cli import main
    from convbn_cli.config import load_config
    from convbn_cli.data.external import load_npz_arrays
    from convbn_cli.formats.catalog import check_keras_archive
    from convbn_cli.runs.rundir import RunDir
    from convbn_cli.train.sweep import open_sweep

    run = a_run(tmp_path)
    for name in ("metrics.jsonl", "results.json", "run.json"):
        (run / name).unlink()
        fifo(run / name)
    reads = [RunDir(run).read_metrics, RunDir(run).read_results, RunDir(run).read_run_info,
             lambda: load_config(fifo(tmp_path / "c2.yaml")),
             lambda: open_sweep(_sweep_with_fifo(tmp_path)),
             lambda: check_keras_archive(fifo(tmp_path / "m.keras")),
             lambda: load_npz_arrays(fifo(tmp_path / "d.npz"), ("x", "y"), 1 << 20, ""),
             lambda: load_inputs([fifo(tmp_path / "p.png")], (28, 28)),
             lambda: load_inputs([fifo(tmp_path / "a.npy")], (28, 28))]
    for read in reads:
        with pytest.raises(ConvbnError, match="FIFO") as e:
            read()
        one_line(e)
    (run / "config.yaml").unlink()
    fifo(run / "config.yaml")
    r = CliRunner().invoke(main, ["runs", str(tmp_path), "--json"])
    assert r.exit_code == 0 and "FIFO" in json.loads(r.output)["unreadable"][0]["problem"]


def _sweep_with_fifo(tmp_path) -> Path:
    d = tmp_path / "sweep-1"
    d.mkdir()
    fifo(d / "sweep.json")
    return d


def test_declared_sizes_are_refused_before_anything_is_decoded(tmp_path):
    """The probe's files: a 62 KB PNG declaring 10^6 x 64 pixels (23.6 GB resident, then an OOM kill), a
    60000 x 1000 PNG (4.5 GB), an .npz of 999,999 images (9.9 GB), .keras members inflating to 2-3 GB (4.8-6.9 GB)
    and a 2 GB sparse metrics.jsonl (4.2 GB): each refused from what it declares."""
    from convbn_cli.analysis.predict import load_inputs
    from convbn_cli.formats.catalog import check_keras_archive
    from convbn_cli.runs.rundir import RunDir

    for w, h in ((10**6, 64), (60000, 1000), (64, 10**6)):
        with pytest.raises(ConvbnError, match="scale it down first") as e:
            load_inputs([png_declaring(tmp_path / f"{w}x{h}.png", w, h)], (28, 28))
        one_line(e)
    with zipfile.ZipFile(tmp_path / "many.npz", "w") as z:
        z.writestr("x.npy", npy_header_only(tmp_path / "h.npy", (999_999, 28, 28)))
    with pytest.raises(ConvbnError, match="more than 10,000 images"):
        load_inputs([tmp_path / "many.npz"], (28, 28))
    with pytest.raises(ConvbnError, match="more than 10,000 images"):
        load_inputs([tmp_path / "h.npy"], (28, 28))
    for member, size in (("config.json", 2 << 30), ("model.weights.h5", 3 << 30), ("assets/x", 1 << 30)):
        archive = zip_declaring(tmp_path / "m.keras", {"config.json": b"{}", "metadata.json": b"{}",
                                                       "model.weights.h5": b"", "assets/x": b""}, {member: size})
        with pytest.raises(ConvbnError, match=f"member '{member}' declares") as e:
            check_keras_archive(archive)
        one_line(e)
    run = a_run(tmp_path)
    with open(run / "metrics.jsonl", "r+b") as f:
        f.truncate(2 << 30)  # sparse: nothing on disk
    with pytest.raises(ConvbnError, match="more than a metrics file can be"):
        RunDir(run).read_metrics()


def test_an_archive_declaring_millions_of_members_is_refused_from_its_last_record(tmp_path):
    from convbn_cli.readers import check_zip

    path = zip_declaring(tmp_path / "a.zip", {"x.npy": b"1"})
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 0xFFFF, 0xFFFF)
    path.write_bytes(bytes(data))
    with pytest.raises(ConvbnError, match="declares too many archive members"):
        check_zip(path, {}, 1 << 20)


# ---------------------------------------------------------------------------------------------- sweeps


def test_a_huge_grid_is_counted_before_it_is_built(tmp_path):
    import tracemalloc

    from convbn_cli.errors import ConfigError
    from convbn_cli.train.sweep import plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    axes = [f"{k}={','.join(str(v) for v in range(1, 101))}" for k in
            ("train.epochs", "train.seed", "data.batch_size", "model.layers[0].filters")]
    tracemalloc.start()
    with pytest.raises(ConfigError, match=r"100 x 100 x 100 x 100 combinations x 1 seeds is 100000000 runs"):
        plan(config, axes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20  # the probe: 3.9-8.7 GB, then MemoryError


@pytest.mark.parametrize("values", ["0.9,0.9", "0.9,0.90", "0.5,0.9,0.5"])
def test_a_value_given_twice_is_refused(tmp_path, values):
    from convbn_cli.errors import ConfigError
    from convbn_cli.train.sweep import plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    with pytest.raises(ConfigError, match="is given twice") as e:
        plan(config, [f"model.bn.decay={values}"])
    assert len(e.value.problems) == 1


def test_no_grid_is_a_usage_error(tmp_path):
    from convbn_cli.errors import ConfigError
    from convbn_cli.train.sweep import plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan(config, ["train.epochs=1"])
    assert len(plan(config, [], seeds=2)["runs"]) == 2


def test_long_combination_names_never_share_a_directory(tmp_path):
    """The probe: a 5-axis logspace grid with --seeds 2 gave 64 runs but 47 directory names (cut at 200 chars)."""
    from convbn_cli.train.sweep import dir_name, plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    lr = ",".join(f"{v:.17g}" for v in np.logspace(-4, -1, 2))
    specs = [f"train.optimizer.lr={lr}", "model.bn.decay=0.90000000000000001,0.990000000000000001",
             "model.bn.epsilon=0.0010000000000000001,0.0000100000000000001",
             "train.label_smoothing=0.0,0.10000000000000001", "train.optimizer.weight_decay=0.0,0.00050000000000000001"]
    runs = plan(config, specs, seeds=2)["runs"]
    names = [r["name"] for r in runs]
    assert len(runs) == 64 and len(set(names)) == 64
    assert all(len(n.encode()) <= 120 and "/" not in n for n in names)
    assert dir_name("a/b") != dir_name("a_b") and dir_name("model.bn.decay=0.9") == "model.bn.decay=0.9"


HAND_EDITS = [  # sweep.json as a hand edit or a damaged disk left it -> what the one line names
    (lambda p: {**p, "runs": [{**p["runs"][0], "name": "a\0b"}]}, "runs[0].name"),
    (lambda p: {**p, "runs": [{**p["runs"][0], "name": "../elsewhere"}]}, "runs[0].name"),
    (lambda p: {**p, "axes": 5}, "axes"),
    (lambda p: {k: v for k, v in p.items() if k != "runs"}, "runs"),
    (lambda p: {**p, "runs": [{k: v for k, v in p["runs"][0].items() if k != "config"}]}, "runs[0].config"),
    (lambda p: {**p, "runs": p["runs"] + p["runs"][:1]}, "two runs share the directory"),
    (lambda p: {**p, "seeds": "2"}, "seeds"),
    (lambda p: [p], "the top level"),
]


@pytest.mark.parametrize("edit,where", HAND_EDITS)
def test_a_hand_edited_sweep_plan_is_one_line(tmp_path, edit, where):
    from convbn_cli.train.sweep import create, open_sweep, plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    path = create(plan(config, ["model.bn.decay=0.9,0.99"]))
    assert len(open_sweep(path)["runs"]) == 2
    (path / "sweep.json").write_text(json.dumps(edit(json.loads((path / "sweep.json").read_text()))))
    with pytest.raises(ConvbnError, match=r"sweep\.json") as e:
        open_sweep(path)
    assert where in one_line(e)


def test_a_combination_linked_elsewhere_is_refused_and_nothing_is_written_there(tmp_path):
    """The probe: a combination directory symlinked to another run got this sweep's results written into it."""
    from convbn_cli.runs.rundir import RunDirError
    from convbn_cli.train.sweep import create, plan, run_sweep

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    path = create(plan(config, ["model.bn.decay=0.9,0.99"]))
    other = tmp_path / "someone_elses_run"
    other.mkdir()
    (path / "model.bn.decay=0.9").symlink_to(other)
    with pytest.raises(RunDirError, match="a link or a file where this sweep keeps a run directory") as e:
        run_sweep(path, log=lambda m: None, progress=False)
    one_line(e)
    assert list(other.iterdir()) == []


def test_a_deeply_nested_sweep_plan_is_one_line(tmp_path):
    from convbn_cli.train.sweep import open_sweep

    (tmp_path / "sweep.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConvbnError, match="nested too deeply") as e:
        open_sweep(tmp_path)
    one_line(e)


# ---------------------------------------------------------------------------------------------- fuzz, per reader


def test_fuzz_run_records(tmp_path):
    from convbn_cli.runs.rundir import RunDir

    run = a_run(tmp_path)
    for name, read in (("metrics.jsonl", RunDir(run).read_metrics), ("results.json", RunDir(run).read_results),
                       ("run.json", RunDir(run).read_run_info)):
        fuzz(run / name, (run / name).read_bytes(), read)


def test_fuzz_config_and_sweep_plan(tmp_path):
    from convbn_cli.config import load_config
    from convbn_cli.train.sweep import create, open_sweep, plan

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    fuzz(config, config.read_bytes(), lambda: load_config(config))
    config.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    path = create(plan(config, ["model.bn.decay=0.9,0.99"]))
    fuzz(path / "sweep.json", (path / "sweep.json").read_bytes(), lambda: open_sweep(path))


def test_fuzz_archives_and_arrays(tmp_path):
    from convbn_cli.analysis.predict import load_inputs
    from convbn_cli.data.external import load_npz_arrays
    from convbn_cli.formats.catalog import check_keras_archive

    rng = np.random.default_rng(0)
    keras_file = zip_declaring(tmp_path / "m.keras", {"metadata.json": b'{"keras_version": "3"}',
                                                      "config.json": json.dumps({"class_name": "Sequential"}).encode(),
                                                      "model.weights.h5": rng.bytes(300)})
    fuzz(keras_file, keras_file.read_bytes(), lambda: check_keras_archive(keras_file))
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8), y=np.arange(4))
    fuzz(tmp_path / "d.npz", (tmp_path / "d.npz").read_bytes(),
         lambda: load_npz_arrays(tmp_path / "d.npz", ("x", "y"), 1 << 20, "needs x and y"))
    from convbn_cli.data.formats import read_idx, read_npz
    from convbn_cli.data.registry import MNIST

    arrays = {"x_train": rng.integers(0, 255, (4, 28, 28), dtype=np.uint8), "y_train": np.arange(4, dtype=np.uint8),
              "x_test": rng.integers(0, 255, (2, 28, 28), dtype=np.uint8), "y_test": np.arange(2, dtype=np.uint8)}
    np.savez(tmp_path / "mnist.npz", **arrays)
    fuzz(tmp_path / "mnist.npz", (tmp_path / "mnist.npz").read_bytes(), lambda: read_npz(tmp_path / "mnist.npz", MNIST))
    write_idx(tmp_path / "images.idx", arrays["x_train"], compress=True)
    fuzz(tmp_path / "images.idx", (tmp_path / "images.idx").read_bytes(),
         lambda: read_idx(tmp_path / "images.idx", (60000, (28, 28))))
    np.save(tmp_path / "a.npy", rng.integers(0, 255, (3, 28, 28), dtype=np.uint8))
    fuzz(tmp_path / "a.npy", (tmp_path / "a.npy").read_bytes(), lambda: load_inputs([tmp_path / "a.npy"], (28, 28)))


def test_fuzz_pictures(tmp_path):
    from PIL import Image

    from convbn_cli.analysis.predict import load_inputs

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(tmp_path / "p.png")
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(tmp_path / "p.jpg")
    for name in ("p.png", "p.jpg"):
        fuzz(tmp_path / name, (tmp_path / name).read_bytes(),
             lambda path=tmp_path / name: load_inputs([path], (28, 28)))


# ---------------------------------------------------------------------------------------------- predict's inputs


@pytest.mark.parametrize("array,message", [
    (np.zeros((0, 28, 28), np.uint8), "holds no images"),
    (np.full((2, 28, 28), np.nan, np.float32), "not finite"),
    (np.full((1, 28, 28), np.inf, np.float64), "not finite"),
])
def test_predict_refuses_empty_and_non_finite_arrays(tmp_path, array, message):
    from convbn_cli.analysis.predict import load_inputs

    np.save(tmp_path / "a.npy", array)
    with pytest.raises(ConvbnError, match=message) as e:
        load_inputs([tmp_path / "a.npy"], (28, 28))
    one_line(e)


def test_a_large_picture_is_shrunk_before_it_is_padded(tmp_path):
    """A 20000 x 64 strip used to be padded to a 20000 x 20000 square (400 M pixels) before resizing; now the
    strip is shrunk first, and still lands centred on a black square."""
    from PIL import Image

    from convbn_cli.analysis.predict import load_image

    Image.new("L", (20000, 64), 255).save(tmp_path / "strip.png")  # light: taken as a stroke on black (no invert)
    a = load_image(tmp_path / "strip.png", (28, 28), invert="no")
    assert a.shape == (28, 28) and a[13:15].max() > 200 and a[:12].max() == 0 and a[16:].max() == 0
