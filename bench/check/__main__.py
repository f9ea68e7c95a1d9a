"""`python -m bench.check ...`: the check command on its own (the same as `python -m bench check`)."""
import sys

from .cli import build_parser, main

sys.exit(main(build_parser().parse_args()))
