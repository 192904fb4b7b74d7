"""One router per resource: jobs, metrics (and the event stream), system, chat."""
