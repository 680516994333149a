"""`python -m modformer ...` (and `torchrun ... -m modformer train ...`) run the CLI."""

import sys

from modformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
