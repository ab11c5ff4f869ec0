#!/usr/bin/env python3
"""Summarises one run of scripts/bench.sh (the lines of results.jsonl tagged with its run id) as
the Markdown tables of BENCHMARKS.md: per variant and implementation, the median over rounds of
each round's median embed / encoder / predict time, their range, the peak RSS, and the ratio to
the official package *within each round* (median and range), so that the VM's drift between
rounds does not enter the ratios.

Usage: bench_summary.py RESULTS.jsonl [RUN_ID]   (default: the last run in the file)
"""
import json
import statistics
import sys
from collections import defaultdict

from sam_builders import VARIANTS


def dur(seconds):
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def dur_range(values):
    return f"{dur(min(values))}-{dur(max(values))}" if len(values) > 1 else dur(values[0])


def main():
    path = sys.argv[1]
    lines = [json.loads(l) for l in open(path) if l.strip()]
    lines = [l for l in lines if "run" in l]
    if not lines:
        sys.exit(f"{path}: no tagged lines (run scripts/bench.sh)")
    run = sys.argv[2] if len(sys.argv) > 2 else lines[-1]["run"]
    lines = [l for l in lines if l["run"] == run]
    print(f"run {run}")
    timing = defaultdict(dict)  # (variant, impl label) -> round -> line
    agreement = []
    for l in lines:
        if "mask_iou_mean" in l:
            agreement.append(l)
            continue
        label = l["impl"] if l["impl"] != "skinsam" else f"skinsam {l['precision']}"
        if l["impl"] == "skinsam" and "cpu_products" in l:
            cp = l["cpu_products"]
            label += f" {cp['setting']}" + (f"={cp['route']}" if cp["setting"] == "auto" else "")
        timing[(l["variant"], label)][l["round"]] = l
    variants = sorted({v for v, _ in timing}, key=VARIANTS.index)
    print()
    print("| variant | implementation | rounds | embed (set_image) median | range | ratio to official, per round: median (range) "
          "| encoder alone median | predict median | ratio | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        official = timing.get((v, "official"), {})
        # The official package first, then the others by name.
        mine = sorted(((label, rounds) for (vv, label), rounds in timing.items() if vv == v), key=lambda x: (x[0] != "official", x[0]))
        for label, rounds in mine:
            embed = [r["embed_ms"] / 1e3 for r in rounds.values()]
            encoder = [r["encoder_ms"] / 1e3 for r in rounds.values()]
            predict = [r["predict_ms"] for r in rounds.values()]
            rss = max(r["peak_rss_mb"] for r in rounds.values())
            if label == "official":
                ratio = pratio = ""
            else:
                er = [rounds[k]["embed_ms"] / official[k]["embed_ms"] for k in rounds if k in official]
                pr = [rounds[k]["predict_ms"] / official[k]["predict_ms"] for k in rounds if k in official]
                ratio = f"{statistics.median(er):.2f}x ({min(er):.2f}-{max(er):.2f})" if er else ""
                pratio = f"{statistics.median(pr):.2f}x ({min(pr):.2f}-{max(pr):.2f})" if pr else ""
            print(f"| {v} | {label} | {len(rounds)} | {dur(statistics.median(embed))} | {dur_range(embed)} | {ratio} "
                  f"| {dur(statistics.median(encoder))} | {statistics.median(predict):.1f} ms | {pratio} | {rss:.0f} MB |")
    if agreement:
        print()
        print("| variant | precision | images | mask IoU with fp32: mean | min | embedding relative error |")
        print("|---|---|---|---|---|---|")
        for a in agreement:
            print(f"| {a['variant']} | {a['precision']} | {a['images']} | {a['mask_iou_mean']:.4f} | {a['mask_iou_min']:.4f} "
                  f"| {a['embedding_rel_err_mean']:.4f} |")


if __name__ == "__main__":
    main()
