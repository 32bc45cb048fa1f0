"""``python -m bench``: run the benchmark suite (``make bench``, ``make bench-quick``).

    python -m bench --profile full               # bench/results/latest.json, bench/RESULTS.md
    python -m bench --profile quick              # bench/out/quick.json, bench/out/RESULTS-quick.md
    python -m bench --profile smoke --json X     # the test suite's run (< 1 minute)

Exit status: 0 when every workload was measured (goals met or not), 1 when one failed,
2 on bad arguments or an unreachable PostgreSQL.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Benchmark the code of the checkout this bench/ lives in (a git worktree included), not
# whatever `app` the interpreter would find first.
_BACKEND = str(Path(__file__).resolve().parents[1] / "backend")
if _BACKEND not in sys.path:
    sys.path.insert(0, _BACKEND)

from bench.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
