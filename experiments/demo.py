"""Deprecated alias of `python -m experiments.tasks.demo`, kept for one release.

`python -m experiments.demo [flags]` still works: it says where the task moved (on stderr) and
runs `experiments.tasks.demo.main` with the same flags.
"""

import sys

from experiments.tasks.demo import main

if __name__ == "__main__":
    print("DeprecationWarning: `python -m experiments.demo` is now `python -m experiments.tasks.demo`;"
          " this alias will be removed in the next release.", file=sys.stderr)
    main()
