"""Make the shared Testinfra helpers importable and their fixtures visible."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from fleet_testing import hostvars  # noqa: F401 -- a fixture, registered by import
