"""Test-time helpers shared by the test suites and benchmarks (never imported by training code)."""
