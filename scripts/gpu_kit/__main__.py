"""`python scripts/gpu_kit check|dry-run|wheels|rehearse|prepare ...`: how the kit starts itself in another process
(the `prepare` child beside the GPU tests, `check` in the rehearsal's Python, the dry run in the project's Python);
`python -m gpu_kit ...` with scripts/ on the path does the same."""

import os
import sys

if not __package__:  # run as a folder: import the package from its parent, not its modules as top-level ones
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from gpu_kit.cli import main  # noqa: E402

sys.exit(main())
