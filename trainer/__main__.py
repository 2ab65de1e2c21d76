"""`python -m trainer` and `torchrun -m trainer fit`."""

from trainer.cli import main

main()
