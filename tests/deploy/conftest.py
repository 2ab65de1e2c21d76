import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def up_module():
    """deploy/up.py, the `make up` supervisor (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_up", ROOT / "deploy" / "up.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy_up"] = module
    spec.loader.exec_module(module)
    return module
