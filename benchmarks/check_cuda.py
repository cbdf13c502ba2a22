"""The whole pretrained-model path on a CUDA device: calibration, pruning, sharing, distillation, file, reload.

Run where a GPU is (the CPU path never needs it): ``python benchmarks/check_cuda.py``.
It compresses all-MiniLM-L6-v2 (the ``[hf]`` extra; ``--model DIR``: another model folder) with a short version of the
built-in ``minilm`` recipe plus a SparseGPT pruning stage, every stage on ``cuda``,
and checks that

- the model's parameters and buffers stayed on the GPU through every stage,
- the folder reloads (dense) and computes what the in-memory model computes,
- fidelity (mean cosine to the original's embeddings on held-out text) is sane,

printing each stage's time. Exit status 0 when every check passes, 1 when one fails,
2 when there is no CUDA device or no ``[hf]`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepshrink.recipes import load_recipe, run_recipe
from deepshrink.recipes.schema import DistillStage, EncodeStage, PruneStage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu runs the same checks there (a smoke test)")
    parser.add_argument("--steps", type=int, default=50, help="distillation steps")
    parser.add_argument("--model", help="a Hugging Face model folder (default: the recipe's, all-MiniLM-L6-v2)")
    args = parser.parse_args()
    kind = torch.device(args.device).type
    if kind == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check", file=sys.stderr)
        return 2
    try:
        from deepshrink import huggingface as hf
    except ImportError as err:
        print(f"{err}: pip install 'deepshrink[hf]'", file=sys.stderr)
        return 2
    recipe = load_recipe("minilm")
    stages = [PruneStage(method="sparsegpt", sparsity={"encoder.*": 0.3}, epochs=0)]
    stages += [dataclasses.replace(s, steps=args.steps) if isinstance(s, DistillStage) else s for s in recipe.stages]
    # float32 codebooks and arrays: the file then holds exactly what the model computes (the recipe's float16
    # rounds them, which moves MiniLM's outputs by about 3e-3)
    stages = [dataclasses.replace(s, codebook_dtype="float32", array_dtype="float32") if isinstance(s, EncodeStage)
              else s for s in stages]  # fmt: skip
    recipe = dataclasses.replace(recipe, stages=stages, pretrained=args.model or recipe.pretrained)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minilm-dsz"
        start = time.perf_counter()
        result = run_recipe(recipe, out=str(out), device=args.device)
        print(f"compressed in {time.perf_counter() - start:.1f} s: {result['bytes']:,} bytes, "
              f"fidelity {result['fidelity']:.4f}")  # fmt: skip
        for row in result["stages"]:
            print(f"  {row['stage']}: fidelity {row['fidelity']:.4f}, {row['seconds']:.1f} s")
        model = result["model"]
        off = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != kind]
        if off:
            failures.append(f"left the {kind} device: {', '.join(off[:5])}")
        if not result["fidelity"] > 0.9:
            failures.append(f"fidelity {result['fidelity']:.4f} <= 0.9")
        reloaded = hf.load_compressed(out)
        reloaded.model.to(args.device)
        texts = ["The train to Berlin was delayed by forty minutes.", "She baked a lemon cake for her grandmother."]
        batch = {k: v.to(args.device) for k, v in reloaded.batches(texts)[0].items()}
        with torch.no_grad():
            a, b = model(**batch)[0], reloaded.model(**batch)[0]
        gap = float((a - b).abs().max())
        print(f"reloaded vs in-memory: largest difference {gap:.2e}")
        if gap > 1e-4:
            failures.append(f"reloaded model differs by {gap:.2e}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
