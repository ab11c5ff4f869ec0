#!/usr/bin/env python3
"""Adds fields to each JSON line on stdin and prints it (the benchmark scripts tag their raw
output with the run, the round or the setting it was measured under).
Usage: tag_lines.py KEY=VALUE ...   (a VALUE that parses as JSON, e.g. a number, is kept as such)"""
import json
import sys


def value(v):
    try:
        return json.loads(v)
    except ValueError:
        return v


def main():
    fields = {k: value(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
    for line in sys.stdin:
        if line.strip():
            print(json.dumps({**json.loads(line), **fields}), flush=True)


if __name__ == "__main__":
    main()
