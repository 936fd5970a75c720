"""Domain core: states, schemas, checksums and errors shared by every component."""
