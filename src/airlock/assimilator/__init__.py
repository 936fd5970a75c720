"""The assimilator: valid outputs from quarantine to trusted storage, exactly once in effect."""
