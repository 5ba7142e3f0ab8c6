from __future__ import annotations

import sys

from llmflow_hpo.cli import main

sys.exit(main())
