"""``python -m w8a16.bench``: the benchmark's command-line entry point (the code is `w8a16.course.bench`)."""

import os

from .course.bench import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
