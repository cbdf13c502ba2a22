"""Fine-tuning runs unchanged under torchrun (DDP): ranks keep identical masks and codebooks."""

import os
import subprocess
import sys
from pathlib import Path


def test_torchrun_two_ranks_keep_masks_and_codebooks_in_sync(data_root, tmp_path):
    out = tmp_path / "result.txt"
    script = Path(__file__).parent / "scripts" / "ddp_finetune.py"
    _torchrun(script, data_root, out)
    assert out.read_text() == "ok"


def test_torchrun_run_resumes_on_every_rank_from_rank_0s_checkpoint(tmp_path):
    out = tmp_path / "result.txt"
    script = Path(__file__).parent / "scripts" / "ddp_resume.py"
    _torchrun(script, out)
    assert out.read_text() == "ok"


def test_torchrun_calibration_and_distillation_keep_ranks_in_sync(tmp_path):
    out = tmp_path / "result.txt"
    script = Path(__file__).parent / "scripts" / "ddp_distill.py"
    _torchrun(script, out)
    assert out.read_text() == "ok"


def _torchrun(script: Path, *args: object) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
