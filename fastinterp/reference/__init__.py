"""Straightforward implementations of the reference codes' semantics (SPEC.md), written
plainly, loop for loop, for parity tests and as the baselines the benchmarks time.

They are slow on purpose: clarity over speed. Nothing in fastinterp's fast paths calls them.
"""
