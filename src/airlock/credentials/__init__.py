"""Credentials: volunteer accounts, the token issuer (WLCG-profile JWTs) and revocation on block."""
