"""The HTTP API: dependencies, schemas, middleware, validation, and one router per resource in `routes/`."""
