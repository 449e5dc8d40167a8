"""Deprecated alias of `python -m experiments.tasks.sentiment`, kept for one release.

`python -m experiments.sentiment [flags]` still works: it says where the task moved (on stderr) and
runs `experiments.tasks.sentiment.main` with the same flags.
"""

import sys

from experiments.tasks.sentiment import main

if __name__ == "__main__":
    print("DeprecationWarning: `python -m experiments.sentiment` is now `python -m experiments.tasks.sentiment`;"
          " this alias will be removed in the next release.", file=sys.stderr)
    main()
