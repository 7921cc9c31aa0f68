"""Reproduce the PAWS paper's Tables 1 and 2: plan (plan.py), run (runner.py), report (report.py).

`paws reproduce table1|table2` (command.py) and `make reproduce-table1` / `make reproduce-table2` drive it; the
published numbers are in paper.py, the GPU-hour estimates in estimate.py, the smoke-scale data in smoke_data.py.
"""
