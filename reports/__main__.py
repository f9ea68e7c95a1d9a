"""`python -m reports DIR ...`: the report command on its own (the same as `python -m bench report`)."""
import argparse
import sys

from reports.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m reports",
                                 description="Tables, plots and an HTML report from run directories.")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
