"""gRPC: the Open Inference Protocol's messages (oip.proto), its RPCs and health service."""
