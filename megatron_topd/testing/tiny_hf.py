"""Tiny random Hugging Face causal LMs (Llama, Qwen2, Qwen3) and a BPE tokenizer, built offline at test time.

Why: tests and benchmarks need a real checkpoint directory that transformers, SGLang and the HF<->Megatron converters
all load, without downloading anything. A tokenizer is trained in well under a second on a generated corpus with
`tokenizers`; the model gets random weights from a fixed seed, so every build is identical.

    from megatron_topd.testing.tiny_hf import build_tiny_model
    model_dir = build_tiny_model(tmp_path / "llama", arch="llama")
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3")
_ARCH_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# "<|endoftext|>" doubles as pad and unk: transformers maps Qwen model types to Qwen2Tokenizer, which adds that
# token as unk when it is missing and would push the tokenizer one past the model's vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
# A minimal ChatML-style template, so prompt datasets can exercise `apply_chat_template` offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny model. Defaults: 2 layers, hidden 64, GQA 4/2 heads, vocab 1000 (about 0.2 M parameters)."""

    arch: str = "llama"
    vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    # Larger than HF's 0.02 so the random logits are peaked: greedy argmax is then far from ties, and an exact
    # token-for-token comparison between two implementations is a meaningful test rather than a coin toss.
    initializer_range: float = 0.25
    seed: int = 0


def _corpus(n_lines: int, seed: int) -> list[str]:
    """Deterministic pseudo-text: syllable words, digits and punctuation, enough for a 1000-token BPE vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ing", "er", "ly", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
    words += ["the", "a", "of", "and", "to", "is", "in", "what", "sum", "prove", "find", "x", "y", "n"]
    lines = []
    for _ in range(n_lines):
        toks = [rng.choice(words) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 999)))
        lines.append(" ".join(toks) + rng.choice([".", "?", "!", ",", ":", " =", ""]))
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer with exactly `vocab_size` tokens and save it (HF format) to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training produced {tok.get_vocab_size()} tokens, wanted {vocab_size}: enlarge _corpus")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        unk_token=SPECIAL_TOKENS[PAD_ID],
        additional_special_tokens=list(SPECIAL_TOKENS[IM_START_ID:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def _hf_config(spec: TinySpec):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":  # q/k/v projections carry biases
        return Qwen2Config(**common)
    if spec.arch == "qwen3":  # per-head RMSNorm on q and k, explicit head_dim
        return Qwen3Config(head_dim=spec.hidden_size // spec.num_heads, **common)
    raise ValueError(f"TinySpec.arch={spec.arch!r}: choose one of {ARCHS}")


def random_state_dict(spec: TinySpec, seed: int | None = None) -> dict[str, torch.Tensor]:
    """HF-named float32 weights of a fresh random model (norm weights randomised too, so every tensor matters)."""
    from transformers import AutoModelForCausalLM

    seed = spec.seed if seed is None else seed
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(spec), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer of a tiny random model."""
    from safetensors.torch import save_file

    spec = replace(TinySpec(arch=arch, seed=seed), **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _hf_config(spec)
    config.dtype = "float32"
    config.architectures = [_ARCH_CLASSES[spec.arch]]  # SGLang picks its model class from this
    config.save_pretrained(out)
    state = random_state_dict(spec)
    if spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False})
    )
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    build_tokenizer(out, spec.vocab_size, seed)
    return out


def load_spec(model_dir: str | Path) -> TinySpec:
    """The TinySpec a directory was built from."""
    return TinySpec(**json.loads((Path(model_dir) / "tiny_spec.json").read_text()))


def load_hf_model(model_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None):
    """The model as transformers loads it (float32, eval), optionally with other weights put in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise ValueError(f"state_dict does not fit {model_dir}: missing={missing} unexpected={unexpected}")
    return model.eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int | None = EOS_ID):
    """Reference greedy decoding with transformers (full recompute per step): (new ids, their log-probs)."""
    ids, lps = list(prompt), []
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
        nxt = int(logp.argmax())
        ids.append(nxt)
        lps.append(float(logp[nxt]))
        if nxt == eos_id:
            break
    return ids[len(prompt):], lps


@torch.no_grad()
def hf_token_logprobs(model, seq: list[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary at every position of `seq` ([len(seq), V], float64): row t predicts token t+1."""
    return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
