"""What the tests and the benchmarks share: a real server on loopback, files made to be
expensive to decode, and a watch on a server while it is attacked."""
