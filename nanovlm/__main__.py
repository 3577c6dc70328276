"""`python -m nanovlm ...` and `torchrun -m nanovlm train ...`."""

import sys

from nanovlm.cli import main

sys.exit(main())
