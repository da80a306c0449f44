"""`python -m ctxsim.cli ...` (also what torchrun launches)."""
from ctxsim.cli.app import main

main()
