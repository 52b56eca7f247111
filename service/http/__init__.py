"""HTTP: routes (v1, OIP v2, repository), the OIP codec, bodies, response schemas, middleware."""
