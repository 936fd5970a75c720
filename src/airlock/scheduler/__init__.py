"""The scheduler: matches tasks to hosts, leases them with deadlines, replicates and reissues."""
