"""The data bridge: volunteers' upload-only quarantine."""
