"""`python -m lmforge ...` (and `torchrun -m lmforge train ...`) run the `lmforge` command."""
import sys

from .cli import main

sys.exit(main())
