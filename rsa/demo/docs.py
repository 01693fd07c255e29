"""Regenerate the demo's tables and figure in README.md and docs/demo.md from a run's report.json.

    python -m rsa.demo.docs out/demo                                  # print the blocks
    python -m rsa.demo.docs out/demo --compare out/demo-native --write

Each block sits between ``<!-- demo:NAME -->`` and ``<!-- /demo:NAME -->`` lines and is replaced
whole; ``--write`` also draws the run's frontier figure (from report.json, with this code) to
docs/img/demo-frontier.png. ``--compare``
adds the side-by-side outcomes of a second run of the same settings (`rsa demo --native-isa`,
another CPU) and says whether the outcomes and the verdict agree.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .report import AXIS_NAMES, METRIC_NAMES, _layout, anchors, matched_table, plot_frontier, summary_text

FIGURE = Path("docs/img/demo-frontier.png")
# the README shows the verdict and the run; the tables live in docs/demo.md (its summary block)
TARGETS = {"README.md": ("verdict", "run"), "docs/demo.md": ("run", "summary", "cpu-check")}


def load(out: Path) -> dict:
    path = Path(out) / "report.json"
    if not path.is_file():
        raise ValueError(f"out: no report.json in {str(out)!r} (run `rsa demo --out {out}` first)")
    return json.loads(path.read_text())


def verdict_line(rep: dict) -> str:
    """The verdict's lines: at matched KL to SFT (issue 32), then at matched helpfulness (the last)."""
    return "\n".join(line for line in rep["verdict"].splitlines() if line.startswith("Verdict"))


def run_line(rep: dict) -> str:
    s, isa = rep["settings"], rep.get("isa")
    how = "" if isa is None else (f" (capped on an {isa['cpu']} CPU)" if isa["cap"] else f" ({isa['cpu']} CPU, no cap)")
    return (f"{s['seeds']} seeds, {rep.get('workers', 1)} worker processes, CPU capability "
            f"{rep.get('cpu_capability', '?')}{how}: {rep['elapsed_s']:.0f} s wall, {rep['cpu_s']:.0f} s of CPU")


def _cell(e: dict) -> str:
    scale = 100 if e is not None and e.get("_metric") == "catastrophic_rate" else 1
    if e["diff_mean"] is None:
        return e["outcome"]
    ci = "" if e["ci95"] is None else f" [{scale * e['ci95'][0]:+.2f}, {scale * e['ci95'][1]:+.2f}]"
    return f"{e['outcome']}: {scale * e['diff_mean']:+.2f}{ci}"


def _probe_rows(a: dict, b: dict, section: str, name) -> list[tuple]:
    """(name(key), group, run a's cell, run b's cell, "yes" | "NO") for every probe outcome of
    report.json's mechanism[section] ({key: {group: outcome entry}})."""
    rows = []
    for key, groups in a.get("mechanism", {}).get(section, {}).items():
        for group, ea in groups.items():
            eb = b["mechanism"][section][key][group]
            rows.append((name(key), group, _cell(ea), _cell(eb), "yes" if ea["outcome"] == eb["outcome"] else "NO"))
    return rows


def compare(a: dict, b: dict, names=("run A", "run B")) -> tuple[str, bool]:
    """The outcomes of two runs side by side, the matched comparisons' and the probe's; (tables,
    whether every outcome and the verdict agree)."""
    rows = [("matched at", "family", "metric", *names, "same outcome")]
    same = True
    for axis, families in a["matched"].items():
        for family, metrics in families.items():
            for metric, ea in metrics.items():
                eb = b["matched"][axis][family][metric]
                agree = ea["outcome"] == eb["outcome"]
                same &= agree
                label = METRIC_NAMES[metric] + (" %" if metric == "catastrophic_rate" else "")
                rows.append((AXIS_NAMES[axis].split(" (")[0], family, label, _cell({**ea, "_metric": metric}),
                             _cell({**eb, "_metric": metric}), "yes" if agree else "NO"))
    probe = [("probe: rsa (DPO->S) - sacpo (H->S)", "group", *names, "same outcome")]
    probe += _probe_rows(a, b, "rsa_dpo_minus_sacpo", lambda setting: f"beta / lambda {setting}")
    kl_probe = [("probe at matched KL", "group", *names, "same outcome")]
    kl_probe += _probe_rows(a, b, "matched_kl", lambda family: family)
    same &= all(r[-1] == "yes" for r in probe[1:] + kl_probe[1:])
    verdict_same = verdict_line(a) == verdict_line(b)
    text = _layout(rows) + ("\n\n" + _layout(probe) if len(probe) > 1 else "")
    text += "\n\n" + _layout(kl_probe) if len(kl_probe) > 1 else ""
    text += "\n\nverdict: " + ("the same" if verdict_same else "DIFFERENT")
    if not verdict_same:
        text += f"\n  {names[0]}: {verdict_line(a)}\n  {names[1]}: {verdict_line(b)}"
    return text, same and verdict_same


def blocks(rep: dict, other: dict | None = None, names=("capped at AVX2", "--native-isa")) -> dict:
    out = {"matched": matched_table(rep["matched"]), "verdict": verdict_line(rep), "run": run_line(rep),
           "summary": summary_text(rep)}
    if other is not None:
        table, agree = compare(rep, other, names)
        out["cpu-check"] = (f"{names[0]}: {run_line(rep)}\n{names[1]}: {run_line(other)}\n\n{table}\n"
                            f"outcomes and verdict {'agree' if agree else 'DISAGREE'}")
    return out


def replace_block(text: str, name: str, body: str) -> str:
    """Replace what lies between the block's markers by ``body`` in a fenced code block."""
    pattern = re.compile(rf"(<!-- demo:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /demo:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- demo:{name} --> ... <!-- /demo:{name} --> block to replace")
    return pattern.sub(lambda m: m.group(1) + "```\n" + body.rstrip("\n") + "\n```\n" + m.group(2), text, count=1)


def write(root: Path, rep: dict, found: dict) -> list[Path]:
    """Rewrite the blocks of README.md and docs/demo.md under ``root`` and draw the figure."""
    written = []
    for rel, names in TARGETS.items():
        path = Path(root) / rel
        text = path.read_text()
        for name in names:
            if name in found:
                text = replace_block(text, name, found[name])
        path.write_text(text)
        written.append(path)
    plot_frontier(None, rep["frontier"], anchors(rep["models"]), path=Path(root) / FIGURE)
    return written + [Path(root) / FIGURE]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsa.demo.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder of the run the docs show (its report.json)")
    parser.add_argument("--compare", metavar="OTHER", help="a second run of the same settings, for the CPU check")
    parser.add_argument("--write", action="store_true", help="rewrite README.md, docs/demo.md and the figure")
    parser.add_argument("--root", default=".", help="the repository (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        rep = load(args.out)
        other = load(args.compare) if args.compare else None
        if other is not None and other["settings"] != rep["settings"]:
            raise ValueError("--compare: the two runs were made with different settings")
        found = blocks(rep, other)
        if args.write:
            for path in write(Path(args.root), rep, found):
                print(f"wrote {path}")
        else:
            for name, body in found.items():
                print(f"<!-- demo:{name} -->\n{body}\n")
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
