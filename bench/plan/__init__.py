"""Planning a run: a suite (TOML) validated into a ``Suite``, then expanded into fits and cells.

suite.py    the suite schema: parse, validate, narrow by command-line filters
keys.py     validation helpers that name the offending key path
configs.py  model overrides and training settings checked against the real config types
fits.py     ``prepare``: a ``Suite`` -> a ``Plan`` of fits (one trained model each) and their cells
choices.py  ``choose``: the one named-choice lookup ("unknown X 'y'; choices: ...")

Everything that can be wrong with a run's input is found here, before a run directory exists.
"""
