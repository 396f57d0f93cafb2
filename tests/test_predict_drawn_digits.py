"""Issue 25, predict: a digit drawn on a large white canvas, of any size and anywhere on it, is read as MNIST's
digits were made (cropped to its ink, fitted in 20x20, centred by its centre of mass in 28x28), so the model
sees what it was trained on; --show writes what the model was fed."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import quiet, tiny_raw
from convbn_cli.cli import main

LAYOUTS = [  # (canvas width, height, digit height in pixels, where its top-left corner goes, as fractions)
    (640, 480, 60, (0.05, 0.05)), (640, 480, 300, (0.3, 0.2)), (1200, 300, 120, (0.8, 0.4)),
    (300, 900, 200, (0.1, 0.7)),
]


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, mnist):
    """A small conv-BN net trained on 12,000 MNIST digits, and 40 test digits it reads right as they are."""
    from convbn_cli.config import load_config
    from convbn_cli.runs.target import open_target
    from convbn_cli.train import train

    tmp = tmp_path_factory.mktemp("digits")
    layers = [{"type": "conv", "filters": 16, "kernel": 3}, {"type": "pool"},
              {"type": "conv", "filters": 32, "kernel": 3}, {"type": "pool"}, {"type": "flatten"},
              {"type": "dense", "units": 10}]
    cfg = load_config(raw=tiny_raw(tmp, **{"data.max_train": 12000, "data.max_test": 1000, "model.layers": layers}))
    run = train(cfg, data=mnist, log=quiet, progress=False).run_dir
    t = open_target(run)
    x, y = mnist["x_test"][:200], mnist["y_test"][:200]
    own = t.predict((x[..., None] / 255.0).astype(np.float32)).argmax(axis=1)
    right = np.flatnonzero(own == y)[:40]
    return run, x[right], y[right]


def drawn(digit: np.ndarray, canvas_w, canvas_h, height, where) -> Image.Image:
    """An MNIST digit as a person would draw it on paper: dark ink on white, `height` pixels tall, somewhere."""
    img = Image.fromarray(255 - digit).resize((height, height), Image.BICUBIC)
    canvas = Image.new("L", (canvas_w, canvas_h), 255)
    canvas.paste(img, (int(where[0] * (canvas_w - height)), int(where[1] * (canvas_h - height))))
    return canvas


def read(run, files, *extra):
    import json

    r = CliRunner().invoke(main, ["predict", str(run), *map(str, files), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_drawn_digits_are_read_right_with_the_mnist_preprocessing(digits_model, tmp_path):
    run, x, y = digits_model
    files, labels = [], []
    for k, (w, h, size, where) in enumerate(LAYOUTS):
        for i in range(k, len(x), len(LAYOUTS)):  # each digit in one layout
            path = tmp_path / f"d{i:02d}-{k}.png"
            drawn(x[i], w, h, size, where).save(path)
            files.append(path)
            labels.append(int(y[i]))
    by_default = read(run, files, "--show", tmp_path / "fed")
    assert by_default["preprocess"] == "mnist"
    got = [p["top"][0]["class"] for p in by_default["predictions"]]
    right = np.mean(np.array(got) == labels)
    plain = [p["top"][0]["class"] for p in read(run, files, "--preprocess", "none")["predictions"]]
    right_plain = np.mean(np.array(plain) == labels)
    print(f"drawn digits read right: {right:.0%} with --preprocess mnist, {right_plain:.0%} with none")
    assert right >= 0.9, (right, got, labels)  # measured: digits the model reads right as MNIST has them
    assert right - right_plain >= 0.2, (right, right_plain)  # padding and shrinking alone lose many of them
    from convbn_cli.analysis.predict import STAGES

    written = sorted(p.name for p in (tmp_path / "fed").iterdir())
    fed = [name for name in written if name.count(".") == 1]  # NNNN-NAME.png: what the model was fed
    assert len(fed) == len(files) and Image.open(tmp_path / "fed" / fed[0]).size == (28 * 8, 28 * 8)
    assert written == sorted(fed + [f"{name[:-4]}.{k}-{s}.png" for name in fed for k, s in enumerate(STAGES, 1)])


def test_mnist_normalize_fits_20x20_and_centres_the_mass():
    from convbn_cli.analysis.predict import mnist_normalize

    a = np.zeros((300, 500), np.float32)
    a[20:120, 400:440] = 255  # a tall bar near the top right corner
    out = mnist_normalize(a)
    rows, cols = np.nonzero(out > 64)
    assert rows.max() - rows.min() + 1 in (19, 20, 21) and cols.max() - cols.min() + 1 <= 10  # 20 tall, aspect kept
    cy, cx = (np.array(np.nonzero(out)) * out[out > 0]).sum(axis=1) / out.sum()
    assert abs(cy - 13.5) <= 0.75 and abs(cx - 13.5) <= 0.75
    assert mnist_normalize(np.zeros((50, 50))).max() == 0  # no ink: blank, not an error


def test_show_never_writes_into_a_directory_with_files(digits_model, tmp_path):
    run, x, _ = digits_model
    Image.fromarray(255 - x[0]).save(tmp_path / "one.png")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    r = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "one.png"), "--show", str(tmp_path / "mine")])
    assert r.exit_code == 2 and "not an empty directory" in r.output
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]
