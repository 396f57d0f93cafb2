"""Issue 36, predict for pictures people take: digits printed and drawn on white, grey, coloured and noisy paper,
photographed under uneven light (tilted, blurred, JPEG), with thin and thick pens, and light on dark
(tests/digit_pictures.py draws them) are read >= 95% right by a small model trained on MNIST alone, every clean
one right; --show writes every stage; an answer the model is unsure of says so; one unreadable picture does not
stop the others.

Measured with this module's model on the 200 pictures of seed 2, before the change (the border rule and MNIST's
crop alone): 67.5% (clean 99%: 79/80; grey paper 3/20, coloured paper 18/20, noisy paper 6/20, photo 1/20, thin
pen 8/20); after: 100%. On seeds 0-3 (800 pictures) after: 99.5%, one clean picture wrong (seed 0: a printed 6
read as a 5 at 42%, so 'uncertain'); the quick start's model 63% before and 99.9% after."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from digit_pictures import CATEGORIES, CLEAN, picture_set, write_set
from PIL import Image

from conftest import quiet, tiny_raw
from convbn_cli.cli import main


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, mnist):
    """Two conv-pool stages (32 and 64 filters, BN after each conv) and a dense layer of 64, trained for 3 epochs
    on 15,000 MNIST digits (35-40 s on 2 cores): far from the quick start's model (99.6%), about 97.5% on MNIST.
    Smaller ones (16 and 32 filters, no dense layer) read a printed 6 as a 5 whatever the preprocessing."""
    from convbn_cli.config import load_config
    from convbn_cli.train import train

    layers = [{"type": "conv", "filters": 32, "kernel": 3}, {"type": "pool"},
              {"type": "conv", "filters": 64, "kernel": 3}, {"type": "pool"}, {"type": "flatten"},
              {"type": "dense", "units": 64}, {"type": "dense", "units": 10}]
    raw = tiny_raw(tmp_path_factory.mktemp("pictures"),
                   **{"data.max_train": 15000, "data.max_test": 1000, "train.epochs": 3, "model.layers": layers})
    return train(load_config(raw=raw), data=mnist, log=quiet, progress=False).run_dir


def predict(run, files, *extra):
    r = CliRunner().invoke(main, ["predict", str(run), *map(str, files), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_pictures_people_take_are_read_right(small_model, tmp_path):
    files = write_set(tmp_path / "pictures", picture_set(seed=2, per_digit=2))
    out = predict(small_model, [p for p, _, _ in files], "--show", tmp_path / "shown")
    got = {p["input"]: p["top"][0]["class"] for p in out["predictions"]}
    right = {c: [got[str(p)] == d for p, cat, d in files if cat == c] for c in CATEGORIES}
    print("read right: " + ", ".join(f"{c} {sum(r)}/{len(r)}" for c, r in right.items()))
    wrong = [f"{p.name}->{got[str(p)]}" for p, _, d in files if got[str(p)] != d]
    assert np.mean([ok for r in right.values() for ok in r]) >= 0.95, wrong
    assert all(all(right[c]) for c in CLEAN), wrong  # what a scanner or a paint program gives: every one
    assert all(np.mean(r) >= 0.85 for r in right.values()), wrong  # and no kind of picture left behind
    # --show: for every picture, each stage and what the model was fed
    from convbn_cli.analysis.predict import STAGES

    shown = sorted(p.name for p in (tmp_path / "shown").iterdir())
    assert len(shown) == len(files) * (len(STAGES) + 1) == len(out["shown"])
    for i, (p, _, _) in enumerate(files):
        for k, stage in enumerate(STAGES, 1):
            assert f"{i:04d}-{p.stem}.{k}-{stage}.png" in shown
        fed = np.asarray(Image.open(tmp_path / "shown" / f"{i:04d}-{p.stem}.png"))
        assert fed.shape == (224, 224) and fed.max() > 200 and fed[:16].max() == 0  # a digit in MNIST's box


def test_unsure_answers_say_uncertain_with_their_class_and_probability(small_model, tmp_path):
    Image.new("L", (300, 200), 235).save(tmp_path / "blank.png")  # no digit at all: nothing to be sure of
    (p, _, digit), = write_set(tmp_path, picture_set(seed=1, per_digit=1, categories=("marker",))[3:4])
    out = predict(small_model, [tmp_path / "blank.png", p])
    blank, three = out["predictions"]
    assert out["uncertain_below"] == 0.7 and blank["uncertain"] and not three["uncertain"], out
    assert three["top"][0]["class"] == digit == 3 and three["top"][0]["probability"] >= 0.7
    text = CliRunner().invoke(main, ["predict", str(small_model), str(tmp_path / "blank.png"), str(p)]).output
    assert f"blank.png  uncertain: {blank['top'][0]['class']} (" in text and f"{p.name}  3 (" in text
    assert all(q["uncertain"] for q in predict(small_model, [p], "--uncertain-below", "1")["predictions"])
    assert not any(q["uncertain"] for q in predict(small_model, [p], "--uncertain-below", "0")["predictions"])
    r = CliRunner().invoke(main, ["predict", str(small_model), str(p), "--uncertain-below", "1.5"])
    assert r.exit_code == 2 and "--uncertain-below" in r.output


def test_one_unreadable_picture_is_one_line_and_the_others_are_predicted(small_model, tmp_path):
    files = write_set(tmp_path / "pictures", picture_set(seed=2, per_digit=1, categories=("font",))[:3])
    bad = tmp_path / "pictures" / "001-broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG's signature and nothing sound after it
    (tmp_path / "notes.png").write_bytes(b"not a picture")
    r = CliRunner().invoke(main, ["predict", str(small_model), str(tmp_path / "pictures"),
                                  str(tmp_path / "notes.png"), "--uncertain-below", "0"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and str(bad) in errors[0] and str(tmp_path / "notes.png") in errors[1], r.output
    assert "<_io" not in r.output and "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if not line.startswith("error:")]
    assert [line.split()[:2] for line in lines] == [[str(p), str(d)] for p, _, d in files], r.output
    out = json.loads(CliRunner().invoke(main, ["predict", str(small_model), str(tmp_path / "pictures"),
                                               "--json"]).stdout)
    assert [f["input"] for f in out["failed"]] == [str(bad)] and len(out["predictions"]) == 3
