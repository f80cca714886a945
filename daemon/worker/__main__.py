"""`python -m llm_residentd.worker --fd N`: the worker process (engine.py)."""

import sys

from .engine import main

sys.exit(main())
