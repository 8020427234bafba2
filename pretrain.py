"""Pretrain or continue pretraining a causal language model.

    python pretrain.py CONFIG.yaml [--any_field value ...]

The YAML sets any field of ModelArguments, DataArguments and PretrainingArguments (a
transformers.TrainingArguments); command line flags override it. The run, top to bottom:
arguments -> tokenizer -> model -> data (data_utils) -> Trainer -> evaluate, save, report.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import types
import typing
import uuid
import zipfile
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

# Where bitsandbytes is installed, importing transformers' Trainer imports it, and on CPUs with AVX512-BF16 it
# warns that an optional kernel from the hub (the `kernels` package) is missing: noise for every run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, HfArgumentParser,
                          Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import is_torch_bf16_gpu_available

import data_utils
from data_utils import DataError, atomic_write_text, closest_key_hint

logger = logging.getLogger("pretrain")


# --------------------------------------------------------------------------------------------
# 1. Arguments
# --------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Continue pretraining from this local directory or hub id. Unset: train from `model_config`."})
    model_config: str | None = field(default=None, metadata={
        "help": "The architecture to train from scratch: a JSON (configs/model/tiny.json), or a model directory or "
                "hub id whose config.json it takes, without the weights (run_clm's --config_name)."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "From scratch: settings that replace the model_config JSON's, as run_clm.py takes them: "
                "num_hidden_layers=4,hidden_size=256 (or a mapping in the config file)."})
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit."})
    model_vocab_size: int | None = field(default=None, metadata={
        "help": "From scratch: embedding rows (at least the tokenizer's size). Unset: the tokenizer's size rounded "
                "up to 64. Set it to a real model's size (151936 for Qwen2) to benchmark its exact shape."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer directory or hub id. Unset: the model's own, or (from scratch) a SentencePiece "
                "BPE trained on the training sources and cached."})
    tokenizer_vocab_size: int = field(default=8000, metadata={"help": "Vocabulary of a trained tokenizer."})
    tokenizer_model_type: str = field(default="bpe", metadata={"help": "bpe or unigram (SentencePiece)."})
    tokenizer_character_coverage: float = field(default=0.9995, metadata={
        "help": "Share of characters covered by pieces; the rest fall back to bytes."})
    new_token_init: str = field(default="subword_mean", metadata={
        "help": "Rows added for a larger tokenizer start at: subword_mean (the mean of the base-tokenizer pieces "
                "each new token replaces) | mean (the mean of all base rows)."})
    torch_dtype: str = field(default="float32", metadata={
        "help": "Dtype of the weights (float32 master weights; mixed precision comes from `mixed_precision`, and "
                "`mixed_precision: bf16_weights` loads them in bfloat16)."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager | flash_attention_2"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub. Off: safe."})
    finetuning: str = field(default="full", metadata={
        "help": "full: train every weight | lora: freeze the model, train low-rank adapters on its linear layers "
                "(peft) and the embedding rows of new tokens; the saved model has the adapters merged in (loads "
                "with AutoModelForCausalLM), the adapter alone is in output_dir/adapter | freeze: train only "
                "`freeze_trainable_layers` decoder layers and `freeze_extra_modules`."})
    freeze_trainable_layers: int = field(default=2, metadata={
        "help": "finetuning freeze: train the last N decoder layers (negative: the first -N; 0: none)."})
    freeze_extra_modules: str = field(default="", metadata={
        "help": "finetuning freeze: comma-separated modules outside the decoder layers that train too, e.g. "
                "embed_tokens,lm_head (with 0 layers: Chinese-LLaMA's first stage after extending the vocabulary)."})
    expand_layers: int = field(default=0, metadata={
        "help": "finetuning freeze: LLaMA Pro block expansion. Insert N copies of decoder layers into the pretrained "
                "model, one after every (layers / N)-th, with their attention and MLP output projections zeroed so "
                "the expanded model computes exactly what the base did; only the new layers train (instead of "
                "`freeze_trainable_layers`; `freeze_extra_modules` still adds modules), so the base layers keep what "
                "they know. The saved model has layers + N decoder layers."})
    lora_rank: int = field(default=64, metadata={
        "help": "LoRA rank. Continued pretraining learns more than instruction tuning: ranks of 64 to 256 keep more "
                "of it (LoRA Learns Less and Forgets Less, Biderman et al. 2024)."})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA scale numerator; unset: 2 x lora_rank (scale 2 at any rank), with use_rslora 16 (scale "
                "16 / sqrt(rank): 2 at rank 64, 1 at rank 256)."})
    lora_dropout: float | None = field(default=None, metadata={
        "help": "Dropout on the LoRA input. Unset: 0.05, and 0 for mixture-of-experts models under lora_target "
                "all-linear (peft may adapt their experts' weights as parameters, which take no dropout)."})
    lora_target: str = field(default="all-linear", metadata={
        "help": "Layers that get adapters: all-linear (every linear layer but the output head) or comma-separated "
                "module names, e.g. q_proj,k_proj,v_proj,o_proj."})
    adapter_name_or_path: str | None = field(default=None, metadata={
        "help": "finetuning lora: go on training this LoRA adapter (a directory with adapter_config.json, such as a "
                "LoRA run's output_dir/adapter) instead of starting new ones; its rank, alpha, targets and extra "
                "modules are its own. The saved model has it merged into model_name_or_path."})
    lora_extra_modules: str = field(default="", metadata={
        "help": "finetuning lora: comma-separated modules outside the decoder layers that train whole beside the "
                "adapters (peft modules_to_save), e.g. embed_tokens,lm_head: Chinese-LLaMA's LoRA stage after "
                "extending the vocabulary. Without it new tokens' rows train anyway, the rest stays frozen."})
    use_rslora: bool = field(default=False, metadata={
        "help": "Rank-stabilised LoRA: scale the adapters by alpha / sqrt(rank), not alpha / rank, so high ranks "
                "(64-256, as continued pretraining wants) still learn at a sane learning rate."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: learn each adapted weight's magnitude apart from its LoRA-updated direction (more "
                "parameters per layer and slower steps; merged at the end like LoRA)."})
    rope_scaling: str | None = field(default=None, metadata={
        "help": "Continue pretraining at a block_size beyond the model's max_position_embeddings: linear (position "
                "interpolation) | yarn | llama3 (Llama 3.1's). The factor is block_size / max_position_embeddings "
                "rounded up; the saved config keeps it, so the model runs at the new length."})
    rope_theta: float | None = field(default=None, metadata={
        "help": "A new RoPE base frequency for the pretrained model (raised for long contexts: adjusted base "
                "frequency, as Llama 3 and Qwen long-context training do). Unset: the model's own."})
    moe_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "Mixture-of-experts models with a router load-balancing loss (Qwen2/3-MoE, Mixtral, OLMoE, ...): its "
                "weight in the training loss (the logs show the loss itself as router_aux_loss). Unset: the model "
                "config's router_aux_loss_coef; 0: off. Evaluation perplexity leaves it out."})
    quantization_bit: int | None = field(default=None, metadata={
        "help": "QLoRA (with finetuning lora): hold the frozen model's linear layers in 4 or 8 bits (bitsandbytes) "
                "while the adapters train; the saved model is the base in torch_dtype with the adapters merged in."})
    quantization_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 (QLoRA's) | fp4."})
    double_quantization: bool = field(default=True, metadata={
        "help": "4-bit: quantize the quantization constants too (about 0.4 bits per weight less)."})

    ADAPTER_SHAPE = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "lora_extra_modules", "use_rslora",
                     "use_dora")  # what a LoRA adapter itself holds
    MODE_OPTIONS = {"lora": (*ADAPTER_SHAPE, "adapter_name_or_path"),
                    "freeze": ("freeze_trainable_layers", "freeze_extra_modules")}  # options of that finetuning only
    CHOICES = {"torch_dtype": ("float32", "bfloat16", "float16"), "tokenizer_model_type": ("bpe", "unigram"),
               "new_token_init": ("subword_mean", "mean"), "finetuning": ("full", "lora", "freeze"),
               "quantization_type": ("nf4", "fp4")}

    def __post_init__(self):
        for name in ("model_name_or_path", "tokenizer_name_or_path", "adapter_name_or_path", "model_config"):
            value = os.path.expanduser(getattr(self, name) or "")  # transformers takes ~/x for a bad hub id
            if value and (getattr(self, name).startswith("~") or name != "model_config" and os.path.isdir(value)):
                # a directory absolute: a LoRA adapter names its base by it (a relative one, read from elsewhere,
                # was looked up on the hub)
                setattr(self, name, os.path.abspath(value) if os.path.isdir(value) else value)
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                auto = (" (`auto` loads a model in its saved dtype elsewhere; here weights stay float32 masters and "
                        "`mixed_precision` picks bf16 compute)" if name == "torch_dtype" and self.torch_dtype == "auto"
                        else "")
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got `{getattr(self, name)}`{auto}.")
        if self.finetuning == "lora" and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be at least 1, got {self.lora_rank}.")
        if self.rope_scaling == "dynamic":
            raise ConfigError("rope_scaling dynamic (dynamic NTK) rescales the rotary frequencies by each batch's "
                              "longest sequence at run time, so the model would train on frequencies that change "
                              "from batch to batch (with packing and document attention, by its longest document). "
                              "Train with yarn, linear or llama3; dynamic can still be set in config.json for "
                              "inference.")
        if self.rope_scaling not in (None, "linear", "yarn", "llama3"):
            raise ConfigError(f"rope_scaling must be linear, yarn or llama3 (or unset), got `{self.rope_scaling}`.")
        if self.moe_aux_loss_coef is not None and not self.moe_aux_loss_coef >= 0:
            raise ConfigError(f"moe_aux_loss_coef must be 0 (off) or more, got {self.moe_aux_loss_coef}.")
        if self.quantization_bit not in (None, 4, 8):
            raise ConfigError(f"quantization_bit must be 4 or 8 (or unset), got {self.quantization_bit}.")
        if self.expand_layers < 0 or self.expand_layers and (self.finetuning != "freeze" or not self.model_name_or_path):
            raise ConfigError(f"expand_layers {self.expand_layers}: block expansion adds N >= 1 layers to a pretrained "
                              "model (`model_name_or_path`) and trains them with `finetuning: freeze`.")
        if self.quantization_bit and self.finetuning != "lora":
            raise ConfigError(f"quantization_bit {self.quantization_bit}: quantized weights cannot be trained "
                              "directly. Set `finetuning: lora` (QLoRA), or drop quantization_bit.")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.finetuning == "freeze" and not self.model_name_or_path:
            raise ConfigError("finetuning freeze keeps most weights of a pretrained model as they are: set "
                              "`model_name_or_path`, or train a model from scratch with `finetuning: full`.")
        quantization = [n for n in ("quantization_type", "double_quantization") if getattr(self, n) != defaults[n]]
        if quantization and not self.quantization_bit:
            raise ConfigError(f"{', '.join(quantization)} only appl{'y' if len(quantization) > 1 else 'ies'} with "
                              "`quantization_bit` (QLoRA), which is unset: set it, or drop "
                              f"{'them' if len(quantization) > 1 else 'it'}.")
        if self.expand_layers and self.freeze_trainable_layers != defaults["freeze_trainable_layers"]:
            raise ConfigError("freeze_trainable_layers does not apply with expand_layers (only the new layers train, "
                              "with `freeze_extra_modules` if given): drop it.")
        shaped = [name for name in self.ADAPTER_SHAPE if getattr(self, name) != defaults[name]]
        if self.adapter_name_or_path and shaped:
            raise ConfigError(f"{', '.join(shaped)}: the adapter `{self.adapter_name_or_path}` (adapter_name_or_path) "
                              "trains on with its own shape; drop them, or start new adapters without "
                              "adapter_name_or_path.")
        if self.config_overrides and self.model_name_or_path:
            raise ConfigError("config_overrides changes the architecture of a model trained from scratch "
                              "(`model_config`); a pretrained model keeps its own. Drop it (longer positions: "
                              "`rope_scaling`, `rope_theta`).")
        for mode, names in self.MODE_OPTIONS.items():
            changed = [name for name in names if getattr(self, name) != defaults[name]]
            if changed and self.finetuning != mode:  # e.g. MedicalGPT's --lora_* flags kept without --use_peft
                them = "it" if len(changed) == 1 else "them"
                raise ConfigError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for `finetuning: "
                                  f"{mode}`, but finetuning is `{self.finetuning}`"
                                  f"{' (every weight trains)' if self.finetuning == 'full' else ''}, which would "
                                  f"ignore {them}. Set `finetuning: {mode}`, or drop {them}.")


@dataclass
class DataArguments:
    sources: str | None = field(default=None, metadata={
        "help": "List of sources (see README): in YAML a list of mappings; on the command line a YAML/JSON "
                "string such as '[{path: data/}]'. Parsed into data_utils.SourceConfig entries."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training sequence."})
    eval_fraction: float = field(default=0.02, metadata={
        "help": "Share of each source's documents held out for evaluation (per-source `eval_fraction` or "
                "`eval_path` win)."})
    add_bos: str = field(default="auto", metadata={
        "help": "BOS policy: auto (prepend BOS iff the tokenizer adds one itself) | always | never. "
                "EOS always ends every document."})
    cache_dir: str = field(default="cache", metadata={"help": "Token stores and trained tokenizers."})
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Tokenizer processes. Unset: min(8, CPU count)."})
    attention: str = field(default="causal", metadata={
        "help": "causal: plain causal attention over each packed block | document: position_ids restart at every "
                "document, so no token attends across documents (sdpa or flash_attention_2, use_cache off)."})
    dedup: bool = field(default=True, metadata={
        "help": "Exact dedup of texts within and across sources and between train and eval."})
    near_dedup: str | None = field(default=None, metadata={
        "help": "Also remove near duplicates: documents whose token n-gram sets have at least this Jaccard "
                "similarity (e.g. 0.8; true: 0.8) with an earlier document that stays, within and across stored "
                "sources and between train and eval (MinHash LSH, every pair verified exactly). Unset: off."})
    near_dedup_ngram: int = field(default=5, metadata={
        "help": "Tokens per shingle (n-gram) of near_dedup: 5 tokens are about 5-10 Chinese characters."})
    max_source_epochs: float = field(default=4.0, metadata={
        "help": "Warn when a source's weight repeats its data more often than this per pass over the mixture."})
    max_eval_tokens: int | None = field(default=1_048_576, metadata={
        "help": "Evaluate at most this many tokens per source, blocks spread evenly over its held-out split "
                "(a large split would take longer than the training between evaluations). 0: all of it."})
    benchmarks: str | None = field(default=None, metadata={
        "help": "Multiple-choice benchmarks scored at every evaluation (see README): in YAML a list of mappings "
                "such as {name: cmb, path: data/benchmarks/cmb.jsonl, shots: 0}; logged as eval_bench_<name>_accuracy."})
    max_train_tokens: int | None = field(default=None, metadata={
        "help": "Token budget: sets max_steps to ceil(budget / tokens per step)."})
    hub_local_dir: str | None = field(default="data/hub", metadata={
        "help": "Local hub snapshots: a hub source OWNER/NAME is read from HUB_LOCAL_DIR/OWNER/NAME when that "
                "directory exists (hf download --repo-type dataset OWNER/NAME --local-dir ...); `modelscope:` "
                "datasets are downloaded there."})
    forgetting_threshold_pct: float = field(default=10.0, metadata={
        "help": "Warn when a `watch_forgetting` source's eval perplexity rises this many percent over its "
                "step-0 baseline."})

    def near_dedup_threshold(self) -> float | None:
        """near_dedup as a number: true is 0.8, false or none is off (YAML and the command line give text)."""
        value = self.near_dedup
        words = {"true": 0.8, "false": None, "none": None, "null": None}
        if value is None or isinstance(value, bool) or str(value).lower() in words:
            return words[str(value).lower()]
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not 0 < threshold <= 1:
            raise DataError(f"near_dedup is a Jaccard similarity in (0, 1] (0.8 removes documents that share at least "
                            f"80% of their token {self.near_dedup_ngram}-grams with an earlier one), got "
                            f"`{value}`.")
        return threshold

    def __post_init__(self):
        if isinstance(self.sources, str):
            try:
                self.sources = yaml.safe_load(self.sources)
            except yaml.YAMLError as e:
                raise DataError(f"`sources` is not valid YAML/JSON: {e}") from None
        self.sources, self.local_hub_copies = data_utils.use_local_hub_copies(self.sources, self.hub_local_dir)
        if isinstance(self.benchmarks, str):
            try:
                self.benchmarks = yaml.safe_load(self.benchmarks)
            except yaml.YAMLError as e:
                raise DataError(f"`benchmarks` is not valid YAML/JSON: {e}") from None
        if self.benchmarks:
            data_utils.parse_benchmarks(self.benchmarks)  # checked now, read after the data
        if self.attention not in ("causal", "document"):
            raise DataError(f"attention must be causal or document, got `{self.attention}`.")
        if self.block_size < 2:
            raise DataError(f"block_size must be at least 2, got {self.block_size}.")
        self.near_dedup = self.near_dedup_threshold()
        if self.near_dedup_ngram < 1:
            raise DataError(f"near_dedup_ngram must be at least 1, got {self.near_dedup_ngram}.")
        if not 0 <= self.eval_fraction < 1:
            raise DataError(f"eval_fraction must be in [0, 1) (0.02 holds out 2% of each source's documents), got "
                            f"{self.eval_fraction}.")


def gpu_has_bf16() -> bool:
    """An accelerator with bfloat16 units: on CUDA Ampere and later (torch's is_bf16_supported() also says yes
    where it only emulates bf16, on a V100 or T4: slower than fp32 there, and far from the peak MFU is measured
    against); other accelerators (MPS, XPU, NPU, ...) as transformers checks them."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return is_torch_bf16_gpu_available()


@dataclass
class PretrainingArguments(TrainingArguments):
    """TrainingArguments with pretraining defaults, mixed precision chosen by the hardware, and samples."""

    output_dir: str | None = field(default="outputs/pretrain", metadata={"help": "Where everything is saved."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of all steps if < 1."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch"})
    eval_steps: float | None = field(default=100, metadata={"help": "Evaluate every N steps."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate before the first step (baseline)."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "Where the logs go: tensorboard | wandb | none ...; several as a list (or `tensorboard,wandb`)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Off: the blocks hold exactly the model inputs, plus the block_id the collator takes out."})
    train_sampling_strategy: str = field(default="sequential", metadata={
        "help": "sequential: read the seeded, evenly mixed block order of data_utils.MixedBlocks as is."})
    ddp_timeout: int = field(default=7200, metadata={"help": "Collective timeout in seconds."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "Off: every parameter of a causal LM gets a gradient each step, so DDP need not search the autograd "
                "graph for unused ones (the Trainer's default turns that search on without gradient checkpointing)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start fresh in an output_dir that holds the checkpoints of an unfinished run, deleting them "
                "(without it such a run stops and names the choices)."})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs that have it, else fp32) | bf16 (autocast over fp32 weights) | bf16_weights "
                "(bf16 weights, activations and gradients, no autocast; the optimizer updates fp32 master copies: "
                "fewer casts and kernel launches) | fp16 | no"})
    logging_nan_inf_filter: bool | None = field(default=None, metadata={
        "help": "Log a non-finite step's loss as the running mean. Unset: on with on_nonfinite_loss skip, off with "
                "stop (the run stops on a non-finite loss; the filter costs a host-device sync every step)."})
    # mixed_precision bf16_weights; transformers overwrites `mixed_precision` with the accelerator's autocast
    # setting in its __post_init__, which is "no" for bf16 weights
    bf16_weights: bool = field(default=False, init=False)
    chunked_loss: bool = field(default=False, metadata={
        "help": "Compute the loss a chunk of tokens at a time without the full logits (llama/qwen2/qwen3/mistral): "
                "with a 152k vocabulary about 2 GB less memory per 1k tokens of micro-batch, the same result."})
    torch_compile_scope: str = field(default="blocks", metadata={
        "help": "With torch_compile: blocks (compile one decoder layer and reuse it for all: fast to compile) | "
                "model (the whole model as one graph)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Peak TFLOP/s of one accelerator for MFU; unset: looked up by GPU name (bf16/fp16 dense)."})
    sample_prompts: list[str] = field(default_factory=list, metadata={
        "help": "Prompts continued by the trained model at the end (written to metrics.json, `samples`)."})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per sample prompt."})
    verify_saved_model: bool = field(default=True, metadata={
        "help": "Reload the saved model and check it reproduces the trained model's logits on a held-out block."})
    on_nonfinite_loss: str = field(default="stop", metadata={
        "help": "stop: stop before the optimizer step, naming the last good checkpoint | skip: drop that update "
                "(optimizer state untouched), count it in metrics.json, and stop after max_consecutive_skips."})
    max_consecutive_skips: int = field(default=5, metadata={
        "help": "on_nonfinite_loss skip: more non-finite steps in a row than this means divergence: stop."})
    loraplus_lr_ratio: float | None = field(default=None, metadata={
        "help": "finetuning lora: LoRA+ (Hayou et al., 2024): the adapters' B matrices learn this many times faster "
                "than the rest (16 is the paper's default), which reaches a given loss in fewer steps."})
    use_muon: bool = field(default=False, metadata={
        "help": "Muon (torch.optim.Muon: momentum orthogonalized by Newton-Schulz) for the weight matrices inside "
                "the model, the configured AdamW for embeddings, output head, norms and biases; one learning rate "
                "and weight decay for both (Muon's update scaled to AdamW's RMS, as Moonlight does). One process "
                "or DDP."})
    trust_checkpoint: bool = field(default=False, metadata={
        "help": "Resume a DeepSpeed checkpoint whose files name classes outside the few DeepSpeed writes (DeepSpeed "
                "loads its files with pickle, which runs such code): only for a checkpoint you trust."})
    eval_only: bool = field(default=False, metadata={
        "help": "Evaluate `model_name_or_path` on the eval split and stop (run_clm's --do_eval without --do_train): "
                "per-source loss and perplexity (and sample continuations) in output_dir/eval_results.json; no "
                "training, no checkpoints, no model written."})
    record_block_ids: bool = field(default=False, metadata={
        "help": "Write the ids of the blocks each micro-batch trains on to output_dir/block_ids/rank<R>.jsonl, one "
                "line per micro-batch ({\"step\": S, \"block_ids\": [...]}): an audit of what each rank trained on "
                "(costs a host read per step on a GPU)."})

    def __post_init__(self):
        self.report_to = [name.strip() for item in self.report_to for name in item.split(",") if name.strip()]
        check_reporters(self.report_to)
        if self.mixed_precision == "auto" and (self.fp16 or self.bf16):  # the Trainer's own switches decide
            self.mixed_precision = "fp16" if self.fp16 else "bf16"
        if self.mixed_precision == "auto":
            on_gpu = not self.use_cpu and torch.cuda.is_available()
            self.mixed_precision = "bf16" if on_gpu and gpu_has_bf16() else "no"
            if on_gpu and self.mixed_precision == "no":
                logger.warning("mixed_precision auto: this GPU (%s) has no bfloat16 units, so training runs in fp32; "
                               "`mixed_precision: fp16` uses its fp16 tensor cores (a model trained in bf16 may "
                               "overflow in fp16)", torch.cuda.get_device_name())
        if self.on_nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite_loss must be stop or skip, got `{self.on_nonfinite_loss}`.")
        if self.mixed_precision not in ("bf16", "bf16_weights", "fp16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16, bf16_weights, fp16 or no, got "
                             f"`{self.mixed_precision}`.")
        if self.torch_compile_scope not in ("blocks", "model"):
            raise ValueError(f"torch_compile_scope must be blocks or model, got `{self.torch_compile_scope}`.")
        if self.logging_nan_inf_filter is None:
            self.logging_nan_inf_filter = self.on_nonfinite_loss == "skip"
        self.sample_prompts = [p for p in self.sample_prompts if p.strip()]  # `--sample_prompts ""`: none
        if self.eval_only and self.resume_from_checkpoint not in (None, "", False):
            raise ValueError(f"eval_only evaluates a model, not a checkpoint's training state: drop "
                             f"resume_from_checkpoint ({self.resume_from_checkpoint}), and name the checkpoint "
                             "directory as `model_name_or_path` to evaluate its weights.")
        if self.use_cpu or not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to
        check_deepspeed_config(self.deepspeed)
        if self.save_only_model:
            raise ValueError("save_only_model writes checkpoints without the optimizer, scheduler and data state, so "
                             "no run can resume from them (preemption, restarts, `--resume_from_checkpoint auto`): drop "
                             "it; `save_total_limit` bounds the disk the checkpoints take, and the final model in "
                             "output_dir holds the weights alone.")
        if self.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("use_liger_kernel needs liger-kernel (GPU kernels): `pip install liger-kernel`, or drop "
                             "use_liger_kernel.")
        if isinstance(self.fsdp, str) and self.fsdp.strip().lower() in ("true", "yes", "1", "false", "no", "0", ""):
            self.fsdp = self.fsdp.strip().lower() in ("true", "yes", "1") or None  # `fsdp: true` from a config
        self.bf16_weights = self.mixed_precision == "bf16_weights"
        self.bf16 = self.bf16 or self.mixed_precision == "bf16"
        if self.bf16 and not self.use_cpu and not gpu_has_bf16():
            if torch.cuda.is_available():
                raise ValueError(f"mixed_precision bf16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 "
                                 "(V100, T4 and older): use `mixed_precision: fp16`.")
            self.use_cpu = True  # no accelerator: bf16 autocast on the CPU, as asked (the Trainer wants it said)
        self.fp16 = self.fp16 or self.mixed_precision == "fp16"
        super().__post_init__()

    @property
    def low_precision(self) -> bool:
        """The matmuls run in bf16 or fp16 (autocast, or bf16 weights)."""
        return self.bf16 or self.fp16 or self.bf16_weights


REPORTER_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit"}  # else its own name


def check_reporters(report_to: list[str]) -> None:
    """Each `report_to` logger's package is installed: the Trainer would find one missing only after the data
    preparation, and stop with a traceback."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK and name not in ("none", "all"):
            raise ValueError(f"report_to `{name}` is not a logger transformers knows.{closest_key_hint(name, INTEGRATION_TO_CALLBACK)} "
                             f"Known: {', '.join(INTEGRATION_TO_CALLBACK)}; or none.")
    missing = [name for name in report_to if name in INTEGRATION_TO_CALLBACK
               and name not in get_available_reporting_integrations()]
    if missing:
        packages = " ".join(REPORTER_PACKAGES.get(name, name) for name in missing)
        raise ValueError(f"report_to {', '.join(missing)}: not installed here. `pip install {packages}`, or drop "
                         f"{'it' if len(missing) == 1 else 'them'} from report_to (tensorboard is installed with "
                         "the requirements).")


def check_deepspeed_config(deepspeed_config) -> None:
    """A DeepSpeed JSON with `optimizer` or `scheduler` blocks silently replaces the optimizer and
    learning-rate schedule set here: refuse it, and say what to do instead."""
    if not deepspeed_config:
        return
    try:
        config = deepspeed_config if isinstance(deepspeed_config, dict) else json.loads(
            Path(deepspeed_config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"deepspeed config `{deepspeed_config}` cannot be read as JSON: {e}") from None
    zero = config.get("zero_optimization") or {}
    gathers = (zero.get(k) for k in ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
                                      "stage3_gather_fp16_weights_on_model_save"))  # the names DeepSpeed reads
    if str(zero.get("stage")) == "3" and True not in gathers:
        raise ConfigError(f"deepspeed config `{deepspeed_config}` is ZeRO-3 without "
                          "`stage3_gather_16bit_weights_on_model_save: true` (DeepSpeed's default is false): the "
                          "final model could not be gathered and written at the end of the run. Add it to "
                          "`zero_optimization` (see deepspeed/ds_zero3.json).")
    blocks = [k for k in ("optimizer", "scheduler") if k in config]
    if blocks:
        raise ConfigError(f"deepspeed config `{deepspeed_config}` has {' and '.join(f'`{b}`' for b in blocks)} "
                          "block(s), which would silently replace `optim` / `lr_scheduler_type` / `learning_rate` "
                          "set in the run config. Remove them (see deepspeed/ds_zero*.json) and set those fields "
                          "instead.")


class ConfigError(ValueError):
    """A config file or command-line setting that cannot be used; the message says which and why."""

    raised_on_every_rank = False  # raised alike on all ranks (printed once per node)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class CheckpointError(RuntimeError):
    """Writing a checkpoint or the final model failed (a full disk); the message names what is intact."""


class ConfigArgumentParser(HfArgumentParser):
    nulls: list[str] = []  # settings the config file sets to `null` (None): no command-line token can say that

    def error(self, message):  # argparse would print usage and exit; raise one clear message instead
        raise ConfigError(f"invalid setting: {message} (from the config file or the command line).")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for key in self.nulls:
            setattr(namespace, key, None)
        return namespace, rest


def null_settings(config: dict, given: set[str], source: str) -> list[str]:
    """The config file's `key: null` settings not overridden on the command line, for the parser to set to None
    (dropped, the default applied instead: `save_total_limit: null`, keep every checkpoint, kept 3). A setting
    that cannot be None is refused."""
    nulls = [key for key, value in config.items() if value is None and key not in given]
    for dtype in (ModelArguments, DataArguments, PretrainingArguments) if nulls else ():
        hints = typing.get_type_hints(dtype)  # not Field.type: HfArgumentParser strips the None from it
        for field_ in dataclasses.fields(dtype):
            if field_.name in nulls and field_.default is not None and type(None) not in typing.get_args(
                    hints[field_.name]):
                raise ConfigError(f"{source}: `{field_.name}: null`, but {field_.name} cannot be empty "
                                  f"({getattr(hints[field_.name], '__name__', hints[field_.name])}): remove the "
                                  f"line for its default ({field_.default!r}), or give it a value.")
    return nulls


# Options of MedicalGPT's pretraining.py, LLaMA-Factory's pt stage and run_clm.py that this toolkit spells
# otherwise: an unknown option names its counterpart here instead of a look-alike ("use_peft" -> "use_cpu").
FOREIGN_OPTIONS = {
    "use_peft": "`finetuning: lora`", "finetuning_type": "`finetuning` (full, lora, freeze)",
    "qlora": "`quantization_bit: 4` with `finetuning: lora`", "load_in_4bit": "`quantization_bit: 4`",
    "load_in_8bit": "`quantization_bit: 8`", "target_modules": "`lora_target`", "lora_r": "`lora_rank`",
    "modules_to_save": "`lora_extra_modules` (with finetuning lora; new tokens' rows train without it)",
    "train_file_dir": "`sources` (a directory, file or glob: `--sources data/my_dir`, or a list in the config)",
    "train_file": "`sources`", "dataset": "`sources` (local files: `path:`, hub datasets: `hub:`)",
    "dataset_name": "a source's `hub:` (in `sources`)", "dataset_config_name": "a source's `hub_config:`",
    "dataset_dir": "`sources` (`path:` of the files)", "validation_file_dir": "a source's `eval_path:`",
    "validation_file": "a source's `eval_path:`",
    "validation_split_percentage": "`eval_fraction` (a fraction: 0.05 for 5%)", "val_size": "`eval_fraction`",
    "cutoff_len": "`block_size`", "max_seq_length": "`block_size`", "model_max_length": "`block_size`",
    "text_column_name": "a source's `text_field:`",
    "streaming": "a source's `streaming: true` (hub sources; local files as a stream: `{hub: text, data_files: "
                 "FILES, streaming: true}`, with `weight: W` beside other sources)",
    "template": "a source's `template:` (records -> text; chat templates do not apply to pretraining text)",
    "keep_linebreaks": "a source's `keep_newlines:` (line breaks inside a record; a text file is one document per "
                       "line, or per article with `group: wikitext_articles`)",
    "flash_attn": "`attn_implementation` (sdpa, eager or flash_attention_2)", "config_name": "`model_config` (a JSON, a model directory or a hub id)",
    "model_type": "`model_type` inside the `model_config` JSON",
    "max_train_samples": "`max_train_tokens` (samples x block_size)",
    "max_samples": "a source's `max_records:` (its first N records)",
    "max_eval_samples": "`max_eval_tokens` (samples x block_size)", "neat_packing": "`attention: document`",
    "packing": "nothing: blocks are always packed without padding",
    "mix_strategy": "a source's `weight:` (share of training tokens)",
    "interleave_probs": "each source's `weight:`", "deepspeed_config": "`deepspeed`",
    "use_llama_pro": "`expand_layers: N` with `finetuning: freeze` (expands the model itself; no separate script)",
    "num_expand": "`expand_layers`", "num_layer_trainable": "`freeze_trainable_layers`",
    "freeze_trainable_modules": "`freeze_trainable_layers` (the last N decoder layers) and `freeze_extra_modules` "
                                "(modules outside them)",
    "additional_target": "`lora_extra_modules` with `finetuning: lora`, `freeze_extra_modules` with `finetuning: freeze`",
    "stage": "nothing: this toolkit only pretrains (LLaMA-Factory's `stage: pt`)",
    "do_train": "nothing: a run always trains (`eval_only: true` evaluates a model without training it)",
    "do_eval": "nothing: a run evaluates before and after training (and every `eval_steps`) on its eval split; "
               "`eval_fraction: 0` without `eval_path` turns evaluation off; `eval_only: true` evaluates a model "
               "without training it",
    "do_predict": "nothing: a run ends with sample continuations of `sample_prompts`",
    "overwrite_cache": "nothing: token stores are keyed by the files' content and the settings, so a change "
                       "rebuilds them; delete `cache_dir` to force it",
    "tokenized_path": "`cache_dir` (token stores, reused by content)", "plot_loss": "nothing: loss.png is always "
    "written", "resize_vocab": "nothing: the embeddings grow by themselves for a larger tokenizer "
    "(`tokenizer_name_or_path`; tools/vocab.py extend makes one)",
    "new_special_tokens": "tools/vocab.py extend (a text file of tokens), then `tokenizer_name_or_path`",
    "eval_dataset": "a source's `eval_path:` (files) or `eval_split:` (hub)", "device_map": "nothing: the launch "
    "script puts one process on each GPU (`NUM_GPUS`)", "use_auth_token": "the HF_TOKEN environment variable",
    "ms_hub_token": "the MODELSCOPE_API_TOKEN environment variable (ModelScope ids: `modelscope:OWNER/NAME`)",
    "token": "the HF_TOKEN environment variable", "use_fast_tokenizer": "nothing: the fast tokenizer is always used",
    "low_cpu_mem_usage": "nothing", "train_from_scratch": "leave `model_name_or_path` unset and give "
    "`model_config` (a JSON)", "preprocessing_batch_size": "nothing: tokenizer processes take chunks of 2,048 "
    "records", "buffer_size": "nothing: streamed sources are mixed by their `weight:`", "group_by_length": "nothing: "
    "every packed block has block_size tokens", "peft_path": "`adapter_name_or_path` (with `finetuning: lora`)",
    "upcast_layernorm": "nothing: weights stay float32 masters",
    "use_unsloth": "nothing", "pissa_init": "nothing",
}
# TrainingArguments fields that other scripts pass and this one does not use: refused as FOREIGN_OPTIONS names them
UNUSED_TRAINING_OPTIONS = ("do_train", "do_eval", "do_predict")


def unknown_option_hint(key: str, valid: set[str]) -> str:
    counterpart = FOREIGN_OPTIONS.get(key)
    if counterpart is None:
        return closest_key_hint(key, valid)
    if counterpart.startswith("nothing"):
        return f" Not needed here{counterpart.removeprefix('nothing')}; drop it."
    return f" This toolkit's counterpart: {counterpart} (README, Config reference)."


def load_config(path: str, valid_keys: set[str]) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"config file `{path}` does not exist.")
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part) or e
        raise ConfigError(f"config file `{path}` is not valid YAML{where}: {what}. Check the indentation, "
                          "brackets and quotes there.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file `{path}` must be a mapping of `key: value`, got {type(config).__name__}.")
    unknown = [str(key) for key in config if key not in valid_keys or key in UNUSED_TRAINING_OPTIONS]
    if unknown:
        raise ConfigError(unknown_options_message(path, [(f"key `{key}`", key) for key in unknown], valid_keys))
    return config


def unknown_options_message(where: str, options: list[tuple[str, str]], valid: set[str]) -> str:
    """One message for every unknown option of a config file or command line (`where`): (how it is written,
    its name) each, with its counterpart here or the closest valid name."""
    lines = [f"- {written}.{unknown_option_hint(key, valid)}" for written, key in options]
    if len(lines) == 1:
        return f"{where}: unknown {lines[0][2:]}"
    return f"{where}: {len(lines)} unknown options:\n" + "\n".join(lines)


# settings with a choice `no`, which YAML 1.1 reads as false (`save_strategy: no`)
NO_CHOICE = ("eval_strategy", "save_strategy", "logging_strategy", "mixed_precision")


def config_to_argv(config: dict, parser: ConfigArgumentParser) -> list[str]:
    """YAML values -> command-line tokens, so YAML and CLI go through the same type checks."""
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        action = parser._option_string_actions[f"--{key}"]
        if isinstance(value, bool):
            argv += [f"--{key}", "no" if value is False and key in NO_CHOICE else str(value).lower()]
        elif isinstance(value, list) and action.nargs in ("+", "*") and all(not isinstance(v, (list, dict)) for v in value):
            argv += [f"--{key}", *(map(str, value) if value else [""])]  # []: one empty item, dropped later
        elif isinstance(value, (list, dict)):
            argv += [f"--{key}", json.dumps(value, ensure_ascii=False)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def split_local_rank(argv: list[str]) -> tuple[list[str], list[str]]:
    """The command line without, and the leading `--local_rank` the deepspeed launcher puts before the config path."""
    if argv and argv[0].startswith("--local_rank"):
        n = 1 if "=" in argv[0] else 2
        return argv[n:], argv[:n]
    return argv, []


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, PretrainingArguments]:
    parser = ConfigArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    config, config_path = {}, None
    argv, local_rank = split_local_rank(argv)
    argv = [*argv, *local_rank]
    if argv and not argv[0].startswith("-"):
        config_path, config, argv = argv[0], load_config(argv[0], valid), argv[1:]
    options = set(parser._option_string_actions)
    given = list(dict.fromkeys(token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")))
    unknown = [key for key in given if key in UNUSED_TRAINING_OPTIONS or f"--{key}" not in options
               and f"--{key.replace('_', '-')}" not in options]
    for key in unknown:
        nested = key.split(".")[0]
        if "." in key and nested in valid:
            raise ConfigError(f"unknown command-line option `--{key}`: `{nested}` is replaced whole from the command "
                              f"line: `--{nested} '[...]'` (YAML or JSON).")
    if unknown:
        raise ConfigError(unknown_options_message("the command line", [(f"option `--{key}`", key) for key in unknown],
                                                  valid))
    given = set(given)
    parser.nulls = null_settings(config, given, f"config file `{config_path}`")
    lengths = {"max_steps", "max_train_tokens", "num_train_epochs"}
    if given & lengths:
        for other in lengths - given:
            config.pop(other, None)  # a run length on the command line replaces the config file's
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(
            args=config_to_argv(config, parser) + argv, look_for_args_file=False)
    except (ValueError, TypeError) as e:
        if isinstance(e, (ConfigError, DataError)):
            raise
        raise ConfigError(f"invalid setting: {e}") from None
    if training_args.eval_only and training_args.deepspeed and not is_deepspeed_zero3_enabled():
        raise ConfigError("eval_only with DeepSpeed ZeRO-1/2: evaluation needs no DeepSpeed there (every rank holds "
                          "the whole model), and the Trainer evaluates through DeepSpeed only at ZeRO-3. Drop "
                          "`deepspeed` (torchrun/run_torchrun.sh evaluates on several GPUs), or use a ZeRO-3 config.")
    if model_args.quantization_bit and training_args.deepspeed and is_deepspeed_zero3_enabled():
        raise ConfigError("quantization_bit (QLoRA) under DeepSpeed ZeRO-3: the 4/8-bit weights load whole on each "
                          "device and cannot be partitioned. Use deepspeed/ds_zero2.json (the quantized base is "
                          "small), or ZeRO-3 with LoRA on the unquantized base (drop quantization_bit).")
    if training_args.eval_only and not model_args.model_name_or_path:
        raise ConfigError("eval_only evaluates a trained model: set `model_name_or_path` (a hub id, a directory such "
                          "as a finished run's output_dir or one of its checkpoints).")
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------
# 2. Tokenizer and 3. model
# --------------------------------------------------------------------------------------------
def fetch_from_modelscope(model_args: ModelArguments, data_args: DataArguments, training_args: PretrainingArguments,
                          with_models: bool = True) -> None:
    """What is named `modelscope:OWNER/NAME` (a model, a tokenizer, a hub source; model and tokenizer ids also
    under LLaMA-Factory's USE_MODELSCOPE_HUB=1) is downloaded, rank 0 first, then each node's first rank (the
    others find it there), and read from its local directory for the rest of the run. `with_models` off: the
    sources only (`data_utils.py convert` loads no tokenizer)."""
    settings = ("model_name_or_path", "tokenizer_name_or_path") if with_models else ()
    if data_utils.env_flag("USE_MODELSCOPE_HUB"):
        for setting in settings:
            name = getattr(model_args, setting)
            if name and data_utils.MODELSCOPE_ID.fullmatch(name) and not data_utils.looks_like_path(name):
                setattr(model_args, setting, data_utils.MODELSCOPE + name)
    models = {getattr(model_args, s) for s in settings if data_utils.is_modelscope(getattr(model_args, s))}
    sources = data_args.sources if isinstance(data_args.sources, list) else [data_args.sources]
    if not models and not any(isinstance(r, dict) and data_utils.is_modelscope(r.get("hub")) for r in sources):
        return

    def fetch():
        local = {name: data_utils.fetch_modelscope_model(
            name, model_args.model_revision, "model" if name == model_args.model_name_or_path else "tokenizer",
            "model_name_or_path" if name == model_args.model_name_or_path else "tokenizer_name_or_path",
            ConfigError, cached_first=training_args.process_index > 0) for name in sorted(models)}
        return local, *data_utils.fetch_modelscope_sources(data_args.sources, data_args.hub_local_dir)

    local, data_args.sources, fetched = on_every_rank(fetch, in_turns=training_args, what="download from ModelScope")
    for setting in settings:
        name = getattr(model_args, setting)
        if name in local:
            setattr(model_args, setting, local[name])
            logger.info("%s %s: read from %s", setting, name, local[name])
    for line in fetched:
        logger.info("hub source read from its ModelScope download: %s", line)


def hub_access(name: str, what: str):
    """data_utils.hub_access for the model or tokenizer of a run: a ConfigError naming the setting."""
    return data_utils.hub_access(name, what, "tokenizer_name_or_path" if what == "tokenizer" else "model_name_or_path",
                                 ConfigError)


TOKENIZER_PROBE = "高血压患者应定期测量血压。Hypertension 2024."


def check_tokenizer_encodes(tokenizer, source: str) -> None:
    """A model directory without tokenizer files gives an empty tokenizer in transformers 5 (it encodes every
    text to nothing, and a run would train on end-of-document tokens alone): stop before that."""
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    if len(tokenizer) < 16 or not ids or all(i == unknown for i in ids):
        raise ConfigError(f"the tokenizer from `{source}` is unusable: {len(tokenizer)} tokens, `{TOKENIZER_PROBE}` -> "
                          f"{ids}. {missing_tokenizer_hint(source)}")


def missing_tokenizer_hint(source: str) -> str:
    return (f"Is `{source}` missing its tokenizer files (tokenizer.json, tokenizer_config.json)? Copy them next to "
            "the model, or set `tokenizer_name_or_path`.")


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments, training_args: PretrainingArguments,
                   resume: str | None = None):
    """The configured tokenizer, or one trained on the sources (cached). A resumed run whose sources changed
    since its checkpoint keeps the tokenizer the checkpoint was trained with."""
    start = time.perf_counter()
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    trained = source is None
    if trained:
        source = str(on_every_rank(lambda: data_utils.train_sentencepiece_tokenizer(
            data_args.sources, data_args.cache_dir, model_args.tokenizer_vocab_size, model_args.tokenizer_model_type,
            model_args.tokenizer_character_coverage), in_turns=training_args, what="train the tokenizer"))
        logger.info("tokenizer: %s (SentencePiece %s, trained on the sources)", source, model_args.tokenizer_model_type)
    if source == model_args.model_name_or_path:
        check_model_directory(source)  # before its tokenizer is looked for there
    with hub_access(source, "tokenizer" if source != model_args.model_name_or_path else "model"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=model_args.model_revision,
                                                      trust_remote_code=model_args.trust_remote_code)
        except ValueError as e:  # no tokenizer file, and no slow tokenizer to convert
            raise ConfigError(f"the tokenizer from `{source}` cannot be built: {str(e).splitlines()[0]} "
                              f"{missing_tokenizer_hint(source)}") from None
    check_tokenizer_encodes(tokenizer, source)
    if tokenizer.pad_token is None:  # pretraining never pads; generation and collators want one
        tokenizer.pad_token = tokenizer.eos_token
    if trained and resume and (Path(resume) / "tokenizer.json").is_file():
        saved = AutoTokenizer.from_pretrained(resume)
        if saved.get_vocab() != tokenizer.get_vocab():
            logger.warning("the sources changed since %s: it resumes with the tokenizer it was trained with, not one "
                           "trained on the sources now", resume)
            tokenizer = saved
    logger.info("tokenizer ready in %.2f s: %d tokens", time.perf_counter() - start, len(tokenizer))
    return tokenizer


def grow_embeddings(model, tokenizer, model_args: ModelArguments) -> list[int]:
    """Give the tokens the base model never saw their own embedding rows. New tokens are the ids from the base
    tokenizer's size on, so those that land in a model's spare rows (Qwen2.5-0.5B has 271) count too; the
    embeddings are resized where the tokenizer outgrew them. A new token's row starts at the mean of the rows
    of the base-tokenizer pieces it replaces (its text, tokenized the way the model saw it so far), or at the
    mean of the base tokens' rows; base rows are untouched. Returns the new tokens' ids."""
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: ZeRO-3 partitions the weight
    base_tokenizer = tokenizer  # the model's own tokenizer: only tokens beyond its rows are new
    if model_args.tokenizer_name_or_path not in (None, model_args.model_name_or_path):
        try:
            base_tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                           revision=model_args.model_revision,
                                                           trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError):
            base_tokenizer = None
            logger.warning("no tokenizer next to the model: the tokens beyond its %d embedding rows count as new, and "
                           "their rows start at the mean of all rows", rows)
    if base_tokenizer is not tokenizer and base_tokenizer is not None:
        check_tokenizer_extends(tokenizer, base_tokenizer, model_args)
    first_new = min(len(base_tokenizer), rows) if base_tokenizer is not None else rows
    if len(tokenizer) <= first_new:
        return []
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    total = model.get_input_embeddings().num_embeddings
    matrices = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        matrices.append(model.get_output_embeddings().weight)
    new_ids = [*range(first_new, len(tokenizer)), *range(max(rows, len(tokenizer)), total)]
    pieces = {}
    if base_tokenizer is not None and model_args.new_token_init == "subword_mean":
        base_vocab = base_tokenizer.get_vocab()
        for new_id in range(first_new, len(tokenizer)):
            text = tokenizer.decode([new_id])
            if "\ufffd" in text:  # part of a character (byte-level BPE builds a character from such tokens): the
                token = tokenizer.convert_ids_to_tokens(new_id)  # base's tokens of its bytes, one per symbol
                ids = [base_vocab[c] for c in token] if all(c in base_vocab for c in token) else []
            else:
                ids = base_tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces[new_id] = [i for i in ids if i < first_new]
    gather = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(matrices, modifier_rank=0)
    with gather, torch.no_grad():
        for weight in matrices:
            mean = weight[:first_new].mean(0)
            for new_id in new_ids:
                weight[new_id] = weight[pieces[new_id]].mean(0) if pieces.get(new_id) else mean
    logger.warning("tokenizer has %d tokens, the base model's %d: %d new token rows (%d start at the mean of the base "
                   "pieces they replace, the others at the mean of the base rows); embedding rows %d -> %d",
                   len(tokenizer), first_new, len(tokenizer) - first_new, sum(map(bool, pieces.values())), rows, total)
    return list(range(first_new, len(tokenizer)))


def check_tokenizer_extends(tokenizer, base_tokenizer, model_args: ModelArguments) -> None:
    """A tokenizer for a pretrained model must keep every token of the model's own at its id (an extension adds
    tokens after them): with another tokenizer each id would read a row the model learned for another text, and
    the run would train, silently, on nonsense. Added special tokens may differ (a warning)."""
    base, new = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    special = set(base_tokenizer.get_added_vocab())
    moved = sorted((i, t) for t, i in base.items() if new.get(t) != i)
    regular = [(i, t) for i, t in moved if t not in special]
    if regular:
        examples = ", ".join(f"{t!r} (id {i}: {'now ' + str(new[t]) if t in new else 'gone'})" for i, t in regular[:5])
        raise ConfigError(
            f"tokenizer `{model_args.tokenizer_name_or_path}` does not extend the tokenizer of "
            f"`{model_args.model_name_or_path}`: {len(regular):,} of its {len(base):,} tokens are missing or at other "
            f"ids ({examples}), so the model's embeddings would be read for the wrong tokens. Extend the model's own "
            f"tokenizer instead (`python tools/vocab.py extend --base {model_args.model_name_or_path} --add "
            f"{model_args.tokenizer_name_or_path} --out OUT`, then `tokenizer_name_or_path: OUT`), or, to train with "
            "this tokenizer from scratch, give `model_config` instead of `model_name_or_path`.")
    if moved:
        logger.warning("tokenizer %s moves %d special token(s) of the model's tokenizer: %s",
                       model_args.tokenizer_name_or_path, len(moved), ", ".join(t for _, t in moved[:5]))


def weight_dtype(model_args: ModelArguments, training_args: PretrainingArguments) -> str:
    """The dtype to load the weights in: bfloat16 for mixed_precision bf16_weights (whose optimizer keeps the fp32
    masters), else `torch_dtype`; low-precision weights without fp32 masters get a warning."""
    if training_args.bf16_weights:
        if model_args.torch_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"mixed_precision bf16_weights trains bfloat16 weights; torch_dtype "
                              f"`{model_args.torch_dtype}` contradicts it: drop torch_dtype.")
        return "bfloat16"
    if model_args.torch_dtype in ("bfloat16", "float16") and model_args.finetuning != "lora":  # LoRA: frozen
        logger.warning("torch_dtype %s without fp32 master weights: updates smaller than 1/256 of a weight are lost. "
                       "For bf16 training use mixed_precision bf16_weights (fp32 masters in the optimizer) and leave "
                       "torch_dtype at float32.", model_args.torch_dtype)
    return model_args.torch_dtype


def build_model(model_args: ModelArguments, tokenizer, block_size: int, gradient_checkpointing: bool = False,
                compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The model to train: `create_model`, checked against the block size, with LoRA adapters when asked.
    `compute_dtype` and `device` matter under quantization_bit only: bitsandbytes computes in that dtype, and
    the quantized weights are loaded straight onto this process's device."""
    try:
        model, new_token_ids = create_model(model_args, tokenizer, compute_dtype, device, block_size)
    except ImportError as e:  # flash_attention_2 without flash-attn, say
        raise ConfigError(f"the model cannot be built with attn_implementation `{model_args.attn_implementation}`: "
                          f"{str(e).splitlines()[0]} Install what it names, or set `attn_implementation: sdpa`.") from None
    except ValueError as e:  # a misspelt attn_implementation: transformers names the valid ones
        if "attn_implementation" not in str(e):
            raise
        raise ConfigError(f"attn_implementation `{model_args.attn_implementation}`: {str(e).splitlines()[0]}") from None
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and block_size > max_positions:
        scale = ("" if model_args.rope_scaling else
                 f", or raise it for this model from scratch (`--config_overrides max_position_embeddings={block_size}`"
                 f", or in {model_args.model_config})" if not model_args.model_name_or_path else
                 ", or set `rope_scaling: yarn` (or linear) or a larger `rope_theta` to train the pretrained "
                 "model at the longer length")
        raise ConfigError(f"block_size {block_size} exceeds the model's max_position_embeddings {max_positions}. "
                          f"Lower `block_size`{scale}.")
    model.config.use_cache = False  # training: packed position_ids are only isolated without the cache
    if model_args.finetuning == "lora":
        model = add_lora(model, model_args, new_token_ids, gradient_checkpointing)
    elif model_args.finetuning == "freeze":
        new_layers = expand_layers(model, model_args.expand_layers) if model_args.expand_layers else None
        freeze(model, model_args, new_token_ids, new_layers)
    return model


OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # what a decoder layer adds to the residual stream (Llama, Qwen, Mistral)


def expand_layers(model, n: int) -> list[int]:
    """LLaMA Pro (Wu et al., 2024): after every (layers / n)-th decoder layer, a copy of it whose output projections
    are zero, so it adds nothing to the residual stream and the expanded model computes exactly what the base did;
    trained alone, the copies learn the new domain while the base layers keep what they know. Returns their indices."""
    if is_deepspeed_zero3_enabled():
        raise ConfigError("expand_layers copies decoder layers as the model loads, which ZeRO-3 has already "
                          "partitioned: use deepspeed/ds_zero2.json (freeze trains few weights anyway) or FSDP.")
    decoder = model.get_decoder()
    base = list(decoder.layers)
    if len(base) % n:
        divisors = [d for d in range(1, len(base) + 1) if len(base) % d == 0]
        raise ConfigError(f"expand_layers {n}: the model has {len(base)} decoder layers, which do not split into {n} "
                          f"equal groups. Use one of {', '.join(map(str, divisors))}.")
    types = getattr(model.config, "layer_types", None)  # per layer: full or sliding-window attention
    layers, new, new_types = [], [], []
    for i, layer in enumerate(base):
        layers.append(layer)
        new_types += [types[i]] if types else []
        if (i + 1) % (len(base) // n) == 0:
            copy = deepcopy(layer)
            projections = [m for name, m in copy.named_modules() if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS]
            if len(projections) != len(OUTPUT_PROJECTIONS):
                raise ConfigError(f"expand_layers needs decoder layers with {' and '.join(OUTPUT_PROJECTIONS)} output "
                                  f"projections (Llama, Qwen, Mistral); {type(layer).__name__} has other names.")
            with torch.no_grad():
                for projection in projections:
                    projection.weight.zero_()
                    if projection.bias is not None:
                        projection.bias.zero_()
            new.append(len(layers))
            layers.append(copy)
            new_types += [types[i]] if types else []
    decoder.layers = torch.nn.ModuleList(layers)
    for index, layer in enumerate(layers):  # the KV cache and per-layer attention types go by position
        for module in (layer, getattr(layer, "self_attn", None)):
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    if types:
        model.config.layer_types = new_types
        sliding = [i for i, t in enumerate(new_types) if t != "full_attention"]
        if sliding and getattr(model.config, "max_window_layers", None) is not None:  # Qwen2/3: full attention below
            model.config.max_window_layers = sliding[0]
    model.config.num_hidden_layers = len(layers)
    logger.info("expand_layers %d: %d -> %d decoder layers; the new ones %s start as identities (output projections "
                "zero)", n, len(base), len(layers), new)
    return new


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")  # decoder layer i's parameters: model.layers.i.*


def layer_of(name: str) -> int | None:
    found = LAYER_INDEX.search(f".{name}")
    return int(found.group(1)) if found else None


def modules_outside_layers(model, setting: str, value: str) -> list[str]:
    """The module names of a comma-separated `setting` (freeze_extra_modules, lora_extra_modules), each checked to
    name a module of the model outside its decoder layers."""
    wanted = sorted({m.strip() for m in value.split(",") if m.strip()})
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()  # holding weights: not `model`, `layers`
             if name and layer_of(name + ".") is None and next(module.parameters(recurse=False), None) is not None}
    if set(wanted) - names:
        raise ConfigError(f"{setting}: no module {', '.join(sorted(set(wanted) - names))} outside the decoder "
                          f"layers of this model; it has {', '.join(sorted(names))}.")
    return wanted


def freeze(model, model_args: ModelArguments, new_token_ids: list[int], new_layers: list[int] | None = None) -> None:
    """finetuning freeze (LLaMA-Factory's): only the chosen decoder layers (or the layers block expansion added)
    and extra modules train; the rest keeps its weights, needs no gradients and no optimizer state. The saved
    model is a whole model."""
    layers, n = model.config.num_hidden_layers, model_args.freeze_trainable_layers
    if new_layers is None and abs(n) > layers:
        raise ConfigError(f"freeze_trainable_layers {n}: the model has {layers} decoder layers. Use -{layers}..{layers}.")
    chosen = set(new_layers) if new_layers is not None else set(range(layers - n, layers) if n > 0 else range(-n))
    extras = set(modules_outside_layers(model, "freeze_extra_modules", model_args.freeze_extra_modules))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = layer_of(name) in chosen
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in extras:
            for parameter in module.parameters():  # a tied lm_head is embed_tokens' weight: it trains too
                parameter.requires_grad = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("finetuning freeze with freeze_trainable_layers 0 and no freeze_extra_modules trains "
                          "nothing: choose layers or modules.")
    embeddings_train = model.get_input_embeddings().weight.requires_grad
    if new_token_ids and not embeddings_train:
        logger.warning("finetuning freeze: %d new tokens keep their initial embedding rows; add embed_tokens (and "
                       "lm_head when untied) to freeze_extra_modules to train them", len(new_token_ids))
    logger.info("finetuning freeze: %s trainable parameters of %s: decoder layers %s, modules %s",
                f"{sum(map(numel, trainable)):,}", f"{sum(map(numel, model.parameters())):,}",
                sorted(chosen) or "none", ", ".join(sorted(extras)) or "none")


def add_lora(model, model_args: ModelArguments, new_token_ids: list[int], gradient_checkpointing: bool):
    """finetuning lora: the model frozen, LoRA adapters on `lora_target`, and the embedding rows of the new
    tokens trainable (peft trainable tokens: those rows only, not the whole matrix; with an untied output
    head its rows too), so an extended vocabulary still learns its tokens."""
    if not model_args.model_name_or_path:
        raise ConfigError(f"finetuning lora{' with quantization_bit' if model_args.quantization_bit else ''} adapts a "
                          "pretrained model: set `model_name_or_path`, or train a model from scratch with "
                          "`finetuning: full`.")
    try:
        import peft
    except ImportError:
        raise ConfigError("finetuning lora needs peft: pip install peft (it is in requirements.txt).") from None
    model, shape = (saved_adapter if model_args.adapter_name_or_path else new_adapters)(model, model_args,
                                                                                        new_token_ids, peft)
    if gradient_checkpointing:  # frozen embeddings give checkpointed layers inputs without grad
        model.enable_input_require_grads()
    total, trainable, _ = parameter_counts(model)  # peft counts the new-token rows twice
    experts, adapted = bool(expert_shares(model)), model.peft_config["default"].target_parameters
    logger.info("finetuning lora: %s trainable parameters of %s (%.2f%%): %s%s", f"{trainable:,}", f"{total:,}",
                100 * trainable / total, shape,
                "" if not experts else f"; the routed experts' weights: adapted too ({', '.join(sorted(adapted))})"
                if adapted else "; the routed experts' weights: frozen (peft adapts only their layers' linear ones)")
    return model


def check_token_rows_gather(new_token_ids: list[int]) -> None:
    """peft trains new tokens' rows (trainable tokens) under ZeRO-3 by gathering the partitioned embedding on a
    CUDA device; elsewhere it fails with an assertion."""
    if new_token_ids and is_deepspeed_zero3_enabled():
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cuda":
            raise ConfigError(f"finetuning lora with {len(new_token_ids)} new tokens under DeepSpeed ZeRO-3 on "
                              f"{get_accelerator().device_name()}: peft gathers the partitioned rows of new tokens on "
                              "CUDA devices only. Run it on GPUs, use deepspeed/ds_zero2.json, or train the embedding "
                              "matrices whole (`lora_extra_modules: embed_tokens,lm_head`).")


def new_adapters(model, model_args: ModelArguments, new_token_ids: list[int], peft) -> tuple:
    """The model with new LoRA adapters of the run's shape, and that shape in words."""
    targets = ("all-linear" if model_args.lora_target in ("all-linear", "all")  # all: MedicalGPT's, LLaMA-Factory's
               else [t.strip() for t in model_args.lora_target.split(",") if t.strip()])
    module_names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    if targets != "all-linear":  # peft ignores a name that matches nothing when another one matches
        paths = [name for name, _ in model.named_modules()]
        unknown = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
        if unknown:
            linear = sorted({module_names[m] for m in model.modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"lora_target `{model_args.lora_target}`: {', '.join(f'`{t}`' for t in unknown)} "
                              f"name(s) no module of this model. Its linear layers: {', '.join(linear)}; or use "
                              "all-linear.")
    embeddings = {module_names[m] for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    on_embeddings = [t for t in targets if t.rsplit(".", 1)[-1] in embeddings] if targets != "all-linear" else []
    if on_embeddings and (new_token_ids or model.config.tie_word_embeddings):
        why = (f"the run adds {len(new_token_ids)} new tokens, whose rows train on those modules instead (peft trainable "
               "tokens)" if new_token_ids else "this model ties its output head to its input embeddings (one matrix), "
               "so merging an adapter of one into it would change the other")
        raise ConfigError(f"lora_target `{model_args.lora_target}`: {', '.join(on_embeddings)}: {why}. Drop "
                          f"{'it' if len(on_embeddings) == 1 else 'them'} from lora_target; to train whole embedding "
                          "matrices use `finetuning: freeze` with `freeze_extra_modules`.")
    extras = modules_outside_layers(model, "lora_extra_modules", model_args.lora_extra_modules)
    if set(extras) & embeddings and model.config.tie_word_embeddings:
        raise ConfigError(f"lora_extra_modules {model_args.lora_extra_modules}: this model ties its output head to its "
                          "input embeddings (one matrix), and peft trains a copy of a module, which would untie them. "
                          "Train the matrix with `finetuning: freeze` and `freeze_extra_modules: "
                          f"{next(iter(set(extras) & embeddings))}`, or drop it (new tokens' rows train anyway).")
    tokens = None
    if new_token_ids:  # (rows of a matrix that trains whole need no rows of their own)
        tokens = {module_names[m]: new_token_ids for m in (model.get_input_embeddings(), None if
                  model.config.tie_word_embeddings else model.get_output_embeddings())
                  if m is not None and module_names[m] not in extras} or None
        check_token_rows_gather(new_token_ids if tokens else [])
    alpha = model_args.lora_alpha or (16 if model_args.use_rslora else 2 * model_args.lora_rank)
    experts = bool(expert_shares(model))  # all-linear: peft may adapt routed experts' fused weights as parameters
    no_dropout = experts and targets == "all-linear"
    dropout = model_args.lora_dropout if model_args.lora_dropout is not None else 0.0 if no_dropout else 0.05
    config = peft.LoraConfig(r=model_args.lora_rank, lora_alpha=alpha,
                             lora_dropout=dropout, target_modules=targets,
                             use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
                             trainable_token_indices=tokens, modules_to_save=extras or None, task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:
        if "does not work with lora_dropout" in str(e):
            raise ConfigError(f"lora_dropout {dropout}: peft adapts this mixture-of-experts model's experts as "
                              "weights, not layers, and that takes no dropout. Leave lora_dropout unset (0 here), or "
                              "name the layers to adapt in lora_target (the experts then stay frozen).") from None
        raise ConfigError(f"lora_target `{model_args.lora_target}`: {e} Name linear layers of this model, or use "
                          "all-linear.") from None  # no module matches lora_target
    whole = f", {', '.join(extras)} whole" if extras else ""
    new_rows = f", plus the rows of {len(new_token_ids)} new tokens" if tokens else ""
    return model, f"rank {model_args.lora_rank} on {model_args.lora_target}{whole}{new_rows}"


def saved_adapter(model, model_args: ModelArguments, new_token_ids: list[int], peft) -> tuple:
    """The model with the LoRA adapter of adapter_name_or_path, training on (its own shape), and that in words.
    Rows of new tokens must be the adapter's own: they were trained with it."""
    adapter = Path(model_args.adapter_name_or_path)
    try:
        saved = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter_name_or_path `{adapter}` holds no readable adapter_config.json ({e}): give a LoRA "
                          "adapter directory, such as a LoRA run's output_dir/adapter.") from None
    if saved.get("peft_type") != "LORA":
        raise ConfigError(f"adapter_name_or_path `{adapter}` is a {saved.get('peft_type')} adapter, not LoRA.")
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embeddings = [names[m] for m in (model.get_input_embeddings(), None if model.config.tie_word_embeddings
                                     else model.get_output_embeddings()) if m is not None]
    whole = set(saved.get("modules_to_save") or []) & {*embeddings, names.get(model.get_output_embeddings())}
    if whole and model.config.tie_word_embeddings:
        raise ConfigError(f"adapter_name_or_path `{adapter}` trains {', '.join(sorted(whole))} whole, and this model "
                          "ties its output head to its input embeddings (one matrix): merging would untie them.")
    refit = "give the tokenizer the adapter was trained with (its run's output_dir), or start new adapters"
    if whole:  # matrices trained whole (lora_extra_modules) hold the new tokens' rows: as many as the model has now
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            saved_rows = {f.get_slice(k).get_shape()[0] for k in f.keys() if ".modules_to_save." in k}
        rows_now = model.get_input_embeddings().num_embeddings
        if saved_rows - {rows_now}:
            raise ConfigError(f"adapter_name_or_path `{adapter}` trains embedding matrices of "
                              f"{', '.join(map(str, sorted(saved_rows)))} rows, and this run's model has {rows_now}: "
                              f"{refit}.")
    rows = saved.get("trainable_token_indices") or {}
    rows = rows if isinstance(rows, dict) else {embeddings[0]: rows}
    if any(sorted(rows.get(m, [])) != sorted(new_token_ids) for m in embeddings if m not in whole):
        trained = sorted({i for ids in rows.values() for i in ids})
        raise ConfigError(f"adapter_name_or_path `{adapter}` trained embedding rows for token ids "
                          f"{trained[:3] or 'none'}{'...' if len(trained) > 3 else ''}, and this run's tokenizer adds "
                          f"{len(new_token_ids)} tokens to the model ({new_token_ids[:3] or 'none'}...): {refit}.")
    check_token_rows_gather(new_token_ids if any(rows.values()) else [])
    base = saved.get("base_model_name_or_path")
    if base and os.path.abspath(os.path.expanduser(base)) != os.path.abspath(model_args.model_name_or_path):
        logger.warning("adapter_name_or_path %s was trained on %s; this run loads it onto %s: check it is the same "
                       "model", adapter, base, model_args.model_name_or_path)
    model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model, f"adapter {adapter} (rank {saved.get('r')}) trained on"


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def is_quantized(model) -> bool:
    """Whether the (base) model's weights are bitsandbytes-quantized: quantization_bit, QLoRA."""
    base = model.get_base_model() if is_lora(model) else model
    return bool(getattr(base, "is_quantized", False))


def plain_output_head(model) -> bool:
    """Whether the output projection is a plain Linear (not wrapped by LoRA or trainable tokens): fused
    losses (chunked_loss, Liger) read its weight directly and would miss a wrapper's part."""
    base = model.get_base_model() if is_lora(model) else model
    return type(base.get_output_embeddings()) is torch.nn.Linear


def quantization_config(model_args: ModelArguments, compute_dtype: torch.dtype):
    """bitsandbytes settings for quantization_bit (QLoRA: NF4 with double quantization by default)."""
    if importlib.util.find_spec("bitsandbytes") is None:  # transformers' own message comes later and says less
        raise ConfigError("quantization_bit needs bitsandbytes: pip install bitsandbytes (CUDA GPUs; recent versions "
                          "also run on CPUs).")
    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                              bnb_4bit_use_double_quant=model_args.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


def extend_context(config, model_args: ModelArguments, block_size: int | None) -> None:
    """rope_theta and rope_scaling applied to a pretrained model's config before its weights load, so the
    rotary embeddings are built for the new length and the saved config carries the change."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:  # no RoPE, or one per layer type
        raise ConfigError(f"rope_scaling / rope_theta: `{model_args.model_name_or_path}` has no single RoPE setting "
                          f"(rope_parameters: {rope!r}). Drop them, or edit the model's config.json.")
    rope = dict(rope)
    if model_args.rope_theta:
        rope["rope_theta"] = float(model_args.rope_theta)
    original = config.max_position_embeddings
    if model_args.rope_scaling and block_size is not None and block_size <= original:
        logger.warning("rope_scaling %s: block_size %d fits the model's %d positions; positions are not scaled",
                       model_args.rope_scaling, block_size, original)
    elif model_args.rope_scaling and block_size is not None:
        if rope["rope_type"] != "default":
            raise ConfigError(f"rope_scaling {model_args.rope_scaling}: `{model_args.model_name_or_path}` already "
                              f"scales its positions ({rope['rope_type']}, factor {rope.get('factor')}). Drop "
                              "rope_scaling, or edit its rope_parameters in config.json.")
        factor = float(math.ceil(block_size / original))
        rope.update(rope_type=model_args.rope_scaling, factor=factor)
        if model_args.rope_scaling in ("yarn", "llama3"):
            rope["original_max_position_embeddings"] = original
        if model_args.rope_scaling == "llama3":  # Llama 3.1's: wavelengths beyond original/1 scaled, below /4 kept
            rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
        config.max_position_embeddings = int(original * factor)
    elif model_args.rope_theta and block_size is not None and block_size > original:
        config.max_position_embeddings = block_size  # adjusted base frequency alone: positions up to the block
    config.rope_parameters = rope
    config.validate_rope()
    logger.warning("RoPE for continued pretraining: %s, max_position_embeddings %d -> %d", rope, original,
                   config.max_position_embeddings)


def set_router_loss(config, model_args: ModelArguments) -> None:
    """A mixture-of-experts model trains with its router's load-balancing loss, weighted by moe_aux_loss_coef or
    its config's router_aux_loss_coef: transformers computes it only under output_router_logits, off by default
    (for inference), and without it the router sends most tokens to a few experts. Set before the weights load:
    the models read the weight once, when built. Models balanced without an auxiliary loss (DeepSeek-V3's
    per-expert bias) have no router_aux_loss_coef and are left as they are."""
    text = config.get_text_config()
    if not hasattr(text, "router_aux_loss_coef"):
        if model_args.moe_aux_loss_coef is not None:
            raise ConfigError(f"moe_aux_loss_coef {model_args.moe_aux_loss_coef}: the model ({text.model_type}) has "
                              "no router load-balancing loss (router_aux_loss_coef in its config); it is for "
                              "mixture-of-experts models such as Qwen2-MoE, Qwen3-MoE and Mixtral. Drop it.")
        return
    if model_args.moe_aux_loss_coef is not None:
        text.router_aux_loss_coef = model_args.moe_aux_loss_coef
    text.output_router_logits = text.router_aux_loss_coef > 0
    if text.output_router_logits:
        logger.info("mixture of experts: the router's load-balancing loss trains with weight %g (moe_aux_loss_coef)",
                    text.router_aux_loss_coef)


@contextlib.contextmanager
def without_router_loss(model):
    """A MoE model computing (and a config saying) no router logits for the time of the `with`."""
    text = model.config.get_text_config()
    routed = getattr(text, "output_router_logits", False)
    if routed:
        text.output_router_logits = False
    try:
        yield
    finally:
        if routed:
            text.output_router_logits = True


def router_loss_weight(model) -> float:
    """The weight of the router's load-balancing loss in the model's loss: 0 unless set_router_loss turned it on."""
    text = model.config.get_text_config()
    return text.router_aux_loss_coef if getattr(text, "output_router_logits", False) else 0.0


def check_model_directory(name: str) -> None:
    """A local directory without config.json holds no model: a LoRA adapter's, or the folder above the model's
    (transformers would say "Unrecognized model", with a traceback)."""
    path = Path(os.path.expanduser(name))
    if not path.is_dir() or (path / "config.json").is_file():
        return
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = None
        with contextlib.suppress(ValueError, OSError, AttributeError):
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        raise ConfigError(f"`{name}` holds a LoRA adapter (adapter_config.json), not a model. Pass its base model"
                          f"{f' (`{base}`)' if base else ''} as `model_name_or_path` to train new adapters, or merge the "
                          "adapter into it first (peft: `PeftModel.from_pretrained(base, adapter).merge_and_unload()"
                          ".save_pretrained(dir)`) and pass that directory; a LoRA run of this toolkit writes its "
                          "merged model to output_dir.")
    inside = sorted(d.name for d in path.iterdir() if (d / "config.json").is_file())
    raise ConfigError(f"model directory `{name}` has no config.json, so it holds no Hugging Face model."
                      + (f" These folders in it do: {', '.join(inside[:5])}; pass one of them." if inside else
                         " Pass the directory that holds config.json and the weights (model.safetensors, ...)."))


def create_model(model_args: ModelArguments, tokenizer, compute_dtype: torch.dtype = torch.float32,
                 device: str = "cpu", block_size: int | None = None):
    """The base model with rows for every token (continued pretraining; also returns the new tokens' ids),
    or a new one from `model_config`. Under quantization_bit its linear layers are quantized as they load,
    onto `device` (bitsandbytes weights cannot move after loading); rope_scaling scales its positions to
    `block_size`."""
    dtype = getattr(torch, model_args.torch_dtype)
    if model_args.model_name_or_path:
        unused = [f"{name} {getattr(model_args, name)}" for name in ("model_config", "model_vocab_size")
                  if getattr(model_args, name)]
        if unused:  # a config file's model_config with --model_name_or_path on the command line, say
            logger.warning("%s: for a model trained from scratch; this run continues %s, which keeps its own "
                           "architecture and vocabulary", ", ".join(unused), model_args.model_name_or_path)
        check_model_directory(model_args.model_name_or_path)
        options = {}
        if model_args.quantization_bit:
            options = {"quantization_config": quantization_config(model_args, compute_dtype), "device_map": {"": device}}
        with hub_access(model_args.model_name_or_path, "model"):
            config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                trust_remote_code=model_args.trust_remote_code)
            if model_args.rope_scaling or model_args.rope_theta:
                extend_context(config, model_args, block_size)
            set_router_loss(config, model_args)
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype,
                attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
                config=config, **options)
        if model_args.quantization_bit:
            for module in model.modules():  # see below
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    # bitsandbytes repacks 4-bit weights for CPU inference at the first forward without grad (an
                    # evaluation), and its training backward through repacked weights is wrong (measured: LoRA
                    # gradients off by ~100% after an eval; tests/test_lora.py). Keep the training layout.
                    module.support_avx512bf16_for_cpu = False
        return model, grow_embeddings(model, tokenizer, model_args)
    else:
        if not model_args.model_config:
            raise ConfigError("set `model_name_or_path` (continue pretraining) or `model_config` (from scratch, "
                              "e.g. configs/model/tiny.json).")
        if model_args.rope_scaling or model_args.rope_theta:
            raise ConfigError("rope_scaling and rope_theta change a pretrained model's positions: from scratch, set "
                              f"max_position_embeddings and the RoPE settings in {model_args.model_config}.")
        spec = model_config_settings(model_args)
        model_type = spec.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"model_config `{model_args.model_config}` has no `model_type` (llama, qwen2, ...).")
        if model_args.model_vocab_size and model_args.model_vocab_size < len(tokenizer):
            raise ConfigError(f"model_vocab_size {model_args.model_vocab_size} is smaller than the tokenizer "
                              f"({len(tokenizer)} tokens): every token needs an embedding row. Leave it unset (the "
                              "tokenizer's size rounded up to 64), or set at least the tokenizer's size.")
        vocab = max(math.ceil(len(tokenizer) / 64) * 64, model_args.model_vocab_size or 0)  # multiple of 64: fast
        if spec.get("vocab_size") != vocab:
            logger.info("vocab_size %s in %s set to %d to fit the tokenizer (%d tokens)",
                        spec.get("vocab_size"), model_args.model_config, vocab, len(tokenizer))
        spec.update(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        spec = override_config(spec, model_type, model_args)
        config = AutoConfig.for_model(model_type, **spec)
        set_router_loss(config, model_args)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=model_args.attn_implementation)
    return model, []


def model_config_settings(model_args: ModelArguments) -> dict:
    """The settings of `model_config`: a JSON file, or (run_clm's --config_name) a model directory or hub id whose
    config.json gives the architecture to train from scratch, without its weights."""
    name = model_args.model_config
    if not os.path.isfile(name) and (os.path.isdir(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name)
                                     and not name.lower().endswith(".json")):
        with data_utils.hub_access(name, "model_config", "model_config", ConfigError):
            config = AutoConfig.from_pretrained(name, revision=model_args.model_revision,
                                                trust_remote_code=model_args.trust_remote_code)
        if getattr(config, "auto_map", None):
            raise ConfigError(f"model_config `{name}` is an architecture of remote code ({config.model_type}), which "
                              "this toolkit builds only as a pretrained model: continue pretraining it "
                              "(`model_name_or_path` with `trust_remote_code: true`), or give a JSON of a "
                              "transformers architecture.")
        spec = config.to_dict()
        for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
            spec.pop(key, None)  # the saving library, the class and the dtype are the run's
        return spec
    try:
        return json.loads(Path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_config `{name}` cannot be read as JSON: {e} (a model directory or hub id gives "
                          f"its config.json){data_utils.started_elsewhere_hint(name)}") from None


SET_BY_THE_RUN = {  # config keys config_overrides may not set, with where they come from
    "vocab_size": "`model_vocab_size` (the tokenizer's size rounded up to 64 when unset)",
    "bos_token_id": "the tokenizer", "eos_token_id": "the tokenizer", "pad_token_id": "the tokenizer",
    "model_type": "the model_config JSON", "torch_dtype": "`torch_dtype`", "dtype": "`torch_dtype`",
}


def override_value(text: str):
    """A `key=value` value as run_clm.py reads it: a whole number, a number, true/false, null, or text (1e-5
    is a number here, where YAML 1.1 reads it as text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def numbers_in(value):
    """A config_overrides mapping with its text leaves read as override_value reads them, nested ones too."""
    if isinstance(value, dict):
        return {k: numbers_in(v) for k, v in value.items()}
    return override_value(value) if isinstance(value, str) else value


def override_config(spec: dict, model_type: str, model_args: ModelArguments) -> dict:
    """model_config's settings with config_overrides (`key=value,...` or a JSON/YAML mapping) applied, before
    the config is built (so what derives from them, like head_dim from hidden_size, follows): each key must be
    a setting of that model type, each value of the type it holds (a whole number where an int is, true/false
    where a bool is), so a typo cannot add an attribute the model never reads."""
    text = (model_args.config_overrides or "").strip()
    if not text:
        return spec
    where = f"config_overrides `{text}`"
    if text.startswith("{"):
        try:
            pairs = yaml.safe_load(text)
        except yaml.YAMLError:
            pairs = None
        if not isinstance(pairs, dict):
            raise ConfigError(f"{where} is not a mapping: write `key=value,key=value` or `{{key: value}}`.")
        pairs = numbers_in(pairs)  # YAML 1.1 reads 1e-6 as text
    else:
        pairs = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{where}: `{item}` is not `key=value` (several: "
                                  "num_hidden_layers=4,hidden_size=256).")
            pairs[key.strip()] = override_value(value.strip())
    settings = {**AutoConfig.for_model(model_type).to_dict(), **spec}
    for key, value in pairs.items():
        if key in SET_BY_THE_RUN:
            raise ConfigError(f"{where}: `{key}` is set by {SET_BY_THE_RUN[key]}, not by config_overrides.")
        if key not in settings:
            public = sorted(k for k in settings if not k.startswith("_"))
            raise ConfigError(f"{where}: `{key}` is not a setting of {model_type} models."
                              f"{closest_key_hint(key, public)} Their settings: {', '.join(public)}.")
        old = settings[key]
        if isinstance(old, bool) or isinstance(value, bool):
            ok = isinstance(old, bool) and isinstance(value, bool) or old is None
        elif isinstance(old, int):
            ok = isinstance(value, int) or isinstance(value, float) and value.is_integer()
            value = int(value) if ok else value
        elif isinstance(old, float):
            ok = isinstance(value, (int, float))
            value = float(value) if ok else value
        else:
            ok = old is None or isinstance(value, type(old))
        if not ok:
            nested = " (a nested setting: give config_overrides as a mapping in the config file)" if isinstance(
                old, (dict, list)) else ""
            raise ConfigError(f"{where}: `{key}` holds {type(old).__name__} values (now {old!r}), got "
                              f"{value!r}{nested}.")
        spec[key] = value
    logger.info("model config from %s with %s", model_args.model_config,
                ", ".join(f"{key}={value}" for key, value in pairs.items()))
    return spec


CHUNKED_LOSS_MODELS = ("llama", "qwen2", "qwen3", "mistral")  # plain lm_head logits: no softcap, scale or bias
CHUNK_LOGITS_BYTES = 2**30  # fp32 logits of one chunk (1,766 tokens at a 151,936 vocabulary); its peak is ~1.5x


class ChunkedCrossEntropy(torch.autograd.Function):
    """Next-token cross-entropy of `hidden @ weight.T` computed a chunk of tokens at a time, so the full
    [tokens, vocab] logits (and their fp32 copy and gradient: about 14 bytes x vocab per token, 34 GB for
    16 k tokens at Qwen's 151,936) never exist. The gradients are computed chunk by chunk during the forward
    pass (softmax minus one-hot, then two matmuls), kept, and scaled in backward: the same matmuls as the
    plain loss, in the same precision (bf16 logits, fp32 softmax), as Liger's fused loss does. The scale
    (upstream gradient / token count) is applied last, in backward, so fp16's loss scaling keeps its effect."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator, needs_grad: bool, hits=None):
        """`hits` (evaluation): a bool per token, set where the most likely next token is the label."""
        chunk = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight.T).float()
            valid = y != -100
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            if hits is not None:
                hits[start:start + chunk] = logits.argmax(-1) == y
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            if needs_grad:  # d (summed loss) / d logits = softmax - one_hot, zero for ignored tokens
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, target[:, None], -valid[:, None].to(probs.dtype))
                grad_logits = probs.mul_(valid[:, None]).to(h.dtype)
                grad_hidden[start:start + chunk] = grad_logits @ weight
                grad_weight += grad_logits.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight, denominator)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, denominator = ctx.saved_tensors
        scale = grad_output / denominator
        return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None, None, None


def chunked_loss_forward(self, *args, labels=None, num_items_in_batch=None, shift_labels=None, **kwargs):
    """A causal LM's forward whose loss is ChunkedCrossEntropy's (no logits are returned with a loss);
    without labels (generation, the saved-model check) it is the model's own forward."""
    if labels is None and shift_labels is None:
        return type(self).forward(self, *args, **kwargs)
    kwargs.pop("logits_to_keep", None)
    kwargs["return_dict"] = True
    outputs = getattr(self, self.base_model_prefix)(*args, **kwargs)
    hidden = outputs.last_hidden_state
    weight = self.get_output_embeddings().weight
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise RuntimeError(f"chunked_loss: the output projection's weight has shape {tuple(weight.shape)} here, not "
                           f"vocab x {hidden.shape[-1]}: it is sharded (FSDP wrapping it on its own?). Wrap only the "
                           "decoder layers (torchrun/fsdp_config.json) or drop chunked_loss.")
    if shift_labels is None:  # token t predicts token t+1
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    targets = shift_labels.to(hidden.device).reshape(-1)
    denominator = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # not in evaluation
    hits = None if needs_grad else torch.zeros(targets.shape, dtype=torch.bool, device=hidden.device)
    loss = ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets,
                                     torch.as_tensor(denominator, device=hidden.device), needs_grad, hits)
    output = CausalLMOutputWithPast(loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    if hits is not None:  # no logits to read next-token accuracy from
        valid = targets.view(hidden.shape[:-1]) != -100
        output["next_token_hits"] = torch.stack([(hits.view(valid.shape) & valid).sum(-1), valid.sum(-1)], -1)
    return output


def next_token_hits(outputs, labels: torch.Tensor) -> torch.Tensor | None:
    """Per block of a batch: [tokens whose most likely next token (argmax) is the label, tokens with a label],
    as run_clm.py's eval accuracy counts them; None when the model returned no logits (Liger's fused loss)."""
    hits = outputs.get("next_token_hits")
    if hits is not None:
        return hits
    logits = outputs.get("logits")
    if logits is None:
        return None
    predicted = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:].to(predicted.device)
    valid = targets != -100
    return torch.stack([((predicted == targets) & valid).sum(-1), valid.sum(-1)], -1)


def use_chunked_loss(model, training_args: PretrainingArguments) -> None:
    """chunked_loss: the model computes its training loss with ChunkedCrossEntropy."""
    if is_deepspeed_zero3_enabled():
        raise ConfigError("chunked_loss reads the output projection's weight directly, which ZeRO-3 keeps "
                          "partitioned: use it with ZeRO-1/2, DDP, FSDP or one process.")
    if training_args.use_liger_kernel:
        raise ConfigError("chunked_loss and use_liger_kernel both replace the loss: Liger's fused loss is the same "
                          "idea; choose one.")
    if not plain_output_head(model):
        raise ConfigError("chunked_loss reads the output projection's weight directly, which finetuning lora wraps "
                          "here (new tokens' rows, or lm_head in lora_target): drop chunked_loss.")
    model = model.get_base_model() if is_lora(model) else model  # LoRA layers run inside its decoder
    head = model.get_output_embeddings()
    if model.config.model_type not in CHUNKED_LOSS_MODELS or getattr(head, "bias", None) is not None:
        raise ConfigError(f"chunked_loss supports {', '.join(CHUNKED_LOSS_MODELS)} models (plain output "
                          f"projection), not `{model.config.model_type}`: drop chunked_loss.")
    @functools.wraps(type(model).forward)  # its signature, which generate() and the Trainer inspect
    def forward(self, *args, **kwargs):
        return chunked_loss_forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


# --------------------------------------------------------------------------------------------
# 5. Trainer: perplexity and throughput in every log, a loss curve on disk
# --------------------------------------------------------------------------------------------
# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts unless named).
PEAK_TFLOPS = {"H200 NVL": 835.5, "H200": 989.5, "H100 PCIe": 756.0, "H100 NVL": 835.5, "H100": 989.5,
               "H800 PCIe": 756.0, "H800": 989.5, "H20": 148.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "L40": 181.0, "L4": 121.0, "A10": 125.0, "A30": 165.0, "V100S": 130.0, "V100-PCIE": 112.0,
               "V100": 125.0, "Tesla T4": 65.0, "RTX 4090": 165.2}  # V100, T4: fp16 (no bf16 units)


def peak_flops_per_device(training_args: PretrainingArguments) -> float | None:
    """The accelerator's peak FLOP/s for MFU: `peak_tflops` if set, else the table by device name."""
    if training_args.peak_tflops:
        return training_args.peak_tflops * 1e12
    if training_args.use_cpu or not torch.cuda.is_available() or not training_args.low_precision:
        return None  # no table entry means anything for CPUs or fp32
    return peak_flops_of(torch.cuda.get_device_name())


def peak_flops_of(device_name: str) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of a GPU by its name, from PEAK_TFLOPS; None when not listed."""
    for key, tflops in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100", "L40S" before "L40" and "L4"
        # (and "V100S", "V100-PCIE" before "V100")
        if all(part in device_name for part in key.split()):
            return tflops * 1e12
    return None


def flops_per_token(model, block_size: int, backward_to_embeddings: bool = False) -> float:
    """Training FLOPs per token, PaLM's convention: 2 N forward + 2 N' for the gradients of the activations
    + 2 T for the gradients of the trainable weights, + 12 L H Q S for attention scores and values.
    N = parameters doing matmuls (all but the input embedding lookup; a tied embedding counts once, as the
    output projection; of a mixture of experts' routed experts the top-k share, expert_shares); T = the
    trainable ones among them; N' = those that activation gradients pass
    through: all (N' = N, so 6 N when all train, about 4 N under LoRA) unless the lowest trainable decoder
    layer is above the first (finetuning freeze: backward stops there, and attention's backward 8 of the 12
    runs in the layers above only; where only the head trains, none; `backward_to_embeddings`: it does not stop,
    as under reentrant gradient checkpointing). Checked against torch's FlopCounterMode (tests/test_freeze.py).
    H heads of width Q (usually H Q = hidden size, not for Qwen3-like configs
    with a wider head_dim); S = block size, no discount for the causal mask."""
    config = model.config
    embedding = model.get_input_embeddings()
    lookup = set() if getattr(config, "tie_word_embeddings", False) else {id(p) for p in embedding.parameters()}
    prefix = next((name + "." for name, module in model.named_modules() if module is embedding), "\0")
    named = list(model.named_parameters())
    layers = config.num_hidden_layers
    trained_layers = [layers if layer_of(name) is None else layer_of(name) for name, p in named if p.requires_grad
                      and not name.startswith(prefix)]  # the head and final norm count as above every layer
    embedding_trains = any(p.requires_grad for name, p in named if name.startswith(prefix))
    lowest = 0 if embedding_trains or backward_to_embeddings else min(trained_layers, default=layers)
    # LoRA's new-token rows (peft trainable tokens) stand in for rows of a matrix already counted: their gradient
    # is computed, they add no matmul of their own
    rows = {id(p) for name, p in named if "trainable_tokens_delta" in name and id(p) not in lookup}
    matmul = [(name, p) for name, p in named if id(p) not in lookup and id(p) not in rows
              and ".original_module." not in name]  # LoRA extra modules: their trained copy computes instead
    shares = expert_shares(model)

    def used(p) -> float:  # the weights one token computes with
        return numel(p) * shares.get(id(p), 1)

    n = sum(used(p) for _, p in matmul)
    # trainable rows of an output head: peft computes the head with the whole matrix, rows put in, so the gradient
    # of that matrix is one full matmul, of which only the rows are kept
    head = {id(p) for p in model.get_output_embeddings().parameters()} if rows else set()
    trainable = (sum(used(p) for _, p in matmul if p.requires_grad)
                 + sum(numel(p) for _, p in matmul if id(p) in head and not p.requires_grad))
    backward = sum(used(p) for name, p in matmul if (layer_of(name) if layer_of(name) is not None else layers) >= lowest)
    if lowest == layers:  # only the head (and the final norm) train: no activation gradient runs below the head,
        head = {id(p) for p in model.get_output_embeddings().parameters()}  # and through it only to a norm that trains
        norm_trains = any(p.requires_grad for name, p in matmul if layer_of(name) is None and id(p) not in head)
        backward = sum(used(p) for _, p in matmul if id(p) in head) if norm_trains else 0
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * n + 2 * backward + 2 * trainable + (4 * layers + 8 * (layers - lowest)) * width * block_size


def expert_shares(model) -> dict[int, float]:
    """Mixture of experts: the share of each routed expert's weights that one token computes with, top-k over
    the experts (its router picks k of them), by id of the parameter; shared experts and the rest count whole."""
    text = model.config.get_text_config()
    top_k = next((v for v in (getattr(text, n, None) for n in ("num_experts_per_tok", "top_k", "moe_topk"))
                  if isinstance(v, int) and not isinstance(v, bool)), None)
    shares = {}
    for name, module in model.named_modules() if top_k else ():
        if name.rsplit(".", 1)[-1] != "experts":
            continue
        params = list(module.parameters())  # (under LoRA also its adapters, for peft wraps the experts module)
        shapes = [getattr(p, "ds_shape", p.shape) for p in params]  # (ZeRO-3 partitions the weights)
        fused = next((shape[0] for shape in shapes if len(shape) == 3), None)  # experts x out x in
        experts = len(module) if isinstance(module, torch.nn.ModuleList) else fused
        shares.update({id(p): min(top_k / experts, 1.0) for p in params} if experts else {})
    return shares


def with_fp32_master_weights(optimizer_cls: type) -> type:
    """`optimizer_cls`, updating fp32 master copies of the model's bf16 weights (Megatron's bf16 scheme).
    Forward and backward run on bf16 weights, with no autocast casting fp32 weights at each use; each step
    copies the bf16 gradients to fp32, updates the fp32 masters (and fp32 optimizer states) and rounds the
    masters back into the model. Updates far smaller than a bf16 weight's resolution (1/256 of it) thus add
    up instead of vanishing. The masters are part of `state_dict`, so a checkpoint resumes exactly."""

    class Fp32MasterWeights(optimizer_cls):
        def __init__(self, params, **kwargs):
            params = list(params)
            groups = ([{**g, "params": list(g["params"])} for g in params] if isinstance(params[0], dict)
                      else [{"params": params}])
            self.model_params = [p for group in groups for p in group["params"]]
            self.master_params = [p.detach().to(torch.float32, copy=True) for p in self.model_params]
            masters = iter(self.master_params)
            for group in groups:
                group["params"] = [next(masters) for _ in group["params"]]
            super().__init__(groups, **kwargs)
            # Until a checkpoint's masters are loaded, the first step takes them from the weights again: DDP
            # replaces every rank's weights with rank 0's after this optimizer is built.
            self.masters_from_weights = True

        def check_overrides(self):
            """bitsandbytes' per-weight settings (the Trainer keeps embeddings' optimizer state in 32 bits under
            its 8-bit optimizers) name the model's weights; this optimizer's groups hold their masters."""
            master_of = {id(p): m for p, m in zip(self.model_params, self.master_params)}
            place = {id(p): (g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])}
            for module, attr, config in self.mng.module_weight_config_triple:
                master = master_of.get(id(getattr(module, attr)))
                if master is not None and id(master) in place:
                    self.mng.pid2config[id(master)] = config
                    self.mng.index2config[place[id(master)]] = config

        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("fp32 master weights do not support an optimizer closure")
            if self.masters_from_weights:
                torch._foreach_copy_(self.master_params, self.model_params)
                self.masters_from_weights = False
            pairs = [(p, m) for p, m in zip(self.model_params, self.master_params) if p.grad is not None]
            if not pairs:
                return None
            for p, m in pairs:  # fp32 gradients live only during the step
                m.grad = torch.empty_like(m)
            torch._foreach_copy_([m.grad for _, m in pairs], [p.grad for p, _ in pairs])
            # torch wraps an optimizer class's step with the step hooks once an instance exists; the hooks already
            # ran around this step, so the update is the class's own step
            update = optimizer_cls.step
            if getattr(update, "hooked", False):
                update = update.__wrapped__
            update(self)
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
            for _, m in pairs:
                m.grad = None
            return None

        def state_dict(self):
            return {**super().state_dict(), "fp32_master_weights": self.master_params}

        @torch.no_grad()
        def load_state_dict(self, state_dict):
            state_dict = dict(state_dict)
            masters = state_dict.pop("fp32_master_weights", None)
            super().load_state_dict(state_dict)
            if masters is None:  # written by a run with other precision settings: start from the weights
                logger.warning("the optimizer state has no fp32 master weights (saved without mixed_precision "
                               "bf16_weights): the masters start from the model's bf16 weights")
                self.masters_from_weights = True
                return
            if all(m is own for m, own in zip(masters, self.master_params)):
                return  # its own state handed back (accelerate does so to move it to the device): nothing new
            if [m.shape for m in masters] != [m.shape for m in self.master_params]:
                raise ValueError("the checkpoint's fp32 master weights do not match this model's parameters")
            torch._foreach_copy_(self.master_params, [m.to(self.master_params[0].device) for m in masters])
            torch._foreach_copy_(self.model_params, self.master_params)
            self.masters_from_weights = False

    Fp32MasterWeights.__name__ = Fp32MasterWeights.__qualname__ = f"Fp32Master{optimizer_cls.__name__}"
    Fp32MasterWeights.__module__ = optimizer_cls.__module__  # the Trainer recognises bitsandbytes by it
    return Fp32MasterWeights


def allreduce_in_fp32(process_group, bucket):
    """DDP communication hook for bf16 gradients: average them in fp32, as Megatron does by default; a bf16
    sum over many ranks would round at every addition."""
    group = process_group or torch.distributed.group.WORLD
    gradients = bucket.buffer()
    fp32 = gradients.float().div_(group.size())

    def write_back(future):
        gradients.copy_(future.value()[0])
        return gradients

    return torch.distributed.all_reduce(fp32, group=group, async_op=True).get_future().then(write_back)


def with_lora_plus(optimizer_cls: type, ratio: float, model) -> type:
    """`optimizer_cls` with the LoRA B matrices in groups of their own at `ratio` times the learning rate (the
    schedule scales every group alike, so the ratio holds throughout)."""
    fast = {id(p) for name, p in model.named_parameters() if "lora_B" in name or "lora_embedding_B" in name}

    class LoraPlus(optimizer_cls):
        def __init__(self, params, **kwargs):
            params = list(params)
            groups, split = ([dict(g) for g in params] if isinstance(params[0], dict) else [{"params": params}]), []
            for group in groups:
                slow = [p for p in group["params"] if id(p) not in fast]
                quick = [p for p in group["params"] if id(p) in fast]
                split += [{**group, "params": slow}] if slow else []
                split += [{**group, "params": quick, "lr": group.get("lr", kwargs["lr"]) * ratio}] if quick else []
            super().__init__(split, **kwargs)

    # the Trainer knows optimizers by their class's printed name: bitsandbytes' 8-bit ones get 32-bit embeddings
    LoraPlus.__module__, LoraPlus.__qualname__ = optimizer_cls.__module__, optimizer_cls.__qualname__
    LoraPlus.__name__ = optimizer_cls.__name__
    return LoraPlus


def plain_optimizer(training_args: PretrainingArguments, model, feature: str, fix: str) -> tuple[type, dict]:
    """The configured optimizer class and its arguments, for `feature`, which subclasses it: a torch optimizer
    built from parameter groups (not a factory, nor one that takes the model or builds its own groups)."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or (
            {"params", "model", "optimizer_dict"} & kwargs.keys()):
        raise ConfigError(f"{feature} needs a plain torch optimizer over the weights (adamw_torch_fused, adamw_torch, "
                          f"sgd, ...); `optim: {training_args.optim}` is not one. {fix}")
    return optimizer_cls, kwargs


def master_weights_optimizer(training_args: PretrainingArguments, model=None) -> tuple[type, dict]:
    """mixed_precision bf16_weights: the configured optimizer class, wrapped to keep fp32 master weights."""
    optimizer_cls, kwargs = plain_optimizer(training_args, model, "mixed_precision bf16_weights",
                                            "Use mixed_precision bf16 with it.")
    return with_fp32_master_weights(optimizer_cls), kwargs


def muon_matrices(model) -> list[torch.nn.Parameter]:
    """use_muon: the trainable 2-D weights inside the model (attention, MLP, routers), which Muon updates; the
    embeddings and output head are lookups and a classifier, not hidden transforms, and stay with AdamW (as in
    Keller Jordan's and Moonlight's recipes), as do norms, biases and 3-D fused expert weights."""
    outside = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        outside.add(id(head.weight))
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in outside]


def with_muon(optimizer_cls: type, model) -> type:
    """An optimizer that updates `muon_matrices` with torch.optim.Muon and every other parameter with
    `optimizer_cls` (the configured AdamW), over the Trainer's parameter groups (weight decay or not). Its
    param_groups are the two optimizers' own, so the LR schedule drives both; the state holds both."""
    matrices = {id(p) for p in muon_matrices(model)}
    if not matrices:
        raise ConfigError("use_muon: the model has no trainable weight matrices for Muon (finetuning freeze with "
                          "only embeddings or norms training?): drop use_muon.")

    class MuonWithAdamW(torch.optim.Optimizer):
        def __init__(self, params, **kwargs):
            split = {True: [], False: []}
            for group in params:
                for is_matrix in (True, False):
                    chosen = [p for p in group["params"] if (id(p) in matrices) == is_matrix]
                    if chosen:
                        split[is_matrix].append({**group, "params": chosen})
            self.muon = torch.optim.Muon(split[True], lr=kwargs["lr"], adjust_lr_fn="match_rms_adamw")
            self.other = optimizer_cls(split[False], **kwargs) if split[False] else None
            self.parts = [o for o in (self.muon, self.other) if o is not None]
            super().__init__([g for o in self.parts for g in o.param_groups], {})  # the same group dicts

        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("use_muon does not support an optimizer closure")
            for optimizer in self.parts:
                optimizer.step()

        def zero_grad(self, set_to_none: bool = True):
            for optimizer in self.parts:
                optimizer.zero_grad(set_to_none)

        def state_dict(self):
            return {"muon": self.muon.state_dict(), "other": self.other and self.other.state_dict()}

        def load_state_dict(self, state_dict):
            if "muon" not in state_dict:
                raise ValueError("this optimizer state was not saved with use_muon")
            self.muon.load_state_dict(state_dict["muon"])
            if self.other is not None:
                self.other.load_state_dict(state_dict["other"])
            # loading replaces the parts' group dicts (accelerate reloads every optimizer's state at the start):
            # the schedule must set the learning rate in the new ones
            self.param_groups = [g for o in self.parts for g in o.param_groups]

    return MuonWithAdamW


def optimizer_of(training_args: PretrainingArguments, model) -> tuple[type, dict] | None:
    """The optimizer class and arguments when bf16_weights, LoRA+ or Muon change the Trainer's own; None
    otherwise."""
    if not (training_args.bf16_weights or training_args.loraplus_lr_ratio or training_args.use_muon):
        return None
    feature = "use_muon" if training_args.use_muon else "loraplus_lr_ratio"
    optimizer_cls, kwargs = (master_weights_optimizer(training_args, model) if training_args.bf16_weights else
                             plain_optimizer(training_args, model, feature, f"Drop {feature}."))
    if training_args.loraplus_lr_ratio:
        optimizer_cls = with_lora_plus(optimizer_cls, training_args.loraplus_lr_ratio, model)
    if training_args.use_muon:
        optimizer_cls = with_muon(optimizer_cls, model)
    return optimizer_cls, kwargs


class ThroughputMeter(TrainerCallback):
    """Tokens/s (global and per device), step time, share of time waiting for data, MFU and peak memory
    over each logging window and over the whole run (to the end of the last step: the final evaluation,
    save and checks after it are not training).

    Evaluation, checkpoints and the logging itself are excluded. The time from one step's end (or from the
    end of what ran after it: a log, an evaluation, a save) to the next step's start is the batch being
    fetched: data wait. The host sync a log makes to read the loss stays in the window, since on a GPU it
    is the steps' compute draining. Peak memory is the accelerator's over the training steps of the window
    (evaluation excluded); on a CPU, the process's peak RSS since it started. `overall` also reports the
    steady state: the run after its first logging window, which holds the one-off costs (CUDA start-up,
    kernel autotuning, torch.compile) that a long run amortises."""

    def __init__(self, tokens_per_step: int, world_size: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.window = self.total = self.steady = None
        self.ended = None  # when the last training step ended

    @staticmethod
    def _fresh(step: int) -> dict:
        return {"start": time.perf_counter(), "step": step, "wait": 0.0, "excluded": 0.0, "peak": 0.0}

    def on_train_begin(self, args, state, control, **kwargs):
        self.window, self.total = self._fresh(state.global_step), self._fresh(state.global_step)
        self.last_end = time.perf_counter()
        reset_peak_memory()

    def on_step_begin(self, args, state, control, **kwargs):
        waited = time.perf_counter() - self.last_end
        for span in self._spans():
            span["wait"] += waited
        reset_peak_memory()  # what ran between the steps (evaluation) is not the training's peak

    def on_step_end(self, args, state, control, **kwargs):
        peak = peak_memory_gib()
        for span in self._spans():
            span["peak"] = max(span["peak"], peak)
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True  # the last window, also when logging_steps does not divide max_steps
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the steps' work is done: the run's end
            self.ended = time.perf_counter()
        self.last_end = time.perf_counter()

    def _exclude(self, args, state, control, **kwargs):
        now = time.perf_counter()
        for span in self._spans() if self.ended is None else []:  # after the last step nothing is measured
            span["excluded"] += now - self.last_end
        self.last_end = now

    on_evaluate = on_save = logged = _exclude  # `logged`: called by PretrainTrainer.log after writing a log

    def _spans(self):
        return [span for span in (self.window, self.total, self.steady) if span is not None]

    def _summary(self, span: dict, step: int, end: float | None = None) -> dict:
        elapsed = (end or time.perf_counter()) - span["start"] - span["excluded"]
        steps = step - span["step"]
        if steps <= 0 or elapsed <= 0:
            return {}
        tokens_per_second = steps * self.tokens_per_step / elapsed
        summary = {"tokens_per_second": round(tokens_per_second, 1),
                   "tokens_per_second_per_device": round(tokens_per_second / self.world_size, 1),
                   "step_time_s": round(elapsed / steps, 4),
                   "data_wait_share": round(span["wait"] / elapsed, 4),
                   "peak_memory_gib": round(span["peak"], 3)}
        if self.peak_flops:
            summary["mfu"] = round(tokens_per_second / self.world_size * self.flops_per_token / self.peak_flops, 4)
        return summary

    def read(self, step: int) -> dict:
        """The figures since the last read (one logging window); the next window starts now, and what
        the log takes after this read is excluded (`logged`)."""
        summary = self._summary(self.window, step) if self.window else {}
        self.last_end = time.perf_counter()
        self.window = self._fresh(step)
        if self.steady is None:
            self.steady = self._fresh(step)
        return summary

    def overall(self, step: int) -> dict:
        summary = self._summary(self.total, step, self.ended) if self.total else {}
        steady = self._summary(self.steady, step, self.ended) if self.steady else {}
        if steady:
            summary["steady_state"] = {"from_step": self.steady["step"], **steady}
        return summary


def reset_peak_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """The accelerator's peak allocated memory since the last reset_peak_memory, or on a CPU the process's
    peak resident set size since it started (the OS keeps no resettable peak)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def sentencepiece_model_of(name_or_path: str, **hub_options) -> bytes | None:
    """A tokenizer's SentencePiece `tokenizer.model` (save_pretrained writes tokenizer.json only): from its
    directory or, for a hub id, from the hub cache beside the files from_pretrained fetched."""
    local = Path(name_or_path) / "tokenizer.model"
    if local.is_file():
        return local.read_bytes()
    if not name_or_path or Path(name_or_path).is_dir():
        return None
    from transformers.utils import cached_file

    try:
        found = cached_file(name_or_path, "tokenizer.model", _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, **hub_options)
    except (OSError, ValueError):  # a repository id that does not resolve: no file to keep
        return None
    return Path(found).read_bytes() if found else None


@dataclasses.dataclass
class ChoiceItem:
    """One forward pass of a benchmark question: its prompt's tokens (and, for answer letters of several tokens,
    one letter's), and for each choice the (position, token) pairs whose log-likelihood scores it."""
    question: int
    ids: list[int]
    targets: dict[int, list[tuple[int, int]]]


@dataclasses.dataclass
class ChoiceBenchmark:
    name: str
    items: list[ChoiceItem]
    choice_counts: list[int]
    answers: list[int]
    report: dict
    watch_forgetting: bool = False


def choice_items(question: int, prompt: str, n_choices: int, tokenizer, bos: int | None,
                 max_tokens: int) -> list[ChoiceItem]:
    """The prompt tokenized as training text is (BOS by the run's add_bos), each answer letter as the tokens
    that follow the prompt when prompt and letter are encoded together; prompts longer than the block lose
    their start (the instruction, the first shots)."""
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    letters = []
    for letter in data_utils.CHOICE_LETTERS[:n_choices]:
        whole = tokenizer(prompt + letter, add_special_tokens=False)["input_ids"]
        letters.append(whole[len(context):] if whole[:len(context)] == context and len(whole) > len(context) else
                       tokenizer(letter, add_special_tokens=False)["input_ids"])
    context = ([bos] if bos is not None else []) + context
    longest = max(map(len, letters))
    context = context[-(max_tokens - longest + 1):]
    if longest == 1:  # one pass: every letter is the token after the prompt
        return [ChoiceItem(question, context, {c: [(len(context) - 1, t[0])] for c, t in enumerate(letters)})]
    return [ChoiceItem(question, context + t[:-1], {c: [(len(context) - 1 + j, tok) for j, tok in enumerate(t)]})
            for c, t in enumerate(letters)]


def prepare_benchmarks(data_args: DataArguments, tokenizer, data) -> list[ChoiceBenchmark]:
    """`benchmarks`: each file's questions as prompts (instruction, worked examples, question, options,
    answer prefix) ready to score at every evaluation. A benchmark file a source trains on is refused."""
    if not data_args.benchmarks:
        return []
    if not data.eval:
        logger.warning("benchmarks are scored at every evaluation, and this run has no eval split (so no "
                       "evaluation): they are not scored. Give the sources one (`eval_fraction` above 0, "
                       "`eval_path`, or a hub `eval_split`) to score them.")
        return []
    bos = data_utils.resolve_bos(tokenizer, data_args.add_bos)
    trained = {Path(f["path"]).resolve(): name for name, source in data.report["sources"].items()
               for f in source["files"] if f["format"] != "hub"}
    prepared = []
    for bench in data_utils.parse_benchmarks(data_args.benchmarks):
        questions, shots, report = data_utils.load_benchmark(bench)
        for path in map(Path, report["files"]):
            if path.resolve() in trained:
                raise DataError(f"benchmark `{bench.name}`: {path} is also training data (source "
                                f"`{trained[path.resolve()]}`): the model would learn the answers. Move it out of the "
                                "sources (a `benchmarks` folder inside a per_file directory is not read for training).")
        header = (f"{bench.instruction}\n\n" if bench.instruction else "") + "".join(
            f"{s.text(bench.answer_prefix)}{data_utils.CHOICE_LETTERS[s.answer]}\n\n" for s in shots)
        items = [item for i, q in enumerate(questions) for item in choice_items(
            i, header + q.text(bench.answer_prefix), len(q.choices), tokenizer, bos, data_args.block_size)]
        report["prompt_tokens_max"] = max(len(item.ids) for item in items)
        prepared.append(ChoiceBenchmark(bench.name, items, [len(q.choices) for q in questions],
                                        [q.answer for q in questions], report, bench.watch_forgetting))
        skipped = f", {sum(report['skipped'].values())} skipped ({report['skipped']})" if report["skipped"] else ""
        logger.info("benchmark %s: %d of %d questions, %d-shot, chance accuracy %.1f%%%s", bench.name,
                    report["questions"], report["questions_available"], report["shots"],
                    100 * report["chance_accuracy"], skipped)
    return prepared


class PretrainTrainer(Trainer):
    """Adds `*_ppl` next to every eval loss, an overall eval loss over all sources, throughput and MFU
    (ThroughputMeter) and the achieved data mixture to every training log; carries out `on_nonfinite_loss`
    (stop: a device-side check read before logs, evaluations and checkpoints; skip: a per-step decision) and
    builds the fp32-master optimizer of `mixed_precision: bf16_weights`."""

    def __init__(self, *args, tokens_per_step: int, block_size: int, meter: ThroughputMeter, data_plan: dict,
                 resume: str | None = None, block_record: Path | None = None,
                 benchmarks: list["ChoiceBenchmark"] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.benchmarks = benchmarks
        self.tokens_per_step, self.block_size, self.meter, self.data_plan = tokens_per_step, block_size, meter, data_plan
        self.run_id, self.block_record = run_id_of(resume), block_record
        # steps whose update was skipped for a non-finite loss or gradient, and the current run of them: kept in
        # checkpoints, so a resume counts on (max_consecutive_skips) and reports every skip
        saved = checkpoint_record(resume, BATCH_PLAN) or {}
        self.skipped_steps: list[int] = saved.get("skipped_nonfinite_steps", [])
        self.consecutive_skips = saved.get("consecutive_skips", 0)
        self.reduces_in_fp32 = False  # bf16 weights under DDP: gradients averaged in fp32 (allreduce_in_fp32)
        self.nonfinite_loss = None  # on the device: a micro-batch of this optimizer step had a non-finite loss
        self.first_nonfinite_step = None  # on the device (stop policy): the first step that went non-finite, or -1
        # read now: the directory it came from may be a checkpoint that rotation deletes later
        self.sentencepiece_model = sentencepiece_model_of(self.processing_class.name_or_path)
        self.router_loss_weight = router_loss_weight(self.model)
        self.router_losses = []  # MoE: the router's load-balancing loss of each micro-batch since the last log
        # evaluation's next-token accuracy: the hits of the current batch's blocks, of the split so far, per split
        self.block_hits, self.hit_counts, self.split_hits = None, None, {}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final model also keep a SentencePiece tokenizer's `tokenizer.model` (save_pretrained
        writes tokenizer.json only): the vocabulary can be extended later, also after a resume. Their config.json
        is for inference, as the final model's (MoE: without the router loss that trains)."""
        with without_router_loss(self.model):
            super()._save(output_dir, state_dict)
        directory = Path(output_dir or self.args.output_dir)
        if self.args.should_save and self.sentencepiece_model is not None:
            (directory / "tokenizer.model").write_bytes(self.sentencepiece_model)
        if self.args.should_save:
            data_utils.record_special_token_flags(directory, self.processing_class)
            write_legacy_rope_keys(directory)
        if self.args.should_save and directory.name.startswith("checkpoint-"):  # what a resume must keep
            atomic_write_text(directory / BATCH_PLAN, json.dumps({**batch_plan(self.args, self.block_size),
                                                                  "run_id": self.run_id,
                                                                  "loraplus_lr_ratio": self.args.loraplus_lr_ratio,
                                                                  "use_muon": self.args.use_muon,
                                                                  "skipped_nonfinite_steps": self.skipped_steps,
                                                                  "consecutive_skips": self.consecutive_skips}))
            atomic_write_text(directory / TRAINABLE, json.dumps(trainable_names(self.model)))
            atomic_write_text(directory / DATA_PLAN, json.dumps(self.data_plan, ensure_ascii=False))

    def blocks_read(self, step: int) -> int:
        """Blocks of the data stream read by `step`: every step is full, and the stream began at the data plan's
        data_start_step (an ignore_data_skip resume starts it again)."""
        return (step - self.data_plan.get("data_start_step", 0)) * self.tokens_per_step // self.block_size

    def nonfinite_error(self, what: str) -> NonFiniteLossError:
        last = last_complete_checkpoint(self.args.output_dir)
        return every_rank(NonFiniteLossError(  # the ranks agreed on it (an all-reduce)
            f"{what}. No checkpoint holds its effect; the last good one is "
            f"{last or 'none (no checkpoint saved yet)'}. Lower `learning_rate`, raise `warmup_steps`, check the data "
            "of this step (`record_block_ids`), or use bf16 instead of fp16; then resume with "
            "--resume_from_checkpoint auto."))

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.pop("block_id", None)
        if self.block_record is not None and ids is not None:  # this micro-batch trains now: record it
            with open(self.block_record, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "block_ids": ids.tolist()}) + "\n")
        ddp = getattr(model, "_orig_mod", model)  # torch_compile_scope model compiles the DDP wrapper
        if self.args.bf16_weights and isinstance(ddp, DistributedDataParallel) and not self.reduces_in_fp32:
            ddp.register_comm_hook(None, allreduce_in_fp32)  # before the first backward, as DDP requires
            self.reduces_in_fp32 = True
            logger.info("bf16 weights under DDP: gradients are averaged across ranks in fp32")
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: no host sync per step
        self.nonfinite_loss = bad if self.nonfinite_loss is None else self.nonfinite_loss | bad
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """MoE: the model adds weight x its router loss to a cross-entropy it divides by the tokens of the whole
        optimizer step on every rank (num_items_in_batch), which the Trainer then multiplies by the number of
        ranks and leaves undivided by the accumulation steps; the router loss, a mean over the micro-batch's own
        tokens, would be scaled by that too (x accumulation steps x ranks: 16x its weight at 2 x 8). Here it is
        brought back to weight x the router loss's mean over the step's micro-batches and ranks."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        router_loss = outputs.get("aux_loss") if self.router_loss_weight and model.training else None
        if router_loss is not None:
            takes_item_count = (self.model_accepts_loss_kwargs or self.compute_loss_func) and num_items_in_batch is not None
            applied = 1  # the factor on the model's router term now, as Trainer.compute_loss scaled the loss
            if self.args.average_tokens_across_devices and takes_item_count:
                applied = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            # the factor it should have: 1 / accumulation steps where training_step leaves the loss undivided
            scaled_for_accumulation = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled_for_accumulation is None:  # (Trainer.training_step's condition)
                scaled_for_accumulation = (self.model_accepts_loss_kwargs and num_items_in_batch is not None
                                           or self.compute_loss_func is not None)
            wanted = 1 / self.current_gradient_accumulation_steps if scaled_for_accumulation else 1
            loss = loss + (wanted - applied) * self.router_loss_weight * router_loss.to(loss.device)
            self.router_losses.append(router_loss.detach().float())
        if self.block_hits is not None and not model.training:
            hits = next_token_hits(outputs, inputs["labels"])
            if hits is not None:
                self.block_hits.append(hits)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop("block_id", None)
        self.block_hits = []  # compute_loss adds each block's next-token hits
        try:
            state = self.accelerator.gradient_state
            padded = prediction_loss_only and self.args.world_size > 1 and state.end_of_dataloader and state.remainder > 0
            loss = self.padded_batch_loss(model, self._prepare_inputs(inputs)) if padded else None
            result = (loss, None, None) if loss is not None else super().prediction_step(
                model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            if self.block_hits:  # the copies padding the last batch dropped, as for the loss
                hits = self.accelerator.gather_for_metrics(torch.cat(self.block_hits)).sum(0)
                self.hit_counts = hits if self.hit_counts is None else self.hit_counts + hits
            return result
        finally:
            self.block_hits = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Adds `<prefix>_accuracy`, the next-token accuracy, to a split's metrics before the Trainer logs them."""
        self.hit_counts = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.hit_counts is not None:
            correct, counted = self.hit_counts.tolist()
            self.split_hits[metric_key_prefix] = (correct, counted)
            output.metrics[f"{metric_key_prefix}_accuracy"] = correct / max(counted, 1)
        return output

    def padded_batch_loss(self, model, inputs) -> torch.Tensor | None:
        """The last eval batch of a split whose blocks do not fill every rank's batch is padded with copies of
        blocks (accelerate's even batches), and the Trainer averages batch means, so the copies would count and
        the source's loss would differ from one process's. Here each block's loss is taken on its own, the copies
        are dropped (gather_for_metrics), and every rank returns the mean of the real blocks, which the Trainer's
        average (cut to the real blocks' number) then weighs exactly. None where the ranks' batches differ in size
        (not accelerate's padding): the Trainer's own average then."""
        size = len(inputs["input_ids"])
        sizes = self.accelerator.gather(torch.tensor([size], device=inputs["input_ids"].device))
        if not bool((sizes == size).all()):
            return None
        with torch.no_grad(), self.compute_loss_context_manager():  # one pass per block, alike on every rank
            losses = torch.stack([self.compute_loss(model, {k: v[i:i + 1] for k, v in inputs.items()}).detach()
                                  for i in range(size)]).float()
        return self.accelerator.gather_for_metrics(losses).mean()

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs):
        """on_nonfinite_loss stop: note the first step whose loss or gradient norm is non-finite, on the device,
        and stop before any log, evaluation or checkpoint that would come after it (one sync each)."""
        if self.args.on_nonfinite_loss == "stop":
            if self.nonfinite_loss is not None:  # None: called again at an epoch's end, after this step's call
                bad = self.nonfinite_loss
                fp16 = self.args.fp16 or getattr(self.accelerator, "mixed_precision", None) == "fp16"
                if grad_norm is not None and not fp16:  # fp16's loss scaler skips overflowing steps itself
                    bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
                if self.first_nonfinite_step is None:
                    self.first_nonfinite_step = torch.tensor(-1, device=bad.device)
                self.first_nonfinite_step = torch.where(bad & (self.first_nonfinite_step < 0), self.state.global_step,
                                                        self.first_nonfinite_step)
                self.nonfinite_loss = None
            if self.control.should_log or self.control.should_save or self.control.should_evaluate:
                self.stop_if_nonfinite()
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def stop_if_nonfinite(self) -> None:
        """Raise if any rank saw a non-finite step (all ranks call this at the same steps and agree)."""
        if self.first_nonfinite_step is None:
            return
        first = torch.where(self.first_nonfinite_step < 0, 2**62, self.first_nonfinite_step)
        if distributed():
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        if int(first) < 2**62:
            raise self.nonfinite_error(
                f"the training loss or gradient norm became non-finite at step {int(first)} (found at step "
                f"{self.state.global_step}: checked before every log, evaluation and checkpoint, not at every step, "
                "to keep the GPU busy)")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer_cls_and_kwargs = optimizer_of(self.args, model or self.model)
        optimizer = super().create_optimizer(model)
        if self.args.on_nonfinite_loss == "skip" and not getattr(optimizer, "skips_nonfinite", False):
            step = optimizer.step

            def guarded_step(opt, *args, **kwargs):
                return None if self.skip_update() else step(*args, **kwargs)

            optimizer.step = types.MethodType(guarded_step, optimizer)  # a bound method, as LR schedulers expect
            optimizer.skips_nonfinite = True
        return optimizer

    def skip_update(self) -> bool:
        """on_nonfinite_loss skip: drop this update when any rank saw a non-finite loss or any gradient is
        non-finite (all ranks agree, so sharded ranks stay in step); stop after too many in a row."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        flag = torch.zeros((), device=device) if self.nonfinite_loss is None else self.nonfinite_loss.float()
        if grads:  # one tensor and one host sync per step, whatever the number of parameters
            flag = torch.maximum(flag, (~torch.stack(torch._foreach_norm(grads)).isfinite()).any().float())
        if distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.nonfinite_loss = None
        if not flag.item():
            self.consecutive_skips = 0
            return False
        step = self.state.global_step + 1
        self.skipped_steps.append(step)
        self.consecutive_skips += 1
        logger.warning("step %d: non-finite loss or gradient, update skipped (%d skipped so far)", step,
                       len(self.skipped_steps))
        if self.consecutive_skips > self.args.max_consecutive_skips:
            raise self.nonfinite_error(
                f"{self.consecutive_skips} steps in a row had a non-finite loss or gradient (more than "
                f"max_consecutive_skips {self.args.max_consecutive_skips}) at step {step}; stopped before its "
                "optimizer step")
        return True

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        sets = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(sets, dict):
            self.split_hits = {}
        with without_router_loss(self.model):  # MoE: perplexity of the language model alone
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(sets, dict):  # token-weighted means over the sources (also with one, for stable keys)
            sizes = {name: len(ds) for name, ds in sets.items()}
            loss = sum(metrics[f"{metric_key_prefix}_{n}_loss"] * s for n, s in sizes.items()) / sum(sizes.values())
            overall = {f"{metric_key_prefix}_loss": loss}
            hits = [self.split_hits.get(f"{metric_key_prefix}_{name}") for name in sets]
            if all(hits):
                overall[f"{metric_key_prefix}_accuracy"] = sum(h[0] for h in hits) / max(sum(h[1] for h in hits), 1)
            for bench in self.benchmarks:
                overall[f"{metric_key_prefix}_bench_{bench.name}_accuracy"] = self.benchmark_accuracy(bench)
            self.log(overall)
            metrics.update(overall)
        return metrics

    @torch.no_grad()
    def benchmark_accuracy(self, bench: "ChoiceBenchmark") -> float:
        """The share of a benchmark's questions whose most likely answer letter is the right one. Each rank scores
        every world_size-th question, in as many forward passes as the busiest rank (ZeRO-3 and FSDP gather
        weights in every forward, on every rank together)."""
        model, rank, world = self.model, self.args.process_index, self.args.world_size
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        items = [item for item in bench.items if item.question % world == rank]
        size = self.args.per_device_eval_batch_size
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        count = torch.tensor(len(batches), device=device)
        if distributed():
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        scores = collections.defaultdict(float)  # (question, choice) -> log-likelihood of its letter
        for i in range(int(count)):
            batch = batches[i] if i < len(batches) else bench.items[:1]  # an idle rank's pass: ignored
            width = max(len(item.ids) for item in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, item in enumerate(batch):  # left padding: every sequence ends at the last position
                ids[row, width - len(item.ids):], mask[row, width - len(item.ids):] = torch.tensor(item.ids), 1
            # logits only where a letter is predicted: the last position, or a few for letters of several tokens
            keep = max(len(item.ids) - min(p for t in item.targets.values() for p, _ in t) for item in batch)
            with self.compute_loss_context_manager(), without_router_loss(model):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
                               logits_to_keep=keep).logits.float()
            if i >= len(batches):
                continue
            logprobs = logits.log_softmax(-1).cpu()
            for row, item in enumerate(batch):
                offset = keep - len(item.ids)  # an item's position -> its index among the kept logits
                for choice, targets in item.targets.items():
                    scores[item.question, choice] += sum(logprobs[row, offset + p, t].item() for p, t in targets)
        mine = {item.question for item in items}
        correct = sum(max(range(bench.choice_counts[q]), key=lambda c: scores[q, c]) == bench.answers[q] for q in mine)
        counts = torch.tensor([correct, len(mine)], device=device)
        if distributed():
            torch.distributed.all_reduce(counts)
        model.train(was_training)
        return counts[0].item() / max(counts[1].item(), 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key, value in list(logs.items()):
            if key.startswith("eval") and key.endswith("_loss"):
                logs[f"{key[:-len('_loss')]}_ppl"] = math.exp(min(value, 30.0))
        if "loss" in logs:
            step = self.state.global_step
            if self.router_losses:  # MoE: the mean over the window's micro-batches and the ranks (in `loss` x weight)
                mean = torch.stack(self.router_losses).mean()
                logs["router_aux_loss"] = round(float(self.accelerator.reduce(mean, "mean")), 4)
                self.router_losses = []
            logs.update(self.meter.read(step))
            logs["tokens_seen"] = step * self.tokens_per_step
            consumed = self.blocks_read(step)
            if hasattr(self.train_dataset, "shares"):  # the achieved mixture so far
                for name, share in self.train_dataset.shares(consumed).items():
                    logs[f"mix_{name}"] = round(share, 4)
            if hasattr(self.train_dataset, "passes"):  # `epoch` counts the Trainer's one pass over the whole run
                logs["data_passes"] = round(self.train_dataset.passes(consumed), 4)
        super().log(logs, start_time)
        if "loss" in logs:
            self.meter.logged(self.args, self.state, self.control)


def reentrant_checkpointing(training_args: PretrainingArguments) -> bool:
    """Whether gradient checkpointing runs reentrant, as transformers 5 and torch decide it: no kwargs (besides
    every_n_layers and offload, which the Trainer takes out) give use_reentrant False; other kwargs without it
    leave torch's default, True."""
    if not training_args.gradient_checkpointing:
        return False
    kwargs = {k: v for k, v in (training_args.gradient_checkpointing_kwargs or {}).items()
              if k not in ("every_n_layers", "offload")}
    return bool(kwargs.get("use_reentrant", True)) if kwargs else False


class FrozenBelowCallback(TrainerCallback):
    """finetuning freeze with frozen embeddings under gradient checkpointing: transformers makes the embedding
    output require grad, which only reentrant checkpointing needs, so the backward would run through every frozen
    layer below the trainable ones (twice the step time with one of eight layers training). Removing that hook
    stops the backward at the lowest trainable layer, as flops_per_token counts it."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not args.gradient_checkpointing or model.get_input_embeddings().weight.requires_grad:
            return
        if reentrant_checkpointing(args):
            logger.warning("finetuning freeze with reentrant gradient checkpointing: the backward runs through the "
                           "frozen layers below the trainable ones (MFU counts it); `gradient_checkpointing_kwargs: "
                           "{use_reentrant: false}` (the default) stops it at the lowest trainable layer.")
            return
        model.disable_input_require_grads()


class PreemptionCallback(TrainerCallback):
    """SIGTERM (a scheduler preempting the job) or a first Ctrl-C (SIGINT) during training -> save a checkpoint at
    the next step boundary and stop cleanly; `--resume_from_checkpoint auto` then continues from it. A second
    Ctrl-C stops at once. Ranks agree on the stop through an all-reduce, so they all save and stop at the same
    step."""

    def __init__(self):
        self.requested, self.stopped_at, self.group = None, None, None  # requested: the signal's name
        self.pid = os.getpid()  # DataLoader workers forked later inherit the handler: only this process acts
        self.previous = {}  # the handlers installed over (while the steps run)

    def _on_signal(self, signum, frame):
        if os.getpid() != self.pid:
            return
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])  # a second Ctrl-C: KeyboardInterrupt
            logger.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, "
                           "without it)")

    def on_train_begin(self, args, state, control, **kwargs):
        if distributed() and torch.distributed.get_backend() != "gloo":  # a host flag: agree on the CPU, never
            self.group = torch.distributed.new_group(backend="gloo")  # waiting for the GPU (NCCL would)
        self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job ignores Ctrl-C: keep that
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

    def on_train_end(self, args, state, control, **kwargs):
        if signal.SIGINT in self.previous:  # the final evaluation and save: Ctrl-C stops at once
            signal.signal(signal.SIGINT, self.previous.pop(signal.SIGINT))

    def restore(self) -> None:
        """The handlers as they were before the run, also when training raised (main may run again in-process)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested is not None
        if distributed():
            flag = torch.tensor([float(stop)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            stop = bool(flag.item())
        if stop:
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True
            logger.warning("%s: saving a checkpoint at step %d and stopping; resume with "
                           "--resume_from_checkpoint auto", self.requested or "another rank's signal",
                           state.global_step)


class BlockStream(torch.utils.data.Dataset):
    """The mixture's block order read as one stream by the whole run, in one Trainer epoch of `steps` full
    optimizer steps: each pass over the order is followed by the next without a seam. Left to its own epochs,
    the Trainer ends every pass with a short step (the pass's remainder, a full update on fewer blocks), which
    shrank the global batch and made token counts, tokens/s, MFU and the logged mixture overcount."""

    def __init__(self, blocks: data_utils.MixedBlocks, steps: int, blocks_per_step: int, steps_not_read: int = 0):
        """`steps_not_read`: steps of the run that read no data of this stream (those before an ignore_data_skip
        resume started it again): the Trainer's index counts them, the stream's place does not."""
        self.blocks, self.length = blocks, steps * blocks_per_step
        self.offset = steps_not_read * blocks_per_step

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        place = index - self.offset
        item = self.blocks[place % len(self.blocks)]
        item["block_id"] = place  # its place in the run's stream
        return item

    def shares(self, consumed: int) -> dict[str, float]:
        return self.blocks.shares(consumed)

    def passes(self, consumed: int) -> float:
        return consumed / len(self.blocks)


def block_stream(blocks: data_utils.MixedBlocks, training_args: PretrainingArguments, blocks_per_step: int,
                 steps_not_read: int = 0) -> BlockStream:
    """The run as full steps over the mixture: `num_train_epochs` becomes the steps that read that many passes,
    and an `epoch` evaluation, save or logging strategy acts after every pass's worth of steps."""
    steps_per_pass = math.ceil(len(blocks) / blocks_per_step)
    if training_args.max_steps <= 0:
        training_args.max_steps = math.ceil(training_args.num_train_epochs * len(blocks) / blocks_per_step)
        logger.info("num_train_epochs %g: max_steps %d", training_args.num_train_epochs, training_args.max_steps)
    for kind in ("eval", "save", "logging"):
        strategy = getattr(training_args, f"{kind}_strategy")
        if strategy == "epoch":
            setattr(training_args, f"{kind}_strategy", type(strategy)("steps"))
            setattr(training_args, f"{kind}_steps", steps_per_pass)
            logger.info("%s_strategy epoch: every %d steps (one pass over the mixture)", kind, steps_per_pass)
    return BlockStream(blocks, training_args.max_steps, blocks_per_step, steps_not_read)


class BlockCollator:
    """default_data_collator, minus the `block_id` each training block carries (the model takes no such input);
    with `keep_ids` the batch carries them as `block_id`, for PretrainTrainer to record once the batch trains
    (the DataLoader collates ahead of the step, and in worker processes)."""

    def __init__(self, keep_ids: bool = False):
        self.keep_ids = keep_ids

    def __call__(self, features: list[dict]) -> dict:
        ids = [int(f.pop("block_id")) for f in features if "block_id" in f]
        batch = default_data_collator(features)
        if self.keep_ids and ids:
            batch["block_id"] = torch.tensor(ids)
        return batch


class LossCurveCallback(TrainerCallback):
    """Writes output_dir/loss.png (train loss and eval perplexity over steps) at each eval and at the end."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "loss.png"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "eval_loss" in (logs or {}):  # an evaluation's last log: every source's, then the overall and benchmarks
            self.on_train_end(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, self.path)


class ForgettingCallback(TrainerCallback):
    """Warns when a watched source's eval perplexity rises, or a watched benchmark's accuracy falls, more than
    `threshold_pct` of its first (step-0) value: the sign that domain training is costing general ability."""

    def __init__(self, sources: list[str], benchmarks: list[str], threshold_pct: float):
        self.threshold_pct, self.baseline = threshold_pct, {}
        # metric -> +1 where a rise is forgetting (perplexity), -1 where a fall is (accuracy)
        self.watched = {**{f"eval_{n}_ppl": 1 for n in sources}, **{f"eval_bench_{n}_accuracy": -1 for n in benchmarks}}
        self.changes: dict[str, float] = {}  # source name -> % change of its perplexity
        self.benchmark_changes: dict[str, float] = {}  # benchmark name -> % change of its accuracy

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run takes its baselines from the checkpoint's history, not from its first evaluation."""
        for entry in state.log_history:
            for key in self.watched:
                if key in entry:
                    self.baseline.setdefault(key, entry[key])

    def on_log(self, args, state, control, logs=None, **kwargs):
        """(Each source's evaluation is logged on its own, the benchmarks with the overall loss after them.)"""
        for key, worse in self.watched.items():
            value = (logs or {}).get(key)
            if value is None:
                continue
            base = self.baseline.setdefault(key, value)
            change = round(100 * (value / base - 1), 2) if base else 0.0
            if key.endswith("_ppl"):
                self.changes[key[len("eval_"):-len("_ppl")]] = change
            else:
                self.benchmark_changes[key[len("eval_bench_"):-len("_accuracy")]] = change
            if worse * change > self.threshold_pct and state.is_world_process_zero:
                fix = ("Raise this source's weight (replay)" if worse > 0 else
                       "Add general-domain text (replay) or raise its weight")
                logger.warning("forgetting: %s %.4g is %.1f%% %s its baseline %.4g (threshold %s%%) at step %d. %s, "
                               "or lower the learning rate.", key, value, abs(change), "above" if worse > 0 else
                               "below", base, self.threshold_pct, state.global_step, fix)


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")


def plot_loss_curve(history: list[dict], path: Path) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    fonts = [name for name in CJK_FONTS if name in installed] + plt.rcParams["font.sans-serif"]
    # Chinese source names need a CJK font; without one installed they show as boxes, warned about at every glyph
    with plt.rc_context({"font.sans-serif": fonts}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        benchmarks = sorted({k for h in history for k in h if k.startswith("eval_bench_")})
        fig, axes = plt.subplots(1, 3 if benchmarks else 2, figsize=(16 if benchmarks else 11, 4))
        ax_loss, ax_ppl = axes[:2]
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if train:
            ax_loss.plot(*zip(*train), label="train loss")
        ax_loss.set(xlabel="step", ylabel="loss", title="train loss")
        names = sorted({k for h in history for k in h if k.startswith("eval") and k.endswith("_ppl")})
        if fonts[0] not in CJK_FONTS and any(not name.isascii() for name in names):
            data_utils.warn_once(f"{path.name}: no CJK font installed, so Chinese source names show as boxes "
                                 "(Linux: `apt install fonts-noto-cjk`)")
        for name in names:
            points = [(h["step"], h[name]) for h in history if name in h]
            ax_ppl.plot(*zip(*points), marker="o", label=name)
        ax_ppl.set(xlabel="step", ylabel="perplexity", title="eval perplexity", yscale="log")
        for name in benchmarks:
            points = [(h["step"], h[name]) for h in history if name in h]
            axes[2].plot(*zip(*points), marker="o", label=name[len("eval_bench_"):-len("_accuracy")])
        if benchmarks:
            axes[2].set(xlabel="step", ylabel="accuracy", title="benchmark accuracy")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# 6. Outputs
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], bos_id: int | None, max_new_tokens: int,
                     synced: bool = False) -> list[dict]:
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        ids = ([bos_id] if bos_id is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=1.2, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)})
        logger.info("sample: %s|%s", prompt, samples[-1]["continuation"])
    return samples


@contextlib.contextmanager
def whole_weights():
    """Models loaded inside get whole weights in this process, even inside a ZeRO-3 run (whose global config
    would otherwise partition them while loading, a collective step the other ranks do not take)."""
    import transformers.integrations.deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def load_plain_model(directory: str, dtype: torch.dtype = torch.float32):
    """from_pretrained as a user would call it: whole weights in this process, also inside a ZeRO-3 run."""
    with whole_weights():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


@torch.no_grad()
def probe_logits(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained model's logits on one held-out block, before it is saved (LoRA: before the merge).
    Every rank runs the forward (ZeRO-3 gathers the weights)."""
    block = next(iter(data.eval.values()))[0] if data.eval else next(iter(data.train))
    ids = block["input_ids"][None]
    model.eval()
    return ids, model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def probe_loss(probe: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Next-token loss of `probe_logits`' logits on its block."""
    ids, logits = probe
    return round(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item(), 6)


def verify_saved_model(probe: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype,
                       training_args: PretrainingArguments) -> dict | None:
    """Reload the saved model from output_dir and check that it reproduces the trained model's logits
    on one held-out block (`probe_logits`): a ZeRO-3 or FSDP run, or a LoRA merge, must never leave an
    unusable model behind. The main process compares."""
    ids, trained = probe
    if not training_args.should_save:
        return None
    saved = load_plain_model(training_args.output_dir, dtype=dtype)  # as it trained
    reloaded = saved(input_ids=ids).logits.float()
    diff = (trained - reloaded).abs().max().item()
    # bf16/fp16 compute, or low-precision weights that a LoRA merge rounds W + BA into, move logits more
    low_precision = training_args.low_precision or dtype != torch.float32
    tolerance = 1e-3 * max(1.0, trained.abs().max().item()) * (50 if low_precision else 1)
    check = {"max_abs_logit_diff": diff, "tolerance": tolerance, "probe_input_ids": ids[0].tolist(),
             "trained_last_logits_head": trained[0, -1, :8].tolist()}
    if diff > tolerance:
        zero3 = (" For ZeRO-3 keep stage3_gather_16bit_weights_on_model_save true in the DeepSpeed config."
                 if training_args.deepspeed else "")
        raise CheckpointError(f"the model saved in {training_args.output_dir} does not reproduce the trained model: "
                              f"logits differ by up to {diff:.3g} (tolerance {tolerance:.3g}). Do not use it; the "
                              f"checkpoints are intact.{zero3}")
    logger.info("saved model verified: reloaded, it gives the logits of the model it was saved from (max diff %.2e)",
                diff)
    return check


def eval_scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("eval") and k.endswith(("_loss", "_ppl", "_accuracy"))}


def eval_at_step(history: list[dict], step: int) -> dict:
    """Eval losses and perplexities logged at `step` (0: the baseline before training)."""
    found = {}
    for h in history:
        if h.get("step") == step:
            found.update(eval_scores(h))
    return found


BATCH_PLAN = "batch_plan.json"  # in every checkpoint: the batch geometry its data position depends on
TRAINABLE = "trainable_parameters.json"  # in every checkpoint: the parameters its optimizer state belongs to


DATA_PLAN = "data_plan.json"  # in every checkpoint: what its data position is a position in


def checkpoint_record(checkpoint: str | None, name: str) -> dict | None:
    """One of the JSON records this toolkit writes into every checkpoint (BATCH_PLAN, DATA_PLAN); None without a
    checkpoint, or for one written before that record was."""
    path = Path(checkpoint) / name if checkpoint else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None


def data_start_step(resume: str | None, training_args: PretrainingArguments) -> int:
    """The step at which the run's data stream began: 0, or the step an ignore_data_skip resume read it from the
    start again (this one, or an earlier one recorded in the checkpoint's data plan)."""
    if not resume:
        return 0
    if training_args.ignore_data_skip:
        return checkpoint_step(resume)
    return (checkpoint_record(resume, DATA_PLAN) or {}).get("data_start_step", 0)


def data_plan(report: dict, training_args: PretrainingArguments) -> dict:
    """What a checkpoint's data position depends on besides the batch: the mixture order's seed, and per
    source the token store (its key covers the files' content, formatting and tokenizer), the split and
    the share; for a stream, its settings."""
    sources = {}
    for name, source in report["sources"].items():
        kept = {k: source[k] for k in ("train_blocks", "eval_documents", "share_of_training_tokens") if k in source}
        if "store" in source:
            kept["store"] = Path(source["store"]).name
            if "legacy_store" in source:
                kept["legacy_store"] = source["legacy_store"]
        else:
            kept["stream"] = source.get("settings")
        sources[name] = kept
    return {"seed": training_args.seed, "dedup": report["dedup"], "near_dedup": report["near_dedup"],
            "sources": sources,  # in the config's order: the mixture interleaves them in it
            **{key: getattr(training_args, key) for key in OPTIMIZER_SETTINGS}}


# Settings a resume cannot change: the optimizer's param groups and the scheduler come back from the checkpoint
OPTIMIZER_SETTINGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


def check_resume_data(checkpoint: str, plan: dict, training_args: PretrainingArguments) -> None:
    """A resumed run skips the batches its checkpoint trained: in other data (other files, split, mixture or
    seed) that position means nothing, and documents it trained on could land in eval. Refused, unless
    ignore_data_skip reads the new data from its start. A new learning_rate cannot take effect: the
    scheduler resumes from its state, nor can other optimizer settings (the param groups are restored)."""
    saved = checkpoint_record(checkpoint, DATA_PLAN)
    if saved is None:  # a checkpoint from before data plans were written
        return
    ignored = [f"{key} {saved[key]} -> {plan[key]}" for key in OPTIMIZER_SETTINGS if key in saved and saved[key] != plan[key]]
    if ignored:
        logger.warning("%s has no effect on a resumed run: the optimizer and scheduler continue from %s's state. "
                       "Start a new run from its model (--model_name_or_path %s, another output_dir) to change it.",
                       ", ".join(ignored), checkpoint, checkpoint)
    changes = [f"{key} {saved.get(key)} -> {plan[key]}" for key in ("seed", "dedup", "near_dedup")
               if saved.get(key) != plan[key]]
    if saved["sources"].keys() == plan["sources"].keys() and list(saved["sources"]) != list(plan["sources"]):
        changes.append(f"source order {', '.join(saved['sources'])} -> {', '.join(plan['sources'])}")
    for name in saved["sources"].keys() | plan["sources"].keys():
        before, now = saved["sources"].get(name), plan["sources"].get(name)
        if before is None or now is None:
            changes.append(f"source `{name}` {'added' if before is None else 'removed'}")
            continue
        before, now = dict(before), dict(now)
        if before.pop("legacy_store", None) is None and before.get("store") == now.get("legacy_store"):
            now["store"] = before["store"]  # saved before local data_files were keyed by content: the same input
        now.pop("legacy_store", None)
        changes += [f"source `{name}` {key} {before.get(key)} -> {now.get(key)}"
                    for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
    if not changes:
        return
    if training_args.ignore_data_skip:
        logger.warning("resuming %s on other data (%s): ignore_data_skip reads it from its start", checkpoint,
                       "; ".join(changes))
        return
    raise ConfigError(f"{checkpoint} trained on other data ({'; '.join(sorted(changes))}; a changed store means "
                      "other file contents, formatting or tokenizer): its data position means nothing here. Resume "
                      "with the data settings it trained with; or keep its optimizer and schedule but read this data "
                      "from the start with `--ignore_data_skip true`; or start a new run from its model, in another "
                      f"`output_dir`, with `--model_name_or_path {checkpoint}`.")


def trainable_names(model) -> list[str]:
    """Names of the trainable parameters, as the uncompiled model has them (torch.compile wraps modules)."""
    return [name.replace("_orig_mod.", "") for name, p in model.named_parameters() if p.requires_grad]


def batch_plan(training_args: PretrainingArguments, block_size: int) -> dict:
    return {"block_size": block_size, "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size, "dataloader_num_workers": training_args.dataloader_num_workers,
            "tokens_per_step": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size * block_size}


def engine(training_args: PretrainingArguments) -> str:
    return ("DeepSpeed" if training_args.deepspeed else "FSDP" if training_args.fsdp
            else "neither DeepSpeed nor FSDP")


def checkpoint_engine(checkpoint: Path) -> str:
    """Which engine wrote a checkpoint, by its optimizer files: DeepSpeed (its engine state in global_step*/),
    FSDP (accelerate's optimizer.bin, or optimizer_0* when sharded, beside pytorch_model_fsdp*), or the
    Trainer's own optimizer.pt."""
    if any(checkpoint.glob("global_step*")):
        return "DeepSpeed"
    if any(checkpoint.glob("pytorch_model_fsdp*")) or any(checkpoint.glob("optimizer.bin")) or any(
            checkpoint.glob("optimizer_[0-9]*")):
        return "FSDP"
    return "neither DeepSpeed nor FSDP"


DEEPSPEED_CHECKPOINT_GLOBALS = {  # what DeepSpeed 0.19's ZeRO 1-3 (with offload) pickle beside tensors
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}


def check_checkpoint_code(checkpoint: str, training_args: PretrainingArguments) -> None:
    """DeepSpeed resumes its global_step*/ files with torch.load(weights_only=False): a downloaded checkpoint could
    run any code it names. Its pickles are read (not run) for the classes they would build, and one outside
    torch's safe set and the few DeepSpeed writes stops the run, unless `trust_checkpoint`. (The Trainer loads
    its own optimizer, scheduler and RNG files with weights_only=True.)"""
    checkpoint = Path(checkpoint)
    if training_args.trust_checkpoint or checkpoint_engine(checkpoint) != "DeepSpeed":
        return
    if linked := next((p for p in checkpoint.rglob("*") if p.is_symlink()), None):  # rglob does not enter them
        raise ConfigError(f"{linked} is a symbolic link: DeepSpeed would load files from outside the checkpoint, which "
                          "are not checked. Resume from a checkpoint without links (or `--trust_checkpoint true`).")
    for name in ("latest", "latest_universal"):  # the folder DeepSpeed loads is the one these name
        tag = (checkpoint / name).read_text(encoding="utf-8").strip() if (checkpoint / name).is_file() else ""
        if tag and not (re.fullmatch(r"[\w.-]+", tag) and tag not in (".", "..") and (checkpoint / tag).is_dir()):
            raise ConfigError(f"{checkpoint / name} names `{tag}`, which is not a folder of the checkpoint: it is "
                              "damaged or made to load files from elsewhere. Resume from another checkpoint.")
    for path in sorted(p for p in checkpoint.rglob("*") if p.suffix in (".pt", ".pth") and p.parent != checkpoint):
        try:  # (every file below the checkpoint's top level: any folder can be named as the tag)
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - DEEPSPEED_CHECKPOINT_GLOBALS
        except (ValueError, RuntimeError, OSError) as e:  # torch's legacy format, or not a torch file at all
            raise ConfigError(f"{path} cannot be checked for the code it would run when DeepSpeed loads it ({e}): "
                              "resume only checkpoints written by runs you trust, and pass `--trust_checkpoint true` "
                              "for this one if it is.") from None
        if unsafe:
            raise ConfigError(f"{path} would run code of {', '.join(sorted(unsafe))} when DeepSpeed loads it (it "
                              "unpickles its files): resume only checkpoints written by runs you trust. If this one "
                              "is (a DeepSpeed version that saves other classes), pass `--trust_checkpoint true`.")


def keep_checkpoint_batch(checkpoint: str, training_args: PretrainingArguments, block_size: int,
                          streaming: bool) -> None:
    """A resumed run must read on from where its checkpoint stopped: the Trainer skips steps x accumulation
    batches of the new geometry, so a different global batch would re-read or skip data (and the learning
    rate schedule would mean other tokens). On another number of processes (a preempted job resumed on
    fewer or more nodes) gradient accumulation is set to keep the checkpoint's tokens per step."""
    saved_by, run_by = checkpoint_engine(Path(checkpoint)), engine(training_args)
    if saved_by != run_by:
        launcher = {"DeepSpeed": "deepspeed/run_deepspeed.sh and the `deepspeed` config",
                    "FSDP": "torchrun/run_torchrun.sh with FSDP=1 and the `fsdp` settings",
                    "neither DeepSpeed nor FSDP": "the launcher without DeepSpeed or FSDP"}[saved_by]
        raise ConfigError(f"{checkpoint} was saved with {saved_by}, this run has {run_by}: the optimizer state is in "
                          "the other's format, and the Trainer would silently start a fresh optimizer or fail to "
                          f"load it. Resume with {launcher} it was saved with, or start fresh in another "
                          "`output_dir`.")
    saved, now = checkpoint_record(checkpoint, BATCH_PLAN), batch_plan(training_args, block_size)
    if saved is None:  # a checkpoint from before batch plans were written
        return
    if saved.get("loraplus_lr_ratio") != training_args.loraplus_lr_ratio:  # the optimizer's groups follow it
        raise ConfigError(f"{checkpoint} trained with loraplus_lr_ratio {saved.get('loraplus_lr_ratio')}, this run has "
                          f"{training_args.loraplus_lr_ratio}: its optimizer state holds the parameter groups and "
                          "learning rates of the first. Resume with the same loraplus_lr_ratio, or start fresh in "
                          "another `output_dir`.")
    if saved.get("use_muon", False) != training_args.use_muon:
        raise ConfigError(f"{checkpoint} trained with use_muon {saved.get('use_muon', False)}, this run with "
                          f"{training_args.use_muon}: its optimizer state belongs to the other optimizer. Resume with "
                          "the same use_muon, or start fresh in another `output_dir`.")
    if saved["block_size"] != block_size:
        raise ConfigError(f"{checkpoint} trained blocks of {saved['block_size']} tokens, this run {block_size}: blocks "
                          f"are cut differently, so its data position means nothing here. Resume with block_size "
                          f"{saved['block_size']}.")
    if streaming and any(saved[k] != now[k] for k in ("per_device_train_batch_size", "world_size",
                                                       "dataloader_num_workers", "gradient_accumulation_steps")):
        raise ConfigError(f"{checkpoint} streamed with per_device_train_batch_size {saved['per_device_train_batch_size']}"
                          f", gradient_accumulation_steps {saved['gradient_accumulation_steps']}, "
                          f"{saved['world_size']} process(es) and dataloader_num_workers "
                          f"{saved['dataloader_num_workers']}: a streaming mixture replays its order only with the "
                          "same settings. Resume with them.")
    if training_args.deepspeed and saved["world_size"] != now["world_size"]:
        raise ConfigError(f"{checkpoint} was saved by DeepSpeed on {saved['world_size']} process(es), this run has "
                          f"{now['world_size']}: ZeRO partitions its optimizer state by process and cannot load it "
                          "on another number. Resume on the same number of processes (or convert the checkpoint "
                          "with DeepSpeed's universal-checkpoint tools first).")
    if saved["tokens_per_step"] == now["tokens_per_step"]:
        return
    micro = now["tokens_per_step"] // training_args.gradient_accumulation_steps  # tokens per micro-step, all ranks
    accumulation, rest = divmod(saved["tokens_per_step"], micro)
    fix = (f"gradient_accumulation_steps {accumulation}" if not rest else
           "a per_device_train_batch_size and gradient_accumulation_steps whose product times the processes is "
           f"{saved['tokens_per_step'] // block_size} blocks")
    if rest or training_args.deepspeed:  # DeepSpeed fixed its batch sizes when the arguments were parsed
        raise ConfigError(f"{checkpoint} trained {saved['tokens_per_step']:,} tokens per step "
                          f"({saved['per_device_train_batch_size']} x {saved['gradient_accumulation_steps']} x "
                          f"{saved['world_size']} process(es) x {block_size}), this run would train "
                          f"{now['tokens_per_step']:,}: the data position and learning-rate schedule would not carry "
                          f"over. Resume with {fix}.")
    logger.warning("resuming %s on %d process(es) with per_device_train_batch_size %d: gradient_accumulation_steps "
                   "%d -> %d keeps its %s tokens per step", checkpoint, training_args.world_size,
                   training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps, accumulation,
                   f"{saved['tokens_per_step']:,}")
    training_args.gradient_accumulation_steps = accumulation


def check_batch_settings(training_args: PretrainingArguments) -> None:
    """Every optimizer step trains batch x accumulation x processes blocks, planned before the first step (the
    block stream, the tokens counted, the batch plan a resume reads, a streaming mixture's worker batches)."""
    if training_args.auto_find_batch_size:
        raise ConfigError("auto_find_batch_size changes the batch size after the run planned its steps (tokens per "
                          "step, the data position a resume reads): set per_device_train_batch_size instead.")
    if training_args.dataloader_drop_last:
        raise ConfigError("dataloader_drop_last: every training step is full already, and in evaluation it would "
                          "drop each source's last blocks by the number of processes (all of a source smaller than a "
                          "batch). Leave it off.")


def check_streaming_settings(training_args: PretrainingArguments) -> None:
    """A streaming mixture is read as one ordered stream (rank 0's DataLoader, workers in turn, batches
    dispatched to the ranks): the logged mixture and resuming rely on that order."""
    if training_args.max_steps <= 0:
        raise ConfigError("streaming sources have no length, so the run cannot count epochs: set `max_steps` or "
                          "`max_train_tokens` (a token budget).")
    if training_args.record_block_ids:
        raise ConfigError("record_block_ids records the places of the mixture's blocks in their order; streamed blocks "
                          "have none. Drop it for a run with streaming sources.")
    accelerator = training_args.accelerator_config
    if not training_args.dataloader_in_order or accelerator.dispatch_batches is False or accelerator.split_batches:
        raise ConfigError("streaming sources need dataloader_in_order true and accelerator_config without "
                          "dispatch_batches false or split_batches true: the stream is read in order by the main "
                          "process and its batches dispatched to the ranks (otherwise every rank would tokenize "
                          "the whole stream, and the logged mixture and resuming would not match what trained).")


def numel(parameter) -> int:
    """A parameter's number of weights, also when ZeRO-3 partitioned it (numel() is 0 outside a gather) or
    bitsandbytes packed it (two 4-bit weights per byte: its quant_state has the real shape)."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        return math.prod(quant_state.shape)
    return getattr(parameter, "ds_numel", parameter.numel())


def parameter_counts(model) -> tuple[int, int, int]:
    """(parameters, trainable parameters, bytes of the frozen ones as stored). LoRA's new-token rows (peft
    trainable tokens) and whole extra modules (modules_to_save) are trainable copies of weights the count
    already holds, not parameters of their own."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    return (sum(numel(p) for name, p in named if "trainable_tokens_delta" not in name and ".modules_to_save." not in name),
            sum(numel(p) for p in params if p.requires_grad),
            sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params if not p.requires_grad))


def preflight(training_args: PretrainingArguments, data, model, tokens_per_step: int) -> None:
    """Before the first step: say what the run will do, and stop on settings that cannot work together."""
    if training_args.loraplus_lr_ratio and not is_lora(model):
        raise ConfigError("loraplus_lr_ratio speeds up LoRA's B matrices: set `finetuning: lora`, or drop it.")
    best = training_args.metric_for_best_model or ""
    if training_args.use_liger_kernel and best.endswith("accuracy") and "bench_" not in best:
        raise ConfigError(f"metric_for_best_model {training_args.metric_for_best_model} with use_liger_kernel: Liger's "
                          "fused loss returns no logits in evaluation, so no accuracy is measured. Choose the best "
                          "model by `loss`, or drop use_liger_kernel.")
    if training_args.use_muon:
        sharded = "DeepSpeed" if training_args.deepspeed else "FSDP" if training_args.fsdp else None
        if sharded:  # their flat or sharded parameters are not the weight matrices Muon orthogonalizes
            raise ConfigError(f"use_muon under {sharded}: the optimizer there sees flattened or sharded parameters, "
                              "not whole weight matrices, so Muon cannot orthogonalize its updates. Use one process "
                              "or DDP (torchrun/run_torchrun.sh), or drop use_muon.")
        if is_lora(model):
            raise ConfigError("use_muon with finetuning lora: Muon orthogonalizes updates of whole weight matrices, "
                              "and LoRA trains low-rank factors; drop use_muon (or train `full` or `freeze`).")
        if training_args.bf16_weights:
            raise ConfigError("use_muon with mixed_precision bf16_weights: the fp32 master weights wrap one "
                              "optimizer class; use mixed_precision bf16 with Muon.")
    if is_lora(model):
        if training_args.fsdp:
            raise ConfigError("finetuning lora under FSDP: merging the adapters into FSDP-sharded weights at the end "
                              "is not supported. Shard the base model with DeepSpeed ZeRO-3 (deepspeed/ds_zero3.json) "
                              "instead, or use ZeRO-2 or plain torchrun where each GPU holds the whole model.")
        if training_args.use_liger_kernel and not plain_output_head(model):
            raise ConfigError("Liger's fused loss reads the output projection's weight directly, which finetuning "
                              "lora wraps here (new tokens' rows, or lm_head in lora_target): drop use_liger_kernel.")
    try:
        Trainer.get_optimizer_cls_and_kwargs(training_args, model)  # what the first step would import
    except ImportError as e:
        name = getattr(training_args.optim, "value", training_args.optim)
        raise ConfigError(f"optim `{name}`: {str(e).strip().splitlines()[0]} Install it, or choose another `optim` "
                          "(adamw_torch_fused, adamw_torch, ...).") from None
    if training_args.on_nonfinite_loss == "skip" and (training_args.deepspeed or training_args.fsdp or
                                                      training_args.fp16):
        raise ConfigError("on_nonfinite_loss skip works with one process, DDP and bf16/fp32 only: DeepSpeed's engine "
                          "owns the optimizer step, FSDP shards the gradients it checks, and fp16's loss scaler "
                          "already skips non-finite steps. Use `on_nonfinite_loss: stop` (then resume from the last "
                          "checkpoint) with those.")
    if training_args.bf16_weights:
        if training_args.deepspeed or training_args.fsdp:
            raise ConfigError("mixed_precision bf16_weights is for one process and DDP: DeepSpeed and FSDP keep their "
                              "own fp32 master weights. Use mixed_precision bf16 with them (DeepSpeed: its bf16 "
                              "section; FSDP: its mixed-precision policy).")
    optimizer_of(training_args, model)  # refuses optimizers that bf16_weights or LoRA+ cannot wrap, before any step
    if training_args.deepspeed and training_args.fsdp:
        raise ConfigError("both `deepspeed` and `fsdp` are set: choose one (deepspeed/run_deepspeed.sh or FSDP=1 "
                          "torchrun/run_torchrun.sh).")
    if training_args.fsdp and training_args.device.type == "cpu":
        raise ConfigError("fsdp on the CPU: accelerate shards models on accelerators only and would train this run "
                          "as plain DDP. Drop FSDP=1 / `fsdp` here (DDP), or run on GPUs.")
    blocks_per_step = tokens_per_step // max(data.report["block_size"], 1)
    if hasattr(data.train, "__len__") and len(data.train) < blocks_per_step:
        raise ConfigError(f"one optimizer step needs {blocks_per_step} blocks but the training data has "
                          f"{len(data.train)}: lower per_device_train_batch_size or gradient_accumulation_steps, or "
                          "add data.")
    n_params, trainable, frozen_bytes = parameter_counts(model)
    steps = training_args.max_steps  # set by block_stream from num_train_epochs where only that was given
    lines = [f"preflight: {steps} optimizer steps x {tokens_per_step:,} tokens = {steps * tokens_per_step:,} tokens, "
             f"{training_args.world_size} process(es), {n_params / 1e6:.1f}M parameters "
             f"({trainable / 1e6:.1f}M trainable), block {data.report['block_size']}",
             f"  memory per device for weights, gradients and AdamW states (fp32 masters; frozen weights as "
             f"loaded): ~{(16 * trainable + frozen_bytes) / 2**30:.2f} GiB before ZeRO/FSDP sharding, plus "
             "activations"]
    for name, source in data.report["sources"].items():
        lines.append(f"  source {name}: " + (f"{source['documents']:,} docs, {source['tokens']:,} tokens, "
                                             if not source.get("streaming") else "streamed, ")
                     + f"{source['share_of_training_tokens']:.1%} of training tokens, "
                     f"{source.get('eval_blocks', 0)} eval blocks")
    logger.info("\n".join(lines))


def start_block_record(training_args: PretrainingArguments, resume: str | None) -> Path | None:
    """record_block_ids: this rank's record of the blocks each step trains on. A fresh run starts it anew; a resumed
    one keeps the steps up to its checkpoint (those after it, trained before a crash, are trained again)."""
    if not training_args.record_block_ids:
        return None
    path = Path(training_args.output_dir) / "block_ids" / f"rank{training_args.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = ""
    if resume and path.is_file():
        step = checkpoint_step(resume)
        kept = "".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                       if line.strip() and json.loads(line)["step"] <= step)
    atomic_write_text(path, kept)
    return path


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step a checkpoint holds, from its trainer state (an explicit resume path need not be named checkpoint-N;
    the state is checked to parse before any resume)."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]


def checkpoints_newest_first(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint unusable, or None. Cheap structural checks of every file the Trainer will
    read: the trainer state (written last) parses, the optimizer state exists (the Trainer silently starts
    a fresh optimizer without it), safetensors headers cover their files, and torch files are whole zips."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "has no trainer_state.json (the run stopped while saving it)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"has a corrupted trainer_state.json ({e})"
    if not any(checkpoint.glob("optimizer*")) and not any(checkpoint.glob("global_step*")):
        return "has no optimizer.pt (resuming would silently restart the optimizer)"
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix == ".safetensors":
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                header_len = int.from_bytes(head, "little") if len(head) == 8 else size
                try:
                    header = json.loads(f.read(header_len)) if header_len < size else None
                    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                except (ValueError, TypeError, KeyError, AttributeError, IndexError):
                    header, ends = None, []
            if header is None or 8 + header_len + max(ends, default=0) != size:
                return f"has a truncated or corrupted {path.relative_to(checkpoint)}"
        elif path.suffix in (".pt", ".pth", ".bin") and path.is_file() and not zipfile.is_zipfile(path):
            return f"has a truncated or corrupted {path.relative_to(checkpoint)}"
    return None


def last_complete_checkpoint(output_dir: str | Path, before: Path | None = None) -> Path | None:
    """The newest usable checkpoint (older than `before` if given); incomplete ones are named in a warning."""
    for checkpoint in checkpoints_newest_first(output_dir):
        if before is not None and int(checkpoint.name.split("-")[1]) >= int(before.name.split("-")[1]):
            continue
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("%s is incomplete and is skipped: it %s", checkpoint, problem)
    return None


def resolve_resume(training_args: PretrainingArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    spelt = resume.strip().lower() if isinstance(resume, str) else resume
    if spelt in ("", "false", "none", "null"):  # `--resume_from_checkpoint "$EMPTY"`: a fresh start
        resume = None
    elif spelt in ("true", "latest"):  # the Trainer's and run_clm's `true`: the newest checkpoint in output_dir
        resume = "auto"
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if max_restarts and resume != "auto":
        raise ConfigError(f"torchrun may restart this run after a failure (MAX_RESTARTS {max_restarts}), and every "
                          "start must then continue from the newest checkpoint: pass `--resume_from_checkpoint auto` "
                          "(to start from another checkpoint, copy it into output_dir first), or set MAX_RESTARTS=0.")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:
        logger.warning("torchrun restart %d: resuming from the newest complete checkpoint in output_dir", restart)
    if resume == "auto":
        last = last_complete_checkpoint(training_args.output_dir)
        found = checkpoints_newest_first(training_args.output_dir)
        if last is None and found:  # starting fresh would let checkpoint rotation delete them
            raise ConfigError(f"resume_from_checkpoint auto: none of the {len(found)} checkpoint(s) in "
                              f"{training_args.output_dir} can be resumed ({found[0].name} {checkpoint_problem(found[0])}). "
                              "Repair or remove them, or choose another `output_dir` to start fresh.")
        logger.info("resume_from_checkpoint auto: %s", last or "no checkpoint in output_dir, starting fresh")
        return str(last) if last else None
    if resume:
        checkpoint = Path(resume)
        problem = "does not exist" if not checkpoint.exists() else (
            "is not a directory" if not checkpoint.is_dir() else checkpoint_problem(checkpoint))
        if problem:
            usable = last_complete_checkpoint(checkpoint.parent, before=checkpoint if checkpoint.name.startswith(
                "checkpoint-") and checkpoint.name.split("-")[1].isdigit() else None)
            hint = f"the last complete checkpoint before it is {usable}" if usable else "no complete checkpoint is there"
            raise ConfigError(f"resume_from_checkpoint `{resume}` {problem}; {hint}. Pass that one, or "
                              "`--resume_from_checkpoint auto` (the newest complete one in output_dir).")
    return resume


def saved_run_id(path: Path) -> str | None:
    """The run_id in a checkpoint's batch plan or in metrics.json (None where absent or unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError):
        return None


def run_id_of(resume: str | None) -> str:
    """One id per run, kept across resumes: it tells whether metrics.json and the checkpoints beside it
    belong to the same run, also after a copy that reorders their modification times."""
    return (saved_run_id(Path(resume) / BATCH_PLAN) if resume else None) or uuid.uuid4().hex[:12]


def finished_run(out: Path, newest: Path) -> bool:
    """Whether output_dir's metrics.json was written by the run of its newest checkpoint, at its end."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return False
    finished, checkpointed = saved_run_id(metrics), saved_run_id(newest / BATCH_PLAN)
    if finished and checkpointed:  # a resume keeps the run id: the end written must be past the newest checkpoint
        try:
            steps = json.loads(metrics.read_text(encoding="utf-8"))["train"]["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return finished == checkpointed and steps >= int(newest.name.split("-")[1])
    return metrics.stat().st_mtime >= newest.stat().st_mtime  # written before run ids: by time


def earlier_checkpoints(training_args: PretrainingArguments, model_args: ModelArguments) -> list[Path]:
    """The checkpoints a fresh run must remove before its first step: left in output_dir they would mix with its
    own (rotation deletes by age, `auto` resumes the highest step). A finished run's go (its final model is being
    replaced anyway); an unfinished run's stop this one now, unless `overwrite_output_dir` says they may go. One
    this run loads its model or tokenizer from stops it too: removing it would delete the run's own base."""
    out = Path(training_args.output_dir)
    found = checkpoints_newest_first(out)
    for setting in ("model_name_or_path", "tokenizer_name_or_path"):
        base = getattr(model_args, setting)
        inside = [c for c in found if base and os.path.isdir(base) and Path(base).resolve().is_relative_to(c.resolve())]
        if inside:
            raise ConfigError(f"{setting} `{base}` is {inside[0].name} of output_dir `{out}`, which a fresh run there "
                              "removes before its first step. Choose another `output_dir` (or move the checkpoint "
                              "out of this one first).")
    if found and not (finished_run(out, found[0]) or training_args.overwrite_output_dir):
        raise ConfigError(f"output_dir `{out}` holds {', '.join(p.name for p in found)} of a run that did not finish. "
                          "Pass `--resume_from_checkpoint auto` to continue it, `--overwrite_output_dir true` to start "
                          "fresh and delete them, or choose another `output_dir`.")
    return found


def remove_checkpoints(checkpoints: list[Path], training_args: PretrainingArguments) -> None:
    if checkpoints:
        logger.warning("output_dir %s holds %s of an earlier run: this run starts fresh and removes them",
                       training_args.output_dir, ", ".join(p.name for p in checkpoints))
    if training_args.should_save:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    barrier()


def check_resume_matches(checkpoint: str, model, tokenizer) -> None:
    """A checkpoint resumes only into the model and tokenizer it was saved from: another shape would fail
    deep inside the optimizer's state loading, another vocabulary would silently train on other ids."""
    adapter = Path(checkpoint) / "adapter_config.json"
    if adapter.is_file() != is_lora(model):
        mode = "lora" if is_lora(model) else "full" if all(p.requires_grad for p in model.parameters()) else "freeze"
        raise ConfigError(f"{checkpoint} holds {'LoRA adapters' if adapter.is_file() else 'full weights'} but this run "
                          f"has finetuning {mode}: resume with the finetuning it was "
                          "trained with, or start fresh in another `output_dir`.")
    if adapter.is_file():
        saved_lora, now_lora = json.loads(adapter.read_text(encoding="utf-8")), model.peft_config["default"]
        settings = {"lora_rank": ("r", lambda v: v), "lora_alpha": ("lora_alpha", float),
                    "lora_target": ("target_modules", lambda v: sorted([v] if isinstance(v, str) else v or [])),
                    "use_rslora": ("use_rslora", bool), "use_dora": ("use_dora", bool),
                    "new tokens": ("trainable_token_indices", lambda v: v or None)}
        changed = [f"{name} {norm(saved_lora.get(key))} -> {norm(getattr(now_lora, key))}"
                   for name, (key, norm) in settings.items() if norm(saved_lora.get(key)) != norm(getattr(now_lora, key))]
        if changed:
            raise ConfigError(f"{checkpoint} holds LoRA adapters trained with other settings ({'; '.join(changed)}): "
                              "resume with the settings it was trained with, or start fresh in another `output_dir`.")
    trained = Path(checkpoint) / TRAINABLE
    if trained.is_file():  # finetuning freeze with other layers or modules: the optimizer state would not fit
        saved_names, now_names = json.loads(trained.read_text(encoding="utf-8")), trainable_names(model)
        if saved_names != now_names:
            only_saved, only_now = sorted(set(saved_names) - set(now_names)), sorted(set(now_names) - set(saved_names))
            raise ConfigError(
                f"{checkpoint} trained other parameters than this run would ({len(saved_names)} then, {len(now_names)} "
                f"now; only then: {', '.join(only_saved[:3]) or 'none'}; only now: {', '.join(only_now[:3]) or 'none'}"
                "). Resume with the finetuning settings it was trained with, or start fresh in another `output_dir`.")
    config = Path(checkpoint) / "config.json"
    saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    now = model.config.to_dict()
    changed = [f"{key} {saved[key]} -> {now.get(key)}" for key in SHAPE_KEYS if key in saved and saved[key] != now.get(key)]
    if changed:
        raise ConfigError(f"{checkpoint} was saved from another model shape ({'; '.join(changed)}). Resume with the "
                          "settings it was trained with, or start fresh in another `output_dir`.")
    if any((Path(checkpoint) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        saved_vocab = AutoTokenizer.from_pretrained(checkpoint).get_vocab()
        if saved_vocab != tokenizer.get_vocab():
            raise ConfigError(f"{checkpoint} was trained with another tokenizer ({len(saved_vocab)} tokens; this run's has "
                              f"{len(tokenizer)}, or other ids): resume with the tokenizer it was trained with, or start "
                              "fresh in another `output_dir`.")


SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "rope_parameters",
              "max_position_embeddings", "head_dim")


def setup_logging(training_args: PretrainingArguments, data_args: DataArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING, force=True)
    data_utils.logger.setLevel(logger.getEffectiveLevel())
    for line in data_args.local_hub_copies:
        logger.info("hub source read from a local copy: %s", line)


def load_data(data_args: DataArguments, training_args: PretrainingArguments, tokenizer) -> data_utils.PreparedData:
    """Phase 4: token stores built by the main process first; the other ranks then hit the cache."""
    start = time.perf_counter()
    data = on_every_rank(lambda: data_utils.build_datasets(
        data_args, tokenizer, data_args.block_size, training_args.seed, training_args.train_batch_size,
        training_args.dataloader_num_workers), in_turns=training_args, what="prepare the data")
    same_on_every_rank("data (the files' content, the tokenizer or the split)",
                       {"tokenizer": data.report["tokenizer"], **data_plan(data.report, training_args)},
                       "Every node must read the same data files with the same tokenizer: put `sources` and "
                       "`cache_dir` on a shared filesystem, or copy them to the same paths on every node.")
    stored = [s for s in data.report["sources"].values() if not s.get("streaming")]
    how = ("streamed" if not stored else "cache hit" if all(s["cache"] == "hit" for s in stored) else "tokenized")
    logger.info("data ready in %.2f s (%s): %s train blocks of %d tokens, eval sources: %s",
                time.perf_counter() - start, how,
                len(data.train) if hasattr(data.train, "__len__") else "streamed", data_args.block_size,
                ", ".join(data.eval) or "none")
    if training_args.should_save:
        data_utils.write_data_report(data.report, training_args.output_dir)
    return data


def prepare_only(argv: list[str]) -> dict:
    """`python data_utils.py prepare CONFIG`: build the token stores and print the data report."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args, data_args)
    fetch_from_modelscope(model_args, data_args, training_args)
    data = load_data(data_args, training_args, load_tokenizer(model_args, data_args, training_args))
    print(json.dumps(data.report, ensure_ascii=False, indent=1))
    return data.report


def check_output_dir_writable(training_args: PretrainingArguments, model_args: ModelArguments) -> None:
    """Fail in the first second, not after hours of tokenizing, when the outputs cannot be written."""
    out = Path(training_args.output_dir)
    base = model_args.model_name_or_path
    if base and os.path.isdir(base) and out.resolve() == Path(base).resolve():
        raise ConfigError(f"output_dir `{out}` is the model being {'evaluated' if training_args.eval_only else 'continued'} "
                          f"(model_name_or_path): {'its data report would be replaced' if training_args.eval_only else 'the trained model would overwrite it'}. "
                          "Choose another `output_dir`.")
    if training_args.eval_only and ((out / "metrics.json").is_file() or checkpoints_newest_first(out)):
        raise ConfigError(f"eval_only: output_dir `{out}` holds a training run (metrics.json or checkpoints), whose "
                          "data report the evaluation would replace. Choose another `output_dir`.")
    if not training_args.should_save:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir `{out}` cannot be created or written ({e.strerror or e}). Choose another "
                          "`output_dir`, or fix the permissions of the directory above it.") from None


def write_failure(e: BaseException, path: Path) -> str:
    """How a failed write reads to a user: a full disk named as such (torch.save and safetensors wrap the
    OS error in their own, so the chain and the free space are checked too), else the error itself."""
    chain, seen = [], e
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = any(getattr(x, "errno", None) == errno.ENOSPC or "No space left" in str(x) for x in chain)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(path).free < 64 * 2**20
    return "no space left on device" if full else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if distributed():
        torch.distributed.barrier()


def settings_fingerprint(argv: list[str]) -> str:
    """What every rank must be started with: the same command line and config file (by content)."""
    argv, _ = split_local_rank(argv)
    config = Path(argv[0]).read_bytes() if argv and os.path.isfile(argv[0]) else b""
    options = argv[1:] if config else argv  # the config by content: the repository may sit elsewhere on a node
    return hashlib.sha256(json.dumps(options).encode() + config).hexdigest()[:16]


def from_every_rank(value) -> list:
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def same_on_every_rank(what: str, value, fix: str) -> None:
    """Stop every rank with the same error when one rank's `value` differs from rank 0's."""
    if not distributed():
        return
    ranks = from_every_rank((socket.gethostname(), value))
    other = next((i for i, (_, v) in enumerate(ranks) if v != ranks[0][1]), None)
    if other is not None:
        raise every_rank(ConfigError(f"rank {other} on {ranks[other][0]} has other {what} than rank 0 on "
                                     f"{ranks[0][0]}. {fix}"))


def every_rank(error: Exception) -> Exception:
    error.raised_on_every_rank = True
    return error


@contextlib.contextmanager
def alike_on_every_rank():
    """Checks every rank makes on the same settings and files: the error they all raise is printed once per node."""
    try:
        yield
    except (ConfigError, DataError) as e:
        raise every_rank(e)


class RankFailure(RuntimeError):
    """Another rank failed where this one did not; the message names it and its error."""


def on_every_rank(work, in_turns: PretrainingArguments | None = None, what: str = ""):
    """`work()` on every rank, then a gather of how it went: an error on some ranks (a file missing on one node)
    stops all of them with it, instead of leaving the others in the next collective until ddp_timeout. With
    `in_turns`: rank 0 first (it fills the cache), then the first rank of every other node (it reads the cache if
    shared, or fills its node's own), then all others (they read their node's cache), so tokenizing never runs on
    two ranks of a node, whether cache_dir is shared or node-local."""
    if not distributed():
        return work()
    turn = 0 if in_turns is None or in_turns.process_index == 0 else 1 if in_turns.local_process_index == 0 else 2
    if turn == 1:  # the other nodes' logs would be silent for as long as rank 0 works
        logger.warning("waiting for rank 0 to %s first (at most ddp_timeout, %d s)", what, in_turns.ddp_timeout)
    result, failure = None, None
    for now in range(1 if in_turns is None else 3):
        if now == turn:
            try:
                result = work()
            except Exception as e:
                if getattr(e, "raised_on_every_rank", False):
                    raise  # agreed on inside `work`: every rank raises it there
                failure = e
        failed = [(rank, *f) for rank, f in enumerate(from_every_rank(
            (socket.gethostname(), type(failure).__name__, str(failure)) if failure else None)) if f]
        if failed:
            break
    else:
        return result
    if failure is not None and not isinstance(failure, (ConfigError, DataError)):
        raise failure  # a bug: its traceback, from the rank it happened on
    rank, host, kind, message = failed[0]
    alike = len(failed) == torch.distributed.get_world_size() and all(f[3] == message for f in failed)
    text = message if alike else f"rank {rank} on {host}: {message}"
    raise every_rank({"ConfigError": ConfigError, "DataError": DataError}.get(kind, RankFailure)(text))


def asked_for_cpu(argv: list[str]) -> bool:
    """`use_cpu` as settings that did not parse give it: the command line's last value, else the config file's."""
    options, _ = split_local_rank(argv)
    value = None
    with contextlib.suppress(Exception):  # a config file that does not read says nothing
        config = yaml.safe_load(Path(options[0]).read_text(encoding="utf-8"))
        value = config.get("use_cpu") if isinstance(config, dict) else None
    for i, option in enumerate(options):
        if option.startswith("--use_cpu="):
            value = option.split("=", 1)[1]
        elif option == "--use_cpu":
            value = options[i + 1] if i + 1 < len(options) and not options[i + 1].startswith("--") else True
    return str(value).strip().lower() in ("true", "yes", "1")


def tell_the_other_ranks(argv: list[str], error: Exception) -> None:
    """A rank whose settings do not parse (its node lacks the config file, or has another version of a package)
    stops before the process group forms, where the other ranks, whose settings parsed, would wait for it until
    ddp_timeout (two hours by default). It joins the group as they did, and the first gather of start_decisions tells them."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "MASTER_ADDR" not in os.environ:
        return
    try:
        if not distributed():
            from accelerate import PartialState

            on_cpu = not torch.cuda.is_available() or asked_for_cpu(argv)
            PartialState(cpu=on_cpu, timeout=datetime.timedelta(seconds=300))  # as TrainingArguments sets it up
        from_every_rank((socket.gethostname(), str(error)))
    except Exception as e:  # the others gone too: this rank's own error still stops it
        logger.warning("could not tell the other ranks why this one stops: %s", e)


def start_decisions(argv: list[str], model_args: ModelArguments,
                    training_args: PretrainingArguments) -> tuple[str | None, list[Path]]:
    """The checks and decisions each rank makes from its own view of the disk (output_dir writable, where to
    resume, which checkpoints of an earlier run go), taken by all ranks alike or by none: a rank that stops or
    decides alone would leave the others waiting in a collective until ddp_timeout (two hours). Across nodes
    this also proves output_dir is one shared directory: checkpoints, resume and the final model need it."""
    stopped = [(rank, host, error) for rank, (host, error) in enumerate(from_every_rank((socket.gethostname(), None)))
               if error] if distributed() else []  # the gather tell_the_other_ranks joins
    if stopped:
        rank, host, error = stopped[0]
        raise every_rank(ConfigError(f"rank {rank} on {host} could not read its settings: {error}"))
    same_on_every_rank("settings (its command line or config file differ)", settings_fingerprint(argv),
                       "Start every node with the same config file and options.")
    out = Path(training_args.output_dir)
    marker = out / f".shared-check-{uuid.uuid4().hex[:12]}"

    def create_output_dir():  # by rank 0 before any other rank looks (NFS would cache "no such directory")
        if training_args.process_index == 0:
            check_output_dir_writable(training_args, model_args)
            if distributed():
                marker.write_bytes(b"")

    def decide():
        if training_args.eval_only:  # writes no checkpoint: none of output_dir's matter
            return None, []
        resume = resolve_resume(training_args)
        return resume, [] if resume else earlier_checkpoints(training_args, model_args)

    on_every_rank(create_output_dir)
    try:
        resume, stale = on_every_rank(decide)
        if not distributed():
            return resume, stale
        marker = from_every_rank(marker)[0]  # rank 0's
        seen = marker.is_file()
        if not seen:  # a new file can take a moment to show on a network filesystem
            time.sleep(2)
            seen = marker.is_file()
        ranks = from_every_rank({"host": socket.gethostname(), "seen": seen, "resume": resume,
                                 "stale": [p.name for p in stale]})
        where = [f"rank {rank} on {r['host']}" for rank, r in enumerate(ranks)]
        blind = [w for w, r in zip(where, ranks) if not r["seen"]]
        if blind:
            raise every_rank(ConfigError(
                f"output_dir `{out}` is not one shared directory: {', '.join(blind)} cannot see the file {where[0]} "
                "wrote there. Checkpoints, resuming and the final model need every node to read and write the same "
                "output_dir: put it on a filesystem all nodes mount at the same path (NFS, Lustre, a cluster "
                "filesystem)."))
        other = next((i for i, r in enumerate(ranks) if (r["resume"], r["stale"]) != (ranks[0]["resume"],
                                                                                       ranks[0]["stale"])), None)
        if other is not None:
            raise every_rank(ConfigError(
                f"{where[other]} sees other checkpoints in `{out}` than {where[0]} (it would resume from "
                f"{ranks[other]['resume']}, the other from {ranks[0]['resume']}): the shared filesystem is not in "
                "sync. Rerun when every node sees the same files."))
    finally:
        if training_args.process_index == 0:
            marker.unlink(missing_ok=True)
    return resume, stale


def unquantized_args(model_args: ModelArguments) -> ModelArguments:
    """The LoRA run's model settings for loading its base again whole, on the CPU for the merge (where
    flash attention has no kernels; the saved config does not keep the attention implementation)."""
    quantization = {f.name: f.default for f in dataclasses.fields(ModelArguments)
                    if f.name in ("quantization_bit", "quantization_type", "double_quantization")}
    return dataclasses.replace(model_args, **quantization, attn_implementation="sdpa")


def for_inference(config) -> None:
    """The saved model's config is for inference: with the KV cache, without the MoE router loss."""
    config.use_cache = True
    if getattr(config.get_text_config(), "output_router_logits", False):
        config.get_text_config().output_router_logits = False


def write_legacy_rope_keys(directory: Path) -> None:
    """transformers 5 saves RoPE settings in `rope_parameters` only, with `rope_theta: null` beside them: readers
    built on transformers 4 (older vLLM, conversion scripts) then take the default base of 10,000 (Qwen2 uses
    1,000,000) and no scaling. The top-level `rope_theta` (and `rope_scaling` for a scaled RoPE) they read are
    written too, as full copies: transformers 5 takes a top-level `rope_scaling` over `rope_parameters` and its
    `rope_theta` from the top level, so it reads the same settings as before (tests/test_long_context.py)."""
    path = directory / "config.json"
    if not path.is_file():
        return  # a LoRA adapter's directory
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final_model(trainer: Trainer, out: Path, whole_base=None):
    """The final model goes to a temporary directory first and each file is then renamed into output_dir,
    the weights last: a crash leaves either no new weights or complete ones, never a half-written file.
    Under finetuning lora the adapters are merged into trainer.model first (and saved alone in adapter/).
    Under QLoRA and ZeRO-3 they are merged into the base model loaded again whole (`whole_base()`: unquantized,
    unpartitioned, on the CPU of the main process), not into rounded 4-bit weights or partitions, and that merged
    model is returned (None on the other ranks, and otherwise); trainer.model stays the model that trained."""
    staging = out / ".final-model.tmp"
    merged = None
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    barrier()  # no rank writes into the staging directory before it is empty
    try:
        if is_lora(trainer.model) and (is_quantized(trainer.model) or is_deepspeed_zero3_enabled()):
            if is_deepspeed_zero3_enabled():  # every rank takes part: ZeRO-3 gathers the adapter's partitions
                trainer.save_model(str(staging / "adapter"), _internal_call=True)
            elif trainer.args.should_save:
                trainer._save(str(staging / "adapter"))
            if trainer.args.should_save:
                import peft

                merged = peft.PeftModel.from_pretrained(whole_base(), staging / "adapter").merge_and_unload()
                for_inference(merged.config)
                trained, trainer.model = trainer.model, merged
                try:
                    trainer._save(str(staging))
                finally:
                    trainer.model = trained
        elif is_lora(trainer.model):  # DDP and ZeRO-1/2 ranks hold whole weights: nothing to gather
            if trainer.args.should_save:
                trainer._save(str(staging / "adapter"))  # the adapter alone, as the checkpoints hold it
            trainer.model = trainer.model.merge_and_unload()  # on every rank, so they keep one model
            if trainer.args.should_save:
                trainer._save(str(staging))
        else:
            # every rank takes part (ZeRO-3 gathers the weights); internal: no push of output_dir from here, before
            # the model is in it (push_to_hub pushes it at the end, push_final_model)
            trainer.save_model(str(staging), _internal_call=True)
    except Exception as e:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        last = last_complete_checkpoint(out)
        then = (f"The checkpoints in output_dir are intact: fix that (free space), then rerun with "
                f"`--resume_from_checkpoint auto` (it resumes at the last one, {last.name})." if last else
                "No checkpoint holds the training (none was saved): fix that (free space) and train again, with "
                "`save_steps` so that a failure at the end costs less.")
        raise CheckpointError(f"{write_failure(e, out)} while writing the final model to {staging}. {then}") from e
    if trainer.is_world_process_zero():
        for pickled in [*staging.rglob("training_args.bin"), out / "training_args.bin"]:
            pickled.unlink(missing_ok=True)  # a pickle of this script's class: nothing outside it can load it
        for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
            stale.unlink()  # an old single file would shadow a new sharded index (and the reverse)
        shutil.rmtree(out / "adapter", ignore_errors=True)  # an earlier LoRA run's, or the one replaced now
        files = sorted(staging.iterdir(), key=lambda p: (p.name.startswith("model"), p.name))
        for path in files:
            if path.is_dir():
                shutil.rmtree(out / path.name, ignore_errors=True)
            os.replace(path, out / path.name)
        staging.rmdir()
    barrier()
    return merged


def refuse_restarts_on_a_shared_store() -> None:
    """torchrun's workers share the rendezvous store by default, and it outlives a restart with the dead attempt's
    process-group keys: restarted ranks can read their peers' old addresses and hang in init_process_group
    (pytorch#135712; seen here in 3 of 6 restarts). Checked before the process group forms, which is where it hangs."""
    max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if max_restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(f"torchrun may restart this run (--max_restarts {max_restarts}) on its shared rendezvous "
                          "store, where a restart can hang before training (pytorch#135712). Launch with "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and the c10d rendezvous (--standalone or "
                          "--rdzv_backend c10d), as torchrun/run_torchrun.sh does with MAX_RESTARTS, or without restarts.")


def train(argv: list[str]) -> dict:
    try:
        refuse_restarts_on_a_shared_store()
        model_args, data_args, training_args = parse_args(argv)
    except (ConfigError, DataError) as e:  # (DataArguments checks its sources as it parses)
        tell_the_other_ranks(argv, e)
        raise every_rank(e)  # every rank parses the same command line: printed once per node
    setup_logging(training_args, data_args)
    set_seed(training_args.seed)
    if training_args.deepspeed and training_args.use_cpu and training_args.world_size > 1:
        import deepspeed  # on CPU accelerate sets up gloo but not deepspeed.comm, which ZeRO-3's zero.Init asks

        deepspeed.init_distributed(dist_backend="gloo")
    resume, stale = start_decisions(argv, model_args, training_args)
    resumed_from = checkpoint_step(resume) if resume else 0  # read now: rotation may delete it during training
    if resume:
        with alike_on_every_rank():  # before anything long: a refused checkpoint should not cost the data preparation
            check_checkpoint_code(resume, training_args)
    fetch_from_modelscope(model_args, data_args, training_args)
    tokenizer = on_every_rank(lambda: load_tokenizer(model_args, data_args, training_args, resume))
    model_args.torch_dtype = weight_dtype(model_args, training_args)
    compute_dtype = (torch.bfloat16 if training_args.bf16 or training_args.bf16_weights else
                     torch.float16 if training_args.fp16 else torch.float32)
    model = on_every_rank(lambda: build_model(model_args, tokenizer, data_args.block_size,
                                              training_args.gradient_checkpointing, compute_dtype,
                                              str(training_args.device)))
    if resume:
        check_resume_matches(resume, model, tokenizer)
        training_args.eval_on_start = False  # the checkpoint's history holds the step-0 baseline
    if training_args.chunked_loss:
        use_chunked_loss(model, training_args)
    data = load_data(data_args, training_args, tokenizer)
    benchmarks = on_every_rank(lambda: prepare_benchmarks(data_args, tokenizer, data))
    if training_args.eval_only:
        return evaluate_only(model, tokenizer, data, benchmarks, model_args, data_args, training_args)
    out = Path(training_args.output_dir)
    if not data.eval and training_args.eval_strategy != "no":
        logger.warning("no eval split (eval_fraction 0 and no eval_path; a streamed source is evaluated only on "
                       "its `eval_split`): evaluation is off")
        training_args.eval_strategy, training_args.eval_on_start = "no", False
    if resume:
        with alike_on_every_rank():
            keep_checkpoint_batch(resume, training_args, data_args.block_size, not hasattr(data.train, "__len__"))
            check_resume_data(resume, data_plan(data.report, training_args), training_args)
    tokens_per_step = batch_plan(training_args, data_args.block_size)["tokens_per_step"]
    if data_args.max_train_tokens:
        if training_args.max_steps > 0:
            raise ConfigError(f"max_steps {training_args.max_steps} and max_train_tokens {data_args.max_train_tokens} "
                              "both set the run's length: keep one (on the command line, either one overrides the "
                              "other from the config file).")
        training_args.max_steps = math.ceil(data_args.max_train_tokens / tokens_per_step)
        logger.info("token budget %d: max_steps %d", data_args.max_train_tokens, training_args.max_steps)
    check_batch_settings(training_args)
    data_start = data_start_step(resume, training_args)
    if not hasattr(data.train, "__len__"):
        check_streaming_settings(training_args)
        if data_start and not training_args.ignore_data_skip:
            raise ConfigError(f"{resume} belongs to a run that read its stream from the start again at step "
                              f"{data_start} (ignore_data_skip): the Trainer would skip the stream's first "
                              f"{checkpoint_step(resume)} steps, not the {checkpoint_step(resume) - data_start} it "
                              "read since. Resume with `--ignore_data_skip true` (the stream starts again), or start "
                              "a new run from its model.")
        train_set = data.train
    else:
        # the Trainer skips the steps a resumed checkpoint trained; after an ignore_data_skip start the data
        # began at data_start, so its place is that many steps earlier
        shift = 0 if training_args.ignore_data_skip else data_start
        train_set = block_stream(data.train, training_args, tokens_per_step // data_args.block_size, shift)
    n_params, n_trainable, _ = parameter_counts(model)  # before save_final_model merges LoRA adapters away
    watched = []
    for spec in data_utils.parse_sources(data_args.sources):
        if spec.watch_forgetting and spec.from_per_file and spec.name not in data.eval:
            logger.warning("source `%s` (per_file) is not watched for forgetting: it is too small for an eval set",
                           spec.name)
        elif spec.watch_forgetting:
            watched.append(spec.name)
    if unevaluated := [name for name in watched if name not in data.eval]:
        raise DataError(f"source{'s' if len(unevaluated) > 1 else ''} {', '.join(f'`{n}`' for n in unevaluated)}: "
                        "`watch_forgetting` needs eval data, and there is none. Give it `eval_split` (hub), "
                        "`eval_path`, or an `eval_fraction` above 0 (not applied to streams), or drop "
                        "watch_forgetting.")
    forgetting = ForgettingCallback(watched, [b.name for b in benchmarks if b.watch_forgetting],
                                    data_args.forgetting_threshold_pct)
    with alike_on_every_rank():
        preflight(training_args, data, model, tokens_per_step)
    preemption = PreemptionCallback()
    meter = ThroughputMeter(tokens_per_step, training_args.world_size,  # reentrant: input grads hooked, full backward
                            flops_per_token(model, data_args.block_size,
                                            backward_to_embeddings=reentrant_checkpointing(training_args)),
                            peak_flops_per_device(training_args))
    trainer = PretrainTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=data.eval or None,
        data_collator=BlockCollator(keep_ids=training_args.record_block_ids), processing_class=tokenizer,
        callbacks=[LossCurveCallback(training_args.output_dir), forgetting, meter, preemption,
                   *([FrozenBelowCallback()] if model_args.finetuning == "freeze" else [])],
        tokens_per_step=tokens_per_step,
        block_size=data_args.block_size, meter=meter, data_plan={**data_plan(data.report, training_args),
                                                                 "data_start_step": data_start},
        resume=resume, block_record=start_block_record(training_args, resume), benchmarks=benchmarks)
    if training_args.torch_compile:  # read when train() prepares the model: compile each layer, or the whole
        trainer.accelerator.state.dynamo_plugin.use_regional_compilation = training_args.torch_compile_scope == "blocks"
    remove_checkpoints(stale, training_args)  # only now: a run that fails to start leaves them where they were
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        writing = out / f"checkpoint-{trainer.state.global_step}"  # the one this step was saving, if any
        if not writing.is_dir() or checkpoint_problem(writing) is None:
            raise
        usable = last_complete_checkpoint(out, before=writing)
        raise CheckpointError(
            f"{write_failure(e, out)} while writing {writing}: it is incomplete and is never resumed from; the "
            f"last complete checkpoint is {usable or 'none'}. Fix that (free space, or lower `save_total_limit`), "
            "then rerun with `--resume_from_checkpoint auto`.") from e
    finally:  # after the steps a signal stops at once again (and a later in-process run starts clean)
        preemption.restore()
    trainer.stop_if_nonfinite()  # steps after the last check: before the final evaluation and model
    if preemption.stopped_at is not None:  # preempted: the checkpoint is saved, the run is not finished
        logger.warning("preempted at step %d: checkpoint saved in %s; not writing a final model",
                       preemption.stopped_at, training_args.output_dir)
        return {"preempted_at_step": preemption.stopped_at}
    # the Trainer's schedule evaluates at the last step too (transformers 5): that one is the final evaluation,
    # unless load_best_model_at_end has put an earlier checkpoint's weights back since
    final_eval = {} if training_args.load_best_model_at_end else eval_at_step(trainer.state.log_history,
                                                                               trainer.state.global_step)
    if data.eval and "eval_loss" not in final_eval:
        final_eval = trainer.evaluate()

    probe = probe_logits(model, data) if training_args.verify_saved_model else None
    for_inference(model.config)
    def whole_base():  # LoRA under QLoRA or ZeRO-3: its base again, unquantized and unpartitioned, for the merge
        with whole_weights():
            return create_model(unquantized_args(model_args), tokenizer, block_size=data_args.block_size)[0]

    merged = save_final_model(trainer, out, whole_base)  # LoRA: + adapter/
    model = trainer.model
    saved_dtype = next((merged or model).parameters()).dtype
    quantization_gap = None
    if merged is not None and probe is not None and is_quantized(model):  # the saved model computes unquantized
        quantized_probe, probe = probe, probe_logits(merged, data)
        quantization_gap = {"probe_loss_quantized": probe_loss(quantized_probe), "probe_loss_saved": probe_loss(probe)}
        logger.info("QLoRA: on a held-out block the saved model (adapters merged into the unquantized weights) has "
                    "loss %.4f, the %d-bit model that trained %.4f", quantization_gap["probe_loss_saved"],
                    model_args.quantization_bit, quantization_gap["probe_loss_quantized"])
    del merged
    saved_check = verify_saved_model(probe, saved_dtype, training_args) if probe else None
    if saved_check and quantization_gap:
        saved_check["quantization"] = quantization_gap
    history = trainer.state.log_history
    metrics = {
        "run_id": trainer.run_id,
        "train": {
            "loss": result.training_loss if trainer.state.global_step > resumed_from else None,  # this start's
            "final_logged_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
            "steps": trainer.state.global_step,
            "world_size": training_args.world_size,
            "tokens": trainer.state.global_step * tokens_per_step,
            "resumed_from_step": resumed_from,
            "runtime_seconds": result.metrics.get("train_runtime"),  # of this start (since resumed_from_step)
            **meter.overall(trainer.state.global_step),
            "flops_per_token": meter.flops_per_token,
            "skipped_nonfinite_steps": trainer.skipped_steps,
            "peak_flops_per_device": meter.peak_flops,
        },
        "eval": {"before_training": eval_at_step(history, 0), "final": eval_scores(final_eval),
                 "ppl_change_pct_over_baseline": forgetting.changes,
                 "benchmark_accuracy_change_pct_over_baseline": forgetting.benchmark_changes,
                 "benchmarks": {bench.name: bench.report for bench in benchmarks}},
        "mixture": {"planned": {n: s["share_of_training_tokens"] for n, s in data.report["sources"].items()},
                    "achieved": data.train.shares(trainer.blocks_read(trainer.state.global_step))},
        "model": {"parameters": n_params, "trainable_parameters": n_trainable, "finetuning": model_args.finetuning, "vocab_size": model.config.vocab_size,
                  "block_size": data_args.block_size,
                  "saved_model_check": saved_check},
    }
    metrics.update(samples_of(model, tokenizer, data, trainer))
    if trainer.is_world_process_zero():
        atomic_write_text(out / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=1))
        plot_loss_curve(history, out / "loss.png")
        logger.info("saved model, tokenizer, metrics.json and loss.png to %s", out)
        if training_args.push_to_hub:
            push_final_model(trainer, out)
    barrier()  # ranks leave together: one exiting mid-write of another can abort it
    return metrics


def samples_of(model, tokenizer, data, trainer: Trainer) -> dict:
    """{"samples": continuations of `sample_prompts`} on the first rank (on every rank under ZeRO-3, which
    partitions the weights: each forward pass needs all of them); {} without prompts or on the other ranks."""
    zero3 = is_deepspeed_zero3_enabled()
    if not trainer.args.sample_prompts or not (zero3 or trainer.is_world_process_zero()):
        return {}
    return {"samples": generate_samples(model, tokenizer, trainer.args.sample_prompts, data.report["bos"],
                                        trainer.args.sample_max_new_tokens, synced=zero3)}


def evaluate_only(model, tokenizer, data, benchmarks: list[ChoiceBenchmark], model_args: ModelArguments,
                  data_args: DataArguments, training_args: PretrainingArguments) -> dict:
    """eval_only: the model's loss and perplexity on each source's eval split, as a training run would report
    them at its start (its step-0 baseline), and the sample continuations; written to eval_results.json."""
    if not data.eval:
        raise ConfigError("eval_only: there is no eval split to evaluate on. Give the sources one: `eval_fraction` "
                          "above 0, a source's `eval_path` (files) or `eval_split` (hub).")
    training_args.report_to = []  # one evaluation, no curve (the Trainer's loggers, never started by training,
    # would write TensorBoard files into the working directory)
    trainer = PretrainTrainer(model=model, args=training_args, eval_dataset=data.eval, data_collator=BlockCollator(),
                              processing_class=tokenizer, tokens_per_step=0, block_size=data_args.block_size,
                              meter=None, data_plan={}, benchmarks=benchmarks)
    metrics = trainer.evaluate()
    results = {"model": model_args.model_name_or_path, "block_size": data_args.block_size,
               "eval": eval_scores(metrics), "eval_blocks": {name: len(blocks) for name, blocks in data.eval.items()},
               "benchmarks": {bench.name: bench.report for bench in benchmarks},
               "runtime_seconds": round(sum(v for k, v in metrics.items() if k.endswith("_runtime")), 3),
               **samples_of(model, tokenizer, data, trainer)}
    if trainer.is_world_process_zero():
        atomic_write_text(Path(training_args.output_dir) / "eval_results.json",
                          json.dumps(results, ensure_ascii=False, indent=1))
        logger.info("eval_only: eval loss %.4f, perplexity %.2f; results in %s", metrics["eval_loss"],
                    math.exp(min(metrics["eval_loss"], 30.0)), Path(training_args.output_dir) / "eval_results.json")
    barrier()
    return results


def push_final_model(trainer: Trainer, out: Path) -> None:
    """push_to_hub: the Trainer pushes each checkpoint's model as it is saved; the final model (merged and
    verified), its tokenizer, metrics, loss curve and data report are pushed here, without checkpoints and logs.
    (Trainer.push_to_hub would first save trainer.model over it: under QLoRA the 4-bit model with adapters.)"""
    from huggingface_hub import upload_folder

    pending = getattr(trainer, "push_in_progress", None)
    if pending is not None and not pending.is_done():
        pending.wait_until_done()  # a checkpoint's push: the final model's commit comes after it
    url = upload_folder(repo_id=trainer.hub_model_id, folder_path=str(out), commit_message="final model",
                        token=trainer.args.hub_token, revision=trainer.args.hub_revision,
                        ignore_patterns=["checkpoint-*", "runs/*", "block_ids/*", ".*"])
    logger.info("pushed the final model to %s", url)


def tell_the_launcher(message: str) -> None:
    """torchrun ends a failed run with a box that names each failed rank's traceback, or only a link where it has
    none: hand it this rank's message (through its per-rank error file), so that the box, the last thing in the
    log, names the reason instead of hiding the line printed above it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": record}), encoding="utf-8")


def no_restart_for_this() -> None:
    """torchrun (MAX_RESTARTS) restarts every rank after one fails, but these errors (a setting, the data, a
    non-finite loss, a full disk) would come back on every attempt, after start-up and data preparation each
    time: stop this node's agent, this process's parent, instead of letting it restart."""
    restarts_left = (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
                     - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    try:  # only ever torchrun's agent
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if restarts_left > 0 and (b"torch.distributed.run" in parent or any(a.endswith(b"torchrun") for a in parent)):
        logger.warning("stopping torchrun rather than restarting: this error would come back on every attempt")
        os.kill(os.getppid(), signal.SIGTERM)


def raise_open_file_limit(wanted: int = 16384) -> None:
    """A source keeps about 8 memory-mapped files open for the whole run, and `per_file` makes every file in
    data/ a source: macOS's default of 256 open files ran out at about 30 files (Errno 24). The soft limit is
    raised to `wanted` (within the hard limit), or to as much below it as the system allows (macOS caps it at
    kern.maxfilesperproc, often 10,240, even under an unlimited hard limit)."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (wanted, 10240, 4096, 1024):
        target = target if hard == resource.RLIM_INFINITY else min(target, hard)
        if soft == resource.RLIM_INFINITY or soft >= target:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):  # above what the system allows: try less
            continue


def main(argv: list[str], job=train) -> int:
    raise_open_file_limit()
    try:
        job(argv)
    except (ConfigError, DataError, NonFiniteLossError, CheckpointError, RankFailure) as e:
        if not getattr(e, "raised_on_every_rank", False) or os.environ.get("LOCAL_RANK", "0") == "0":  # once per node
            print(f"\nerror: {e}", file=sys.stderr)  # on its own line, even after an unfinished progress bar
            tell_the_launcher(f"error: {e}")
            no_restart_for_this()
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one in data preparation, evaluation or saving
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print("\ninterrupted (Ctrl-C). Nothing written is lost: rerunning the same command reuses the token stores "
                  "already built and resumes an unfinished one from its last saved progress; add "
                  "`--resume_from_checkpoint auto` to continue training from the newest checkpoint.", file=sys.stderr)
        return 130
    finally:
        if distributed():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record  # an unexpected error's traceback in the box

    sys.exit(record(main)(sys.argv[1:]))
