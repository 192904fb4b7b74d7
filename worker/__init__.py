"""The GPU worker: claims jobs from the database and runs each in its own process (`worker.main`, `worker.job`)."""
