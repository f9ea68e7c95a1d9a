"""The runner: `python -m bench ...`."""
