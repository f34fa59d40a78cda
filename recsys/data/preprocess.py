"""Criteo TSV -> the preprocessed NumPy form that `--data criteo:DIR` reads.

    recsys-preprocess-criteo 'day_*.tsv' /data/criteo_bin --rows 10000000
    recsys-train --data criteo:/data/criteo_bin

Parses every line once (the training run then only memory-maps arrays), hashing each
categorical column to its table size: `--rows` for all, or chosen from the data (twice
the distinct values, capped at `--max-rows`).
"""

from __future__ import annotations

import argparse
import sys

from recsys.data.dataset import ReadOptions, preprocess_criteo
from recsys.data.examples import OnError
from recsys.data.schema import ColumnOptions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="recsys-preprocess-criteo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("inputs", help="TSV files: a path, a glob or a comma-separated list")
    p.add_argument("output", help="directory to write (created if missing)")
    p.add_argument("--rows", type=int, default=None, help="table rows of every categorical column")
    p.add_argument("--max-rows", type=int, default=ColumnOptions().max_rows)
    p.add_argument("--on-error", choices=[e.value for e in OnError], default="raise")
    p.add_argument("--chunk-rows", type=int, default=1 << 18)
    args = p.parse_args(argv)
    options = ReadOptions(
        columns=ColumnOptions(encoding="hash", rows=args.rows, max_rows=args.max_rows),
        on_error=args.on_error,
        chunk_rows=args.chunk_rows,
    )
    schema = preprocess_criteo(args.inputs, args.output, options, progress=lambda m: print(m, flush=True))
    sizes = ", ".join(f"{c.name}={c.rows}" for c in schema.sparse)
    print(f"wrote {args.output}: table rows {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
