# The steered default model: every checkpoint behind `steerserve serve`'s default sliders, reproduced from
# ../shared/data with the project's own recipes. Times are for 2 CPU cores (see README, "Steered default").
#   make steered-default          # apm -> bootstrap -> annotate -> acsft, dpo (robust + sigmoid), mcq; then package
#   make steered-default RUNS=/data/runs   # somewhere else
# Each step is a `steerserve train` run: atomic, resumable (rerun after an interruption), never overwritten.

RUNS ?= runs/steered-default
TRAIN = steerserve train
RECIPES = training/recipes
SHIPPED = models/steered-default

.PHONY: steered-default dpo package-steered-default steered-precisions clean-steered-default

steered-default: $(RUNS)/acsft/manifest.json dpo $(RUNS)/mcq/manifest.json
	$(MAKE) package-steered-default RUNS=$(RUNS)

$(RUNS)/apm/manifest.json:
	$(TRAIN) apm --config $(RECIPES)/apm-default.yaml --output $(RUNS)/apm

$(RUNS)/bootstrap/manifest.json:
	$(TRAIN) bootstrap --config $(RECIPES)/bootstrap-default.yaml --output $(RUNS)/bootstrap

$(RUNS)/annotate/manifest.json: $(RUNS)/apm/manifest.json $(RUNS)/bootstrap/manifest.json
	$(TRAIN) annotate --config $(RECIPES)/annotate-default.yaml --output $(RUNS)/annotate \
	    --set model=$(RUNS)/apm --set data=$(RUNS)/bootstrap/samples.jsonl

$(RUNS)/acsft/manifest.json: $(RUNS)/annotate/manifest.json
	$(TRAIN) acsft --config $(RECIPES)/acsft-default.yaml --output $(RUNS)/acsft \
	    --set data=$(RUNS)/annotate/annotations.jsonl

# QLoRA: the same AC-SFT trained as an adapter on the default model's nf4 checkpoint (`default:nf4`: built once
# into the steerserve cache by `steerserve quantize default --precision nf4`, GPTQ-rounded, ~2.5 min), to be
# served unmerged on that same checkpoint, where the float adapter merged and then quantized to nf4 loses the
# verbosity slider. Packaged, it is served as steered-qlora:nf4 on smollm2-135m-instruct:nf4 (--model default:nf4);
# steered:nf4 is the float adapter merged and quantized in act order, which keeps more of the slider.
$(RUNS)/acsft-nf4/manifest.json: $(RUNS)/annotate/manifest.json
	$(TRAIN) acsft --config $(RECIPES)/acsft-default.yaml --output $(RUNS)/acsft-nf4 \
	    --set data=$(RUNS)/annotate/annotations.jsonl --set model=default:nf4 --set lora_base_precision=nf4

# DPO: one epoch on every preference pair (686 steps), about 6.5 hours a run on 2 CPU cores and 4 min on one
# H200 GPU, where the shipped dpo-robust and dpo-sigmoid adapters were trained. Both losses take DPO_SETTINGS, so
# a recipe change is trained and shipped as a pair, e.g. whole replies with an NLL term (586 steps, 11-13 s a step
# on 2 Intel cores with AMX, 15 s on 2 AMD cores without: 2-2.5 hours a run; benchmarks/results/dpo-held-out/):
#   make dpo RUNS=runs/dpo-whole-nll DPO_SETTINGS="--set whole_replies=true --set sft_weight=0.2"
#   make package-steered-default RUNS=runs/dpo-whole-nll    # ships the two DPO adapters, skips the runs not there
DPO_SETTINGS ?=
dpo: $(RUNS)/dpo-robust/manifest.json $(RUNS)/dpo-sigmoid/manifest.json

$(RUNS)/dpo-robust/manifest.json:
	$(TRAIN) dpo --config $(RECIPES)/dpo-default.yaml --output $(RUNS)/dpo-robust $(DPO_SETTINGS)

$(RUNS)/dpo-sigmoid/manifest.json:
	$(TRAIN) dpo --config $(RECIPES)/dpo-default.yaml --output $(RUNS)/dpo-sigmoid \
	    --set loss_type=sigmoid --set label_smoothing=0 $(DPO_SETTINGS)

$(RUNS)/mcq/manifest.json:
	$(TRAIN) sft --config $(RECIPES)/sft-mcq-default.yaml --output $(RUNS)/mcq

# The LoRA adapters (a few MB each) and their manifests go into the repo; the server applies them to the
# default model (steerserve.steered_default).
package-steered-default:
	python -m steerserve.steered_default package $(RUNS) $(SHIPPED)

# The steered default (AC-SFT) in every precision this CPU makes, then steerability and held-out MCQ per
# precision side by side: quantization must not erase steering. Finished quantizations are skipped; each takes the
# options steered:<precision> is built with (gptq-w4 and w4a16: groups of 32).
# The shipped adapter is merged into the default model first, so no training is needed
# (STEERED_SOURCE=$(RUNS)/acsft quantizes a fresh training run instead). On a CPU without AVX-512, vLLM cannot
# serve gptq-w4 or w4a16: PRECISIONS="bf16 int8 nf4 w8a8 gguf-q8_0 gguf-q4_k_m" (about 25 min of quantizing there).
PRECISIONS ?= bf16 int8 nf4 gptq-w4 w8a8 w4a16 gguf-q8_0 gguf-q4_k_m
BENCH_PROMPTS ?= 80
STEERED_SOURCE ?= $(SHIPPED)/acsft
steered-precisions:
	for p in $(PRECISIONS); do \
	    python -m steerserve.steered_default current $(RUNS)/q/$$p || steerserve quantize $(STEERED_SOURCE) \
	        --precision $$p --output $(RUNS)/q/$$p --eval-chars 8000 --mcq-per-subject 1 \
	        $$(python -m steerserve.steered_default pinned $$p) $$([ -f $(RUNS)/q/$$p/manifest.json ] && echo --force) \
	        || exit 1; \
	done
	steerserve bench steerability $(foreach p,$(PRECISIONS),--variant $(RUNS)/q/$(p)) --num-prompts $(BENCH_PROMPTS) \
	    --answer-tokens 512 --parallel 16 --apm $(RUNS)/apm --output $(RUNS)/bench/steerability-precisions
	steerserve bench mcq $(foreach p,$(PRECISIONS),--variant $(RUNS)/q/$(p)) --mcq-heldout 0.2 \
	    --output $(RUNS)/bench/mcq-precisions

clean-steered-default:
	rm -rf $(RUNS)
