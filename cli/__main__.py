"""`python -m cli ...` runs `ckl ...`."""

import sys

from cli.main import main

sys.exit(main())
