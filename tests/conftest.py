"""Shared by every test folder: this file puts tests/ on sys.path, so `servicekit` (the real service as a
subprocess, tiny checkpoints, scrapes) is importable from tests/service, tests/deploy and tests/reliability."""
