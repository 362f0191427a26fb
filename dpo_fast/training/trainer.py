"""`DPOTrainer`: a thin DPO training loop over the fused loss and the batch layouts.

One optimizer step:

1. The step's pairs (global batch = per_device_train_batch_size x gradient_accumulation_steps x world
   size, from a seeded per-epoch permutation) are cut into micro-batches of per_device_train_batch_size
   pairs; micro-batch j goes to rank j % world_size.
2. Each micro-batch is laid out (`dpo_fast.data.layouts`) on the host by a background thread while the
   device computes the one before (pinned memory, copies that do not block the host), run through the
   policy's backbone to its last hidden states with the layout's attention (`dpo_fast.data.attention.
   model_inputs`: a FlexAttention BlockMask built on the device for the packed layouts on CUDA, a dense
   mask for eager/sdpa, varlen boundaries for flash), and scored by `linear_dpo_loss` against the
   lm_head weight: the [tokens, vocab] logits never exist.
3. Its mean loss is scaled by (its pairs / the step's pairs over all micro-batches and ranks) before
   backward, and the gradients are summed over ranks. The update is therefore the gradient of the mean
   loss over the step's pairs however they were split: 4 pairs x 1 micro-batch, 1 x 4, 2 ranks x 2, any
   layout. (Losses with a batch statistic, bco_pair and aot*, see only their micro-batch.)
4. Clip, optimizer step, scheduler step; metrics every logging_steps (summed on the device and read
   once per logging step), checkpoints every save_steps and every save_minutes.

What can go wrong is watched without a per-step host sync: a step whose loss or gradient norm is not finite
is skipped on the device (the fused optimizer's found_inf) and counted by `TrainingHealth`, read at each
logging step and before each save; max_nonfinite_steps in a row stop the run (TrainingDiverged), and a
checkpoint is never written from non-finite weights. A dead gradient or a loss jump is a warning in
metrics.jsonl and the returned metrics. SIGTERM/SIGINT finish the step in progress, save a checkpoint and
raise `checkpoint.TrainingInterrupted` (with several processes the stop request is reduced with the step's
statistics and read a step later, so every rank stops after the same step). A collective that waits longer
than ddp_timeout raises DistributedTimeout naming the rank.

Gradient checkpointing is on by default (non-reentrant, as in TRL); the reference forward runs without it.

The reference log-probs come from a frozen copy of the initial policy, or a given `ref_model`, or the
policy with its LoRA adapter disabled, or a disk cache computed once (`precompute_ref`); reference-free
losses (simpo) use none.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.attention import (
    attention_implementation,
    model_inputs,
    preferred_attention,
    row_multiple,
    set_attention,
    uses_dense_mask,
)
from ..data.layouts import build_batch, unit_lengths
from ..data.pairs import ROLE_PAD, Batch, TokenizedPair, pairs_fingerprint
from ..data.summary import layout_padding, padding_line, summarize_data
from ..loss.formulas import DPOOutput, loss_from_logps
from ..loss.functional import linear_dpo_loss
from . import checkpoint as ckpt
from . import plan, reference, saving
from .config import DPOConfig
from .metrics import (
    CHART_FILE,
    METRICS_FILE,
    MetricsLogger,
    TrainingDiverged,
    TrainingHealth,
    plot_metrics,
)
from .reference import weights_fingerprint
from .scoring import (
    backbone_of,
    check_sequence_lengths,
    head_token_logps,
    is_peft_model,
    model_base,
    output_head,
    pad_token_id,
)

logger = logging.getLogger(__name__)

# Sums reduced over ranks each step, in this order (one all_reduce for all of them). The first
# _DEVICE_STATS come from the model's outputs and are summed on the device; the rest are counts the host knows.
_STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "kl_num", "kl_den", "pairs", "tokens")
_DEVICE_STATS = 7


# ------------------------------------------------------------------------------------------------
# Helpers


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("lora_r > 0 needs the peft package: pip install 'dpo-fast[peft]'") from None
    return peft


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing, non-reentrant (works with frozen inputs, LoRA and no_grad reference passes)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("gradient_checkpointing=True needs a model with gradient_checkpointing_enable() "
                         f"(a transformers PreTrainedModel); got {type(model).__name__}")


def lr_lambda_factory(schedule: str, total_steps: int, warmup_steps: int):
    """Multiplier of the peak learning rate at step s (LambdaLR): linear warmup, then the schedule."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _ModelOutputs(nn.Module):
    """Runs a causal LM to per-sequence scores for a laid-out batch; the unit FSDP shards and hooks.

    forward(...) with reference=False returns the DPO loss outputs as a tuple (FSDP2 traverses tuples
    to hook its backward), with reference=True the [2B] sequence log-probs without gradient.
    """

    def __init__(self, model: nn.Module, config: DPOConfig):
        super().__init__()
        self.model = model
        self.config = config

    def hidden_states(self, inputs: dict[str, Any]) -> Tensor:
        base = model_base(self.model)
        use_autocast = self.config.bf16 and inputs["input_ids"].device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            out = backbone_of(base)(**inputs, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden.reshape(-1, hidden.shape[-1])

    def forward(self, inputs: dict[str, Any], scored: Tensor, labels: Tensor, segment_ids: Tensor, num_pairs: int,
                ref_chosen: Tensor | None = None, ref_rejected: Tensor | None = None, reference: bool = False):
        """inputs: `model_inputs`; scored: [N] flat indices of the scored positions, labels/segment_ids theirs."""
        base = model_base(self.model)
        head = output_head(base)
        # Only scored positions go through the head: prompt and padding rows would cost 2·H·V flops each
        # for nothing. The gather's backward scatters the gradient back into the [R*L, H] hidden states.
        # The head's matmul runs in the head's dtype; [N, H] hidden states are small next to [N, V] logits.
        hidden = self.hidden_states(inputs)[scored].to(head.weight.dtype)
        segments = segment_ids
        if reference:
            tok = head_token_logps(hidden, head, labels, backend=self.config.backend)
            sums = torch.zeros(2 * num_pairs, dtype=torch.float32, device=hidden.device)
            return sums.index_add_(0, segments, tok)
        lc = self.config.loss_config
        if head.softcap is None:
            weight, bias = head.weight, head.bias
            if head.scale != 1.0:
                weight = weight * head.scale
                bias = None if bias is None else bias * head.scale
            out = linear_dpo_loss(hidden, weight, labels, ref_chosen, ref_rejected, bias=bias, beta=lc.beta,
                                  loss_type=lc.loss_type, label_smoothing=lc.label_smoothing,
                                  nll_weight=lc.nll_weight, simpo_gamma=lc.simpo_gamma,
                                  discopop_tau=lc.discopop_tau, segment_ids=segments, backend=self.config.backend)
        else:
            # A softcapped head is not linear: score it tile by tile through `head_token_logps`.
            tok = head_token_logps(hidden, head, labels, backend=self.config.backend)
            sums = torch.zeros(2 * num_pairs, dtype=tok.dtype, device=tok.device).index_add(0, segments, tok)
            lengths = torch.zeros(2 * num_pairs, dtype=tok.dtype, device=tok.device).index_add(
                0, segments, torch.ones_like(tok))
            out = loss_from_logps(lc, sums[:num_pairs], sums[num_pairs:], ref_chosen, ref_rejected,
                                  chosen_lengths=lengths[:num_pairs], rejected_lengths=lengths[num_pairs:])
        return (out.loss, out.losses, out.chosen_logps, out.rejected_logps, out.chosen_rewards,
                out.rejected_rewards)


@dataclasses.dataclass
class _LaidOut:
    """A micro-batch laid out on the host (pinned when training on CUDA), with what the step needs from it."""

    batch: Batch
    members: list[int]  # indices into the split's pairs
    member_index: Tensor  # the same, as a tensor (pinned with the rest)
    weight: float  # this micro-batch's share of the step's pairs (0 for an FSDP filler)
    scored: Tensor  # [N] flat indices of the scored positions
    labels: Tensor  # [N]
    segment_ids: Tensor  # [N]
    num_tokens: int  # real tokens (padding aside)
    chosen_tokens: int  # scored tokens of the chosen responses


def check_output_dir(config: DPOConfig) -> None:
    """Refuse an output_dir holding another run unless resuming or overwrite_output_dir is set."""
    out = config.output_dir
    if config.resume_from_checkpoint or config.overwrite_output_dir or not os.path.isdir(out):
        return
    names = os.listdir(out)
    traces = [n for n in names if n in (METRICS_FILE, "final") or n.startswith("checkpoint-")]
    if traces:
        raise ValueError(
            f"output_dir {out!r} already holds a run ({', '.join(sorted(traces)[:3])}): choose another directory, "
            "resume it with resume_from_checkpoint='latest', or set overwrite_output_dir=True")


# ------------------------------------------------------------------------------------------------
# Trainer


class DPOTrainer:
    """DPO training of `model` (a transformers causal LM) on preference pairs.

    Args:
        model: the policy, e.g. `AutoModelForCausalLM.from_pretrained(...)`; trained in place
            (`trainer.model` is it, or its peft wrapper when lora_r > 0).
        tokenizer: used to tokenize `train_data`/`eval_data` and for its pad (else EOS) token id.
        train_data: a `dpo_fast.data.load_preferences` Dataset, anything `load_preferences` accepts
            (path, Hub name, list of rows), or a list of `TokenizedPair`.
        config: a `DPOConfig`.
        ref_model: the frozen reference; None = a frozen copy of the initial policy (or the policy with
            its adapter disabled under LoRA). Must be None for reference-free losses.
        eval_data: like train_data; evaluated at the end of training (metrics prefixed "eval/").
    """

    def __init__(self, model: nn.Module, tokenizer: Any, train_data: Any, *, config: DPOConfig | None = None,
                 ref_model: nn.Module | None = None, eval_data: Any = None):
        self.config = config = config if config is not None else DPOConfig()
        if not isinstance(config, DPOConfig):
            raise TypeError(f"config must be a DPOConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
        if config.reference_free and ref_model is not None:
            raise ValueError(f"loss_type={config.loss_type!r} is reference-free: do not pass ref_model")
        check_output_dir(config)
        ckpt.check_writable_dir(config.output_dir)  # before any weight moves or data is read
        self.tokenizer = tokenizer
        self._init_distributed()
        # Every rank checks output_dir before rank 0 writes anything into it.
        self._barrier()
        set_seed(config.seed)
        self.layout, self.attn_implementation = self._choose_attention(model, ref_model)
        self._set_attention(model, ref_model)

        self.train_pairs = self._as_pairs(train_data, "train_data")
        if not self.train_pairs:
            raise ValueError("train_data holds no preference pair")
        self.eval_pairs = None if eval_data is None else self._as_pairs(eval_data, "eval_data")
        self._check_pair_sizes(self.train_pairs, "train_data")
        if self.eval_pairs:
            self._check_pair_sizes(self.eval_pairs, "eval_data")
        # max_length, the model's positions and a sliding window (our masks do not apply windows).
        check_sequence_lengths(self.train_pairs, model, config.max_length)
        if self.eval_pairs:
            check_sequence_lengths(self.eval_pairs, model, config.max_length)
        self._report_padding()

        if config.lora_r > 0:
            model = self._add_lora(model)
        model.to(self.device)
        if config.gradient_checkpointing:
            _enable_checkpointing(model)
        if config.bf16 and self.device.type != "cuda":
            warnings.warn("bf16=True is ignored on the CPU (autocast is used on CUDA only)", stacklevel=2)
        self.model = model
        self.ref_model = None
        if ref_model is not None:
            ref_model.to(self.device)
            self.ref_model = reference.freeze(ref_model)
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        self.steps_per_epoch = math.ceil(len(self.epoch_plan(0)) / plan.micro_batches_per_step(config, self.world_size))
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.steps_per_epoch * config.num_train_epochs))
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self._ref_cache: dict[str, Tensor] = {}
        self._outputs = _ModelOutputs(self.model, config)
        self._ref_outputs: _ModelOutputs | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.metrics: MetricsLogger | None = None
        self.last_lr = 0.0
        self.step_loss: Tensor | float = 0.0  # the last step's mean loss (`_accumulate_gradients`)
        # One worker lays micro-batches out on the host while the device computes (started on first use).
        self._layout_worker: ThreadPoolExecutor | None = None

    # -- setup ------------------------------------------------------------------------------------

    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=timedelta(seconds=self.config.ddp_timeout))
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.config.fsdp and not self.distributed:
            warnings.warn("fsdp=True with a single process: nothing to shard, training unsharded", stacklevel=3)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _any_rank_failed(self, failed: bool) -> bool:
        """A barrier that also tells every rank whether any of them failed (a failed save raises everywhere
        instead of leaving the other ranks at the next barrier until ddp_timeout)."""
        if not self.distributed:
            return failed
        flag = torch.tensor([float(failed)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _choose_attention(self, model: nn.Module, ref_model: nn.Module | None) -> tuple[str, str]:
        """(layout, attn_implementation) the run uses: `preferred_attention` (FlexAttention for the packed
        layouts on CUDA when the model supports it, and the reference model too) unless flex_attention=False;
        a flash model runs "prefix_shared" as "packed" (varlen boundaries cannot skip the chosen branch)."""
        base = model_base(model)
        impl, layout = attention_implementation(base), self.config.layout
        if "flash" in impl and layout == "prefix_shared":
            warnings.warn(f"attn_implementation={impl!r} cannot run the 'prefix_shared' layout (its rejected branch "
                          "skips part of its context): using the 'packed' layout (varlen boundaries)", stacklevel=3)
            layout = "packed"
        if self.config.flex_attention:
            preferred = preferred_attention(base, layout, self.device)
            if ref_model is None or preferred_attention(model_base(ref_model), layout, self.device) == preferred:
                impl = preferred
        return layout, impl

    def _set_attention(self, model: nn.Module, ref_model: nn.Module | None) -> None:
        """Switch the policy and the reference (both read the same inputs) to the chosen implementation; where
        transformers refuses FlexAttention (torch too old, ...), both keep their own, with a warning."""
        models = [model_base(m) for m in (model, ref_model) if m is not None]
        before = [attention_implementation(m) for m in models]
        try:
            for m in models:
                set_attention(m, self.attn_implementation)
        except (ValueError, ImportError) as e:
            for m, impl in zip(models, before):
                set_attention(m, impl)
            warnings.warn(f"attn_implementation={self.attn_implementation!r} is not available ({e}); keeping "
                          f"{before[0]!r}", stacklevel=3)
            self.attn_implementation = before[0]

    @property
    def _dense_mask(self) -> bool:
        return uses_dense_mask(self.attn_implementation)

    def _as_pairs(self, data: Any, name: str) -> list[TokenizedPair]:
        if isinstance(data, (list, tuple)) and data and all(isinstance(p, TokenizedPair) for p in data):
            pairs = list(data)
        else:
            if isinstance(data, (list, tuple)) and any(isinstance(p, TokenizedPair) for p in data):
                bad = next(i for i, p in enumerate(data) if not isinstance(p, TokenizedPair))
                raise TypeError(f"{name}[{bad}] is a {type(data[bad]).__name__}, the others TokenizedPair: "
                                "pass one kind")
            import datasets

            from ..data.formats import load_preferences_with_report
            from ..data.tokenization import tokenize_dataset

            report = None
            if isinstance(data, datasets.Dataset):
                dataset = data
            else:
                dataset, report = load_preferences_with_report(data)
            if self.tokenizer is None:
                raise ValueError(f"{name} is raw text: a tokenizer is needed to tokenize it")
            pairs, stats = tokenize_dataset(self.tokenizer, dataset, max_length=self.config.max_length,
                                            truncation=self.config.truncation)
            pairs = list(pairs)
            if self.rank == 0:
                summary = summarize_data(pairs, stats, max_length=self.config.max_length, load_report=report)
                print(summary.format(), file=sys.stderr)
        # Positions in this list key the reference log-probs; the source row stays in error messages.
        return pairs

    def _report_padding(self) -> None:
        """The last line of the data summary: the padding share of the layout as this run lays batches out."""
        if self.rank != 0:
            return
        capacity = None if self.layout == "padded" else self.config.row_capacity(self._dense_mask)
        fraction, batches = layout_padding(self.train_pairs, self.layout,
                                           pairs_per_batch=self.config.per_device_train_batch_size,
                                           row_capacity=capacity, pad_id=pad_token_id(self.tokenizer),
                                           seed=self.config.seed)
        print(f"layout {padding_line(self.layout, fraction, batches)}", file=sys.stderr)

    def _check_pair_sizes(self, pairs: list[TokenizedPair], name: str) -> None:
        budget = self.config.max_tokens_per_batch
        if budget and name == "train_data":
            from ..data.layouts import pair_cost

            for i, p in enumerate(pairs):
                if pair_cost(p, self.layout) > budget:
                    raise ValueError(f"{name}[{i}] (dataset row {p.index}) needs {pair_cost(p, self.layout)} tokens "
                                     f"in the {self.layout!r} layout, more than max_tokens_per_batch={budget}")
        capacity = self.config.row_capacity(self._dense_mask)
        if self.layout == "padded" or capacity is None:
            return
        lengths = unit_lengths(pairs, self.layout)
        for i, n in enumerate(lengths):
            if n > capacity:
                j = i % len(pairs)
                raise ValueError(f"{name}[{j}] (dataset row {pairs[j].index}) needs {n} tokens in one row of the "
                                 f"{self.layout!r} layout, more than max_tokens_per_row={capacity}")

    def _add_lora(self, model: nn.Module) -> nn.Module:
        peft = _require_peft()
        if is_peft_model(model):
            return model
        targets = [t.strip() for t in self.config.lora_target_modules.split(",") if t.strip()]
        lora = peft.LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                               lora_dropout=self.config.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
        return peft.get_peft_model(model, lora)

    @property
    def has_adapter(self) -> bool:
        return is_peft_model(self.model)

    def _setup_reference(self) -> None:
        """Before any weight changes: the reference copy, or the precomputed reference log-probs."""
        if self.config.reference_free:
            return
        if self.config.precompute_ref:
            # Without a separate ref model, the policy as it is now (before training or resuming) is the reference.
            source = self.ref_model if self.ref_model is not None else self.model
            # On the device (8 bytes a pair): each micro-batch gathers its rows there, with no host copy.
            self._ref_cache["train"] = self._cached_reference_logps(source, self.train_pairs, "train").to(self.device)
            if self.eval_pairs:
                self._ref_cache["eval"] = self._cached_reference_logps(source, self.eval_pairs, "eval").to(self.device)
            # Freed: its log-probs are all the run needs.
            self.ref_model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        self.ref_model = reference.reference_model(self.config, self.model, self.ref_model)
        if self.ref_model is not None:
            self._ref_outputs = _ModelOutputs(self.ref_model, self.config)

    def _cached_reference_logps(self, model: nn.Module, pairs: list[TokenizedPair], split: str) -> Tensor:
        """[len(pairs), 2] (chosen, rejected) reference log-probs, from the disk cache or computed (each rank
        a share of the pairs) and cached."""
        path = reference.cache_path(self.config, model, pairs, layout=self.layout,
                                    bf16=self.config.bf16 and self.device.type == "cuda",
                                    adapter_disabled=self.has_adapter)
        cached = reference.read_cache(path, len(pairs))
        if cached is not None:
            logger.info("reference log-probs for %s read from %s", split, path)
            return cached
        values = torch.zeros(len(pairs), 2, dtype=torch.float32)
        mine = list(range(self.rank, len(pairs), self.world_size))
        if mine:
            values[mine, 0], values[mine, 1] = reference.reference_pair_logps(
                model, self.tokenizer, [pairs[i] for i in mine], layout=self.layout,
                max_length=self.config.max_length,
                max_tokens_per_batch=(self.config.row_capacity(self._dense_mask) or 2 * self.config.max_length)
                * self.config.per_device_train_batch_size,
                backend=self.config.backend)
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        if self.rank == 0:
            ckpt.atomic_torch_save(values, path)
            logger.info("reference log-probs for %s cached in %s", split, path)
        self._barrier()
        return values

    def _build_optimizer(self) -> None:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter")
        c = self.config
        # No decay on biases and norm scales (1-D): decaying them only hurts, as is common practice.
        groups = [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        # fused: one kernel per parameter group, and it reads `found_inf` on the device, which is how a
        # non-finite step is skipped without a host sync (`optimizer_step`). FSDP's DTensors have no fused SGD.
        if c.optim == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=c.learning_rate, fused=not (c.fsdp and self.distributed))
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                               eps=c.adam_epsilon, fused=True)
        warmup = math.ceil(c.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(c.lr_scheduler_type, self.total_steps, warmup))

    def _setup_parallel(self) -> None:
        if not self.distributed:
            return
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for outputs in (self._outputs, self._ref_outputs):
                if outputs is None:
                    continue
                backbone = backbone_of(model_base(outputs.model))
                for layer in getattr(backbone, "layers", []):
                    fully_shard(layer)
                fully_shard(outputs)
            return
        # Replicas must start equal: the all-reduced gradients are applied to every copy.
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, src=0)

    def _prepare(self) -> None:
        if self.optimizer is not None:
            return
        self._setup_reference()
        self._setup_parallel()
        self._build_optimizer()
        if self.rank == 0:
            os.makedirs(self.config.output_dir, exist_ok=True)
        self.run_settings = ckpt.run_settings(self.config, world_size=self.world_size, layout=self.layout,
                                              num_train_pairs=len(self.train_pairs),
                                              data_fingerprint=pairs_fingerprint(self.train_pairs))
        self.health = TrainingHealth(max_nonfinite_steps=self.config.max_nonfinite_steps, device=self.device)
        self.run_warnings: list[str] = []
        self.lineage, path, state = saving.start_run(self.config, self.run_settings, rank=self.rank,
                                                     barrier=self._barrier)
        if path is not None:
            self._resume(path, state)
        self.metrics = MetricsLogger(self.config.output_dir, enabled=self.rank == 0,
                                     tensorboard=self.config.report_to_tensorboard)
        self._barrier()

    # -- data -------------------------------------------------------------------------------------

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """All micro-batches of an epoch, in order, as lists of indices into train_pairs (`plan.epoch_plan`)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, plan.epoch_plan(self.train_pairs, self.config, self.layout, self.world_size,
                                                       epoch))
        return self._plan_cache[1]

    def step_micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """The global step's micro-batches (all ranks); micro-batch j is run by rank j % world_size."""
        return plan.step_micro_batches(self.epoch_plan(epoch), step_in_epoch,
                                       plan.micro_batches_per_step(self.config, self.world_size))

    def _my_micro_batches(self, micro_batches: list[list[int]]) -> list[tuple[list[int], float]]:
        """This rank's micro-batches of a step: (pair indices, share of the step's pairs)."""
        return plan.rank_micro_batches(micro_batches, self.rank, self.world_size,
                                       same_count=self.config.fsdp and self.distributed)

    def _lay_out(self, pairs: list[TokenizedPair], members: list[int], weight: float) -> _LaidOut:
        """Host work of one micro-batch (runs on the layout worker): rows, scored positions, counts, pinning."""
        capacity = None if self.layout == "padded" else self.config.row_capacity(self._dense_mask)
        batch = build_batch([pairs[i] for i in members], self.layout, pad_id=pad_token_id(self.tokenizer),
                            max_tokens_per_row=capacity, pad_to_multiple_of=row_multiple(self.attn_implementation))
        segments = batch.segment_ids.reshape(-1)
        scored = (segments >= 0).nonzero().squeeze(-1)
        segments = segments[scored]
        laid_out = _LaidOut(batch=batch, members=members, member_index=torch.tensor(members), weight=weight,
                            scored=scored,
                            labels=batch.labels.reshape(-1)[scored], segment_ids=segments,
                            num_tokens=int((batch.roles != ROLE_PAD).sum()),
                            chosen_tokens=int((segments < batch.num_pairs).sum()))
        if self.device.type == "cuda":
            laid_out.batch = batch.pin_memory()
            laid_out.scored, laid_out.labels, laid_out.segment_ids, laid_out.member_index = (
                t.pin_memory() for t in (laid_out.scored, laid_out.labels, laid_out.segment_ids,
                                         laid_out.member_index))
        return laid_out

    def _lay_out_ahead(self, pairs: list[TokenizedPair],
                       micro: list[tuple[list[int], float]]) -> list[Future]:
        """Queue the micro-batches on the layout worker (in order); their results are read as they are needed."""
        if self._layout_worker is None:
            # Pinning touches the CUDA context: the worker uses this rank's device, not device 0 (as the
            # DataLoader's pin-memory thread does).
            cuda = self.device.type == "cuda"
            self._layout_worker = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="dpo_fast-layout",
                initializer=torch.cuda.set_device if cuda else None, initargs=(self.device,) if cuda else ())
        return [self._layout_worker.submit(self._lay_out, pairs, members, weight) for members, weight in micro]

    def _to_device(self, laid_out: _LaidOut) -> dict[str, Any]:
        """The forward's arguments on the device; copies from pinned memory do not block the host."""
        base = model_base(self.model)
        dtype = next(self.model.parameters()).dtype

        def move(t: Tensor) -> Tensor:
            return t.to(self.device, non_blocking=True)

        return {"inputs": model_inputs(base, laid_out.batch, self.device, dtype=dtype),
                "scored": move(laid_out.scored), "labels": move(laid_out.labels),
                "segment_ids": move(laid_out.segment_ids), "num_pairs": laid_out.batch.num_pairs}

    # -- reference log-probs for a batch ----------------------------------------------------------

    def _reference_logps(self, split: str, laid_out: _LaidOut, inputs: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        if self.config.reference_free:
            return None
        if split in self._ref_cache:
            return reference.gather_cached(self._ref_cache[split], laid_out.member_index, self.device)
        if self._ref_outputs is not None:
            return reference.forward_reference_logps(self._ref_outputs, inputs)
        return reference.forward_reference_logps(self._outputs, inputs, policy=self.model)  # LoRA: the base model

    # -- one optimizer step -----------------------------------------------------------------------

    def compute_gradients(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """Forward and backward of this rank's share of one step, given as all ranks' micro-batches.

        micro_batches: lists of indices into train_pairs; micro-batch j is run by rank j % world_size.
        Leaves in each parameter's .grad the gradient of the mean loss over all the step's pairs (summed
        over ranks) and returns the step's statistics (sums over pairs), reduced over ranks.
        """
        self._prepare()
        pending = self._lay_out_ahead(self.train_pairs, self._my_micro_batches(micro_batches))
        return dict(zip(_STAT_KEYS, self._accumulate_gradients(pending).tolist()))

    def _accumulate_gradients(self, pending: list[Future], flags: Sequence[float] = ()) -> Tensor:
        """`compute_gradients` over micro-batches queued by `_lay_out_ahead`; the statistics stay on the device.
        flags: host numbers summed over ranks with the statistics (appended after them)."""
        stats = torch.zeros(_DEVICE_STATS, dtype=torch.float64, device=self.device)
        counts = [0.0] * (len(_STAT_KEYS) - _DEVICE_STATS)
        for j, future in enumerate(pending):
            laid_out = future.result()
            inputs = self._to_device(laid_out)
            ref = self._reference_logps("train", laid_out, inputs)
            if hasattr(self._outputs, "set_requires_gradient_sync"):
                self._outputs.set_requires_gradient_sync(j == len(pending) - 1)
            loss, *rest = self._outputs(**inputs, ref_chosen=None if ref is None else ref[0],
                                        ref_rejected=None if ref is None else ref[1])
            # FSDP averages gradients over ranks; the manual all-reduce sums them.
            scale = laid_out.weight * (self.world_size if self.config.fsdp and self.distributed else 1)
            (loss * scale).backward()
            if laid_out.weight > 0:
                stats += self._batch_stats(loss, rest, ref)
                counts = [a + b for a, b in zip(counts, self._batch_counts(laid_out, ref))]
        self._all_reduce_gradients()
        reduced = self._reduced(stats, counts + list(flags))
        # The step's mean loss, on the device, for `optimizer_step` to watch with the gradient norm.
        self.step_loss = reduced[0] / reduced[_STAT_KEYS.index("pairs")].clamp(min=1.0)
        return reduced

    def _reduced(self, stats: Tensor, counts: list[float]) -> Tensor:
        """[len(_STAT_KEYS)] float64 on the device: the device sums and the host counts, summed over ranks."""
        counts = torch.tensor(counts, dtype=torch.float64)
        if self.device.type == "cuda":
            counts = counts.pin_memory()  # a copy from pageable memory would wait for the device
        stats = torch.cat([stats, counts.to(self.device, non_blocking=True)])
        if self.distributed:
            dist.all_reduce(stats)
        return stats

    @staticmethod
    def _batch_stats(loss: Tensor, rest: list[Tensor], ref) -> Tensor:
        """The first _DEVICE_STATS statistics of a micro-batch, computed on the device (no host sync)."""
        losses, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards = (t.detach().double() for t in rest)
        kl_num = (chosen_logps - ref[0].double()).sum() if ref is not None else chosen_logps.new_zeros(())
        return torch.stack([
            loss.detach().double() * chosen_logps.shape[0], chosen_rewards.sum(), rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).double().sum(), chosen_logps.sum(), rejected_logps.sum(), kl_num,
        ])

    @staticmethod
    def _batch_counts(laid_out: _LaidOut, ref) -> list[float]:
        """kl_den, pairs, tokens: known on the host from the layout."""
        return [laid_out.chosen_tokens if ref is not None else 0, laid_out.batch.num_pairs, laid_out.num_tokens]

    def _all_reduce_gradients(self) -> None:
        if not self.distributed or self.config.fsdp:
            return
        grads = []
        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # every rank must reduce the same tensors
                grads.append(p.grad)
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= 1 << 24):
                flat = torch._utils._flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                for dst, src in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                bucket, size = [], 0

    def optimizer_step(self) -> Tensor:
        """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping, a 0-dim
        tensor on the device (reading it waits for the device: the training loop reads it once per log).

        When the step's mean loss (`self.step_loss`, left by the forward and backward) or the gradient norm
        is NaN or infinite, the update is skipped on the device (the fused optimizer's found_inf: weights,
        moments and step count stay as they were) and counted by `self.health`, with no host sync;
        `self.step_finite` says which (a 0-dim bool tensor)."""
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self.step_finite = self.health.update(self.global_step + 1, self.step_loss, grad_norm)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~self.step_finite).to(torch.float32)
        else:
            # SGD (no momentum) on FSDP's shards: a zero gradient leaves the weights as they were but for
            # the step's weight decay.
            for p in params:
                p.grad.copy_(torch.where(self.step_finite, p.grad, 0.0))
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (logged as "lr")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Run to config.max_steps (or the epochs); returns the last logged metrics, with the last step's loss
        ("last_step_loss", beside "loss", the logging window's mean) and the run's warnings ("warnings").

        Raises TrainingDiverged when max_nonfinite_steps steps in a row were non-finite (no checkpoint of
        non-finite weights is written), ckpt.TrainingInterrupted after SIGTERM/SIGINT (once the step is finished
        and a checkpoint written), DistributedTimeout when the other processes do not answer within ddp_timeout.
        """
        try:
            return self._train()
        except RuntimeError as e:
            if self.distributed and _is_timeout(e):
                raise DistributedTimeout(
                    f"rank {self.rank} of {self.world_size}: a collective waited more than ddp_timeout="
                    f"{self.config.ddp_timeout} s at step {self.global_step + 1}: another rank is stuck or died "
                    f"(see its log); {str(e).splitlines()[0]}") from e
            raise
        finally:
            # A stop (divergence, a signal, an error) leaves the next step's micro-batches queued: drop them
            # rather than lay out and pin them for nothing; a later call starts a new worker.
            if self._layout_worker is not None:
                self._layout_worker.shutdown(wait=True, cancel_futures=True)
                self._layout_worker = None

    def _train(self) -> dict[str, Any]:
        self._prepare()
        self.model.train()
        c = self.config
        progress = _progress_bar(self.total_steps, self.global_step, enabled=self.rank == 0)
        # Sums over the logging window, on the device: read (one host sync) once per logging step. After the
        # statistics: the gradient norm and the count of finite steps (a skipped step adds nothing).
        window = torch.zeros(len(_STAT_KEYS) + 2, dtype=torch.float64, device=self.device)
        last_step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        last: dict[str, Any] = {}
        # Periodic saves by minutes; save_steps is checked exactly below (every rank knows the step).
        schedule = ckpt.SaveSchedule(0, c.save_minutes)
        self._flags_in_flight, self._last_save_step, self._safety_checkpoint = None, -1, None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        upcoming = self._lay_out_step(self.epoch, self.step_in_epoch)
        with ckpt.StopRequest() as stop:
            while self.global_step < self.total_steps:
                current = upcoming
                following = self._following(self.epoch, self.step_in_epoch)
                # The next step's layouts queue behind this one's: the worker keeps a step ahead of the device.
                upcoming = self._lay_out_step(*following) if self.global_step + 1 < self.total_steps else []
                flags = [float(stop.requested), float(self.rank == 0 and schedule.due(self.global_step + 1))]
                stats = self._accumulate_gradients(current, flags)
                stats, flags = stats[:-2], stats[-2:]
                grad_norm = self.optimizer_step()
                self.global_step += 1
                self.epoch, self.step_in_epoch = following
                step_values = torch.cat([stats, grad_norm.to(torch.float64).view(1), stats.new_ones(1)])
                window += torch.where(self.step_finite, step_values, torch.zeros_like(step_values))
                last_step_loss = self.step_loss
                window_steps += 1
                progress.update(1)
                if self.global_step % c.logging_steps == 0 or self.global_step == self.total_steps:
                    values = torch.cat([window, last_step_loss.view(1)]).tolist()
                    sums = dict(zip((*_STAT_KEYS, "grad_norm", "finite_steps", "last_step_loss"), values))
                    elapsed = time.perf_counter() - window_start
                    last = self._window_metrics(sums, window_steps, elapsed)
                    self.metrics.log(self.global_step, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}")
                    window.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                    self._check_health()
                stop_now, save_due = self._agreed_flags(flags, stop, schedule)
                saved = None
                by_steps = bool(c.save_steps) and self.global_step % c.save_steps == 0
                if by_steps or save_due or stop_now:
                    saved = self.save_checkpoint()
                    schedule.saved()
                    self._last_save_step = self.global_step
                    self._replace_safety_checkpoint(saved, kept=by_steps)
                if stop_now:
                    progress.close()
                    self.metrics.close()
                    raise ckpt.TrainingInterrupted(stop.signal or signal.SIGTERM, self.global_step, saved)
        progress.close()
        self._check_health()
        if self.eval_pairs:
            evaluated = self.evaluate()
            self.metrics.log(self.global_step, evaluated)
            last = {**last, **evaluated}
        self.save_final()
        if self.rank == 0:
            plot_metrics(self.metrics.history, os.path.join(c.output_dir, CHART_FILE))
        self.metrics.close()
        return {**last, "warnings": list(self.run_warnings)}

    def _replace_safety_checkpoint(self, saved: str, *, kept: bool) -> None:
        """A checkpoint written by the minutes or a signal, not by save_steps, only guards against losing the
        run: each newer checkpoint replaces it, so that periodic saves take the disk of one checkpoint."""
        previous, self._safety_checkpoint = self._safety_checkpoint, None if kept else saved
        if self.rank == 0 and previous is not None and previous != saved:
            shutil.rmtree(previous, ignore_errors=True)

    def _agreed_flags(self, flags: Tensor, stop: ckpt.StopRequest, schedule: ckpt.SaveSchedule) -> tuple[bool, bool]:
        """(stop, save now) as every rank sees them. One process: this step's, from the host. Several: the
        previous step's sums over ranks (rank 0's clock decides the minutes), copied to the host behind the
        device's work; reading this step's would wait for the device, the previous step's is long done."""
        if not self.distributed:
            return stop.requested, schedule.due(self.global_step)
        cuda = self.device.type == "cuda"
        host = torch.empty(2, dtype=torch.float64, pin_memory=cuda)
        host.copy_(flags, non_blocking=True)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        previous, self._flags_in_flight = self._flags_in_flight, (self.global_step, host, event)
        if previous is None:
            return False, False
        step, host, event = previous
        if event is not None:
            event.synchronize()
        requested, due = host.tolist()
        # A save asked for before the last save happened is that save.
        return requested > 0, due > 0 and step > self._last_save_step

    def _check_health(self) -> None:
        """Read `self.health` (one host sync): log its new warnings (metrics file, stderr, the returned list);
        TrainingDiverged when too many steps in a row were non-finite."""
        report = self.health.read()
        for note in report.warnings:
            self.metrics.log(self.global_step, {"warning": note})
            self.run_warnings.append(note)
            if self.rank == 0:
                print(f"warning: {note}", file=sys.stderr)
        if report.stop_message:
            raise TrainingDiverged(report.stop_message)

    def _following(self, epoch: int, step_in_epoch: int) -> tuple[int, int]:
        """(epoch, step in epoch) of the step after the given one."""
        return (epoch + 1, 0) if step_in_epoch + 1 >= self.steps_per_epoch else (epoch, step_in_epoch + 1)

    def _lay_out_step(self, epoch: int, step_in_epoch: int) -> list[Future]:
        return self._lay_out_ahead(self.train_pairs,
                                   self._my_micro_batches(self.step_micro_batches(epoch, step_in_epoch)))

    def _window_metrics(self, window: dict[str, float], steps: int, elapsed: float) -> dict[str, float]:
        pairs = max(window["pairs"], 1.0)
        out = {
            "loss": window["loss"] / pairs,
            "rewards/chosen": window["rewards/chosen"] / pairs,
            "rewards/rejected": window["rewards/rejected"] / pairs,
            "rewards/margins": (window["rewards/chosen"] - window["rewards/rejected"]) / pairs,
            "rewards/accuracies": window["rewards/accuracies"] / pairs,
            "logps/chosen": window["logps/chosen"] / pairs,
            "logps/rejected": window["logps/rejected"] / pairs,
        }
        if window["kl_den"] > 0:
            out["kl"] = window["kl_num"] / window["kl_den"]
        finite = int(window["finite_steps"])
        if finite == 0:
            out = {k: float("nan") for k in out}
        if finite < steps:
            out["skipped_steps"] = steps - finite  # non-finite: left out of every mean here
        out.update({
            "last_step_loss": window["last_step_loss"],
            "grad_norm": window["grad_norm"] / finite if finite else float("nan"),
            "lr": self.last_lr,
            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
            "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
            "pairs_per_s": window["pairs"] / max(elapsed, 1e-9),
            "peak_memory_mb": _peak_memory_mb(self.device),
        })
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over eval_data (no gradient), named "eval/<metric>"."""
        self._prepare()
        if not self.eval_pairs:
            raise ValueError("evaluate() needs eval_data")
        was_training = self.model.training
        self.model.eval()
        stats = torch.zeros(_DEVICE_STATS, dtype=torch.float64, device=self.device)
        counts = [0.0] * (len(_STAT_KEYS) - _DEVICE_STATS)
        indices = list(range(len(self.eval_pairs)))
        size = self.config.per_device_train_batch_size
        chunks = [(indices[s:s + size], 1.0) for s in range(0, len(indices), size)]
        mine = [chunk for j, chunk in enumerate(chunks) if j % self.world_size == self.rank]
        for future in self._lay_out_ahead(self.eval_pairs, mine):
            laid_out = future.result()
            inputs = self._to_device(laid_out)
            ref = self._reference_logps("eval", laid_out, inputs)
            loss, *rest = self._outputs(**inputs, ref_chosen=None if ref is None else ref[0],
                                        ref_rejected=None if ref is None else ref[1])
            stats += self._batch_stats(loss, rest, ref)
            counts = [a + b for a, b in zip(counts, self._batch_counts(laid_out, ref))]
        stats = self._reduced(stats, counts)
        self.model.train(was_training)
        s = dict(zip(_STAT_KEYS, stats.tolist()))
        pairs = max(s["pairs"], 1.0)
        out = {"eval/loss": s["loss"] / pairs, "eval/rewards/accuracies": s["rewards/accuracies"] / pairs,
               "eval/rewards/margins": (s["rewards/chosen"] - s["rewards/rejected"]) / pairs,
               "eval/logps/chosen": s["logps/chosen"] / pairs, "eval/logps/rejected": s["logps/rejected"] / pairs}
        if s["kl_den"] > 0:
            out["eval/kl"] = s["kl_num"] / s["kl_den"]
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def _full_state_dict(self) -> dict[str, Tensor] | None:
        """The model state to save under FSDP (gathered: every rank calls it); None otherwise."""
        return saving.full_state_dict(self._outputs) if self.config.fsdp and self.distributed else None

    def _check_weights_finite(self) -> None:
        saving.check_weights_finite(self.model, self.global_step, distributed=self.distributed, device=self.device)

    def save_checkpoint(self) -> str:
        """Write output_dir/checkpoint-<step> (every rank calls it). Raises TrainingDiverged instead when the
        weights are not finite, or when the run has had too many non-finite steps in a row."""
        self._check_health()
        self._check_weights_finite()
        state_dict = self._full_state_dict()  # a collective under FSDP: every rank takes part
        fsdp = self.config.fsdp and self.distributed
        trainer_state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "total_steps": self.total_steps,
                         "num_train_pairs": len(self.train_pairs), "config": self.config.to_dict(),
                         "run_settings": self.run_settings, "lineage": self.lineage}
        return ckpt.save_checkpoint(
            self.config.output_dir, self.global_step,
            save_model=lambda d: saving.save_model(self.model, d, state_dict),
            optimizer_state=None if fsdp else self.optimizer.state_dict(),
            sharded_optimizer_state=self.optimizer.state_dict() if fsdp else None,
            scheduler_state=self.scheduler.state_dict(), trainer_state=trainer_state,
            rank=self.rank, world_size=self.world_size, failed_anywhere=self._any_rank_failed,
            save_total_limit=self.config.save_total_limit, tokenizer=self.tokenizer)

    def _resume(self, path: str, state: dict[str, Any]) -> None:
        """Load the weights, optimizer, scheduler and RNG states of a checkpoint `check_resume` accepted."""
        saving.load_training_state(path, model=self.model, outputs=self._outputs, optimizer=self.optimizer,
                                   scheduler=self.scheduler, adapter=self.has_adapter,
                                   fsdp=self.config.fsdp and self.distributed, rank=self.rank, device=self.device)
        self.global_step = int(state["global_step"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        if self.rank == 0:
            saving.announce_resume(self.config, path, state, self.global_step)

    def save_final(self) -> str:
        """save_pretrained into output_dir/final (adapters, or merged weights with merge_lora=True)."""
        final = os.path.join(self.config.output_dir, "final")
        self._check_weights_finite()
        state_dict = self._full_state_dict()
        error = None
        if self.rank == 0:
            if self.has_adapter and self.config.merge_lora:
                self.model = self.model.merge_and_unload()
            try:
                ckpt.write_directory(final, lambda d: saving.save_model(self.model, d, state_dict),
                                      tokenizer=self.tokenizer)
            except ckpt.CheckpointWriteError as e:
                error = e
        if self._any_rank_failed(error is not None):
            raise error or ckpt.CheckpointWriteError(f"the final model was not written to {final!r}: rank 0 could "
                                                     "not write it (its error says why)")
        return final


class DistributedTimeout(RuntimeError):
    """A collective waited longer than ddp_timeout: the message names this rank and the step."""


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        return float("nan")


def _progress_bar(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="dpo", disable=not enabled or not sys.stderr, dynamic_ncols=True)


__all__ = ["DPOConfig", "DPOOutput", "DPOTrainer", "DistributedTimeout", "check_output_dir", "set_seed",
           "weights_fingerprint"]
