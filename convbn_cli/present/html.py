"""The HTML page of `convbn report` (analysis/report.py gathers what it shows): one file, its pictures embedded as
PNG data, its style inline, no network needed to open it. Every text from a run (names, config, findings) is
escaped. A few lines of script check, once the page has loaded, that every picture decoded, and say so on the
browser's console otherwise (the test opens the page in headless Chromium and reads that console)."""

from __future__ import annotations

import base64
import html
import json

from ..runs.rundir import final_val
from ..runs.sweepdir import finite  # a results.json number, or None: a field of the wrong type shows as missing
from .bn_activations import report_sections
from .reports import BATCHES_OF

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; color: #1f2328; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #59636e; }
.verdict { font-size: 1.15em; padding: .6em 1em; border-radius: 6px; display: inline-block; margin: .5em 0; }
.healthy { background: #dafbe1; } .problems { background: #ffebe9; }
table { border-collapse: collapse; margin: .6em 0; } td, th { padding: .25em .8em; border-bottom: 1px solid #eee;
text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
.runs { display: grid; grid-template-columns: repeat(auto-fill, minmax(640px, 1fr)); gap: 1em; }
pre { background: #f6f8fa; padding: 1em; overflow: auto; font-size: 13px; }
.note { background: #fff8c5; padding: .4em .8em; border-radius: 6px; }
.finding { margin: .5em 0 .9em; } .error { color: #b42318; } .warning { color: #9a6700; } .info { color: #59636e; }
"""

CHECK_IMAGES = """
window.addEventListener("load", function () {
  var bad = Array.prototype.filter.call(document.images, function (im) { return !im.complete || !im.naturalWidth; });
  bad.forEach(function (im) { console.error("convbn report: picture did not decode: " + im.alt); });
  document.body.setAttribute("data-pictures", bad.length ? "broken" : "ok");
});
"""


def esc(value) -> str:
    text = "" if value is None else str(value)
    # a lone surrogate (JSON's "\ud800" in a hand-edited file) cannot be written as UTF-8: shown as its escape
    return html.escape(text.encode("utf-8", "backslashreplace").decode("utf-8"), quote=True)


def picture(data: bytes | None, alt: str) -> str:
    if not data:
        return f"<p class=sub>({esc(alt)}: not available)</p>"
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def pct(x) -> str:
    x = finite(x)
    return "-" if x is None else f"{100 * x:.2f}%"


def seconds(x) -> str:
    x = finite(x)
    return "-" if x is None else f"{x:.0f} s"


def of_type(value, kind, default=None):
    """`value` when it is a `kind` (a bool is no int), else `default`: what the page shows of a field it reads."""
    return value if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool) else default


# results.json's fields that its reader (runs/rundir.py) leaves unchecked, and what the page expects of them
NESTED_RESULTS = {"bn_statistics": dict, "inference_gap": dict}


def damaged_fields(res: dict) -> list:
    """The fields of results.json the page reads whose value is not of the type convbn writes there."""
    return [k for k, kind in NESTED_RESULTS.items() if res.get(k) is not None and not isinstance(res[k], kind)]


def _text(value):
    """A provenance value as a table shows it: nested ones as JSON."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def rows_table(head, rows, numeric=()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td class=num>{esc(c)}</td>" if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out + ["</table>"])


def page(report: dict) -> str:
    body = run_body(report) if report["kind"] == "run" else sweep_body(report)
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>convbn report: {esc(report['title'])}"
            f"</title>\n<style>{STYLE}</style>\n<script>{CHECK_IMAGES}</script></head>\n<body>\n{body}\n</body></html>\n")


def run_body(r: dict) -> str:
    res, test = r["results"], r["test"]
    bn = of_type(res.get("bn_statistics"), dict, {})
    healthy = r["verdict"].startswith("BN looks healthy")
    epochs_done = of_type(res.get("epochs_done"), int, len(r["metrics"]))
    shown, moving = final_val(res)
    facts = [("test accuracy", pct(test["accuracy"])), ("test loss", f"{test['loss']:.4f}"),
             ("validation accuracy (final model)", pct(shown) + (f" (best epoch with the moving BN statistics: "
                                                                 f"{pct(moving)})" if moving is not None else "")),
             ("best epoch", of_type(res.get("best_epoch"), int)),
             ("epochs", f"{epochs_done}/{of_type(res.get('epochs'), int, '-')}"),
             ("training time", seconds(res.get("wall_time_s"))), ("final model", r["checkpoint"]),
             ("BN statistics settled by", settled_by(bn)),
             ("stopped early", of_type(res.get("stopped_early"), str) or "no")]
    if not res:
        facts.append(("status", "unfinished: no results.json yet (the model is the best checkpoint so far)"))
    if damaged_fields(res):
        facts.append(("damaged", f"results.json: {', '.join(damaged_fields(res))} not as convbn writes it; "
                                 "shown as missing"))
    findings = "".join(
        f"<div class=finding><b class={esc(f['severity'])}>{esc(f['severity'])}: {esc(f['name'])}</b> "
        f"{esc(f['message'])}<br><span class=sub>fix: {esc(f['fix'])}</span></div>" for f in r["findings"])
    layers = ", ".join(f"{esc(n)} ({v['channels']} channels, {esc(v['impl'])})" for n, v in r["bn_layers"].items())
    prov = r["provenance"] or {}
    versions = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    machine = prov.get("machine") if isinstance(prov.get("machine"), dict) else {}
    return f"""<h1>convbn report: {esc(r['title'])}</h1>
<p class=sub>{esc(of_type(prov.get('command'), str, ''))} &middot; {esc(of_type(prov.get('time'), str, ''))}</p>
<div class="verdict {'healthy' if healthy else 'problems'}">diagnose: {esc(r['verdict'])}</div>
<h2>Results</h2>
{rows_table(('', ''), facts)}
<h2>Training curves</h2>
{picture(r['pictures'].get('curves'), 'training curves')}
<h2>Test confusion matrix</h2>
{picture(r['pictures'].get('confusion'), 'confusion matrix')}
<h2>What the model trained on</h2>
{picture(r['pictures'].get('train_batch'), 'the first training batch')}
<h2>BN parameters per channel</h2>
<p class=sub>{layers}</p>
{picture(r['pictures'].get('bn'), 'per-channel BN parameters')}
{report_sections(r, picture, esc)}
<h2>Diagnose</h2>
{findings or '<p>No findings.</p>'}
<p class=sub>passed: {esc(', '.join(r['passed']) or '-')}</p>
<h2>Config</h2>
<pre>{esc(r['config'])}</pre>
<h2>Provenance</h2>
{rows_table(('', ''), [*versions.items(), *((k, _text(v)) for k, v in machine.items()),
                       ('git commit', of_type(prov.get('git_commit'), str) or '-')])}
"""


SETTLED_BY = {  # results.json's bn_statistics.mechanism, said so that someone new to BN can read it
    "none": "nothing needed: the moving statistics training kept were already right (validation with them within "
            "the noise of each batch's own statistics)",
    "precise_bn": "precise BN: the statistics were recomputed for the final weights from training batches",
    "ema": "the EMA of the weights, with its BN statistics recomputed from training batches"}


def settled_by(bn: dict) -> str:
    """How the final model's BN statistics were made, in words (results.json's bn_statistics)."""
    mechanism = of_type(bn.get("mechanism"), str)
    if mechanism is None:
        return "-"
    text = SETTLED_BY.get(mechanism, mechanism)
    batches = of_type(bn.get("batches"), int)
    if mechanism != "none" and batches is not None:
        text += f" ({batches} {BATCHES_OF.get(of_type(bn.get('augmented'), bool), '')}batches)"
    if mechanism == "precise_bn" and bn.get("kept") is False:
        text += "; not kept, as it did not help: the moving statistics stayed"
    return text


def points(x) -> str:
    """An accuracy difference in percentage points."""
    x = finite(x)
    return "-" if x is None else f"{100 * x:+.2f} points"


def sweep_body(r: dict) -> str:
    keys = [k for k, _ in r["axes"]]
    head = (*keys, "seeds", "test accuracy", "validation (final model)", "best epoch, moving BN statistics",
            "BN gap (batch - moving)", "time")
    rows = [(*[row.get(k) for k in keys], f"{row['seeds_done']}/{row['seeds']}",
             _mean(row, "test_acc", pct), _mean(row, "val_acc", pct), _moving(row),
             _mean(row, "bn_gap", points), _mean(row, "time_s", seconds)) for row in r["rows"]]
    said = "".join(f"<p class=note><b>note:</b> {esc(n)}</p>" for n in r.get("notes", []))
    cards = "\n".join(f"<div><h3>{esc(e['name'])}</h3><p class=sub>test accuracy "
                      f"{pct(of_type(e['results'], dict, {}).get('test_acc'))}</p>"
                      f"{picture(e['curves'], 'curves of ' + e['name'])}</div>" for e in r["runs"])
    return f"""<h1>convbn sweep report: {esc(r['title'])}</h1>
<p class=sub>{len(r['runs'])} runs; swept: {esc(', '.join(keys) or '-')}; {r['seeds']} seed(s) each</p>
<h2>Summary</h2>
{said}
{picture(r['pictures'].get('summary'), 'sweep summary')}
{rows_table(head, rows, numeric=range(len(keys), len(head)))}
<h2>Every run</h2>
<div class=runs>
{cards}
</div>
"""


def _moving(row) -> str:
    """The best epochs' validation with the moving statistics, only where it differs from the final models'."""
    moving, shown = finite(row.get("val_acc_moving_mean")), finite(row.get("val_acc_mean"))
    if moving is None or shown is not None and abs(moving - shown) < 5e-5:
        return ""
    return _mean(row, "val_acc_moving", pct)


def _mean(row, key, fmt) -> str:
    mean, std = finite(row.get(f"{key}_mean")), finite(row.get(f"{key}_std"))
    if mean is None:
        return "-"
    return fmt(mean) + (f" ± {fmt(std)}" if std else "")
