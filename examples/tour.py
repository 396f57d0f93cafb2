"""A one-page tour of convbn's Python API: data -> model -> train -> evaluate -> inspect -> diagnose.

    python examples/tour.py                          # the built-in config mnist_fast: about 30 s on 2 CPU cores
    python examples/tour.py data.max_train=2000 output.root=/tmp/tour     # any config KEY=VALUE, as `convbn train`

Per-channel batch normalization, the thing convbn is about: after a conv layer with F filters, BN normalizes each
of the F feature maps with that map's own mean and variance, taken over the batch *and* every pixel (axes N, H, W
of an NHWC tensor), then applies one learned scale (gamma) and one shift (beta) per map. So gamma, beta and the
moving mean and variance BN keeps for inference all have shape (F,): one number per filter, not per pixel.
"""

import sys

from convbn_cli.api import diagnose, evaluate, inspect_bn, load_config, train
from convbn_cli.errors import ConvbnError, Stopped  # what a user can fix (ConfigError's base); Ctrl-C, SIGTERM


def main(overrides):
    # 1. Config: the network and its training as data. mnist_fast is three conv blocks of 16, 32 and 48 filters,
    # each with BN (the first two max-pool before BN: the statistics cover the pooled maps, still one per filter),
    # trained for one epoch; any key can be overridden from the command line. The run goes to
    # <output.root>/tour/<n> (output.root: ./runs unless given), a new number each time: nothing is overwritten.
    cfg = load_config("mnist_fast", ["output.name=tour", *overrides])

    # 2. Train. MNIST is fetched into the cache on first use. While training, BN normalizes with each batch's
    # statistics and folds them into its moving averages (decay model.bn.decay); the result holds the run
    # directory that every later step reads back from disk, as the `convbn` commands would.
    result = train(cfg, progress=sys.stdout.isatty())
    run = result.run_dir

    # 3. Evaluate the saved model. At inference BN uses the moving statistics, not the batch's: the two lines
    # show that these averages were measured well (with batch statistics each prediction would depend on the
    # other images in its batch; a large gap between the two numbers means the moving statistics lag).
    acc = evaluate(run)["accuracy"]
    batch_acc = evaluate(run, bn_stats="batch")["accuracy"]
    print(f"\ntest accuracy: {acc:.2%}  (with each batch's own BN statistics instead: {batch_acc:.2%})")

    # 4. Inspect every BN layer: one gamma, beta, moving mean and moving variance per channel (feature map). At
    # inference the layer is the affine map y = scale * x + shift per channel, scale = gamma / sqrt(var + eps);
    # a channel whose |gamma| is near zero carries almost nothing (Network Slimming prunes those).
    print("\nper-channel BN (one scale and shift per feature map):")
    for name, p in inspect_bn(run)["layers"].items():
        g = abs(p["gamma"])
        print(f"  {name}: {p['channels']} channels, gamma {p['gamma'].shape}, beta {p['beta'].shape}, "
              f"moving_variance {p['moving_variance'].shape}; |gamma| {g.min():.2f}..{g.max():.2f}")

    # 5. Diagnose: convbn's checks for BN mistakes (statistics never updated, a decay too slow for the steps
    # taken, a gap between training and inference mode, dead channels, a bias before BN, ...), each with a fix.
    d = diagnose(run)
    c = d["counts"]
    verdict = ("BN looks healthy" if not c["error"] and not c["warning"]
               else f"{c['error']} error(s), {c['warning']} warning(s)")
    print(f"\ndiagnose: {verdict} ({len(d['passed'])} checks passed, {c['info']} note(s))")
    for f in d["findings"]:  # most severe first
        print(f"  {f.severity}: {f.name}: {f.message}\n    fix: {f.fix}")
    print(f"\nthe run: {run}  (look at it in a browser: convbn report {run})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])  # KEY=VALUE overrides of the config, e.g. train.epochs=1
    except ConvbnError as e:  # bad input (a mistyped key or value, an unusable output.root): one line per problem
        print("\n".join(f"error: {line}" for line in e.lines), file=sys.stderr)
        sys.exit(e.exit_code)
    except (Stopped, KeyboardInterrupt) as e:  # Ctrl-C, SIGTERM: training saves a checkpoint first (train --resume)
        print(f"stopped: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))
