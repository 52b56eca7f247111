"""Decoding in worker processes, each image under a memory limit and a time limit.

Pillow's decoders run in C and in pure Python; neither can be interrupted, and a crafted file can
make them allocate gigabytes or run for minutes. In a process of its own a decoder can be bounded
(`RLIMIT_AS`, where the kernel enforces it: Linux) and stopped (killed), and its memory comes back
when the process goes. `pool` drives the workers from the event loop (one pool per server,
decoding for every model: each image comes with its model's preprocessing), `turns` orders the
images waiting for one, `launcher` starts them (forked from a process that has Pillow imported
already, so replacing a killed worker costs a fork, not an interpreter start), `worker` is a
worker's life, and `shared_file` and `messages` are what passes between the server and a worker.
"""
