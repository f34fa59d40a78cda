"""`recsys-train` and `python -m recsys.train`: the command line (`recsys.cli`)."""

import sys

from recsys.cli import main

if __name__ == "__main__":
    sys.exit(main())
