"""The HTTP layer: routes, request bodies, response schemas and the pages served to browsers."""
