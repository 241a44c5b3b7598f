"""Durable jobs: every image request and prediction is a row that workers claim, run and finish.

- spec.py: an ImageJob as JSON in the record, and back
- journal.py: upstream tasks committed before the gateway waits on them (resume, never resubmit)
- runner.py: runs one claimed job to its end (route, store, record, notify)
- worker.py: claim loops with leases, cancel, and the in-process completion signal
"""
