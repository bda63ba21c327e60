"""``python -m w8a16 ...``: see `w8a16.io.cli`."""

import sys

from .io.cli import main

if __name__ == "__main__":
    sys.exit(main())
