"""Entry stage: `python -m ds4f ...` argv in, ds4f.cli.main's exit status out."""

from __future__ import annotations

import sys

from ds4f.cli import main

sys.exit(main())
