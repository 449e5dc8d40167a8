"""Deprecated alias of `python -m experiments.tasks.addition`, kept for one release.

`python -m experiments.addition [flags]` still works: it says where the task moved (on stderr) and
runs `experiments.tasks.addition.main` with the same flags.
"""

import sys

from experiments.tasks.addition import main

if __name__ == "__main__":
    print("DeprecationWarning: `python -m experiments.addition` is now `python -m experiments.tasks.addition`;"
          " this alias will be removed in the next release.", file=sys.stderr)
    main()
