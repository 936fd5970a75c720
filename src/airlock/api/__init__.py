"""The HTTP layer: thin routers over the components' plain functions."""
