"""What the tests share, so that no test module imports another: one way to start each process, the tiny budgets,
the expensive trained artifacts, and the helpers that write what a worker would.

- `procs`: the repository root, free ports, waiting for a URL or a condition, stopping a process group, a service's
  environment.
- `backend`: one way to start `edgerlhf backend` (`start_backend`), for every test that needs a real one.
- `workers`: a data directory with its database and real `edgerlhf worker` processes (`Service`), and the cheapest jobs.
- `tiny`: the named tiny budgets, one `tiny_config`, `make_tiny_run` (an untrained run directory in seconds) and the
  ChatML tokenizer of the template tests.
- `trained`: one trained tiny run (data -> sft -> reward x3 -> ppo -> evaluate), built once per test run.
- `service`: a PPO and a GRPO job that real workers ran through a real backend, built once per test run and served
  (the report-contract, Compare and arena tests).
- `db`: the two engines of `db_url`, `sqlite_only`, and a backend app's row counts.
- `runs`: run directories of random tiny models and the job rows that serve them (`make_run_dir`, `make_jobs`), and
  `JobWriter`, which writes what a running job writes with the worker's own queue functions.
- `dashboard`: Streamlit AppTest helpers and API clients that answer fixed bodies.
- `browser`: Debian's Chromium for Playwright, and the `edgerlhf` processes a browser test drives.
- `rawhttp`: HTTP/1.1 written by hand on a socket, for requests no polite client sends.
- `stand_in_hub`: a local Hugging Face hub (model and data set repositories served from directories) for the
  hub-id loading tests, which cannot reach the real one.
- `postgres`: a throw-away PostgreSQL server for the session; `fake_gpus`: a stand-in `nvidia-smi`.

Under pytest-xdist (`-n 2 --dist loadfile`) the two expensive ones, `trained` and `service`, are built once for all
workers (a file lock in the run's common temp dir); everything else is per worker.

Nothing here imports another test module, and the modules the GPU tests import (`procs`, `backend`, `workers`,
`runs`) import nothing the GPU machine lacks (`scripts/gpu_kit/scan.py` follows these imports).
"""
