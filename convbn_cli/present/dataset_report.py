"""`convbn data check`: a dataset's checks (analysis/dataset_checks.py's DataCheck) as text and JSON, and the short
summary `train` prints on a dataset's first use. The check is read by its attributes only: present/ sits below
analysis/ and imports nothing of it."""

from __future__ import annotations

from dataclasses import dataclass

from .reports import plural, table

SHOWN = 5  # examples per finding in the text; --json has every example the check kept
SEVERITY_ORDER = ("error", "warning", "info")


@dataclass
class DataCheckReport:
    check: object  # analysis.dataset_checks.DataCheck

    def to_json(self) -> dict:
        c = self.check
        return {"path": c.root, "format": c.format, "image_shape": list(c.image_shape), "resize": c.resize,
                "content_hash": c.content_hash, "class_names": list(c.class_names), "batch_size": c.batch_size,
                "strict": c.strict, "refused": c.refused, "images": dict(c.sizes),
                "counts": {s: dict(zip(c.class_names, n)) for s, n in c.counts.items()},
                "imbalance": {s: dict(r) for s, r in c.imbalance.items()},
                "severity_counts": c.severity_counts(), "findings": [f.to_json() for f in c.findings]}

    def render(self) -> str:
        c = self.check
        lines = [self.header(), ""] + self.counts_table()
        for severity in SEVERITY_ORDER:
            group = [f for f in c.findings if f.severity == severity]
            if group:
                lines += ["", f"{severity} ({len(group)}):"]
            for f in group:
                lines.append(f"  {f.id}: {f.message}")
                lines += [f"    {e}" for e in f.examples[:SHOWN]]
                if f.count > min(len(f.examples), SHOWN):
                    lines.append(f"    ... and {f.count - min(len(f.examples), SHOWN):,} more")
        return "\n".join(lines + ["", self.verdict()])

    def header(self) -> str:
        c = self.check
        shape = "x".join(map(str, c.image_shape))
        digest = f", content {c.content_hash[:12]}" if c.content_hash else ""
        images = ", ".join(f"{s} {n:,}" for s, n in c.sizes.items())
        return (f"dataset: {c.root} ({c.format}), {sum(c.sizes.values()):,} images ({images}) as {shape} "
                f"(resize: {c.resize}){digest}")

    def counts_table(self) -> list:
        """Images per class (rows) and split (columns), a total row, and each split's largest/smallest ratio."""
        c = self.check
        splits = list(c.counts)
        if not splits:
            return ["no labeled images"]
        rows = [(name, *[f"{c.counts[s][k]:,}" for s in splits], f"{sum(c.counts[s][k] for s in splits):,}")
                for k, name in enumerate(c.class_names)]
        rows.append(("total", *[f"{sum(c.counts[s]):,}" for s in splits],
                     f"{sum(sum(c.counts[s]) for s in splits):,}"))
        lines = table(("class", *splits, "total"), rows, right=tuple(range(1, len(splits) + 2)))
        lines.insert(len(lines) - 1, "-" * len(lines[1]))
        for s, r in c.imbalance.items():
            lines.append(f"{s}: largest/smallest {r['ratio']:.1f}x ('{r['largest']}' {r['largest_images']:,}, "
                         f"'{r['smallest']}' {r['smallest_images']:,})")
        return lines

    def verdict(self) -> str:
        c = self.check
        n = c.severity_counts()
        counts = f"{plural(n['error'], 'error')}, {plural(n['warning'], 'warning')}, {plural(n['info'], 'note')}"
        if c.refused:
            first = next(f for f in c.findings if f.severity == "error")
            return f"verdict: refused ({counts}); first: {first.id}"
        if not n["warning"]:
            return "verdict: no problems found" + (f" ({plural(n['info'], 'note')})" if n["info"] else "")
        first = next(f for f in c.findings if f.severity == "warning")
        return f"verdict: {counts}; first: {first.id}"

    def summary(self) -> str:
        """What `train` prints on a dataset's first use: one line, and one per error or warning."""
        c = self.check
        lines = [f"data check of {c.root}: {self.verdict().removeprefix('verdict: ')}"]
        lines += [f"  {f.severity}: {f.id}: {f.message}" for f in c.findings if f.severity != "info"]
        if any(f.severity != "info" for f in c.findings):
            lines.append(f"  details: convbn data check {c.root}")
        return "\n".join(lines)
