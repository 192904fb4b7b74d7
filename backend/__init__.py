"""The FastAPI backend: enqueues and reads jobs, streams their progress, serves the chat API (`backend.main`)."""
