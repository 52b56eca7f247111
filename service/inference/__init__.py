"""The data plane every front calls, and below it: the registry of served models, the
repository's control, loading versions, one version's pipeline, batching."""
