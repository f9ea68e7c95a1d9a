"""Running a plan: cells executed against a results store, one estimator evaluation at a time.

execute.py     ``execute``: every pending fit trained (or loaded), then its cells evaluated and written
evaluate.py    one estimator cell: batches, means and standard errors, failures as rows, timing rows
evaluators.py  the estimator table a suite names (what each measures, its parameters)
rows.py        the row builder of one fit (``ResultRow`` of reports.schema)
timing.py      throughput and peak memory of one call, on CPU or CUDA
device.py      the one device resolution, device names, per-device housekeeping
"""
