"""The model contract: the file format (metadata), decoding and preprocessing that the service and
the export tools share, so an image is turned into a tensor the same way in training and serving.
It imports nothing from `service` or `model_export`."""
