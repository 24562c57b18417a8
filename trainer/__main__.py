"""`python -m trainer --run-id N`: the command the server's job runner starts for each run."""

import sys

from trainer.cli import main

sys.exit(main())
