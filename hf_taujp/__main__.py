"""`python -m hf_taujp demo` / `python -m hf_taujp merge recipe.yaml`."""

import sys

from .cli import main

sys.exit(main())
