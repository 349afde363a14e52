"""`import poptorch` for a worker subprocess: with this directory on PYTHONPATH, the import gets the test
double tests/fake_poptorch.py itself (the very module object, so its state is one), configured from
FAKE_POPTORCH_IPUS and FAKE_POPTORCH_LOG (see its docstring). Used by tests/test_ipu_worker.py."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests import fake_poptorch  # noqa: E402

fake_poptorch.configure_from_env()
sys.modules[__name__] = fake_poptorch  # the import statement returns the module found here
