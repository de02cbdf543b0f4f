"""Run the benchmark suite: ``.venv/bin/python bench/run.py [--quick] [--out FILE]``.

See the README's Performance section for what it starts and what each figure means.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: the repository root, which holds the ``bench`` package, is not on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.main import main  # after the path is set just above

if __name__ == "__main__":
    sys.exit(main())
