"""Running a plan: one task per fit on an executor; the driver alone writes the results store.

execute.py     ``execute``: a task per pending fit, run on an executor, each cell's rows written as they come
fit_task.py    one fit as a unit of work: train (or load), evaluate its pending cells, yield each cell's rows
executors/     where fits run: serial (this process), process (a worker pool), ray (Ray tasks, the [ray] extra)
threads.py     workers x torch threads within the cores; threads set explicitly in every worker
reuse.py       a log_marginal cell takes the rows of the iwae cell with the same draws
evaluate.py    one estimator cell: batches, means and standard errors, failures as rows, timing rows
evaluators.py  the estimator table a suite names (what each measures, its parameters)
rows.py        the row builder of one fit (``ResultRow`` of reports.schema)
timing.py      throughput and peak memory of one call, on CPU or CUDA
device.py      the one device resolution, device names, per-device housekeeping
"""
