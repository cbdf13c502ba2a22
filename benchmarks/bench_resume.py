"""kill -9 during a LeNet compression, then --resume: how much work is redone, and is the result the same?

A reference run of ``deepshrink compress --recipe RECIPE --out FILE`` goes to the end.
Then each trial runs the same command in a child process, kills it with ``kill -9``
after a random number of optimizer steps, and runs it again with ``--resume`` to the
end. The children count their optimizer steps (a global optimizer hook writes one
byte per step to a pipe), so the work redone is measured, not inferred:
``steps before the kill + steps after the resume - steps of the reference run``.
Reported per trial: those steps, whether the resumed file is byte-identical to the
reference's, and its test error (the file loaded back). The target: at most one
checkpoint interval (``--checkpoint-every``) redone, the error within noise of the
reference.

Usage:
    python benchmarks/bench_resume.py [--recipe lenet-300-100] [--trials 3] [--every 500] [--out-dir results]

Writes ``results/bench_resume.json`` and ``.md``; ``docs/recipes.md`` quotes the figures.
``tests/test_checkpoint.py`` runs one trial of a small digits recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_data_dir, add_output, write_results


def child(report_fd: int, argv: list[str]) -> int:
    """Run the command line, writing one byte to ``report_fd`` after every optimizer step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from deepshrink.cli import main

    register_optimizer_step_post_hook(lambda *_: os.write(report_fd, b"."))
    return main(argv)


def run(argv: list[str], kill_after: int | None = None) -> dict:
    """Run ``deepshrink ARGV`` in a child; with ``kill_after``, kill it with SIGKILL once it has made that many steps.

    Returns:
        ``{"steps", "killed", "seconds", "status"}``.
    """
    read_end, write_end = os.pipe()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same arithmetic in every run
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(write_end), "--", *argv],
        pass_fds=(write_end,), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    steps, killed = 0, False
    while chunk := os.read(read_end, 4096):
        steps += len(chunk)
        if kill_after is not None and steps >= kill_after and not killed:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
    os.close(read_end)
    status = proc.wait()
    error = proc.stderr.read().decode()
    proc.stderr.close()
    if status and not killed:
        raise RuntimeError(f"deepshrink {' '.join(argv)} failed: {error[-2000:]}")
    return {"steps": steps, "killed": killed, "seconds": time.perf_counter() - start, "status": status}


def test_error(path: Path, data: str, data_dir: str | None) -> float:
    """Test error of the model loaded back from ``path``."""
    from deepshrink.compress.train import evaluate
    from deepshrink.data.registry import load_data
    from deepshrink.fileformat.model_io import load

    return 1 - evaluate(load(path), load_data(data, data_dir, "test"), progress=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def trials(recipe: str, folder: Path, n: int, every: int, data: str, data_dir: str | None, seed: int = 0) -> dict:
    """The reference run, then ``n`` kill-and-resume trials at random steps; the figures of each."""
    base = ["compress", "--recipe", recipe, "--checkpoint-every", str(every), "--quiet"]
    base += ["--data-dir", data_dir] if data_dir else []
    reference = folder / "reference.dsz"
    ref = run([*base, "--out", str(reference)])
    result = {"recipe": recipe, "every": every, "reference_steps": ref["steps"], "reference_seconds": ref["seconds"],
              "reference_error": test_error(reference, data, data_dir), "trials": []}  # fmt: skip
    rng = random.Random(seed)
    for i in range(n):
        out = folder / f"trial{i}.dsz"
        kill_after = rng.randrange(1, ref["steps"])
        killed = run([*base, "--out", str(out)], kill_after=kill_after)
        left = sorted(p.name for p in folder.iterdir() if p.name.startswith(out.name))
        resumed = run([*base, "--out", str(out), "--resume"])
        result["trials"].append({
            "killed_after_steps": killed["steps"], "files_after_kill": left, "resumed_steps": resumed["steps"],
            "redone_steps": killed["steps"] + resumed["steps"] - ref["steps"], "identical": digest(out) == digest(reference),
            "error": test_error(out, data, data_dir), "checkpoint_left": (folder / f"{out.name}.ckpt").exists(),
        })  # fmt: skip
        print(result["trials"][-1], flush=True)
    return result


def page(result: dict) -> str:
    lines = [f"# kill -9 during `compress --recipe {result['recipe']}`, then `--resume`", "",
             f"Reference run: {result['reference_steps']:,} optimizer steps, {result['reference_seconds']:.0f} s, "
             f"test error {100 * result['reference_error']:.2f}% (file loaded back). Checkpoint every "
             f"{result['every']} steps and after every step of a stage. Load average {result['load_average']:.1f}.", "",
             "| trial | killed after steps | resumed run's steps | steps redone | file identical | test error |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for i, t in enumerate(result["trials"]):
        lines.append(f"| {i} | {t['killed_after_steps']:,} | {t['resumed_steps']:,} | {t['redone_steps']:,} | "
                     f"{'yes' if t['identical'] else 'no'} | {100 * t['error']:.2f}% |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lenet-300-100")
    parser.add_argument("--data", default="mnist", help="the recipe's data set, for the test error")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--every", type=int, default=500, help="--checkpoint-every")
    parser.add_argument("--seed", type=int, default=0)
    add_data_dir(parser)
    add_output(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = trials(args.recipe, Path(folder), args.trials, args.every, args.data, args.data_dir, args.seed)
    result["load_average"] = os.getloadavg()[0]
    print(page(result))
    write_results(args, "bench_resume", result, page)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":  # internal: python bench_resume.py --child FD -- ARGV
        sys.exit(child(int(sys.argv[2]), sys.argv[4:]))
    main()
