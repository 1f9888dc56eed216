"""Benchmarks of quotad. They start their own servers on loopback and print figures."""
