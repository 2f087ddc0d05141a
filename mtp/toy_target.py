"""Deprecated alias: the toy target moved to :mod:`mtp.demo.toy_target` (it is demo code, not
the library); this name keeps working for one release."""

from .demo.toy_target import ToyTarget, matching_mtp

__all__ = ["ToyTarget", "matching_mtp"]
