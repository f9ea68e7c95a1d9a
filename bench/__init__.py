"""The runner: `python -m bench list | run | report | check`, from a suite to a run directory of rows.

cli.py         the command line: every input validated here, one line and exit 2 on bad input
plan/          suite schema and validation -> fits and cells (suites/*.toml beside)
run/           execute a plan: one task per fit on an executor (serial, process, Ray), evaluate each cell,
               the estimator table, rows, timing, threads, device
train/         training loop, checkpoints and resume states, schedules
check/         bound-tightness regression check against a committed baseline
data.py        datasets: embedded, synthetic with exact log p(x), binarized MNIST (digest-checked)
store.py       the run directory: append-only rows, finished cells, resume, its lock (through reports.schema)
provenance.py  the manifest's provenance: commit, versions, device, time
speed.py       `python -m bench.speed`: IWAE throughput against a plain loop and the matmul ceiling
"""
