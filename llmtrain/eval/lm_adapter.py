"""Our model as an lm-evaluation-harness language model, so every lm-eval task runs on it.

`LlmtrainLM` implements lm-eval's three requests on any `forward(ids (B, T)) -> logits (B, T, V)`:
- `loglikelihood`: log P(continuation | context) and whether greedy decoding would produce it;
- `loglikelihood_rolling`: the whole text's log-likelihood in lm-eval's disjoint windows (perplexity);
- `generate_until`: greedy decoding until a stop string or EOS, on the KV cache of a plain model
  (`kv_greedy`), or by full forwards through the training backend during training (`forward_greedy`).

Every request starts with EOS, the document separator the shards put before each document, and a
context longer than model.max_seq_len loses its oldest tokens (left truncation, as lm-eval's own
Hugging Face model does). With `collective=True` (in-loop evaluation on several ranks) lm-eval hands
each rank its share of the documents; every rank then runs the same number of forwards (padded with
one-token dummies), which ZeRO-3's parameter gathering needs.

This module imports lm_eval at the top: import it through `llmtrain.eval.tasks.require_lm_eval()`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmtrain.errors import UserError
from llmtrain.eval.decode import forward_greedy, kv_greedy

log = logging.getLogger(__name__)

Request = tuple[tuple[str | None, str | None], list[int], list[int]]


class LlmtrainLM(TemplateLM):
    """lm-eval's `LM` over our model. Build it with `from_model` (a plain model, KV-cache decoding) or
    `from_backend` (the training engine, during training)."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        tokenizer,
        *,
        max_length: int,
        vocab_size: int,
        device: torch.device,
        batch_size: int = 8,
        max_gen_toks: int = 256,
        kv_model: torch.nn.Module | None = None,
        collective: bool = False,
    ):
        super().__init__()
        self._forward = forward
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size
        self._device = device
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.kv_model = kv_model
        self.collective = collective
        self.forwards = 0  # forward passes so far (tests check ranks agree)
        if collective:
            import torch.distributed as dist

            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self._warned_sampling = False

    @classmethod
    def from_model(cls, model, tokenizer, *, batch_size: int = 8, max_gen_toks: int = 256) -> LlmtrainLM:
        """A plain `Transformer` in eval mode (e.g. `llmtrain.inference.load_checkpoint_model`'s)."""
        return cls(
            model,
            tokenizer,
            max_length=model.cfg.max_seq_len,
            vocab_size=model.vocab_size,
            device=model.tok_emb.weight.device,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
            kv_model=model,
        )

    @classmethod
    def from_backend(
        cls, backend, model_cfg, tokenizer, device, *, batch_size: int = 8, max_gen_toks: int = 256
    ) -> LlmtrainLM:
        """The training backend: `backend(ids, None, None)` returns logits (ZeRO-3 gathers inside)."""
        import torch.distributed as dist

        collective = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return cls(
            lambda ids: backend(ids, None, None),
            tokenizer,
            max_length=model_cfg.max_seq_len,
            vocab_size=model_cfg.vocab_size,
            device=device,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
            collective=collective,
        )

    # -- tokenization (lm-eval's TemplateLM contract) ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id  # what preceded every document in the shards

    @property
    def tokenizer_name(self) -> str:
        return f"llmtrain-{self.tokenizer.hash[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.prefix_token_id, *ids]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- forwards, kept in step across ranks when collective -----------------------------------------

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        with torch.no_grad():
            return self._forward(ids)[..., : self.vocab_size].float()

    def _agree_max(self, value: int) -> int:
        """The largest `value` over the ranks (itself when not collective)."""
        if not self.collective:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _dummy_forward(self) -> None:
        self._logits(torch.full((1, 1), self.prefix_token_id, dtype=torch.long, device=self._device))

    # -- loglikelihood ------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs):
        """(sum of continuation log-probs, continuation is the greedy one) per request, in order."""
        rows = []
        for index, ((_, continuation), ctx_enc, cont_enc) in enumerate(requests):
            if len(cont_enc) > self.max_length:
                raise UserError(
                    f"a continuation of {len(cont_enc)} tokens does not fit model.max_seq_len="
                    f"{self.max_length}: {(continuation or '')[:60]!r}"
                )
            whole = (ctx_enc + cont_enc)[-(self.max_length + 1) :]  # left truncation, as lm-eval's HFLM
            rows.append((index, whole[:-1], cont_enc))
        rows.sort(key=lambda r: -len(r[1]))  # longest first: less padding, any OOM comes at once
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for batch in batches:
            width = len(batch[0][1])
            ids = torch.full((len(batch), width), self.prefix_token_id, dtype=torch.long)
            for row, (_, inp, _) in enumerate(batch):
                ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = self._logits(ids.to(self._device))  # (B, T, V)
            for row, (index, inp, cont) in enumerate(batch):
                if not cont:
                    results[index] = (0.0, True)
                    continue
                end = len(inp)
                # fp64: a sum over many tokens keeps 1e-5 against a direct computation
                logprobs = F.log_softmax(logits[row, end - len(cont) : end].double(), dim=-1)  # (n, V)
                target = torch.tensor(cont, device=logprobs.device)
                score = logprobs.gather(1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results[index] = (score, greedy)
                (context, continuation) = requests[index][0]
                if context is not None:
                    self.cache_hook.add_partial("loglikelihood", (context, continuation), (score, greedy))
        for _ in range(self._agree_max(len(batches)) - len(batches)):
            self._dummy_forward()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text scored whole, in lm-eval's disjoint windows of at most max_length tokens."""
        windows: list[Request] = []
        owner: list[int] = []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            rolling = get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, rolling):
                windows.append(((None, None), ctx, cont))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, scores, strict=True):
            totals[index] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (`until`) or EOS; batched by settings."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(index)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            first = requests[indices[0]]
            kwargs = normalize_gen_kwargs(dict(first.args[1]), self.max_gen_toks)
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("llmtrain: generate_until decodes greedily; do_sample/temperature are ignored")
                self._warned_sampling = True
            until = [u for u in kwargs["until"] if u]
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self.max_length:
                raise UserError(
                    f"task {first.task_name}: generation_kwargs.max_gen_toks={max_new} leaves no room for "
                    f"a prompt in model.max_seq_len={self.max_length}"
                )
            prompts = {
                i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in indices
            }
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            for batch in batches:
                texts = self._generate([prompts[i] for i in batch], max_new, until)
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            for _ in range(self._agree_max(len(batches)) - len(batches)):
                self._generate([[self.prefix_token_id]], max_new, until, dummy=True)
        return results

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], dummy: bool = False):
        eos = self.tokenizer.eos_id

        def text_of(row: int, tokens: list[int]) -> str:
            return self._continuation_text(prompts[row], [t for t in tokens if t != eos])

        def stop(row: int, tokens: list[int]) -> bool:
            if dummy or tokens[-1] == eos:
                return True
            return bool(until) and any(u in text_of(row, tokens) for u in until)

        if self.kv_model is not None and not self.collective:
            outs = kv_greedy(self.kv_model, prompts, max_new, stop, pad_id=eos)
            self.forwards += len(outs[0]) if outs else 0
        else:
            max_new = self._agree_max(max_new)
            outs = forward_greedy(
                self._logits,
                prompts,
                max_new,
                stop,
                pad_id=eos,
                device=self._device,
                vocab_size=self.vocab_size,
                agree=self._all_finished if self.collective else None,
            )
        texts = []
        for row, tokens in enumerate(outs):
            text = text_of(row, tokens)
            for term in until:  # lm-eval's rule: the text before the first stop string
                text = text.split(term)[0]
            texts.append(text)
        return texts

    def _all_finished(self, finished: bool) -> bool:
        return self._agree_max(0 if finished else 1) == 0

    def _continuation_text(self, prompt: list[int], tokens: list[int]) -> str:
        """The text the tokens add after the prompt, leading space included (sentencepiece drops the
        space of a text's first piece, so decode after the prompt's last token and cut it off)."""
        anchor = prompt[-1:] if prompt and prompt[-1] != self.tokenizer.eos_id else []
        head = self.tokenizer.decode(anchor) if anchor else ""
        whole = self.tokenizer.decode(anchor + tokens)
        return whole[len(head) :] if whole.startswith(head) else self.tokenizer.decode(tokens)

    # -- ranks (lm-eval's evaluator calls these when world_size > 1) ---------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.collective:
            return tensor
        import torch.distributed as dist

        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if not self.collective:
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self._world_size
        dist.all_gather_object(gathered, obj)
        return gathered if self._rank == dst else None

    def barrier(self) -> None:
        if self.collective:
            import torch.distributed as dist

            dist.barrier()

    def get_model_info(self) -> dict:
        return {"model_max_length": self.max_length, "tokenizer_hash": self.tokenizer.hash}
