"""assimilator"""
