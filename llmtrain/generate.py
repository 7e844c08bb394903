"""`llmtrain generate`: continue prompts with a checkpoint, batched, with the full sampling controls.

Prompts come from `generate.prompt` (`-`: stdin), or `generate.prompt_file` (one per line, or JSONL
`{"prompt": ...}`). Every (prompt, sample) row has its own random stream, seeded from (seed, prompt,
sample), so what a row produces does not depend on the batch it was decoded in. Text streams to the
console as it is produced, decoded incrementally (a character split over byte pieces prints whole),
and stop strings are held back until they can be ruled out, so nothing past a stop is ever printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmtrain.config import Config
from llmtrain.errors import CheckpointError, DataError, UserError
from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer

REPLACEMENT = "\ufffd"  # what a byte piece decodes to until the rest of its character arrives


class TextStream:
    """The text of generated ids, given out as it becomes final.

    Each `feed(id)` returns the new text that can be printed: not a character still missing bytes,
    not a tail that may be the start of a stop string. `stopped` turns true when a stop string
    appears; `text` is then everything before it. `finish()` returns what was held back.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], context: Sequence[int] = (), stops: Sequence[str] = ()
    ):
        self._decode = decode
        self._context = list(context)  # decoded with the new ids, so spacing at the seam is right
        self._context_text = decode(self._context) if self._context else ""
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # the text so far, cut before a stop string
        self.emitted = 0  # characters of `text` given out
        self.stopped = False

    def _new_text(self) -> str:
        full = self._decode(self._context + self.ids)
        if full.startswith(self._context_text):
            return full[len(self._context_text) :]
        return self._decode(self.ids)  # the seam re-tokenized differently: decode on its own

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._new_text()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._emit(len(self.text))
        self.text = text
        safe = len(text.rstrip(REPLACEMENT))
        # the longest tail that could still grow into a stop string waits
        held = max((_overlap(text[:safe], stop) for stop in self.stops), default=0)
        return self._emit(safe - held)

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def finish(self) -> str:
        return self._emit(len(self.text))


def _overlap(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


@dataclass
class Prompt:
    where: str
    """The key or file:line it came from (named in errors)."""
    text: str


def read_prompts(cfg: Config) -> list[Prompt]:
    """The prompts `generate.prompt` / `generate.prompt_file` name; DataError naming the file and line."""
    g = cfg.generate
    if g.prompt_file:
        return _prompts_from_file(Path(g.prompt_file).expanduser())
    if g.prompt == "-":
        text = sys.stdin.read()
        return [Prompt("generate.prompt=- (stdin)", text[:-1] if text.endswith("\n") else text)]
    return [Prompt("generate.prompt", g.prompt)]


def _prompts_from_file(path: Path) -> list[Prompt]:
    key = f"generate.prompt_file={path}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{key}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{key}: unreadable ({type(err).__name__}: {err})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(f"{key}: the file holds no prompt")
    jsonl = all(line.lstrip().startswith("{") for _, line in numbered)
    prompts = []
    for n, line in numbered:
        where = f"{path}:{n}"
        if not jsonl:
            prompts.append(Prompt(where, line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'{where}: a JSONL prompt line must be an object with a string "prompt"')
        prompts.append(Prompt(where, record["prompt"]))
    return prompts


def prompt_ids(tokenizer, text: str) -> list[int]:
    """BOS (when the tokenizer has one) and the prompt's ids: how every training document starts."""
    return ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(text)


def row_generator(seed: int, prompt: int, sample: int) -> torch.Generator:
    """The random stream of one (prompt, sample) row: independent of batching and of the device."""
    import numpy as np

    state = np.random.SeedSequence(
        [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, prompt, sample]
    ).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Row:
    prompt: int
    sample: int
    ids: list[int]
    """BOS and the prompt's ids."""
    limit: int
    """New tokens at most."""


def generate_rows(
    model,
    tokenizer,
    rows: list[Row],
    params,
    *,
    seed: int,
    stops: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The continuation text of every row (decoded together), cut before the first stop string.

    `on_text(row, text)` receives each row's text as it becomes final (streaming).
    """
    from llmtrain.model.sampling import decode

    streams = [TextStream(tokenizer.decode, row.ids, stops) for row in rows]
    ends = set(stop_ids)

    def on_token(i: int, token: int) -> None:
        if token in ends:
            return
        piece = streams[i].feed(token)
        if piece and on_text is not None:
            on_text(i, piece)

    decode(
        model,
        [row.ids for row in rows],
        [row.limit for row in rows],
        params,
        rng=[row_generator(seed, row.prompt, row.sample) for row in rows],
        stop_ids=stop_ids,
        use_cache=use_cache,
        on_token=on_token,
        should_stop=(lambda i, _ids: streams[i].stopped) if stops else None,
    )
    texts = []
    for i, stream in enumerate(streams):
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(i, rest)
        texts.append(stream.text)
    return texts


def sampling_params(section):
    """SamplingParams from a `generate` or `chat` config section (validated at compose time)."""
    from llmtrain.model.sampling import SamplingParams

    top_p = section.top_p if section.top_p < 1 else None
    return SamplingParams(section.temperature, section.top_k or None, top_p, section.repetition_penalty)


def room_for(where: str, ids: list[int], max_new_tokens: int, max_seq_len: int) -> int:
    """New tokens a prompt leaves room for; a UserError naming `where` if none."""
    room = max_seq_len - len(ids)
    if room <= 0:
        raise UserError(
            f"{where}: prompt of {len(ids)} tokens leaves no room in model.max_seq_len={max_seq_len}"
        )
    return min(max_new_tokens, room)


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    num_samples: int = 1,
    seed: int = 0,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    use_cache: bool = True,
) -> list[str]:
    """Continuations of `prompt` (the prompt included), one per sample."""
    from llmtrain.model.sampling import SamplingParams

    ids = prompt_ids(tokenizer, prompt)
    limit = room_for("generate.prompt", ids, max_new_tokens, model.cfg.max_seq_len)
    rows = [Row(0, s, ids, limit) for s in range(num_samples)]
    params = SamplingParams(temperature, top_k or None, top_p, repetition_penalty)
    texts = generate_rows(
        model, tokenizer, rows, params, seed=seed, stops=stop, stop_ids=_ends(tokenizer), use_cache=use_cache
    )
    return [prompt + text for text in texts]


def _ends(tokenizer) -> tuple[int, ...]:
    return (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()


@dataclass
class Source:
    """A model ready to generate and its tokenizer, from a checkpoint or a Hugging Face export."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    name: str
    """What the output names it: `step_<N>`, or the export folder's name."""
    step: int


def load_source(cfg: Config, which: str | None, key: str) -> Source:
    """`which` (the value of `key`): a checkpoint or run folder (None: this run's newest), verified and
    consolidated, or a folder `llmtrain export` wrote (config.json + model.safetensors + tokenizer.model)."""
    folder = Path(which).expanduser() if which else None
    if folder is not None and (folder / "config.json").is_file():
        return _load_export(folder, f"{key}={which}")
    loaded = _load_quietly(cfg, which)
    tokenizer = load_matching_tokenizer(loaded)
    return Source(loaded.model, tokenizer, loaded.checkpoint, loaded.checkpoint.name, loaded.step)


def _load_quietly(cfg: Config, which: str | None):
    """`load_checkpoint_model` without DeepSpeed's narration of the consolidation on stderr (an error
    stays one line); our own warnings still pass."""
    import contextlib
    import io

    noise = io.StringIO()
    with contextlib.redirect_stderr(noise):
        loaded = load_checkpoint_model(cfg, which)
    for line in noise.getvalue().splitlines():
        if line.startswith("llmtrain") or "warning" in line.lower():
            print(line, file=sys.stderr)
    return loaded


def _load_export(folder: Path, where: str) -> Source:
    """Our model from a Hugging Face folder (safetensors only: nothing is unpickled) and its tokenizer."""
    from safetensors.torch import load_file

    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.inference import default_device
    from llmtrain.model import build_model
    from llmtrain.model.hf import from_hf

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"{where}: {weights.name} not found (a Hugging Face folder with safetensors weights)"
        )
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        state, model_cfg = from_hf(load_file(str(weights)), hf_config)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{where}: unreadable ({type(err).__name__}: {err})") from None
    except KeyError as err:
        raise CheckpointError(f"{where}: {weights.name} lacks tensor {err}") from None
    tokenizer = Tokenizer.load(folder / "tokenizer.model")
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer.model has {tokenizer.vocab_size} pieces, the model {model_cfg.vocab_size}"
        )
    model = build_model(model_cfg)
    model.load_state_dict(state)
    try:
        step = int(json.loads((folder / "llmtrain.json").read_text(encoding="utf-8")).get("step", 0))
    except (OSError, ValueError, AttributeError):
        step = 0  # not one of our exports
    return Source(model.to(default_device()).eval(), tokenizer, folder, folder.name, step)


def main(cfg: Config) -> int:
    g = cfg.generate
    prompts = read_prompts(cfg)  # before the model loads: a bad prompt file fails fast
    source = load_source(cfg, g.checkpoint, "generate.checkpoint")
    tokenizer = source.tokenizer
    max_len = source.model.cfg.max_seq_len
    rows = []
    for p, prompt in enumerate(prompts):  # every prompt checked before anything is printed
        ids = prompt_ids(tokenizer, prompt.text)
        if not ids:
            raise UserError(f"{prompt.where}: empty prompt, and the tokenizer has no BOS to start from")
        limit = room_for(prompt.where, ids, g.max_new_tokens, max_len)
        rows += [Row(p, s, ids, limit) for s in range(g.num_samples)]
    params = sampling_params(g)
    seed = cfg.run.seed if g.seed is None else g.seed
    stream = len(rows) == 1 if g.stream is None else g.stream
    # streaming prints one row at a time; the tokens are the same as in a batch
    size = 1 if stream else g.batch_size
    out = sys.stdout

    def header(row: Row) -> str:
        which = f"sample {row.sample + 1} of {g.num_samples}"
        if len(prompts) > 1:
            which = f"prompt {row.prompt + 1} of {len(prompts)}, {which}"
        return f"--- {which} (checkpoint {source.name}) ---"

    def write(_i: int, text: str) -> None:
        out.write(text)
        out.flush()

    for start in range(0, len(rows), size):
        batch = rows[start : start + size]
        if stream:
            print(header(batch[0]), flush=True)
            out.write(prompts[batch[0].prompt].text)
        texts = generate_rows(
            source.model,
            tokenizer,
            batch,
            params,
            seed=seed,
            stops=g.stop,
            stop_ids=_ends(tokenizer),
            use_cache=g.use_cache,
            on_text=write if stream else None,
        )
        for row, text in zip(batch, texts):
            if stream:
                out.write("\n")
            else:
                print(header(row))
                print(prompts[row.prompt].text + text)
        out.flush()
    return 0
