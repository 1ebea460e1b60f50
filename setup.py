"""The one compiled part: the fast lane's native core (sidecar/_lane.c).

It is optional: where no C compiler is present the install still succeeds and the sidecar uses
the same lane in Python (sidecar/dialects/fastlane.py), with identical accounting.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sidecar._lane", sources=["sidecar/_lane.c"], optional=True)])
