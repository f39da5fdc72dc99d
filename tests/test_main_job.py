"""The README's main command, as written, on the real embedded models (slow: about 3 minutes with the
models cached in ~/.cache/specorch, plus 3-5 minutes to download and convert them the first time)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python launch.py --cluster cluster_configs/local.yaml"


@pytest.mark.slow
def test_readme_main_command_runs_and_ends_with_the_table():
    readme = (ROOT / "README.md").read_text()
    assert f"bash scripts/setup.sh && {COMMAND}\n" in readme, "the README's main command changed: update this test"
    run = subprocess.run(COMMAND, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    out = run.stdout
    assert run.returncode == 0, f"exit {run.returncode}\n{out[-4000:]}\n{run.stderr[-4000:]}"
    assert "Ray actors stopped" in out
    tail = out[out.rindex("main job (local"):]                 # the final table is the last thing printed
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in tail.splitlines()
            if line.startswith("| ") and not line.startswith("| strategy")]
    cfg = load_config(ROOT / "cluster_configs/local.yaml")
    assert [r[0] for r in rows] == ["plain"] + [s.name for s in cfg.strategies if s.name in cfg.main_job.strategies]
    for name, tps, speedup, accepted, equal in rows:
        assert float(tps) > 0 and speedup.endswith("x"), name
        # Plain decoding scores exactly 1.00; a strategy whose drafter failed falls back to target-only
        # decoding, which also scores 1.00 (and still equals plain): the drafters' drafts must be kept.
        assert float(accepted) == 1.0 if name == "plain" else float(accepted) > 1.0, (name, accepted)
        m = re.fullmatch(r"(\d+)/(\d+)(?: \+ (\d+) bf16 near-ties?)?", equal)
        assert m, f"{name}: outputs neither equal to plain decoding nor reported as bf16 near-ties: {equal!r}"
        same, total, ties = int(m[1]), int(m[2]), int(m[3] or 0)
        assert same + ties == total, f"{name}: {equal}"
    assert rows[0][2] == "1.00x" and rows[0][4] == "3/3"
    assert "MISMATCH" not in tail
    print(tail)                 # shown with -rA
