"""Make the repository's top-level modules (model, palora, tasks, ...) importable from the tests, however
pytest is started."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
