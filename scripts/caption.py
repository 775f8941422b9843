"""`python scripts/caption.py ARGS` is `mm caption ARGS` (mm/batch.py): for a checkout without the console
script. `python scripts/caption.py --help` lists the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
