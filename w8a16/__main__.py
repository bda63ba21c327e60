"""``python -m w8a16 ...``: see `w8a16.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
