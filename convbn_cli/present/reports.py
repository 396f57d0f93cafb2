"""What the commands print: each result as a small report with `to_json()` (machine-readable) and `render()`
(for people). The commands (cli.py) only pick one; the numbers come from the importable modules."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

from . import inspection as ib
from .thresholds import DEAD_GAMMA, RANK_THRESHOLDS


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)


@dataclass
class LayerTable:
    """`convbn validate`: the resolved config and the layer table."""

    config_yaml: str
    rows: list
    estimate: object = None  # config.plan.Estimate

    def render(self) -> str:
        head = ("layer", "type", "output shape", "params", "")
        cells = [head] + [(n, t, "x".join(map(str, s)), f"{p:,}", note) for n, t, s, p, note in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:4], widths)))
                 + ("  " + r[4] if r[4] else "") for r in cells]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"total parameters: {sum(r[3] for r in self.rows):,}")
        e = self.estimate
        if e is not None:
            lines.append(f"estimated training memory: {e.train_bytes / 2**20:,.0f} MiB for a batch of {e.batch_size} "
                         f"({e.activations_per_image:,} activation values per image); {e.layers} layers")
        return self.config_yaml.rstrip() + "\n\n" + "\n".join(lines)


@dataclass
class EvalReport:
    """`convbn eval`: loss, accuracy, per-class accuracy and the confusion matrix."""

    result: dict

    def to_json(self) -> dict:
        r = self.result
        return {**r, "per_class_accuracy": r["per_class_accuracy"].tolist(), "confusion": r["confusion"].tolist()}

    def render(self) -> str:
        r = self.result
        names = r.get("class_names") or [str(c) for c in range(len(r["confusion"]))]
        lines = [f"checkpoint: {r['checkpoint']}",
                 f"split: {r['split']} ({r['images']} images), BN statistics: {r['bn_stats']}",
                 f"loss {r['loss']:.4f}, accuracy {r['accuracy']:.2%}",
                 *([f"with test-time augmentation ({r['tta']['what']}): loss {r['tta']['loss']:.4f}, "
                    f"accuracy {r['tta']['accuracy']:.2%}"] if r.get("tta") else []),
                 "per-class accuracy: " + "  ".join(f"{n}: {a:.2%}" for n, a in zip(names, r["per_class_accuracy"])),
                 "confusion matrix (rows: true class, columns: predicted):"]
        width = max(5, len(str(r["confusion"].max())) + 1)
        label = max(len(n) for n in names)
        lines.append(" " * (label + 4) + "".join(str(c).rjust(width) for c in range(len(names))))
        for c, row in enumerate(r["confusion"]):
            lines.append(f"  {names[c].rjust(label)}: " + "".join(str(v).rjust(width) for v in row))
        if any(n != str(i) for i, n in enumerate(names)):
            lines.append("columns: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
        return "\n".join(lines)


@dataclass
class InspectReport:
    """`convbn inspect-bn`: per-channel BN parameters, with optional ranking and comparison."""

    result: dict
    dead_threshold: float = DEAD_GAMMA
    ranks: dict | None = None  # {layer: {"order", "below"}} with --rank
    diff: dict | None = None  # {layer: {quantity: array}} with --compare
    channels: bool = False  # the per-channel tables too (--all, --layer)
    thresholds: tuple = RANK_THRESHOLDS

    def to_json(self) -> dict:
        out = ib.to_json(self.result, self.dead_threshold)
        for name in out["layers"]:
            r = self.ranks.get(name) if self.ranks else None
            if r is not None:
                out["layers"][name]["rank"] = {"order": r["order"].tolist(), "fraction_below": r["below"]}
            elif self.ranks:
                out["layers"][name]["rank"] = None  # gamma fixed (scale: false): nothing to rank
            if self.diff is not None and name in self.diff:
                out["layers"][name]["difference"] = {q: v.tolist() for q, v in self.diff[name].items()}
        if self.ranks:
            out["global_rank"] = ib.global_rank(self.result)
        return out

    def to_csv(self) -> str:
        rows = ib.diff_csv_rows(self.diff, self.result) if self.diff is not None else ib.csv_rows(self.result)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue()

    def render(self) -> str:
        parts = [f"checkpoint: {self.result['checkpoint']}", "", ib.layer_summaries(self.result, self.dead_threshold)]
        if self.diff is not None:
            parts += ["", "differences (the other checkpoint minus this one):",
                      ib.diff_summaries(self.diff, self.result)]
        if self.ranks:
            parts += ["", ib.global_rank_text(ib.global_rank(self.result), self.thresholds)]
        if not self.channels:
            parts += ["", "per-channel values: --all (every layer) or --layer NAME; --format csv|json for all of them"]
            return "\n".join(parts)
        return "\n".join(parts) + "\n\n" + self.channel_tables()

    def channel_tables(self) -> str:
        order = {n: r["order"] for n, r in self.ranks.items() if r is not None} if self.ranks else None
        text = ib.table(self.result, self.dead_threshold, order, self.diff).split("\n", 1)[1].lstrip("\n")
        if self.ranks:
            text += "\n\n" + "\n".join(
                f"{name}: gamma fixed (scale: false), not ranked" if r is None else
                f"{name}: fraction of channels with |gamma| below " + ", ".join(f"{t:g}: {f:.1%}"
                                                                                 for t, f in r["below"].items())
                for name, r in self.ranks.items())
        return text


# which images precise BN calibrated on (recalibrate's and results.json's bn_statistics `augmented`); None:
# training augments nothing, so nothing to say
BATCHES_OF = {True: "augmented ", False: "unaugmented "}


@dataclass
class RecalibrateReport:
    result: dict

    def render(self) -> str:
        r = self.result
        return "\n".join([
            f"recalibrated {len(r['layers'])} BN layer(s) of {r['source']} over {r['batches']} "
            f"{BATCHES_OF.get(r.get('augmented'), '')}batches",
            f"{r['split']} accuracy: before {r['before']['accuracy']:.2%} (loss {r['before']['loss']:.4f}), "
            f"after {r['after']['accuracy']:.2%} (loss {r['after']['loss']:.4f})",
            f"saved {r['checkpoint']}"])


@dataclass
class ExportReport:
    result: dict
    fold_bn: bool = False

    def to_json(self) -> dict:
        return dict(self.result)

    def render(self) -> str:
        r, lines = self.result, []
        if r["folded"]:
            lines.append(f"folded into the preceding conv/dense: {', '.join(r['folded'])}")
        if r["kept"]:
            why = " (not foldable into the layer before it)" if self.fold_bn else ""
            lines.append(f"BN layers kept{why}: {', '.join(r['kept'])}")
        lines += [f"input: {r['input']}",
                  f"max |logit difference| on {r['checked_images']} test images: {r['max_abs_logit_diff']:.2e}",
                  f"wrote {r['path']}"]
        return "\n".join(lines)


@dataclass
class DataInfoReport:
    cache_dir: str
    datasets: list = field(default_factory=list)
    own: list = field(default_factory=list)  # the user's datasets the cache holds (data/own/cache.own_caches)

    def to_json(self) -> dict:
        return {"cache_dir": self.cache_dir, "datasets": self.datasets, "own": self.own}

    def render(self) -> str:
        lines = [f"cache directory: {self.cache_dir}"]
        for i in self.datasets:
            if not i["cached"]:
                state = "not cached (convbn data fetch " + i["dataset"] + ")"
            elif i.get("verified"):
                state = f"cached, verified, {i['shapes']['x_train'][0]} train / {i['shapes']['x_test'][0]} test images"
            else:
                state = f"cached but unusable: {i['problem']}"
            lines.append(f"  {i['dataset']}: {state}")
        for o in self.own:
            shape = "x".join(map(str, o["image_shape"] or []))
            lines.append(f"  {o['dataset']} ({o['format']}): {o['images']} images of {shape} ({o['resize']}), "
                         f"{o['classes']} classes, {(o['size_bytes'] or 0) / 2**20:.1f} MiB in {o['cache']}")
        return "\n".join(lines)


@dataclass
class DiagnoseReport:
    """`convbn diagnose`: findings grouped by severity, each with its layers, evidence and fix; a verdict last."""

    result: dict

    def to_json(self) -> dict:
        return {**self.result, "findings": [f.to_json() for f in self.result["findings"]]}

    def render(self) -> str:
        r = self.result
        lines = [f"diagnosis of {r['target']} ({r['kind']}, {len(r['bn_layers'])} BN layers, {r['images']} images)"]
        for severity in ("error", "warning", "info"):
            group = [f for f in r["findings"] if f.severity == severity]
            if group:
                lines += ["", f"{severity} ({len(group)}):"]
            for f in group:
                lines.append(f"  {f.name}: {f.message}")
                if f.layers:
                    lines.append(f"    layers: {', '.join(f.layers)}")
                for layer, channels in f.channels.items():
                    more = f" (+{len(channels) - 16} more)" if len(channels) > 16 else ""
                    lines.append(f"    {layer} channels: {', '.join(map(str, channels[:16]))}{more}")
                if f.evidence:
                    evidence = _compact(f.evidence)
                    cut = evidence if len(evidence) <= EVIDENCE_CHARS else evidence[:EVIDENCE_CHARS] + " ... (--json)"
                    lines.append(f"    evidence: {cut}")
                lines.append(f"    fix: {f.fix}")
        if r.get("passed"):
            lines += ["", f"passed ({len(r['passed'])}): {', '.join(r['passed'])}"]
        return "\n".join(lines + ["", self.verdict()])

    def verdict(self) -> str:
        c = self.result["counts"]
        counts = f"{c['error']} error(s), {c['warning']} warning(s), {c['info']} note(s)"
        # a model that does not fit the images (diagnose's accuracy floor, not explained by a BN layer of its own)
        # leaves no BN verdict to give: that is the verdict, whatever else was found
        misfit = next((f for f in self.result["findings"] if f.name in MISFIT and "explained_by" not in f.evidence),
                      None)
        if misfit is not None:
            acc = misfit.evidence["accuracy"].values()
            spread = f"{min(acc):.2%}" if max(acc) - min(acc) < 0.005 else f"{min(acc):.2%} to {max(acc):.2%}"
            return (f"verdict: {counts}; the model does not fit these images ({spread} whatever BN uses, chance "
                    f"{misfit.evidence['chance']:.2%}), so no BN verdict can be drawn from them: check the data, "
                    f"their preprocessing and labels, and that it learned ({misfit.name})")
        if not c["error"] and not c["warning"]:
            return "verdict: BN looks healthy" + (f" ({c['info']} note(s))" if c["info"] else "")
        worst = next(f for f in self.result["findings"] if f.severity in ("error", "warning"))
        return f"verdict: {counts}; first: {worst.name}"


EVIDENCE_CHARS = 240  # one readable line of evidence in the text report; --json holds all of it
MISFIT = ("accuracy_at_chance", "accuracy_low_in_every_bn_mode")  # diagnose's findings of a model that does not fit


def _compact(value, depth=0) -> str:
    """Evidence on one line: floats to 4 significant digits, long lists shortened."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_compact(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [_compact(v, depth + 1) for v in value[:8]]
        return "[" + ", ".join(items) + (", ..." if len(value) > 8 else "") + "]"
    return str(value)


@dataclass
class PredictReport:
    result: dict

    def to_json(self) -> dict:
        return dict(self.result)

    def render(self) -> str:
        preds = self.result["predictions"]
        width = min(max((len(p["input"]) for p in preds), default=0), 60)
        lines = []
        for p in preds:
            top = p["top"]
            # under --uncertain-below: said first, so that a doubtful answer is not read as a confident one
            label = ("uncertain: " if p.get("uncertain") else "") + f"{top[0]['name']} ({top[0]['probability']:.2%})"
            rest = ", ".join(f"{t['name']} {t['probability']:.2%}" for t in top[1:])
            lines.append(f"{p['input']:<{width}}  {label}" + (f"   then: {rest}" if rest else ""))
        return "\n".join(lines)


def table(head, rows, right=()) -> list:
    """Aligned text columns (`right`: the indices of right-aligned columns, numbers)."""
    cells = [tuple(head)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return lines


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


def duration(seconds: float) -> str:
    """12 s, 3 min, 1.2 h: how long something left takes, roughly."""
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")


def plural(n: int, word: str) -> str:
    """1 epoch, 2 epochs."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def val_cell(shown, moving) -> str:
    """The final model's validation accuracy, and the best epoch's with the moving BN statistics beside it where
    they differ: "97.67% (moving 11.17%)"."""
    return _pct(shown) + (f" (moving {moving:.2%})" if moving is not None else "")


VAL_HEAD = "final val"  # the validation accuracy of the final model: what `convbn eval RUN --split val` gives
VAL_NOTE = ("final val: validation accuracy of the final model, what `convbn eval RUN --split val` gives; (moving "
            "X): the best epoch's with the moving BN statistics training left, which precise BN replaced")


def _seconds(v) -> str:
    return "-" if v is None else (f"{v:.0f}s" if v < 120 else f"{v / 60:.1f}m")


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


@dataclass
class RunsReport:
    """`convbn runs`: one line per run, with the config keys where runs differ."""

    result: dict

    def to_json(self) -> dict:
        return {**self.result, "runs": [{k: v for k, v in r.items() if k != "config"} for r in self.result["runs"]]}

    def render(self, width: int = 120) -> str:
        """The table, cut to `width` columns: the `differs` cell (the config keys where runs differ) is shortened
        with "..." where it would not fit."""
        r = self.result
        if not r["runs"]:
            return f"no runs under {r['root']}" + "".join(f"\n  unreadable: {b['run']}: {b['problem']}"
                                                          for b in r["unreadable"])
        rows = [(s["run"], s["date"], s["dataset"] or "-", s["architecture"], f"{s['epochs_done']}/{s['epochs']}",
                 val_cell(s["val_acc"], s["val_acc_moving"]), _pct(s["test_acc"]), _seconds(s["time_s"]),
                 "" if s["status"] == "finished" else s["status"],
                 " ".join(f"{_short_key(k)}={_value(v)}" for k, v in s["differs"].items()))
                for s in r["runs"]]
        head = ("run", "date (UTC)", "dataset", "layers", "epochs", VAL_HEAD, "test", "time", "", "differs")
        fixed = table(head[:-1], [row[:-1] for row in rows], right=(4, 5, 6, 7))
        room = max(width - max(len(line) for line in fixed) - 4, 12)  # two separators: the status column may be empty
        rows = [(*row[:-1], row[-1] if len(row[-1]) <= room else row[-1][:room - 3] + "...") for row in rows]
        lines = table(head, rows, right=(4, 5, 6, 7))
        lines += [VAL_NOTE] if any(s["val_acc_moving"] is not None for s in r["runs"]) else []
        lines += [f"unreadable: {b['run']}: {b['problem']}" for b in r["unreadable"]]
        return "\n".join(lines)


def _short_key(key: str) -> str:
    """model.bn.decay -> bn.decay, train.optimizer.lr -> optimizer.lr: the section names add little in a row."""
    return key.split(".", 1)[1] if key.startswith(("model.", "train.")) and key.count(".") > 1 else key


@dataclass
class CompareReport:
    """`convbn runs compare`: the config keys that differ (one column per run), the results, and the picture."""

    result: dict
    plot: str | None = None

    def to_json(self) -> dict:
        return {"runs": [{k: v for k, v in s.items() if k != "config"} for s in self.result["runs"]],
                "differing_keys": self.result["differing_keys"], "plot": self.plot}

    def render(self) -> str:
        runs = self.result["runs"]
        head = ("", *[s["run"] for s in runs])
        rows = [("layers", *[s["architecture"] for s in runs])] if self.result.get("architectures_differ") else []
        rows += [(k, *[_value(s["config"].get(k)) for s in runs]) for k in self.result["differing_keys"]]
        rows += [(VAL_HEAD, *[val_cell(s["val_acc"], s["val_acc_moving"]) for s in runs]),
                 ("test accuracy", *[_pct(s["test_acc"]) for s in runs]),
                 ("epochs", *[f"{s['epochs_done']}/{s['epochs']}" for s in runs]),
                 ("time", *[_seconds(s["time_s"]) for s in runs])]
        lines = table(head, rows)
        lines += [VAL_NOTE] if any(s["val_acc_moving"] is not None for s in runs) else []
        if not self.result["differing_keys"] and not self.result.get("architectures_differ"):
            lines.insert(0, "the configs are identical (apart from output.*)")
        if self.plot:
            lines.append(f"curves: {self.plot}")
        return "\n".join(lines)


@dataclass
class SweepReport:
    """`convbn sweep`: one line per combination, mean ± spread over its seeds."""

    summary: dict

    def to_json(self) -> dict:
        return dict(self.summary)

    def render(self) -> str:
        keys = [k for k, _ in self.summary["axes"]]

        def cell(row, name, fmt):
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            if mean is None:
                return "-"
            return fmt(mean) + (f" ± {fmt(std)}" if row["seeds_done"] > 1 else "")

        def val(row):  # the final models' validation; the best epochs' with the moving statistics where it differs
            moving = row.get("val_acc_moving_mean")
            differs = moving is not None and abs(moving - (row.get("val_acc_mean") or 0.0)) >= 5e-5
            return cell(row, "val_acc", lambda v: f"{v:.2%}") + (f" (moving {moving:.2%})" if differs else "")

        rows = [(*[str(r[k]) for k in keys], f"{r['seeds_done']}/{r['seeds']}",
                 cell(r, "test_acc", lambda v: f"{v:.2%}"), val(r),
                 cell(r, "bn_gap", lambda v: f"{v * 100:+.2f} pt" if v else "0.00 pt"),
                 cell(r, "time_s", lambda v: f"{v:.0f}s")) for r in self.summary["rows"]]
        lines = table((*keys, "seeds", "test acc", VAL_HEAD, "BN gap (batch - moving)", "time"), rows,
                      right=tuple(range(len(keys), len(keys) + 5)))
        moving = any(r.get("val_acc_moving_mean") is not None and r.get("val_acc_mean") is not None
                     and abs(r["val_acc_moving_mean"] - r["val_acc_mean"]) >= 5e-5 for r in self.summary["rows"])
        lines += ([VAL_NOTE] if moving else []) + [f"note: {note}" for note in self.summary.get("notes", [])]
        d = self.summary["sweep"]
        lines.append(f"written: {d}/summary.csv, summary.json, summary.png; runs in {d}/<combination>/")
        return "\n".join(lines)
