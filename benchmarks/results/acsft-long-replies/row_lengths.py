"""Token length of AC-SFT's examples per verbosity label, and the share past a max_length (cut in training).

    python benchmarks/results/acsft-long-replies/row_lengths.py runs/steered-default/annotate/annotations.jsonl
"""
import statistics
import sys

from steerserve.default_model import CACHE_DIR, default_model_dir
from steerserve.prompts import SteeringMethod
from steerserve.training.acsft import conditioned_example
from steerserve.training.data.attribute_rows import load_attribute_rows, levels
from steerserve.training.runner import load_tokenizer

source = sys.argv[1]
rows, report = load_attribute_rows(source, "helpsteer")
tok = load_tokenizer(str(default_model_dir(CACHE_DIR)))
by = {}
for row in rows:
    ex = conditioned_example(row, SteeringMethod.DESCRIBED, tok)
    p = len(tok(ex["prompt"]).input_ids); c = len(tok(ex["completion"]).input_ids)
    by.setdefault(levels(row).get("verbosity"), []).append((p, c))
print(source, len(rows), "rows; skipped:", report)
for level in sorted(by, key=lambda x: (x is None, x)):
    xs = by[level]; tot = [p + c for p, c in xs]
    q = statistics.quantiles([c for _, c in xs], n=10)
    print(f"verbosity {level}: n={len(xs)} reply median {statistics.median(c for _, c in xs):.0f} p90 {q[-1]:.0f}"
          f" | total>448 {sum(t > 448 for t in tot) / len(xs):.0%} >768 {sum(t > 768 for t in tot) / len(xs):.0%}")
