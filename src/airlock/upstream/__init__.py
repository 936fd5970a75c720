"""Upstream workload management systems that Airlock pulls jobs from (DIRAC 9.1 via a worker process)."""
