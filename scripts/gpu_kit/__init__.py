"""The GPU kit (issue 18): one call on a bare, offline GPU machine gives the GPU figures and runs the GPU tests.

    scripts/gpu-wheels                                  # where pip reaches the registry: the wheels the target lacks
    scripts/gpu-check --dry-run                         # anywhere (CI): every import the GPU run needs is provided
    scripts/gpu-check --wheels gpu-wheels --out DIR     # on the GPU machine: install, pytest -m gpu, bench, table

The target (`TARGET_PACKAGES`): x86-64 Linux, one NVIDIA GPU, a Python 3.12 with torch (CUDA), transformers,
peft, accelerate, numpy, pandas, pyarrow, safetensors, tokenizers and what they require; no network; the
repository plus at most 64 MiB of carried files; one command of at most 10 minutes. What the GPU run imports
beyond that travels as wheels (`WHEELHOUSE`, pinned by constraints.txt) in a git-ignored folder, with the GPT-2
tokenizer and the HH-RLHF sample from the shared directory (`SHARED_FILES`) packed beside them, since only the
repository and carried paths reach the machine.

`check` (the GPU run) works in phases against one deadline (`--budget-s`, 9 minutes by default) and rewrites
`gpu-check.json` and `gpu-check.txt` in the output folder as each part ends, so a run cut short still returns what
it measured (with `gpu-check.log`, `pytest.log` and `bench.log`: five files in all):
1. setup: install the carried wheels the machine lacks (without network, into the machine's Python, else into a
   folder on PYTHONPATH), unpack the shared files (`EDGERLHF_SHARED_DIR`), import everything the run needs, and
   cap the bench at 8 GiB per process: `PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:F` (no code change;
   every process reads it), or, where torch ignores that key, a `sitecustomize` that calls
   `torch.cuda.set_per_process_memory_fraction` when CUDA starts; either is kept only once an allocation 1 GiB
   over the cap has failed;
2. `pytest -m gpu tests/gpu` (the tests record their figures through `EDGERLHF_GPU_RECORD`), while a process
   kept off the GPU builds the bench's synthetic run directories (the presets' published shapes with random
   weights: for the 1.7B model, the slow part of `edgerlhf bench`);
3. `edgerlhf bench`'s stages on `distilgpt2-8gb` at its full configuration, each in a fresh process as the bench
   runs them (`edgerlhf.lab.bench.run_stage_process`), alone on the GPU;
4. the same for the other presets with a published shape (side by side: their peaks are per process, their
   times upper bounds);
5. one table: peaks against the 1 GB target and the floor, PPO one copy / naive / TRL RLOO, the reward
   precision study, the planner against `torch.cuda.max_memory_allocated`, the cancelled job's GPU memory,
   the chat endpoint.
`--skip-tests` / `--skip-bench` rerun one half.

One module per job, each above what it reads, all standard library only, so the kit runs on the target before
anything is installed:

    target.py    what the target has and what travels (`TARGET_PACKAGES`, `WHEELHOUSE`, `SHARED_FILES`, the budget)
    scan.py      the dry run: the GPU run's imports, read from the code, against those lists; the wheelhouse check
    wheels.py    `scripts/gpu-wheels`: download the wheelhouse and pack the shared files
    table.py     phase 5: the figures as a table
    check.py     phases 1-4: the run on the GPU machine
    rehearse.py  `scripts/gpu-rehearse`: the GPU machine's Python on a CPU machine
    cli.py       the command lines the scripts call; `python scripts/gpu_kit <command>` (`__main__.py`) reaches them
"""
