"""The runtime: onnxruntime sessions, providers and their options, IO binding, decoding workers."""
