"""No collapse under the loop guard: APM means at default sliders, the steered default (its answers from the
session-45 headline sweep, served with every default on) against the base model served the same way now.

    python benchmarks/results/loop-guard/no_collapse_guarded.py URL APM_DIR OUT.json   (the base served as README.md here says)
"""

import asyncio
import gzip
import json
import sys

from steerserve.benchmarks.no_collapse import default_slider_quality
from steerserve.benchmarks.steerability import measured
from steerserve.attributes import ATTRIBUTE_DEFAULTS
from steerserve.clients.client import AsyncSteerClient

url, apm, out = sys.argv[1:4]
headline = json.load(gzip.open("benchmarks/results/loop-guard/steerability-headline-s45.json.gz"))
steered = headline["variants"]["steered:bf16 (vllm)"]
prompts = steered["prompts"]


async def base_answers() -> list[dict]:
    limit = asyncio.Semaphore(24)

    async def one(client: AsyncSteerClient, i: int) -> dict:
        async with limit:
            reply = await client.chat("smollm2-135m-instruct:bf16", prompts[i], attributes=dict(ATTRIBUTE_DEFAULTS),
                                      max_tokens=steered["max_tokens"], temperature=0.0)
        return {"slider": "verbosity", "level": ATTRIBUTE_DEFAULTS["verbosity"], "prompt": i,
                **measured({"text": reply.choices[0].message.content, "tokens": reply.usage.completion_tokens,
                            "finish_reason": reply.choices[0].finish_reason})}

    async with AsyncSteerClient(url, timeout=3600) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(len(prompts)))))


base = asyncio.run(base_answers())
result = {"base": {"answers": base, "default_slider_apm": default_slider_quality(apm, prompts, base)},
          "steered": {"default_slider_apm": default_slider_quality(apm, prompts, steered["answers"])}}
for name in ("base", "steered"):
    print(name, {k: round(v, 3) for k, v in result[name]["default_slider_apm"].items()})
print("base at cap", sum(a["finish_reason"] == "length" for a in base), "of", len(base))
json.dump(result, open(out, "w"), indent=1)
