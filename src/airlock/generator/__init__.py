"""The job generator: takes jobs from upstream, caches their inputs by digest and creates tasks."""
