"""The validator: integrity, exit code, outputs, archive safety, app checks and quorum."""
