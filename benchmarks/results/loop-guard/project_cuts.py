"""Where the loop guard would have ended the stored greedy answers of earlier sweeps (unguarded servers).

Greedy decoding is the same up to the step the guard acts, so a guarded answer is the stored one cut where the
guard first sees a loop (the text tokenized again with the default model's tokenizer). Prints, per variant and
slider, the means before and after the cut and how many answers it cuts among those that ended on their own and
those cut at the token cap.

    python benchmarks/results/loop-guard/project_cuts.py RESULT.json[.gz] ...
"""

import gzip
import json
import statistics
import sys
from pathlib import Path

from transformers import AutoTokenizer

from steerserve.default_model import CACHE_DIR, default_model_dir
from steerserve.loop_guard import DEFAULT_LOOP_REPEATS, LoopWatch
from steerserve.measures import fk_grade

tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir(Path(CACHE_DIR).expanduser())))


def guarded(text: str) -> tuple[str, bool]:
    """The answer as the guard would have ended it, and whether it did."""
    ids, watch = tokenizer.encode(text, add_special_tokens=False), LoopWatch(DEFAULT_LOOP_REPEATS)
    for n in range(1, len(ids) + 1):
        if watch.feed(ids[:n]):
            return tokenizer.decode(ids[:n]), True
    return text, False


def means(values: list[float | None]) -> float:
    return statistics.mean(v for v in values if v is not None and v == v)


totals, seen = {"stop": [0, 0], "length": [0, 0]}, set()
for path in sys.argv[1:]:
    result = json.load(gzip.open(path) if path.endswith(".gz") else open(path))
    for label, variant in result["variants"].items():
        for slider, measure in (("verbosity", len), ("complexity", fk_grade)):
            answers = [a for a in variant["answers"] if a["slider"] == slider]
            if not answers or (label, slider) in seen:  # a joined result repeats the rows it was joined with
                continue
            seen.add((label, slider))
            cuts = [guarded(a["text"]) for a in answers]
            for answer, (_, cut) in zip(answers, cuts):
                totals[answer["finish_reason"]][cut] += 1
            before = [means([a["chars" if slider == "verbosity" else "fkgl"] for a in answers if a["level"] == lvl])
                      for lvl in range(5)]
            after = [means([measure(t) for a, (t, _) in zip(answers, cuts) if a["level"] == lvl]) for lvl in range(5)]
            shown = " ".join(f"{v:.1f}" for v in before), " ".join(f"{v:.1f}" for v in after)
            print(f"{label} | {slider} | {shown[0]} | {shown[1]} | {sum(c for _, c in cuts)} of {len(answers)}")
for reason, (kept, cut) in totals.items():
    print(f"finish_reason {reason}: {cut} of {kept + cut} answers cut ({cut / max(kept + cut, 1):.0%})")
