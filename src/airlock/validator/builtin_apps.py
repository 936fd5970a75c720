"""Apps that ship with Airlock: importing this module registers them."""

from airlock.demo.lbmc_validator import LbmcValidator
from airlock.validator.apps import register

register(LbmcValidator())
