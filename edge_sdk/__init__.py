"""Device side of hsplitlora: runtimes, profiler and the client loop (being built; see the issues)."""
