"""``steerserve load``: an open-loop load generator for steerserve, modelled on ``vllm bench serve``.

    steerserve load --url http://127.0.0.1:8000 --model a:bf16 --model b:bf16 --request-rate 4 --num-prompts 50

``arrivals`` (Poisson/gamma schedule), ``prompts`` (prompt sets), ``runner``
(streamed requests timed from SSE), ``stats`` (percentiles, goodput),
``report`` (JSON + markdown), ``cli`` (flags).
"""
